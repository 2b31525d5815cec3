"""Merging a step's metrics across micro-batches and data-parallel ranks, on the device."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from titan_rl.rl.losses import KEPT_COUNTS, OVER_KEPT_TOKENS

BALANCE_METRIC = "router/balance_loss"  # rl.router_aux_loss_coef's term, before its weight
SUMMED = (BALANCE_METRIC,)  # micro-batch metrics already over the minibatch's counts: they add up


@dataclass
class StepStats:
    """Merges per-micro-batch metrics on the device: sums, token-weighted means, min / max. Nothing
    is read on the host until ``result``, once per step. A mean over the tokens the loss kept
    (``OVER_KEPT_TOKENS``; fewer than the trained ones only with MIS) is weighted by their count."""

    tokens: float = 0.0
    loss: torch.Tensor | float = 0.0
    kept: torch.Tensor | float = 0.0  # tokens the loss kept
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    mins: dict[str, torch.Tensor] = field(default_factory=dict)
    maxs: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, metrics: dict[str, torch.Tensor], tokens: int) -> None:
        """One micro-batch's ``rl_loss`` metrics over its ``tokens`` trained tokens (its loss goes in
        with ``add_loss``: the trainer adds a minibatch's once it is rescaled)."""
        self.tokens += tokens
        kept = metrics.get("kept/tokens")
        kept = float(tokens) if kept is None else torch.as_tensor(kept).detach().double()
        self.kept = self.kept + kept
        for key, value in metrics.items():
            if key in KEPT_COUNTS or key == "loss":
                continue
            v = torch.as_tensor(value).detach().double()
            if key in SUMMED:  # already normalized by the minibatch's counts: the parts add up
                self.sums[key] = self.sums.get(key, 0.0) + v
            elif key.endswith(("/min", "_min")):
                self.mins[key] = torch.minimum(self.mins[key], v) if key in self.mins else v
            elif key.endswith(("/max", "_max")):  # ratio/max, mismatch/logp_abs_max
                self.maxs[key] = torch.maximum(self.maxs[key], v) if key in self.maxs else v
            else:
                self.sums[key] = self.sums.get(key, 0.0) + v * (kept if key in OVER_KEPT_TOKENS else tokens)

    def add_loss(self, loss: torch.Tensor) -> None:
        self.loss = self.loss + loss.detach().double()

    def all_reduce(self, group, device: torch.device | str = "cpu") -> None:
        """Combine the data-parallel ranks' stats (sums add, mins / maxs reduce) on ``device``."""
        keys = sorted(self.sums)
        sums = self._stack([self.loss, self.tokens, self.kept, *(self.sums[k] for k in keys)], device)
        torch.distributed.all_reduce(sums, group=group)
        self.loss, self.tokens, self.kept = sums[0], float(sums[1]), sums[2]
        self.sums = dict(zip(keys, sums[3:]))
        for values, op in (
            (self.mins, torch.distributed.ReduceOp.MIN),
            (self.maxs, torch.distributed.ReduceOp.MAX),
        ):
            names = sorted(values)
            t = self._stack([values[k] for k in names], device)
            torch.distributed.all_reduce(t, op=op, group=group)
            values.update(zip(names, t))

    @staticmethod
    def _stack(values: list, device: torch.device | str) -> torch.Tensor:
        return torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])

    def result(self) -> dict[str, float]:
        """The merged metrics as floats: the step's one read from the device."""
        keys = sorted(self.sums)
        extremes = {**self.mins, **self.maxs}
        names = ["loss", "kept", *keys, *extremes]
        device = next((v.device for v in (*self.sums.values(), *extremes.values())), "cpu")
        values = self._stack(
            [self.loss, self.kept, *(self.sums[k] for k in keys), *extremes.values()], device
        )
        out = dict(zip(names, values.tolist()))
        kept = out.pop("kept")
        for k in keys:
            if k not in SUMMED:
                out[k] /= max(kept if k in OVER_KEPT_TOKENS else self.tokens, 1.0)
        for k in self.mins:  # still the identity: no token was trained (or all were rejected)
            out[k] = math.nan if out[k] == math.inf else out[k]
        for k in self.maxs:
            out[k] = math.nan if out[k] == -math.inf else out[k]
        return out

"""The trainer: one RL step over a packed rollout batch (the unified forward lives here).

On-policy (one optimizer step per rollout batch) the grad forward's own log-probs, detached, are
the old log-probs: the importance ratio is exactly 1 and MoE routing cannot drift between passes.
With several minibatches, one no-grad pass over the whole batch records old log-probs and each
token's experts first, and the grad passes replay those experts (``rl.routing_replay``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from titan_rl.config import JobConfig
from titan_rl.model import GptOss, token_logprobs_and_entropy
from titan_rl.parallel import ParallelConfig, ParallelDims, clip_grad_norm_, parallelize_gpt_oss
from titan_rl.rl.losses import LossConfig, rl_loss
from titan_rl.rl.packing import PackedBatch


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: JobConfig, total_steps: int):
    sched = cfg.lr_scheduler

    def factor(step: int) -> float:  # step = optimizer steps taken so far
        if step < sched.warmup_steps:
            return (step + 1) / sched.warmup_steps
        if sched.decay == "constant":
            return 1.0
        progress = (step - sched.warmup_steps) / max(1, total_steps - sched.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return sched.min_lr_ratio + (1 - sched.min_lr_ratio) * cosine

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def loss_config(cfg: JobConfig) -> LossConfig:
    rl = cfg.rl
    return LossConfig(
        policy_loss=rl.policy_loss,
        clip_eps_low=rl.clip_eps_low,
        clip_eps_high=rl.clip_eps_high,
        dual_clip=rl.dual_clip or None,
        gspo_eps_low=rl.gspo_eps_low,
        gspo_eps_high=rl.gspo_eps_high,
        aggregation=rl.aggregation,
        norm_constant=float(cfg.rollout.max_new_tokens),
        kl_coef=rl.kl_coef,
        kl_estimator=rl.kl_estimator,
        entropy_coef=rl.entropy_coef,
        correction=rl.correction,
        correction_level=rl.correction_level,
        correction_threshold=rl.correction_threshold,
    )


@dataclass
class StepStats:
    """Merges per-micro-batch metrics: sums, token-weighted means, min / max."""

    tokens: float = 0.0
    sums: dict[str, float] = field(default_factory=dict)
    mins: dict[str, float] = field(default_factory=dict)
    maxs: dict[str, float] = field(default_factory=dict)
    loss: float = 0.0

    def add(self, loss: torch.Tensor, metrics: dict[str, torch.Tensor], tokens: int) -> None:
        self.loss += loss.item()
        self.tokens += tokens
        for key, value in metrics.items():
            v = float(value)
            if key.endswith("/min"):
                self.mins[key] = min(self.mins.get(key, v), v)
            elif key.endswith("/max"):
                self.maxs[key] = max(self.maxs.get(key, v), v)
            elif key != "loss":
                self.sums[key] = self.sums.get(key, 0.0) + v * tokens

    def all_reduce(self, group, device: torch.device | str = "cpu") -> None:
        """Combine the data-parallel ranks' stats (sums add, mins / maxs reduce) on ``device``."""
        keys = sorted(self.sums)
        values = [self.loss, self.tokens, *(self.sums[k] for k in keys)]
        sums = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(sums, group=group)
        self.loss, self.tokens = float(sums[0]), float(sums[1])
        self.sums = {k: float(v) for k, v in zip(keys, sums[2:])}
        for values, op in (
            (self.mins, torch.distributed.ReduceOp.MIN),
            (self.maxs, torch.distributed.ReduceOp.MAX),
        ):
            names = sorted(values)
            t = torch.tensor([values[k] for k in names], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(t, op=op, group=group)
            values.update({k: float(v) for k, v in zip(names, t)})

    def result(self) -> dict[str, float]:
        means = {k: v / max(self.tokens, 1.0) for k, v in self.sums.items()}
        return {"loss": self.loss, **means, **self.mins, **self.maxs}


class Trainer:
    """Owns the policy, the optional frozen reference and the optimizer; runs one RL step."""

    def __init__(
        self,
        model: GptOss,
        cfg: JobConfig,
        dims: ParallelDims | None = None,
        materialize: Callable[[GptOss], None] | None = None,
    ) -> None:
        """``materialize`` fills a model built on the meta device, after it is sharded (so each rank
        allocates only its shards) and before the optimizer sees its parameters."""
        self.model, self.cfg = model, cfg
        self.dims = dims or ParallelDims.from_config(cfg.parallelism, 1)
        self.loss_cfg = loss_config(cfg)
        self.reference = None
        if cfg.rl.kl_coef > 0:
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        if self.dims.distributed or cfg.parallelism.activation_checkpoint != "none":
            # every rank runs the same rollouts and trains on its share of the rows (see train_step)
            parallelize_gpt_oss(model, self.dims, ParallelConfig(cfg.parallelism.activation_checkpoint))
            if self.reference is not None:  # no grad: nothing to recompute
                parallelize_gpt_oss(self.reference, self.dims)
        if materialize is not None:
            for module in (model, self.reference):
                if module is not None:
                    materialize(module)
        self.device = next(model.parameters()).device  # batches and collectives go there
        opt = cfg.optimizer
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay
        )
        total_optimizer_steps = cfg.training.steps * cfg.training.minibatches
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg, total_optimizer_steps)
        self.consecutive_skips = 0
        self.skipped_steps = 0

    def _logprobs(self, model: GptOss, mb: PackedBatch, expert_indices=None, record: bool = False):
        """Log-probs and entropy of the trained positions of ``mb`` (+ routing when recording)."""
        out = model(
            mb.tokens,
            positions=mb.positions,
            document_ids=mb.document_ids,
            return_hidden=True,
            expert_indices=expert_indices,
            return_expert_indices=record,
        )
        hidden, experts = out if record else (out, None)
        sel = mb.target_mask
        logprobs, entropy = token_logprobs_and_entropy(
            hidden[sel], model.lm_head.weight, mb.targets[sel], self.cfg.rollout.temperature
        )
        return logprobs, entropy, experts

    def _local_rows(self, batch: PackedBatch) -> PackedBatch:
        """This data-parallel rank's rows (r, r + dp, ...), padded so every rank has as many, on
        the model's device."""
        if self.dims.distributed:
            dp, rank = self.dims.dp, self.dims.get_mesh("dp").get_local_rank()
            batch = batch.padded_rows(-(-batch.num_rows // dp) * dp).rows(slice(rank, None, dp))
        return batch if self.device.type == "cpu" else batch.map(lambda t: t.to(self.device))

    def _global_counts(self, minibatch: PackedBatch) -> tuple[float, float]:
        """Trained tokens and trajectories of this minibatch summed over data-parallel ranks."""
        mask = minibatch.target_mask
        counts = torch.tensor(
            [float(mask.sum()), float(minibatch.seq_ids[mask].unique().numel())], device=self.device
        )
        if self.dims.distributed:
            torch.distributed.all_reduce(counts, group=self.dims.get_mesh("dp").get_group())
        return float(counts[0]), float(counts[1])

    def _micro_batches(self, batch: PackedBatch) -> list[PackedBatch]:
        """Micro-batches of rows; with context parallelism each is this rank's sequence shard."""
        size = self.cfg.training.micro_batch_rows
        micro = [batch.rows(slice(i, i + size)) for i in range(0, batch.num_rows, size)]
        if self.dims.cp_enabled:
            from titan_rl.parallel.context_parallel import shard_sequence

            cp_mesh, mode = self.dims.get_mesh("cp"), self.dims.cp_mode
            micro = [mb.map(lambda t: shard_sequence(t, cp_mesh, mode, dim=1)) for mb in micro]
        return micro

    def train_step(self, batch: PackedBatch, num_seqs: int) -> dict[str, float]:
        """All optimizer steps for one rollout batch; returns the merged metrics."""
        cfg = self.cfg
        batch = self._local_rows(batch)
        rows = torch.arange(batch.num_rows)
        minibatches = [
            batch.rows(r) for r in rows.tensor_split(min(cfg.training.minibatches, batch.num_rows))
        ]
        unified = cfg.rl.old_logprob_mode == "unified"
        needs_old_pass = not unified or len(minibatches) > 1
        replay = unified and cfg.rl.routing_replay and len(minibatches) > 1
        stats = StepStats()
        grad_norms = []
        lr = self.lr_scheduler.get_last_lr()[0]  # the rate this step's updates use
        # Old (and reference) log-probs of every minibatch come from the policy that sampled the
        # batch, i.e. before any update; the experts they used are recorded for replay.
        old, routing, ref = {}, {}, {}
        with torch.no_grad():
            for m, minibatch in enumerate(minibatches):
                for i, mb in enumerate(self._micro_batches(minibatch)):
                    if not unified:  # the two-forward failure: an inference-style pass per trajectory
                        old[m, i] = torch.cat([self._logprobs(self.model, doc)[0] for doc in mb.documents()])
                    elif needs_old_pass:
                        old[m, i], _, routing[m, i] = self._logprobs(self.model, mb, record=replay)
                    if self.reference is not None:
                        ref[m, i] = self._logprobs(self.reference, mb)[0]
        for m, minibatch in enumerate(minibatches):
            micro = self._micro_batches(minibatch)
            global_tokens, global_seqs = self._global_counts(minibatch)
            self.optimizer.zero_grad(set_to_none=True)
            for i, mb in enumerate(micro):
                if not mb.target_mask.any() and not self.dims.distributed:
                    continue  # (with FSDP every rank must run the same forwards, even empty ones)
                logprobs, entropy, _ = self._logprobs(
                    self.model, mb, expert_indices=routing[m, i] if replay else None
                )
                old_logprobs = old[m, i] if needs_old_pass else logprobs.detach()
                sel = mb.target_mask
                loss, metrics = rl_loss(
                    logprobs,
                    old_logprobs,
                    mb.rollout_logprobs[sel],
                    mb.advantages[sel],
                    torch.ones_like(logprobs),
                    mb.seq_ids[sel],
                    num_seqs,
                    self.loss_cfg,
                    entropy=entropy,
                    ref_logprobs=ref.get((m, i)),
                    global_tokens=global_tokens,
                    global_seqs=global_seqs,
                )
                loss.backward()
                stats.add(loss.detach(), metrics, int(sel.sum()))
            grad_norms.append(self._optimizer_step())
        if self.dims.distributed:
            stats.all_reduce(self.dims.get_mesh("dp_cp").get_group(), self.device)
        result = stats.result()
        result["grad_norm"] = max(grad_norms)
        result["lr"] = lr
        result["train/skipped_steps"] = self.skipped_steps
        return result

    def sft_step(self, batch: PackedBatch, optimizer: torch.optim.Optimizer) -> float:
        """One supervised step: mean negative log-likelihood of the demonstrations' trained tokens."""
        optimizer.zero_grad(set_to_none=True)
        batch = self._local_rows(batch)
        tokens, _ = self._global_counts(batch)
        total = 0.0
        for mb in self._micro_batches(batch):
            logprobs, _, _ = self._logprobs(self.model, mb)
            loss = -logprobs.sum() / tokens
            loss.backward()
            total += loss.item()
        if self.dims.distributed:  # each rank holds its share of the loss: the loss is their sum
            summed = torch.tensor(total, dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(summed, group=self.dims.get_mesh("dp_cp").get_group())
            total = float(summed)
        clip = self.cfg.training.grad_clip
        clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
        optimizer.step()
        return total

    def _optimizer_step(self) -> float:
        clip = self.cfg.training.grad_clip
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            self.consecutive_skips += 1
            return float(grad_norm)
        self.consecutive_skips = 0
        self.optimizer.step()
        self.lr_scheduler.step()
        return float(grad_norm)

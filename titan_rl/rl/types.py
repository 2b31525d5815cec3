"""The trajectory: what the rollout side hands the trainer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Trajectory:
    """One episode as a single token sequence.

    ``loss_mask[t]`` is 1 on tokens the policy sampled (trained), 0 on prompt / environment text;
    ``rollout_logprobs[t]`` is the engine's log-prob of token t (0 where the mask is 0);
    ``routing`` (with ``rl.rollout_routing_replay``): the experts the engine chose at each position,
    int16 ``[len(tokens), layers, top_k]``, -1 where nothing was recorded (``titan_rl.rl.routing_replay``).
    """

    tokens: list[int]
    loss_mask: list[int]
    rollout_logprobs: list[float]
    reward: float
    group: int  # trajectories of the same prompt share a group (the advantage baseline)
    turns: int = 1
    tool_calls: int = 0
    tool_errors: int = 0
    routing: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not (len(self.tokens) == len(self.loss_mask) == len(self.rollout_logprobs)):
            raise ValueError(
                f"trajectory fields differ in length: tokens {len(self.tokens)}, loss_mask "
                f"{len(self.loss_mask)}, rollout_logprobs {len(self.rollout_logprobs)}"
            )
        if self.routing is not None and self.routing.shape[0] != len(self.tokens):
            raise ValueError(
                f"trajectory routing covers {self.routing.shape[0]} positions, tokens {len(self.tokens)}"
            )
        if self.loss_mask and self.loss_mask[0]:
            raise ValueError("the first token of a trajectory cannot be trained (nothing predicts it)")

    @property
    def response_len(self) -> int:
        return sum(self.loss_mask)

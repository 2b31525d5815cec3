"""The environment protocol the trainer talks to (single-turn until the agent loop lands)."""

from __future__ import annotations

from typing import Protocol


class Environment(Protocol):
    def prompts(self, step: int, count: int) -> list[list[int]]:
        """``count`` prompts (token ids) for RL step ``step``; deterministic given the step."""
        ...

    def reward(self, prompt: list[int], response: list[int]) -> float:
        """Score one sampled response to ``prompt`` (on a worker thread under env.reward_timeout_s,
        env.reward_concurrency at once: thread-safe when that is above 1)."""
        ...

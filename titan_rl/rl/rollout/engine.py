"""What the trainer asks of a rollout engine (``NativeEngine``, ``VllmEngine``): the whole interface.

Per training step ``train.py`` calls ``wake_up``, then ``generate`` (once, or once per turn of an
agent loop), then ``sleep`` while it trains, then ``update_weights`` after the optimizer step. A
checkpoint stores ``rng_state()``; a resumed run hands it back to ``set_rng_state``. The trainer
uses nothing else, so a third engine that implements these methods plugs in unchanged. In a
torchrun job every rank calls every method, in the same order (an engine may run collectives).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from titan_rl.rl.rollout.native import Completion
    from titan_rl.rl.rollout.sampling import SamplingParams


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """One completion per prompt (token ids in, token ids and their log-probs out), in prompt
        order; every rank returns the same list. Wakes the engine first if it is asleep. An engine
        that records routing (``rl.rollout_routing_replay``) fills ``Completion.routing``: the
        experts it ran at every position of prompt + completion[:-1] (``titan_rl.rl.routing_replay``)."""
        ...

    def update_weights(self, model: torch.nn.Module) -> None:
        """Sample from ``model``'s current weights from the next ``generate`` on (called after each
        optimizer step; may gather sharded weights, so every rank calls it)."""
        ...

    def sleep(self) -> None:
        """Release the device memory generation holds (KV cache, the engine's copy of the weights)
        while the trainer runs its step; a no-op for an engine that holds none between calls."""
        ...

    def wake_up(self) -> None:
        """Take back what ``sleep`` released, with the current weights, ready to ``generate``."""
        ...

    def rng_state(self) -> Any | None:
        """The sampler's random state for a checkpoint (picklable), or None where the engine cannot
        read it back (then a resumed run draws different samples than an uninterrupted one)."""
        ...

    def set_rng_state(self, state: Any) -> None:
        """Continue sampling from ``state``, a value ``rng_state`` returned (possibly in a run that
        was interrupted), so that the resumed run samples what the uninterrupted one would have."""
        ...

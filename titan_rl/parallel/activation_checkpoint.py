"""Activation checkpointing per transformer block.

Modes:
  none       keep every activation (fastest, most memory).
  full       every block keeps only its inputs; its activations are recomputed in backward.
  selective  every ``every``-th block (0, every, 2 * every, ...) is checkpointed, the others keep
             their activations: with every=2 about half the activation memory of ``none`` for about
             half the recompute of ``full``.

A checkpointed block recomputes its forward once during backward, collectives included (the expert
all_to_alls run again with the same splits; FSDP re-gathers parameters it had resharded). The
block's own ``forward`` is wrapped in place, so module structure and parameter names
(``layers.0.self_attn.q_proj.weight``) do not change and ``fully_shard`` hooks stay outside the
recomputed region.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from titan_rl.model.model import GptOss

AC_MODES = ("none", "full", "selective")


def checkpoint_module(module: nn.Module) -> None:
    """Make ``module(...)`` recompute its forward in backward instead of storing activations."""
    if getattr(module, "_titan_rl_checkpointed", False):
        raise RuntimeError(f"{type(module).__name__} is already activation-checkpointed")
    forward: Callable[..., Any] = module.forward

    @functools.wraps(forward)
    def checkpointed_forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            # nothing to recompute without a backward; and checkpoint() would save the RNG state,
            # which on CUDA cannot be read while a graph is captured (the engine's cuda_graph decode)
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    module.forward = checkpointed_forward
    module._titan_rl_checkpointed = True


def apply_activation_checkpointing(model: GptOss, mode: str, every: int = 2) -> None:
    """Checkpoint ``model.layers`` by ``mode`` (see the module docstring)."""
    if mode not in AC_MODES:
        raise ValueError(f"activation_checkpoint = {mode!r} is not one of {', '.join(AC_MODES)}")
    if mode == "selective" and every < 1:
        raise ValueError(f"selective activation checkpointing needs every >= 1, got {every}")
    for index, block in enumerate(model.layers):
        if mode == "full" or (mode == "selective" and index % every == 0):
            checkpoint_module(block)

"""Rollout routing replay: the trainer's forward uses the experts the rollout engine chose.

In bf16 the engine's forward (decode steps against a KV cache, other batch shapes) and the trainer's
packed forward round router logits differently, and where two experts' logits nearly tie a token
goes to different experts in the two. Such a flip moves that token's log-prob far more than
rounding does: on the CPU benchmark model it carries over half of the mean engine / trainer
difference and all of its large values (benchmarks/README.md). With ``rl.rollout_routing_replay``
the native engine records every position's experts per MoE layer (``NativeEngine(record_routing=
True)``), each trajectory carries them, and the trainer's forward replays them: the router's
weights are still recomputed from the trainer's own logits at those experts, so the router trains
(the routing-replay idea of "Stabilizing MoE Reinforcement Learning by Aligning Training and
Inference Routers", Ma et al. 2025, arXiv:2510.11370).

A routing is an int16 tensor ``[positions, layers, top_k]``; -1 (``moe.UNROUTED``) marks a position
with nothing recorded, where the trainer routes on its own: a token the engine drew but never fed
(the last one of a turn cut at ``max_new_tokens``), environment text appended after the last turn.

Multi-turn episodes prompt the engine with the whole episode each turn, so earlier positions are
routed again by the next turn's prefill. A position keeps the routing of the first call that ran it:
the one under which the engine computed the log-probs of the tokens sampled there.
"""

from __future__ import annotations

import torch

from titan_rl.model.moe import UNROUTED


def extend_routing(known: torch.Tensor | None, recorded: torch.Tensor | None) -> torch.Tensor | None:
    """An episode's routing ``known`` (positions 0..) after a call that recorded ``recorded`` for
    positions 0.. of its prompt + completion: positions already known keep their experts, the
    others take the call's. None stays None on either side."""
    if recorded is None:
        return known
    if known is None:
        return recorded.clone()
    n = min(len(known), len(recorded))
    head = torch.where(known[:n] == UNROUTED, recorded[:n], known[:n])
    return torch.cat([head, known[n:], recorded[n:]])


def routing_to_length(routing: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """``routing`` cut or padded (-1: route yourself) to ``length`` positions."""
    if routing is None or len(routing) == length:
        return routing
    if len(routing) > length:
        return routing[:length]
    pad = routing.new_full((length - len(routing), *routing.shape[1:]), UNROUTED)
    return torch.cat([routing, pad])

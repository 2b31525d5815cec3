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

A routing is an int16 tensor ``[positions, layers, top_k]``. An engine call reports the routing of
prompt + completion[:-1]: the tokens it ran to sample the ones after them (``Completion.routing``;
vLLM's ``routed_experts`` has the same layout). -1 (``moe.UNROUTED``) marks a position with nothing
recorded, where the trainer routes on its own: an episode's last token.

Multi-turn episodes prompt the engine with the whole episode each turn, so earlier positions are
routed again by the next turn's prefill. A position keeps the routing of the first call that ran
it: for a turn's tokens, the call that sampled them (its log-probs came from that routing); a turn's
last token and the environment's reply first run in the next call, the one they condition.
The next call's log-probs saw the prefix through its own prefill, which may have routed an earlier
position differently; that rare case keeps the earlier call's experts.
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


def pad_routing(routing: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """``routing`` padded with -1 (route yourself) to ``length`` positions."""
    if routing is None or len(routing) == length:
        return routing
    if len(routing) > length:  # a misaligned routing: it would replay experts at the wrong tokens
        raise ValueError(f"a routing of {len(routing)} positions for {length} tokens")
    pad = routing.new_full((length - len(routing), *routing.shape[1:]), UNROUTED)
    return torch.cat([routing, pad])

"""Context parallelism: split the sequence over the ``cp`` mesh; only attention talks across it.

Everything but attention is per token, so each cp rank runs embeddings, MoE, norms and the head on
its own shard of the sequence; ``apply_context_parallel`` re-places each layer's attention
(``Attention.attention_fn``) by one of two exact schemes:

  ulysses -- all-to-all from sequence shards to head shards (``[B, T/cp, H, D] -> [B, T, H/cp, D]``),
             the layer's ordinary backend on the full sequence for the local heads (and their
             sinks), all-to-all back. Needs ``H % cp == 0``; kv heads are replicated when
             ``KV % cp != 0``. Contiguous sequence split.
  ring    -- k/v blocks travel around the ring; partial (o, lse) merged by log-sum-exp, the sink
             applied once after the merge (``ring_attention.py``). Zig-zag split for causal balance.

How a training step uses it (every tensor of shape ``[B, T, ...]`` is split the same way)::

    tokens_l = shard_sequence(tokens, cp_mesh, mode)                  # also targets, loss_mask
    positions_l = cp_positions(tokens, cp_mesh, mode, document_ids)   # GLOBAL positions (RoPE)
    document_ids_l = shard_sequence(document_ids, cp_mesh, mode)
    logprobs_l = logprobs(model(tokens_l, positions_l, document_ids_l), targets_l)
    loss = -(logprobs_l * loss_mask_l).sum() / global_token_count      # local share of the loss

Gradients of every parameter (sinks included) are then partial sums over this rank's tokens and
must be summed over the cp mesh, as data parallelism does (FSDP over a mesh that includes cp does
it; its averaging over dp x cp ranks must be matched by the loss normalization). Sums reported as
metrics are all-reduced over cp. ``gather_sequence`` reassembles a sharded tensor in global order.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from titan_rl.model.attention import BACKENDS, AttentionFn, resolve_backend
from titan_rl.model.model import positions_from_document_ids
from titan_rl.parallel.ring_attention import ring_sink_attention, zigzag_chunks

CP_MODES = ("ulysses", "ring")


def _check_mode(mode: str) -> None:
    if mode not in CP_MODES:
        raise ValueError(f"unknown context-parallel mode {mode!r}; choose one of {list(CP_MODES)}")


def _cp_group(cp_mesh: DeviceMesh) -> dist.ProcessGroup:
    if cp_mesh.ndim != 1:
        raise ValueError(
            f"context parallelism needs a 1-D cp mesh, got dims {cp_mesh.mesh_dim_names}; pass mesh['cp']"
        )
    return cp_mesh.get_group()


def shard_indices(seq_len: int, cp: int, rank: int, mode: str) -> torch.Tensor:
    """Global token indices held by cp rank ``rank``, in local order (``[seq_len // cp]``)."""
    _check_mode(mode)
    if mode == "ulysses":
        if seq_len % cp:
            raise ValueError(f"ulysses needs the sequence length ({seq_len}) divisible by cp = {cp}; pad it")
        local = seq_len // cp
        return torch.arange(rank * local, (rank + 1) * local)
    if seq_len % (2 * cp):
        raise ValueError(
            f"ring attention splits the sequence into 2 * cp = {2 * cp} zig-zag chunks, so its length "
            f"({seq_len}) must be divisible by {2 * cp}; pad it"
        )
    chunk = seq_len // (2 * cp)
    return torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in zigzag_chunks(rank, cp)])


def shard_sequence(x: torch.Tensor, cp_mesh: DeviceMesh, mode: str, dim: int = 1) -> torch.Tensor:
    """This rank's shard of ``x`` along ``dim``: contiguous (ulysses) or zig-zag chunks (ring)."""
    group = _cp_group(cp_mesh)
    index = shard_indices(x.shape[dim], dist.get_world_size(group), dist.get_rank(group), mode)
    return x.index_select(dim, index.to(x.device))


def cp_positions(
    tokens: torch.Tensor, cp_mesh: DeviceMesh, mode: str, document_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """This rank's shard of the global positions of full ``tokens [B, T]`` (restarting per document
    when the full ``document_ids [B, T]`` is given), the model's default positions on one rank."""
    if document_ids is None:
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[:2])
    else:
        positions = positions_from_document_ids(document_ids)
    return shard_sequence(positions, cp_mesh, mode)


class _GatherSequence(torch.autograd.Function):
    """All-gather of sequence shards in global order; backward keeps this rank's slice of the
    gradient (as DTensor's Shard -> Replicate), so the result must be used alike on every cp rank."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: dist.ProcessGroup, mode: str) -> torch.Tensor:
        cp, rank = dist.get_world_size(group), dist.get_rank(group)
        pieces = [torch.empty_like(x) for _ in range(cp)]
        dist.all_gather(pieces, x.contiguous(), group=group)
        seq_len = x.shape[dim] * cp
        order = torch.cat([shard_indices(seq_len, cp, r, mode) for r in range(cp)])
        ctx.dim, ctx.local_index = dim, shard_indices(seq_len, cp, rank, mode).to(x.device)
        return torch.cat(pieces, dim=dim).index_select(dim, torch.argsort(order).to(x.device))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.index_select(ctx.dim, ctx.local_index), None, None, None


def gather_sequence(x_local: torch.Tensor, cp_mesh: DeviceMesh, mode: str, dim: int = 1) -> torch.Tensor:
    """Inverse of ``shard_sequence``: the full tensor in global order on every cp rank."""
    _check_mode(mode)
    return _GatherSequence.apply(x_local, dim, _cp_group(cp_mesh), mode)


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    """Send piece j of ``x`` (split on ``scatter_dim``) to rank j; concat the arrivals on ``gather_dim``."""
    cp = dist.get_world_size(group)
    if cp == 1:
        return x
    # one tensor, split on dim 0: all_to_all_single runs on gloo in every torch (the list form
    # all_to_all does not in 2.11) and is NCCL's native all-to-all
    send = torch.stack(x.chunk(cp, dim=scatter_dim))  # [cp, *piece]
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    return torch.cat(received.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    """``_all_to_all`` whose backward is the all-to-all the other way round."""

    @staticmethod
    def forward(ctx, x, scatter_dim: int, gather_dim: int, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.dims, ctx.group = (scatter_dim, gather_dim), group
        return _all_to_all(x, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, gather_dim, scatter_dim, ctx.group), None, None, None


def kv_repeat_for_ulysses(n_heads: int, n_kv_heads: int, cp: int) -> int:
    """Smallest copy count m of each kv head so ``KV * m`` heads split evenly over cp ranks and
    query head h still reads expanded head ``h // (H / (KV * m))`` (= kv head ``h // (H / KV)``)."""
    if n_heads % cp:
        raise ValueError(
            f"ulysses splits the {n_heads} query heads over cp = {cp} ranks; choose cp dividing "
            f"{n_heads} or use context-parallel mode 'ring'"
        )
    groups = n_heads // n_kv_heads
    return next(m for m in range(1, groups + 1) if groups % m == 0 and (n_kv_heads * m) % cp == 0)


def _gather_document_ids(document_ids: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    pieces = [torch.empty_like(document_ids) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, document_ids.contiguous(), group=group)
    return torch.cat(pieces, dim=1)


def ulysses_sink_attention(
    q: torch.Tensor,  # [B, T/cp, H, D]
    k: torch.Tensor,  # [B, T/cp, KV, D]
    v: torch.Tensor,
    sinks: torch.Tensor,  # [H], replicated
    scale: float,
    window: int | None,
    document_ids: torch.Tensor | None,  # [B, T/cp]
    *,
    group: dist.ProcessGroup,
    local_attention: AttentionFn,
) -> torch.Tensor:
    """Sink attention over a contiguous sequence split: heads are split instead while attending."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    n_heads = q.shape[2]
    repeat = kv_repeat_for_ulysses(n_heads, k.shape[2], cp)
    if repeat > 1:
        k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
    q, k, v = (_AllToAll.apply(t, 2, 1, group) for t in (q, k, v))  # [B, T, heads / cp, D]
    local_heads = n_heads // cp
    local_sinks = sinks[rank * local_heads : (rank + 1) * local_heads]
    if document_ids is not None:
        document_ids = _gather_document_ids(document_ids, group)
    out = local_attention(q, k, v, local_sinks, scale, window, document_ids)  # [B, T, H / cp, D]
    return _AllToAll.apply(out, 1, 2, group)


def _module_backend(attention: nn.Module) -> AttentionFn:
    """The module's own backend, resolved per call (follows ``set_attention_backend``)."""

    def attend(q, k, v, sinks, scale, window, document_ids):
        fn = BACKENDS[resolve_backend(attention.backend, q.device, q.dtype)]
        return fn(q, k, v, sinks, scale, window, document_ids)

    return attend


def apply_context_parallel(model: nn.Module, cp_mesh: DeviceMesh, mode: str) -> nn.Module:
    """Make every layer's attention context parallel over ``cp_mesh`` (``ulysses`` or ``ring``).

    Inputs must then be sharded with ``shard_sequence``/``cp_positions`` (module docstring).
    """
    _check_mode(mode)
    group = _cp_group(cp_mesh)
    cp = dist.get_world_size(group)
    attention_fn: Callable[[nn.Module], AttentionFn]
    if mode == "ulysses":
        args = model.args
        kv_repeat_for_ulysses(args.num_attention_heads, args.num_key_value_heads, cp)  # validates
        attention_fn = lambda attn: partial(
            ulysses_sink_attention, group=group, local_attention=_module_backend(attn)
        )
    else:
        attention_fn = lambda attn: partial(ring_sink_attention, group=group)
    for block in model.layers:
        block.self_attn.attention_fn = attention_fn(block.self_attn)
    return model

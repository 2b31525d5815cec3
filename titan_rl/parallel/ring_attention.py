"""Ring attention with sinks: k/v blocks travel around the cp ring, the sink is applied once.

The sequence is cut into ``2 * cp`` chunks and rank r holds chunks r and ``2 * cp - 1 - r``
(zig-zag), so under a causal mask every rank has the same amount of work. At ring step s, rank r
holds the k/v block of rank ``r - s`` and, for each (query chunk, key chunk) pair the masks do not
rule out, calls an ``LseKernel`` for the partial ``(o, lse)``; partials are merged by log-sum-exp:

    lse = logaddexp(lse_a, lse_b),   o = o_a * exp(lse_a - lse) + o_b * exp(lse_b - lse)

and after the last block ``lse_s = logaddexp(lse, sink)``, ``o_s = o * exp(lse - lse_s)``.

Backward (exact, see ``sink_kernels.py``): the kernel's backward per block with the FINAL
``(o_s, lse_s)`` gives that block's dq, dk, dv; dk/dv travel with their block and arrive back at its
owner after ``cp`` hops. The sink gradient ``-sum_i exp(sink - lse_s_i) * delta_i`` covers this
rank's queries only: like every other parameter gradient under cp it is summed over the cp mesh by
the caller's gradient reduction (it is not all-reduced here, which would count it cp times).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from titan_rl.model.masks import allowed_keys
from titan_rl.model.sink_kernels import KERNELS, LseKernel, apply_sink, default_kernel, sink_gradient

_KV_TAG, _GRAD_TAG = 11, 12


def zigzag_chunks(rank: int, cp: int) -> tuple[int, int]:
    """The two sequence chunks (of ``2 * cp``) that cp rank ``rank`` holds, in local order."""
    return rank, 2 * cp - 1 - rank


def may_attend(q_start: int, k_start: int, chunk: int, window: int | None) -> bool:
    """Can any query of chunk [q_start, q_start + chunk) see a key of [k_start, k_start + chunk)?"""
    if k_start > q_start + chunk - 1:  # every key after every query
        return False
    return window is None or q_start - (k_start + chunk - 1) < window


class _Ring:
    """Send to the next cp rank and receive from the previous one, asynchronously."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)

    def shift(self, tensor: torch.Tensor, tag: int) -> Callable[[], torch.Tensor]:
        """Start passing ``tensor`` along; the returned function waits and gives the one received."""
        if self.size == 1:
            return lambda: tensor
        received = torch.empty_like(tensor)
        ops = [
            dist.P2POp(dist.isend, tensor, group=self.group, tag=tag, group_peer=(self.rank + 1) % self.size),
            dist.P2POp(
                dist.irecv, received, group=self.group, tag=tag, group_peer=(self.rank - 1) % self.size
            ),
        ]
        works = dist.batch_isend_irecv(ops)

        def wait() -> torch.Tensor:
            for work in works:
                work.wait()
            return received

        return wait


class _Plan:
    """Who holds which chunk and which (query chunk, key chunk) pairs need a kernel call."""

    def __init__(self, ring: _Ring, local_len: int, window: int | None, document_ids: torch.Tensor | None):
        self.ring, self.window, self.document_ids = ring, window, document_ids  # ids: [B, T] global order
        self.chunk = local_len // 2

    def pairs(self, src: int, q: torch.Tensor) -> Iterator[tuple[slice, slice, torch.Tensor, torch.Tensor]]:
        """(local query slice, block key slice, additive mask, rows with any key) for rank src's block."""
        c, cp = self.chunk, self.ring.size
        for qi, q_chunk in enumerate(zigzag_chunks(self.ring.rank, cp)):
            for ki, k_chunk in enumerate(zigzag_chunks(src, cp)):
                if not may_attend(q_chunk * c, k_chunk * c, c, self.window):
                    continue
                keep = allowed_keys(
                    q_chunk * c, (q_chunk + 1) * c, k_chunk * c, (k_chunk + 1) * c,
                    self.window, self.document_ids, q.device,
                )  # fmt: skip
                if not keep.any():  # e.g. every key in another document
                    continue
                mask = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill(
                    ~keep, float("-inf")
                )
                yield slice(qi * c, (qi + 1) * c), slice(ki * c, (ki + 1) * c), mask, keep.any(-1)


def _expand(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, KV, S, D] -> [B, KV * groups, S, D] (query head h reads kv head h // groups)."""
    return (x if groups == 1 else x.repeat_interleave(groups, dim=1)).contiguous()


def _fold(grad: torch.Tensor, groups: int) -> torch.Tensor:
    """Gradient of ``_expand``: [B, KV * groups, S, D] -> [B, KV, S, D]."""
    batch, heads, seq, dim = grad.shape
    return grad.float().view(batch, heads // groups, groups, seq, dim).sum(2)


class _RingSinkAttention(torch.autograd.Function):
    """q ``[B, H, T/cp, D]``, k/v ``[B, KV, T/cp, D]`` (zig-zag shards) -> sink attention output."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, plan: _Plan, scale: float, kernel: LseKernel):
        ring, groups = plan.ring, q.shape[1] // k.shape[1]
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), device=q.device)
        kv = torch.stack([k, v])
        for step in range(ring.size):
            next_kv = ring.shift(kv, _KV_TAG) if step < ring.size - 1 else None
            for qs, ks, mask, rows in plan.pairs((ring.rank - step) % ring.size, q):
                o_blk, lse_blk = kernel.forward(
                    q[:, :, qs].contiguous(), _expand(kv[0, :, :, ks], groups),
                    _expand(kv[1, :, :, ks], groups), mask, scale,
                )  # fmt: skip
                lse_blk = torch.where(rows, lse_blk, float("-inf"))  # rows that see no key here
                o_blk = torch.where(rows[..., None], o_blk.float(), 0.0)
                merged = torch.logaddexp(lse[:, :, qs], lse_blk)
                finite = torch.where(torch.isfinite(merged), merged, 0.0)
                out[:, :, qs] = (
                    out[:, :, qs] * torch.exp(lse[:, :, qs] - finite)[..., None]
                    + o_blk * torch.exp(lse_blk - finite)[..., None]
                )
                lse[:, :, qs] = merged
            if next_kv is not None:
                kv = next_kv()
        out_sink, lse_sink = apply_sink(out, lse, sinks)  # every row sees its own key
        out_sink = out_sink.to(q.dtype)
        ctx.save_for_backward(q, k, v, sinks, out_sink, lse_sink)
        ctx.plan, ctx.scale, ctx.kernel = plan, scale, kernel
        return out_sink

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, sinks, out_sink, lse_sink = ctx.saved_tensors
        plan, kernel = ctx.plan, ctx.kernel
        ring, groups = plan.ring, q.shape[1] // k.shape[1]
        grad_out = grad_out.contiguous()
        grad_q = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        grad_kv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)  # travels with its block
        for step in range(ring.size):
            next_kv = ring.shift(kv, _KV_TAG) if step < ring.size - 1 else None
            for qs, ks, mask, _ in plan.pairs((ring.rank - step) % ring.size, q):
                dq, dk, dv = kernel.backward(
                    grad_out[:, :, qs].contiguous(), q[:, :, qs].contiguous(),
                    _expand(kv[0, :, :, ks], groups), _expand(kv[1, :, :, ks], groups),
                    out_sink[:, :, qs].contiguous(), lse_sink[:, :, qs].contiguous(), mask, ctx.scale,
                )  # fmt: skip
                grad_q[:, :, qs] += dq.float()
                grad_kv[0, :, :, ks] += _fold(dk, groups)
                grad_kv[1, :, :, ks] += _fold(dv, groups)
            grad_kv = ring.shift(grad_kv, _GRAD_TAG)()  # after cp hops it is back at the owner
            if next_kv is not None:
                kv = next_kv()
        grad_sinks = sink_gradient(grad_out, out_sink, lse_sink, sinks)  # this rank's queries only
        return (
            grad_q.to(q.dtype), grad_kv[0].to(k.dtype), grad_kv[1].to(v.dtype), grad_sinks, None, None, None,
        )  # fmt: skip


def _global_document_ids(document_ids: torch.Tensor, ring: _Ring) -> torch.Tensor:
    """All ranks' zig-zag shards of ``[B, T/cp]`` document ids, reassembled as ``[B, T]``."""
    pieces = [torch.empty_like(document_ids) for _ in range(ring.size)]
    dist.all_gather(pieces, document_ids.contiguous(), group=ring.group)
    chunks: dict[int, torch.Tensor] = {}
    for rank, piece in enumerate(pieces):
        for half, chunk in zip(piece.chunk(2, dim=1), zigzag_chunks(rank, ring.size)):
            chunks[chunk] = half
    return torch.cat([chunks[c] for c in range(2 * ring.size)], dim=1)


def ring_sink_attention(
    q: torch.Tensor,  # [B, T/cp, H, D], zig-zag shard
    k: torch.Tensor,  # [B, T/cp, KV, D]
    v: torch.Tensor,
    sinks: torch.Tensor,  # [H], replicated
    scale: float,
    window: int | None,
    document_ids: torch.Tensor | None,  # [B, T/cp], zig-zag shard
    *,
    group: dist.ProcessGroup,
    kernel: str | None = None,
) -> torch.Tensor:
    """Sink attention over zig-zag sequence shards (``shard_sequence(..., mode="ring")``)."""
    ring = _Ring(group)
    if q.shape[1] % 2:
        raise ValueError(
            f"ring attention got {q.shape[1]} local tokens, not two zig-zag chunks; shard inputs with "
            "shard_sequence(x, cp_mesh, 'ring') and a sequence length divisible by 2 * cp"
        )
    if document_ids is not None:
        document_ids = _global_document_ids(document_ids, ring)
    plan = _Plan(ring, q.shape[1], window, document_ids)
    impl = KERNELS[kernel or default_kernel(q.device)]
    q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # [B, heads, T/cp, D]
    out = _RingSinkAttention.apply(q, k, v, sinks, plan, scale, impl)
    return out.transpose(1, 2)

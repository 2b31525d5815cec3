"""Fast sink attention: any kernel returning (o, lse) plus the sink identity, with exact gradients.

With ``o`` and ``lse`` (natural log-sum-exp of the scaled, masked scores per query row) from
ordinary attention, sink attention is

    lse_s = logaddexp(lse, sink),   o_s = o * exp(lse - lse_s)          (= o * sigmoid(lse - sink))

and its backward is the kernel's ordinary backward called with ``(dO, q, k, v, o_s, lse_s)``: the
kernel recomputes ``P = exp(scores - lse_s)``, the probabilities with the sink in the denominator,
and ``delta = rowsum(dO * o_s)``, which is exactly the gradient of sink attention for q, k and v.
The sink itself gets ``d sink_h = -sum_i exp(sink_h - lse_s_i) * delta_i``.

Kernels: ``aten_cpu`` (PyTorch's fused CPU flash-attention, used on CPU) and ``math`` (plain torch
on any device: materializes the scores of one query chunk only). Long sequences are cut into query
chunks so no [T, T] tensor exists per head; a sliding-window chunk only reads the keys it can see.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from titan_rl.model.masks import allowed_keys

DEFAULT_CHUNK = 1024
MIN_WINDOW_CHUNK = 128


class LseKernel(Protocol):
    """Attention over ``[B, H, C, D]`` queries and ``[B, H, S, D]`` keys returning (o, lse)."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def backward(
        self,
        grad_out: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


def _causal_additive(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Square causal mask used when a kernel is called without an explicit mask."""
    c, s = q.shape[2], k.shape[2]
    keep = torch.ones(c, s, dtype=torch.bool, device=q.device).tril()
    return torch.zeros(c, s, device=q.device).masked_fill(~keep, float("-inf"))


class MathKernel:
    """Plain-torch (o, lse) kernel: scores of one chunk in fp32, flash-style recomputing backward."""

    def _scores(self, q, k, mask, scale):  # [B, H, C, S] fp32
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
        return scores + (mask if mask is not None else _causal_additive(q, k)).float()

    def forward(self, q, k, v, mask, scale):
        scores = self._scores(q, k, mask, scale)
        lse = torch.logsumexp(scores, dim=-1)
        out = torch.matmul(torch.exp(scores - lse[..., None]), v.float())
        return out.to(q.dtype), lse

    def backward(self, grad_out, q, k, v, out, lse, mask, scale):
        probs = torch.exp(self._scores(q, k, mask, scale) - lse[..., None])  # [B, H, C, S]
        grad_out = grad_out.float()
        delta = (grad_out * out.float()).sum(-1, keepdim=True)
        grad_v = torch.matmul(probs.transpose(-1, -2), grad_out)
        grad_scores = probs * (torch.matmul(grad_out, v.float().transpose(-1, -2)) - delta)
        grad_q = torch.matmul(grad_scores, k.float()) * scale
        grad_k = torch.matmul(grad_scores.transpose(-1, -2), q.float()) * scale
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype)


class AtenCpuKernel:
    """PyTorch's fused CPU flash-attention (returns lse; its backward takes lse)."""

    def forward(self, q, k, v, mask, scale):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, mask is None, attn_mask=mask, scale=scale
        )
        return out, lse.float()

    def backward(self, grad_out, q, k, v, out, lse, mask, scale):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out.contiguous(),
            q,
            k,
            v,
            out,
            lse,
            0.0,
            mask is None,
            attn_mask=mask,
            scale=scale,
        )


KERNELS: dict[str, LseKernel] = {"math": MathKernel(), "aten_cpu": AtenCpuKernel()}


def default_kernel(device: torch.device) -> str:
    return "aten_cpu" if device.type == "cpu" else "math"


def apply_sink(
    out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sink identity. out ``[B, H, T, D]``, lse ``[B, H, T]``, sinks ``[H]`` ->
    (``o * exp(lse - lse_s)`` in out's dtype, ``lse_s = logaddexp(lse, sink)`` fp32)."""
    lse_sink = torch.logaddexp(lse.float(), sinks.float()[None, :, None])
    return (out.float() * torch.exp(lse - lse_sink)[..., None]).to(out.dtype), lse_sink


def sink_gradient(
    grad_out: torch.Tensor, out_sink: torch.Tensor, lse_sink: torch.Tensor, sinks: torch.Tensor
) -> torch.Tensor:
    """``d sink_h = -sum_i exp(sink_h - lse_s_i) * rowsum(dO_i * o_s_i)``, shapes as ``apply_sink``."""
    delta = (grad_out.float() * out_sink.float()).sum(-1)  # [B, H, T]
    grad = -(torch.exp(sinks.float()[None, :, None] - lse_sink) * delta).sum(dim=(0, 2))
    return grad.to(sinks.dtype)


class _SinkAttention(torch.autograd.Function):
    """o_s = o * exp(lse - logaddexp(lse, sink)); backward by the kernel with (o_s, lse_s)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, mask, scale, kernel):
        out, lse = kernel.forward(q, k, v, mask, scale)  # [B, H, C, D], [B, H, C]
        out_sink, lse_sink = apply_sink(out, lse, sinks)
        ctx.save_for_backward(q, k, v, sinks, mask, out_sink, lse_sink)
        ctx.scale, ctx.kernel = scale, kernel
        return out_sink

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, sinks, mask, out_sink, lse_sink = ctx.saved_tensors
        grad_q, grad_k, grad_v = ctx.kernel.backward(grad_out, q, k, v, out_sink, lse_sink, mask, ctx.scale)
        grad_sinks = sink_gradient(grad_out, out_sink, lse_sink, sinks)
        return grad_q, grad_k, grad_v, grad_sinks, None, None, None


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, KV, S, D] -> [B, KV * groups, S, D] (query head h reads kv head h // groups)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def chunked_sink_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor,
    scale: float,
    window: int | None = None,
    document_ids: torch.Tensor | None = None,
    *,
    chunk_size: int | None = None,
    kernel: str | None = None,
) -> torch.Tensor:
    """Sink attention by query chunks. q ``[B, T, H, D]``, k/v ``[B, T, KV, D]`` -> ``[B, T, H, D]``.

    Default chunk: 1024 queries; on sliding-window layers about one window (at least 128), so each
    chunk reads at most ``chunk + window - 1`` keys instead of every earlier key.
    """
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK if window is None else min(DEFAULT_CHUNK, max(window, MIN_WINDOW_CHUNK))
    seq = q.shape[1]
    groups = q.shape[2] // k.shape[2]
    impl = KERNELS[kernel or default_kernel(q.device)]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
    outputs = []
    for q_start in range(0, seq, chunk_size):
        q_end = min(seq, q_start + chunk_size)
        k_start = 0 if window is None else max(0, q_start - window + 1)
        plain_causal = q_start == 0 and q_end == seq and document_ids is None
        plain_causal = plain_causal and (window is None or seq <= window)
        mask = None
        if not plain_causal:
            keep = allowed_keys(q_start, q_end, k_start, q_end, window, document_ids, q.device)
            mask = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill(~keep, float("-inf"))
        outputs.append(
            _SinkAttention.apply(
                q[:, :, q_start:q_end].contiguous(),
                _expand_kv(k[:, :, k_start:q_end], groups).contiguous(),
                _expand_kv(v[:, :, k_start:q_end], groups).contiguous(),
                sinks,
                mask,
                scale,
                impl,
            )
        )
    return torch.cat(outputs, dim=2).transpose(1, 2)


@dataclass
class DocumentLayout:
    """Varlen view of a ``[B, T]`` batch for the flash kernels: one sequence per document (or per
    row without documents). Build it on the host from the packer's document ids, once per batch:
    derived on the device it would cost a host synchronization in every layer."""

    cu_seqlens: torch.Tensor  # [n_seqs + 1] int32, on the model's device
    max_len: int

    @classmethod
    def of(
        cls, batch: int, seq: int, document_ids: torch.Tensor | None, device: torch.device | str | None = None
    ) -> DocumentLayout:
        """From ``document_ids [B, T]`` (ideally a CPU tensor); ``device``: where ``cu_seqlens`` goes."""
        device = (
            device if device is not None else (document_ids.device if document_ids is not None else "cpu")
        )
        if document_ids is None:
            lengths = torch.full((batch,), seq, dtype=torch.int32)
        else:
            flat = document_ids.reshape(-1)
            row = torch.arange(batch, device=flat.device).repeat_interleave(seq)
            starts = torch.ones_like(flat, dtype=torch.bool)
            starts[1:] = (flat[1:] != flat[:-1]) | (row[1:] != row[:-1])
            idx = torch.nonzero(starts).flatten()
            lengths = torch.diff(torch.cat([idx, idx.new_tensor([flat.numel()])])).to(torch.int32)
        cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=lengths.device)
        cu[1:] = torch.cumsum(lengths, 0)
        return cls(cu.to(device), int(lengths.max()))


class _FlashSinkAttention(torch.autograd.Function):
    """Sink identity on PyTorch's CUDA flash-attention varlen kernels (window and documents)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, cu, max_len, scale, window):
        left = -1 if window is None else window - 1
        out, lse, seed, offset, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_len, max_len, 0.0, True, False,
            scale=scale, window_size_left=left, window_size_right=0,
        )  # fmt: skip
        # varlen layout: out [tokens, H, D], lse [H, tokens]; seen as one [1, H, tokens] batch
        out_sink, lse_sink = apply_sink(out.transpose(0, 1)[None], lse[None], sinks)
        out_sink, lse_sink = out_sink[0].transpose(0, 1).contiguous(), lse_sink[0]
        ctx.save_for_backward(q, k, v, sinks, cu, out_sink, lse_sink, seed, offset)
        ctx.max_len, ctx.scale, ctx.left = max_len, scale, left
        return out_sink

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, sinks, cu, out_sink, lse_sink, seed, offset = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_q, grad_k, grad_v = torch.ops.aten._flash_attention_backward(
            grad_out, q, k, v, out_sink, lse_sink, cu, cu, ctx.max_len, ctx.max_len, 0.0, True,
            seed, offset, scale=ctx.scale, window_size_left=ctx.left, window_size_right=0,
        )  # fmt: skip
        grad_sinks = sink_gradient(
            grad_out.transpose(0, 1)[None], out_sink.transpose(0, 1)[None], lse_sink[None], sinks
        )
        return grad_q, grad_k, grad_v, grad_sinks, None, None, None, None


def flash_sink_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor,
    scale: float,
    window: int | None = None,
    document_ids: torch.Tensor | None = None,
    *,
    layout: DocumentLayout | None = None,
) -> torch.Tensor:
    """CUDA flash-attention with sinks. Shapes as ``chunked_sink_attention``; bf16/fp16 only.

    ``layout``: the documents as varlen sequences, built on the host (``DocumentLayout.of``);
    without it they are derived from ``document_ids`` here, a host synchronization per call. The
    kernel reads query head h from kv head h // (H / KV) itself (GQA): K and V are not repeated."""
    if q.device.type != "cuda" or q.dtype not in (torch.bfloat16, torch.float16):
        raise RuntimeError(
            f"the 'flash' attention backend needs CUDA bf16/fp16 tensors, got {q.device.type} "
            f"{q.dtype}; set model.attn_backend = 'chunked' (or 'auto')"
        )
    if not hasattr(torch.ops.aten, "_flash_attention_forward"):
        raise RuntimeError("this PyTorch build has no flash-attention kernel; use attn_backend='chunked'")
    batch, seq, n_heads, head_dim = q.shape
    n_kv = k.shape[2]
    if layout is None:
        layout = DocumentLayout.of(batch, seq, document_ids, q.device)
    flat_q = q.reshape(batch * seq, n_heads, head_dim)
    flat_k = k.reshape(batch * seq, n_kv, head_dim)
    flat_v = v.reshape(batch * seq, n_kv, head_dim)
    out = _FlashSinkAttention.apply(
        flat_q, flat_k, flat_v, sinks, layout.cu_seqlens, layout.max_len, scale, window
    )
    return out.reshape(batch, seq, n_heads, head_dim)

"""Grouped-query attention with learned sinks and optional sliding window.

Every backend computes the same function. For one query row i of head h with allowed keys j:

    p_ij = exp(s_ij) / (sum_j exp(s_ij) + exp(sink_h)),     o_i = sum_j p_ij v_j

i.e. a softmax over the scores plus one extra "sink" logit whose column is dropped before
multiplying by V. Key j is allowed for query i when j <= i, i - j < window (sliding layers) and
both tokens belong to the same packed document.

Backends (``GptOssModelArgs.attn_backend``):
  eager   -- the readable reference below: materializes [B, H, T, T] scores and the sink column.
  chunked -- default off CUDA: query chunks through an (o, lse)-returning kernel, sink applied as
             ``o * sigmoid(lse - sink)``, exact custom backward (``sink_kernels.py``).
  flash   -- CUDA flash-attention kernel with the same sink identity (``sink_kernels.py``).
  auto    -- flash on CUDA for bf16/fp16, chunked otherwise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from titan_rl.model.args import GptOssModelArgs
from titan_rl.model.linear import Linear

if TYPE_CHECKING:
    from titan_rl.model.kv_cache import LayerCache
from titan_rl.model.masks import allowed_keys
from titan_rl.model.rope import apply_rope
from titan_rl.model.sink_kernels import DocumentLayout, chunked_sink_attention, flash_sink_attention


def sink_softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor,
    scale: float,
    allowed: torch.Tensor,
) -> torch.Tensor:
    """The math of sink attention, written out. q ``[B, Tq, H, D]``, k/v ``[B, Tk, KV, D]``,
    ``allowed`` broadcastable to ``[B, H, Tq, Tk]`` -> ``[B, Tq, H, D]``.

    Query head h reads kv head h // (H / KV); the grouped einsum does that without copying k/v."""
    batch, q_len, n_heads, head_dim = q.shape
    n_kv = k.shape[2]
    q = q.float().view(batch, q_len, n_kv, n_heads // n_kv, head_dim)
    scores = torch.einsum("bqkgd,bskd->bkgqs", q, k.float()).reshape(batch, n_heads, q_len, -1) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))  # [B, H, Tq, Tk]
    sink_column = sinks.float().view(1, n_heads, 1, 1).expand(batch, n_heads, q_len, 1)
    probs = torch.softmax(torch.cat([scores, sink_column], dim=-1), dim=-1)[..., :-1]
    probs = probs.view(batch, n_kv, n_heads // n_kv, q_len, -1)
    out = torch.einsum("bkgqs,bskd->bqkgd", probs, v.float())
    return out.reshape(batch, q_len, n_heads, head_dim).to(v.dtype)


def eager_sink_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    sinks: torch.Tensor,
    scale: float,
    window: int | None = None,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference sink attention. q ``[B, T, H, D]``, k/v ``[B, T, KV, D]`` -> ``[B, T, H, D]``."""
    seq = q.shape[1]
    allowed = allowed_keys(0, seq, 0, seq, window, document_ids, q.device)
    return sink_softmax_attention(q, k, v, sinks, scale, allowed)


AttentionFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, int | None, torch.Tensor | None],
    torch.Tensor,
]

BACKENDS: dict[str, AttentionFn] = {
    "eager": eager_sink_attention,
    "chunked": chunked_sink_attention,
    "flash": flash_sink_attention,
}


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """Turn ``auto`` into a concrete backend for this device and dtype."""
    if name == "auto":
        return "flash" if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) else "chunked"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {['auto', *BACKENDS]}")
    return name


class Attention(nn.Module):
    """GQA with q/k/v/o biases, RoPE, learned per-head sinks, sliding window on some layers."""

    def __init__(self, args: GptOssModelArgs, layer: int) -> None:
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = args.head_dim**-0.5
        self.window = args.window_of(layer)
        self.backend = args.attn_backend
        # Parallel code may re-place the attention computation (e.g. context parallelism) by setting
        # this to a function with the backends' signature
        # (q, k, v, sinks, scale, window, document_ids) -> out; the model math never changes.
        self.attention_fn: AttentionFn | None = None
        self.q_proj = Linear(args.hidden_size, self.n_heads * self.head_dim)
        self.k_proj = Linear(args.hidden_size, self.n_kv_heads * self.head_dim)
        self.v_proj = Linear(args.hidden_size, self.n_kv_heads * self.head_dim)
        self.o_proj = Linear(self.n_heads * self.head_dim, args.hidden_size)
        self.sinks = nn.Parameter(torch.empty(self.n_heads))

    def forward(
        self,
        x: torch.Tensor,  # [B, T, hidden]
        cos: torch.Tensor,  # [B, T, head_dim // 2]
        sin: torch.Tensor,
        document_ids: torch.Tensor | None = None,  # [B, T]
        kv_cache: LayerCache | None = None,
        documents: DocumentLayout | None = None,  # the same documents for varlen kernels
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seq, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        attend = self.attention_fn or BACKENDS[resolve_backend(self.backend, x.device, x.dtype)]
        if attend is flash_sink_attention and documents is not None:
            attend = functools.partial(flash_sink_attention, layout=documents)
        if kv_cache is None:
            out = attend(q, k, v, self.sinks, self.scale, self.window, document_ids)
        else:
            out = kv_cache.attend(q, k, v, self.sinks, self.scale, self.window, document_ids, attend)
        return self.o_proj(out.reshape(batch, seq, self.n_heads * self.head_dim))

    def init_weights(self, std: float) -> None:
        for linear in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            nn.init.normal_(linear.weight, std=std)
            nn.init.zeros_(linear.bias)
        nn.init.normal_(self.sinks, std=std)

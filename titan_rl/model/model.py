"""GPT-OSS: embedding, blocks of (sink attention, MoE), final RMSNorm, untied lm_head.

Parameter names follow the Hugging Face checkpoint without its ``model.`` prefix
(``layers.0.self_attn.q_proj.weight``, ``layers.0.mlp.experts.gate_up_proj``, ``lm_head.weight``),
so checkpoint conversion is a renaming of the prefix, not a re-layout.

Usage::

    model = GptOss(GptOssModelArgs.from_preset("debug"))
    logits = model(tokens)                               # [B, T, vocab]
    hidden = model(tokens, return_hidden=True)           # [B, T, hidden], after the final norm
    logits, experts = model(tokens, return_expert_indices=True)   # experts [layers, B, T, top_k]
    logprobs, entropy = model(tokens, targets=next_ids, target_index=flat_positions)  # [N] each
    logits, experts, router_logits = model(tokens, return_expert_indices=True, return_router_logits=True)
    model(tokens, expert_indices=experts)                # replays that routing

For a large model build it on the meta device, move it, then initialize::

    with torch.device("meta"):
        model = GptOss(args)
    model.to_empty(device="cuda")
    model.init_weights()
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from titan_rl.model.args import GptOssModelArgs
from titan_rl.model.attention import Attention
from titan_rl.model.linear import Linear
from titan_rl.model.logprobs import token_logprobs_and_entropy
from titan_rl.model.moe import MoE
from titan_rl.model.rope import rope_cos_sin, rope_inv_freq
from titan_rl.model.sink_kernels import DocumentLayout

if TYPE_CHECKING:
    from titan_rl.model.kv_cache import KVCache, LayerCache


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32; the weight multiplies in fp32 before casting back (as HF)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * x32).to(x.dtype)

    def init_weights(self) -> None:
        nn.init.ones_(self.weight)


class Block(nn.Module):
    """``x = x + attn(norm(x)); x = x + moe(norm(x))``."""

    def __init__(self, args: GptOssModelArgs, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MoE(args)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        document_ids: torch.Tensor | None = None,
        expert_indices: torch.Tensor | None = None,
        kv_cache: LayerCache | None = None,
        documents: DocumentLayout | None = None,
        return_router_logits: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """``(x, experts used)``, and the router's logits with ``return_router_logits``."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, document_ids, kv_cache, documents)
        moe_out, *routing = self.mlp(self.post_attention_layernorm(x), expert_indices, return_router_logits)
        return x + moe_out, *routing

    def init_weights(self, std: float) -> None:
        self.input_layernorm.init_weights()
        self.post_attention_layernorm.init_weights()
        self.self_attn.init_weights(std)
        self.mlp.init_weights(std)


def positions_from_document_ids(document_ids: torch.Tensor) -> torch.Tensor:
    """Positions ``[B, T]`` that restart at 0 wherever the document id changes along a row."""
    batch, seq = document_ids.shape
    index = torch.arange(seq, device=document_ids.device).expand(batch, seq)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - start_index


class GptOss(nn.Module):
    """The GPT-OSS decoder (no parallelism inside; see ``titan_rl.parallel``)."""

    def __init__(self, args: GptOssModelArgs) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, layer) for layer in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = Linear(args.hidden_size, args.vocab_size, bias=False)
        self._rope_inv_freq: torch.Tensor | None = None  # see the rope_inv_freq property
        if not self.lm_head.weight.is_meta:
            self.init_weights()

    @property
    def rope_inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies ``[head_dim // 2]``, fp32, on the embedding's device.

        Computed from the args where used, never a buffer: the model owns no floating buffer, so no
        cast of the module (``.to(torch.bfloat16)``, ``.half()``, ``to_empty``, FSDP mixed precision)
        can round them. In bf16 they would put every rotary angle past a few hundred positions off,
        a silent trainer / rollout-engine mismatch (engines compute RoPE in fp32)."""
        device = self.embed_tokens.weight.device
        cached = self._rope_inv_freq
        if cached is None or cached.device != device:
            cached = self._rope_inv_freq = rope_inv_freq(self.args, device=device)
        return cached

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random init (normal with ``initializer_range``)."""
        std = self.args.initializer_range
        nn.init.normal_(self.embed_tokens.weight, std=std)
        nn.init.normal_(self.lm_head.weight, std=std)
        self.norm.init_weights()
        for block in self.layers:
            block.init_weights(std)

    def set_attention_backend(self, name: str) -> None:
        """Switch every layer to attention backend ``eager``, ``chunked``, ``flash`` or ``auto``."""
        self.args.attn_backend = name
        for block in self.layers:
            block.self_attn.backend = name

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        *,
        documents: DocumentLayout | None = None,
        expert_indices: torch.Tensor | None = None,
        return_hidden: bool = False,
        return_expert_indices: bool = False,
        return_router_logits: bool = False,
        kv_cache: KVCache | None = None,
        targets: torch.Tensor | None = None,
        target_index: torch.Tensor | None = None,
        temperature: float = 1.0,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Logits ``[B, T, vocab]`` (or final hidden states with ``return_hidden``, or log-probs
        and entropy with ``targets``).

        tokens: ``[B, T]`` int64. positions: ``[B, T]``; default 0..T-1, or restarting at each
            document when ``document_ids`` is given.
        document_ids: ``[B, T]``; tokens attend only within their document (packed rows).
        documents: ``document_ids`` as varlen sequences for the flash kernels, built on the host
            (``DocumentLayout.of``) so no layer synchronizes with it to find the boundaries.
        expert_indices: ``[layers, B, T, top_k]`` to replay a recorded routing.
        return_expert_indices: also return the routing used, ``[layers, B, T, top_k]``.
        return_router_logits: also return the routers' logits ``[layers, B, T, experts]`` (after
            the expert indices when both are asked for; for a load-balancing loss).
        kv_cache: generation cache (``titan_rl.model.kv_cache``); needs explicit ``positions``.
        targets: ``[N]`` token ids scored at the flat positions ``target_index [N]`` (indices into
            ``B * T``, each position's *next* token): returns ``(logprobs [N], entropy [N])`` of the
            distribution tempered by ``temperature``, fp32, from the chunked lm_head
            (``token_logprobs_and_entropy``; no ``[tokens, vocab]`` logits are kept).
        """
        if kv_cache is not None:
            if positions is None:
                raise ValueError("generation with a kv_cache needs explicit positions")
            kv_cache.begin(positions)
        if positions is None:
            if document_ids is None:
                positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
            else:
                positions = positions_from_document_ids(document_ids)
        x = self.embed_tokens(tokens)
        if self.args.activation_dtype == "float32":  # the residual stream; GEMMs return fp32
            x = x.float()
        cos, sin = rope_cos_sin(self.rope_inv_freq, positions, self.args.yarn_attention_factor, x.dtype)
        used, router_logits = [], []
        for i, block in enumerate(self.layers):
            forced = None if expert_indices is None else expert_indices[i]
            layer_cache = None if kv_cache is None else kv_cache.layers[i]
            if return_router_logits:  # (only then the extra argument: compiled blocks keep their graph)
                x, chosen, logits = block(x, cos, sin, document_ids, forced, layer_cache, documents, True)
                router_logits.append(logits)
            else:
                x, chosen = block(x, cos, sin, document_ids, forced, layer_cache, documents)
            used.append(chosen)
        if kv_cache is not None:
            kv_cache.end()
        out = self.norm(x)
        if targets is not None:
            hidden = out.flatten(0, 1).index_select(0, target_index)  # [N, hidden]: a gather, no sync
            out = token_logprobs_and_entropy(hidden, self.lm_head.weight, targets, temperature)
        elif not return_hidden:
            out = self.lm_head(out)
        extra = [torch.stack(used)] if return_expert_indices else []
        if return_router_logits:
            extra.append(torch.stack(router_logits))
        if not extra:
            return out
        return (*out, *extra) if targets is not None else (out, *extra)

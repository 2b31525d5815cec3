"""Per-token log-probs and entropy from hidden states, chunked over tokens.

``logits = hidden @ lm_head.T / temperature`` for vocab 201,088 is 0.8 MB per token in fp32, so
2048 tokens would take 1.6 GB (and autograd would keep it). Here a custom autograd function walks
the tokens in chunks, keeps only per-token results plus the log-sum-exp, and recomputes each
chunk's logits in the backward. With z the tempered logits, p = softmax(z), y the target:

    logp_y = z_y - lse(z)                 d logp_y / dz = onehot(y) - p
    H = lse(z) - sum_v p_v z_v            dH / dz       = -p * (log p + H)
"""

from __future__ import annotations

import torch

TARGET_CHUNK_ELEMENTS = 1 << 24  # fp32 logits per chunk: 64 MB


def default_chunk_size(vocab_size: int) -> int:
    return max(1, TARGET_CHUNK_ELEMENTS // vocab_size)


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 tempered logits ``[chunk, vocab]``."""
    if hidden.dtype == torch.float32 and weight.dtype == torch.float32:
        logits = hidden @ weight.T
    else:
        logits = (hidden @ weight.T).float()
    return logits / temperature if temperature != 1.0 else logits


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size):
        n = hidden.shape[0]
        logprobs = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(logprobs)
        lse = torch.empty_like(logprobs)
        for start in range(0, n, chunk_size):
            end = min(n, start + chunk_size)
            logits = _chunk_logits(hidden[start:end], weight, temperature)
            chunk_lse = torch.logsumexp(logits, dim=-1)
            probs = torch.exp(logits - chunk_lse[:, None])
            logprobs[start:end] = logits.gather(1, targets[start:end, None]).squeeze(1) - chunk_lse
            entropy[start:end] = chunk_lse - torch.linalg.vecdot(probs, logits)
            lse[start:end] = chunk_lse
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        temperature, chunk_size = ctx.temperature, ctx.chunk_size
        n = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(lse)
        if grad_entropy is None:
            grad_entropy = torch.zeros_like(lse)
        for start in range(0, n, chunk_size):
            end = min(n, start + chunk_size)
            # grad of (g_lp * logp_y + g_ent * H) w.r.t. the logits, built in place in two buffers
            log_p = _chunk_logits(hidden[start:end], weight, temperature).sub_(lse[start:end, None])
            probs = torch.exp(log_p)
            grad_logits = log_p.add_(entropy[start:end, None]).mul_(-grad_entropy[start:end, None])
            grad_logits.sub_(grad_logprobs[start:end, None]).mul_(probs)
            grad_logits.scatter_add_(1, targets[start:end, None], grad_logprobs[start:end, None])
            grad_logits.div_(temperature)
            del probs
            if grad_hidden is not None:
                grad_hidden[start:end] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if ctx.needs_input_grad[1]:
                grad_weight.addmm_(grad_logits.T, hidden[start:end].float())
        grad_weight = grad_weight.to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None


def token_logprobs_and_entropy(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log softmax(h W^T / T)[target]`` and the entropy of that distribution, both fp32.

    hidden: ``[..., hidden]`` (final-norm output); lm_head_weight: ``[vocab, hidden]``;
    targets: ``[...]`` token ids (the *next* token for each position). Returns two ``[...]``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    batch_shape = targets.shape
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    chunk = chunk_size or default_chunk_size(lm_head_weight.shape[0])
    logprobs, entropy = _ChunkedLogprobs.apply(
        flat_hidden, lm_head_weight, targets.reshape(-1), float(temperature), chunk
    )
    return logprobs.view(batch_shape), entropy.view(batch_shape)

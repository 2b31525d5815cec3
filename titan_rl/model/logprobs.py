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
    """fp32 tempered logits ``[chunk, vocab]`` (a fresh buffer the caller may modify in place)."""
    logits = hidden @ weight.T
    logits = logits if logits.dtype == torch.float32 else logits.float()
    return logits.div_(temperature) if temperature != 1.0 else logits


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
            lse[start:end] = torch.logsumexp(logits, dim=-1)
            log_p = logits.sub_(lse[start:end, None])
            logprobs[start:end] = log_p.gather(1, targets[start:end, None]).squeeze(1)
            entropy[start:end] = -torch.linalg.vecdot(torch.exp(log_p), log_p)
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.temperature, ctx.chunk_size = temperature, chunk_size
        ctx.set_materialize_grads(False)  # an unused output (often the entropy) arrives as None
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        temperature, chunk_size = ctx.temperature, ctx.chunk_size
        n = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, n, chunk_size):
            end = min(n, start + chunk_size)
            rows = slice(start, end)
            # d(g_lp * logp_y + g_ent * H)/d logits = g_lp * (onehot_y - p) - g_ent * p * (log p + H),
            # built in place in at most two [chunk, vocab] buffers
            grad_logits = _chunk_logits(hidden[rows], weight, temperature).sub_(lse[rows, None])  # log p
            if grad_entropy is not None:
                probs = torch.exp(grad_logits)
                grad_logits.add_(entropy[rows, None]).mul_(-grad_entropy[rows, None])
                if grad_logprobs is not None:
                    grad_logits.sub_(grad_logprobs[rows, None])
                grad_logits.mul_(probs)
                del probs
            else:
                grad_logits.exp_().mul_(-grad_logprobs[rows, None])
            if grad_logprobs is not None:
                grad_logits.scatter_add_(1, targets[rows, None], grad_logprobs[rows, None])
            if temperature != 1.0:
                grad_logits.div_(temperature)
            if grad_hidden is not None:
                grad_hidden[rows] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(grad_logits.T, hidden[rows].float())
        grad_weight = grad_weight.to(weight.dtype) if grad_weight is not None else None
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

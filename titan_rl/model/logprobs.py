"""Per-token log-probs and entropy from hidden states, chunked over tokens.

``logits = hidden @ lm_head.T / temperature`` for vocab 201,088 is 0.8 MB per token in fp32, so
2048 tokens would take 1.6 GB (and autograd would keep it). Here a custom autograd function walks
the tokens in chunks, keeps only per-token results plus the log-sum-exp, and recomputes each
chunk's logits in the backward. With z the tempered logits, p = softmax(z), y the target:

    logp_y = z_y - lse(z)                 d logp_y / dz = onehot(y) - p
    H = lse(z) - sum_v p_v z_v            dH / dz       = -p * (log p + H)

With a bf16 lm_head (mixed precision) the three GEMMs (logits, hidden gradient, weight gradient)
take bf16 operands and sum in fp32: logits are never rounded to bf16, and the weight gradient
accumulates over chunks in fp32.
"""

from __future__ import annotations

import functools

import torch

CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 512 << 20}
"""fp32 logits per chunk. On CUDA a chunk must hold enough tokens for tensor-core GEMMs (~670
tokens at vocab 201,088); the backward holds about 2.5 chunks at once."""


def default_chunk_size(vocab_size: int, device: torch.device | str = "cpu") -> int:
    budget = CHUNK_BYTES.get(torch.device(device).type, CHUNK_BYTES["cpu"])
    return max(1, budget // (4 * vocab_size))


@functools.cache
def cuda_out_dtype_gemm(accumulate: bool) -> bool:
    """Whether this PyTorch's CUDA ``mm`` (``addmm`` into ``out``) takes bf16 operands with an fp32
    ``out_dtype``; probed once on tiny tensors (older builds lack the overload)."""
    a = torch.ones(16, 16, dtype=torch.bfloat16, device="cuda")
    try:
        if accumulate:
            acc = torch.ones(16, 16, device="cuda")
            torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            return bool((acc == 17).all())
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError):
        return False


class LogitsGemm:
    """Matmuls with operands in the lm_head weight's dtype and fp32 sums and results.

    fp32 weights: plain fp32 matmuls. bf16 / fp16 weights: on CUDA one tensor-core GEMM with an fp32
    output (``out_dtype``), accumulating in place into the fp32 weight gradient; no fp32 copy of the
    ``[vocab, hidden]`` weight is ever made. Elsewhere the same numbers from fp32 matmuls of the
    rounded operands (the weight upcast once per call, not per chunk).
    """

    def __init__(self, weight: torch.Tensor) -> None:
        self.dtype = weight.dtype
        self.low = weight.dtype != torch.float32
        self.cuda = weight.is_cuda and self.low
        self.weight = weight.float() if self.low and not self.cuda else weight

    def operand(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)  # the rounding a bf16 GEMM applies to its inputs
        return x.float() if self.low and not self.cuda else x

    def mm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """fp32 ``a @ b`` (operands already through ``operand``)."""
        if not self.cuda:
            return a @ b
        if cuda_out_dtype_gemm(False):
            return torch.mm(a, b, out_dtype=torch.float32)
        return (a @ b).float()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits ``[N, vocab]`` of ``hidden [N, hidden]``: what the trainer's log-probs use."""
        return self.mm(self.operand(hidden), self.weight.T)

    def add_mm(self, acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        """``acc += a @ b`` with ``acc`` fp32."""
        if not self.cuda:
            acc.addmm_(a, b)
        elif cuda_out_dtype_gemm(True):
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        else:
            acc.add_(self.mm(a, b))


def _chunk_logits(gemm: LogitsGemm, hidden: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 tempered logits ``[chunk, vocab]`` (a fresh buffer the caller may modify in place)."""
    logits = gemm.logits(hidden)
    return logits.div_(temperature) if temperature != 1.0 else logits


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size):
        n = hidden.shape[0]
        gemm = LogitsGemm(weight)
        logprobs = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(logprobs)
        lse = torch.empty_like(logprobs)
        for start in range(0, n, chunk_size):
            end = min(n, start + chunk_size)
            logits = _chunk_logits(gemm, hidden[start:end], temperature)
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
        gemm = LogitsGemm(weight)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, n, chunk_size):
            end = min(n, start + chunk_size)
            rows = slice(start, end)
            # d(g_lp * logp_y + g_ent * H)/d logits = g_lp * (onehot_y - p) - g_ent * p * (log p + H),
            # built in place in at most two [chunk, vocab] buffers
            grad_logits = _chunk_logits(gemm, hidden[rows], temperature).sub_(lse[rows, None])  # log p
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
            grad_op = gemm.operand(grad_logits)  # [chunk, vocab] in the weight's dtype
            del grad_logits
            if grad_hidden is not None:
                grad_hidden[rows] = gemm.mm(grad_op, gemm.weight).to(hidden.dtype)
            if grad_weight is not None:
                gemm.add_mm(grad_weight, grad_op.T, gemm.operand(hidden[rows]))
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
    chunk = chunk_size or default_chunk_size(lm_head_weight.shape[0], hidden.device)
    logprobs, entropy = _ChunkedLogprobs.apply(
        flat_hidden, lm_head_weight, targets.reshape(-1), float(temperature), chunk
    )
    if targets.dim() == 1:  # no view: FSDP warns about (and in-place ops break) views of its outputs
        return logprobs, entropy
    return logprobs.view(batch_shape), entropy.view(batch_shape)

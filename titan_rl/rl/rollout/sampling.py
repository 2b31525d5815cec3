"""Sampling on the model's device: the LM head of a decode step, temperature, top-k, top-p, and
the sampled token's log-prob, with no host read (``titan_rl.rl.rollout.native`` runs it each step)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from titan_rl.model.logprobs import LogitsGemm


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()


def filter_logits(logits: torch.Tensor, top_p: float, top_k: int) -> torch.Tensor:
    """Set logits outside top-k / the top-p nucleus to -inf. ``logits [B, vocab]``.

    Top-p keeps the most probable tokens (of the top-k distribution) until their mass reaches
    ``top_p``, the token that crosses it included (one whose predecessors' mass is exactly ``top_p``
    is not: vLLM's rule). Both cut at a logit value, so tokens tied with the
    last one kept are kept too: the result does not depend on the order of the vocabulary.
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits = torch.sort(logits, dim=-1, descending=True).values
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(-1) - probs  # the first token is always kept
        cutoff = sorted_logits.masked_fill(mass_before >= top_p, float("inf")).amin(-1, keepdim=True)
        logits = logits.masked_fill(logits < cutoff, float("-inf"))
    return logits


def _onednn_linear_ok(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


class DecodeHead:
    """The LM head for the few rows of decode steps, ``hidden [rows, hidden]`` -> fp32 logits
    ``[rows, vocab]``, for the duration of one ``generate`` call.

    The numbers are the trainer's (``titan_rl.model.logprobs.LogitsGemm``): operands rounded to the
    weight's dtype, fp32 sums and results. bf16 logits would be rounded to 3 significant digits
    (spacing 0.06 at a logit of 10, 0.125 at 20): with logits in the tens a sampled token's log-prob
    was 1e-2 off the trainer's (``test_bf16_engine_logprobs_of_a_prefilled_row_are_the_trainers``).
    On CPU the fp32 weight (upcast once for bf16) is also reordered once, in the call, into oneDNN's
    blocked layout for ``rows`` rows (``torch.ops.mkldnn._reorder_linear_weight``, the packing
    inductor uses for CPU linears; any row count runs on it): on the 2-core benchmark machine, a
    ``[32000, 512]`` head at 8 rows took 3.6 ms a step against 4.9 ms for oneDNN on the unchanged
    weight and about 10 ms for the default BLAS call; the reorder takes about 20 ms, once per call.
    On CPU the head is therefore a snapshot of the weight (on CUDA it reads the live one): build a
    new one whenever the weights may have changed (every call does).
    """

    def __init__(self, weight: torch.Tensor, rows: int) -> None:
        self.gemm = LogitsGemm(weight.detach())
        fp32 = self.gemm.weight  # fp32 on CPU (bf16 upcast once), the weight itself on CUDA
        self.packed = (
            torch.ops.mkldnn._reorder_linear_weight(fp32, max(rows, 1)) if _onednn_linear_ok(fp32) else None
        )

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return self.gemm.logits(hidden)
        return torch.ops.mkldnn._linear_pointwise(
            self.gemm.operand(hidden), self.packed, None, "none", [], ""
        )


def sample_next(
    logits: torch.Tensor, params: SamplingParams, noise: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next tokens ``[B]`` from ``logits [B, vocab]`` and their log-probs under the tempered
    distribution (before top-k / top-p filtering: what the trainer computes), fp32, on the logits'
    device. ``noise``: Exp(1) draws like ``logits`` (``titan_rl.rl.rollout.noise``); unused when greedy.

    The draw is the exponential race ``argmax(p / E)`` with ``E ~ Exp(1)`` i.i.d., which picks v with
    probability p_v: ``torch.multinomial``'s own method for one sample (with its generator's
    exponential draws as ``noise``, the same tokens), without its validity checks, which read the
    probabilities on the host (a CUDA sync).
    """
    logits = logits.float()
    if params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k == 1:  # greedy
        # max(dim).indices: the first maximum, as argmax, and on CPU about 40% faster (one pass)
        sampled = logits.max(dim=-1).indices
    else:
        probs = torch.softmax(filter_logits(logits, params.top_p, params.top_k), dim=-1)
        sampled = (probs / noise).max(dim=-1).indices
    # log p(token) = logit - logsumexp(logits): the full [B, vocab] log-softmax is never stored
    logprobs = logits.gather(1, sampled[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
    return sampled, logprobs

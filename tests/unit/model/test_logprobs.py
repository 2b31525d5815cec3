"""Chunked log-probs and entropy equal the naive computation, and stay small in memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.conftest import rel_err
from titan_rl.model.logprobs import token_logprobs_and_entropy


def naive(hidden, weight, targets, temperature):
    logits = (hidden @ weight.T) / temperature
    log_p = torch.log_softmax(logits.float(), dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return log_p.gather(-1, targets[..., None]).squeeze(-1), entropy


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
@pytest.mark.parametrize("chunk_size", [None, 5, 64])
def test_values_and_gradients_match_naive(temperature, chunk_size):
    g = torch.Generator().manual_seed(int(temperature * 10) + (chunk_size or 0))
    hidden = torch.randn(3, 13, 24, generator=g)
    weight = torch.randn(101, 24, generator=g) * 0.5
    targets = torch.randint(0, 101, (3, 13), generator=g)
    coef_lp, coef_ent = torch.randn(3, 13, generator=g), torch.randn(3, 13, generator=g)

    results = []
    for fn in (naive, lambda *a: token_logprobs_and_entropy(*a, chunk_size=chunk_size)):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logprobs, entropy = fn(h, w, targets, temperature)
        ((logprobs * coef_lp).sum() + (entropy * coef_ent).sum()).backward()
        results.append((logprobs.detach(), entropy.detach(), h.grad, w.grad))
    for name, ours, ref in zip(["logprobs", "entropy", "grad hidden", "grad weight"], results[1], results[0]):
        assert rel_err(ours, ref) <= 1e-5, name


def test_only_logprobs_used_in_loss():
    hidden = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    targets = torch.randint(0, 50, (10,))
    logprobs, _ = token_logprobs_and_entropy(hidden, weight, targets, chunk_size=3)
    logprobs.sum().backward()
    ref_h, ref_w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    naive(ref_h, ref_w, targets, 1.0)[0].sum().backward()
    assert rel_err(hidden.grad, ref_h.grad) <= 1e-5
    assert rel_err(weight.grad, ref_w.grad) <= 1e-5


def test_bf16_values_and_gradients_match_fp32_reference():
    """bf16 operands, fp32 sums: log-probs and entropy equal fp32 math on the same (bf16) numbers to
    fp32 round-off; gradients to bf16 round-off of the [tokens, vocab] gradient (2^-8 relative).
    Rounding the logits themselves to bf16 (a plain bf16 lm_head) is far worse, so this fails if the
    logits GEMM loses its fp32 output."""
    g = torch.Generator().manual_seed(11)
    hidden = (torch.randn(37, 48, generator=g) * 2).bfloat16()
    weight = torch.randn(301, 48, generator=g).bfloat16()
    targets = torch.randint(0, 301, (37,), generator=g)
    coef_lp, coef_ent = torch.randn(37, generator=g), torch.randn(37, generator=g)

    def run(fn, h, w):
        h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
        logprobs, entropy = fn(h, w, targets, 0.8)
        ((logprobs * coef_lp).sum() + (entropy * coef_ent).sum()).backward()
        return logprobs.detach(), entropy.detach(), h.grad, w.grad

    ref = run(naive, hidden.float(), weight.float())
    ours = run(lambda *a: token_logprobs_and_entropy(*a, chunk_size=8), hidden, weight)
    plain_bf16 = run(naive, hidden, weight)  # logits rounded to bf16 before the softmax
    assert ours[2].dtype == ours[3].dtype == torch.bfloat16
    assert rel_err(ours[0], ref[0]) <= 1e-5 and rel_err(ours[1], ref[1]) <= 1e-5
    assert (ours[0] - ref[0]).abs().mean() < 0.05 * (plain_bf16[0] - ref[0]).abs().mean()
    assert rel_err(ours[2].float(), ref[2]) <= 1e-2, "grad hidden"
    assert rel_err(ours[3].float(), ref[3]) <= 1e-2, "grad weight"


PEAK_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, torch
    from titan_rl.model.logprobs import token_logprobs_and_entropy
    mode = sys.argv[1]
    torch.manual_seed(0)
    dtype = torch.bfloat16 if mode.endswith("bf16") else torch.float32
    hidden = torch.randn(2048, 64).to(dtype).requires_grad_()
    weight = (torch.randn(201088, 64) * 0.05).to(dtype).requires_grad_()
    targets = torch.randint(0, 201088, (2048,))
    def mib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    before = mib()
    if mode.startswith("chunked"):
        logprobs, entropy = token_logprobs_and_entropy(hidden, weight, targets)
    else:
        log_p = torch.log_softmax(hidden @ weight.T, dim=-1)
        logprobs = log_p.gather(1, targets[:, None]).squeeze(1)
        entropy = -(log_p.exp() * log_p).sum(-1)
    (logprobs.sum() + entropy.sum()).backward()
    print(json.dumps({"peak_increase_mib": mib() - before}))
    """
)


def peak_increase_mib(mode: str) -> float:
    result = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, mode], capture_output=True, text=True, timeout=240, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_increase_mib"]


def test_peak_memory_far_below_full_logits():
    """2048 tokens x vocab 201,088: full fp32 logits are 1571 MiB; the chunked path stays far below."""
    full_logits_mib = 2048 * 201088 * 4 / 2**20
    chunked = peak_increase_mib("chunked")
    chunked_bf16 = peak_increase_mib("chunked_bf16")  # bf16 weights: one fp32 accumulator, no logits
    naive_peak = peak_increase_mib("naive")
    assert naive_peak > full_logits_mib  # the measurement sees a full-logits allocation
    assert chunked < 0.25 * full_logits_mib, f"chunked peak {chunked:.0f} MiB"
    assert chunked_bf16 < 0.25 * full_logits_mib, f"chunked bf16 peak {chunked_bf16:.0f} MiB"

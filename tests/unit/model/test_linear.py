"""model/linear.py: fp32 activations over bf16 weights, and the model's ``activation_dtype = "float32"``
mode against an fp32 reference that rounds the same GEMM operands (the emulation bench_precision.py
measured), forward and gradients."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import titan_rl.model.moe as moe
from tests.conftest import bf16, rel_err
from titan_rl.model import GptOss, GptOssModelArgs
from titan_rl.model.linear import linear
from titan_rl.model.logprobs import LogitsGemm


def wide_linear_case(device: str = "cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 64, generator=g).to(device).requires_grad_()
    w = (torch.randn(32, 64, generator=g) / 8).to(device, torch.bfloat16).requires_grad_()
    b = torch.randn(32, generator=g).to(device, torch.bfloat16).requires_grad_()
    grad = torch.randn(3, 5, 32, generator=g).to(device)
    return x, w, b, grad


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_fp32_input_over_bf16_weight_is_an_unrounded_gemm_of_rounded_operands(device):
    """Forward: fp32 sums of the bf16-rounded input and the weight, never rounded to bf16 (a plain
    bf16 GEMM's result is 1e-3 off). Backward: the GEMMs of the bf16-rounded gradient, to bf16's
    precision. On CUDA this is the out_dtype GEMM, checked against the same fp32 numbers."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    x, w, b, grad = wide_linear_case(device)
    out = linear(x, w, b)
    out.backward(grad)
    exact = F.linear(bf16(x.detach()), w.detach().float(), b.detach().float())
    assert out.dtype == torch.float32 and out.shape == (3, 5, 32)
    assert rel_err(out, exact) <= 1e-6
    assert rel_err(F.linear(x.detach().to(torch.bfloat16), w.detach(), b.detach()), exact) > 1e-3
    g2 = grad.reshape(-1, 32)
    assert x.grad.dtype == torch.float32 and w.grad.dtype == b.grad.dtype == torch.bfloat16
    assert rel_err(x.grad, (g2 @ w.detach().float()).view_as(x)) <= 1e-2
    assert rel_err(w.grad, g2.T @ bf16(x.detach().reshape(-1, 64))) <= 1e-2
    assert rel_err(b.grad, g2.sum(0)) <= 1e-2


@pytest.mark.parametrize("case", ["no bias", "x without grad", "non-contiguous x", "2-D x"])
def test_wide_linear_cases(case):
    x, w, b, grad = wide_linear_case()
    x = x.detach()
    if case == "no bias":
        b = None
    if case == "non-contiguous x":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)  # [3, 5, 64] with swapped strides
        assert not x.is_contiguous()
    if case == "2-D x":
        x, grad = x[0], grad[0]
    x.requires_grad_(case != "x without grad")
    out = linear(x, w, b)
    out.backward(grad)
    exact = F.linear(bf16(x.detach()), w.detach().float(), None if b is None else b.detach().float())
    assert out.shape == exact.shape and rel_err(out, exact) <= 1e-6
    g2 = grad.reshape(-1, 32)
    assert rel_err(w.grad, g2.T @ bf16(x.detach().reshape(-1, 64))) <= 1e-2
    assert (x.grad is None) == (case == "x without grad")
    if x.grad is not None:
        assert rel_err(x.grad, (g2 @ w.detach().float()).view_as(x)) <= 1e-2


def test_without_the_mode_a_bf16_model_never_widens(monkeypatch):
    """Plain bf16 (and fp32) models run plain ``F.linear``; only the mode's fp32 activations widen."""
    import titan_rl.model.linear as linear_module

    calls = []
    apply = linear_module._WideLinear.apply
    monkeypatch.setattr(linear_module._WideLinear, "apply", lambda *a: calls.append(1) or apply(*a))
    mode, plain, reference = mode_and_reference()
    tokens = torch.randint(0, plain.args.vocab_size, (2, 8), generator=torch.Generator().manual_seed(2))
    for model in (plain, reference):
        model(tokens).float().sum().backward()
    assert calls == []
    mode(tokens).sum().backward()
    assert len(calls) == 4 * len(mode.layers) + 1 + len(mode.layers)  # q k v o, the head, routers


def test_same_dtypes_are_plain_linear():
    x, w, b, _ = wide_linear_case()
    low = x.detach().to(torch.bfloat16)
    assert torch.equal(linear(low, w, b), F.linear(low, w, b))
    w32 = w.detach().float()
    assert torch.equal(linear(x, w32), F.linear(x, w32))


@contextlib.contextmanager
def rounded_gemm_operands():
    """An fp32 model computing as the mode should: every GEMM's activation operand rounded to bf16
    (the expert GEMMs' too), nothing else; every result fp32."""
    plain_linear, plain_grouped, plain_operand = F.linear, moe.grouped_mm, LogitsGemm.operand
    with (
        mock.patch.object(F, "linear", lambda x, w, b=None: plain_linear(bf16(x), w, b)),
        mock.patch.object(moe, "grouped_mm", lambda x, w, c: plain_grouped(bf16(x), w, c)),
        mock.patch.object(LogitsGemm, "operand", lambda self, x: plain_operand(self, bf16(x))),
    ):
        yield


def mode_and_reference(seed: int = 0):
    """A bf16 model in the fp32-activation mode, the plain bf16 model, and an fp32 model holding
    the same (bf16) values."""
    torch.manual_seed(seed)
    args = GptOssModelArgs.from_preset("debug", num_hidden_layers=2)
    reference = GptOss(args)
    with torch.no_grad():
        reference.lm_head.weight.mul_(20.0)  # logits in the tens, as real models'
        for p in reference.parameters():
            p.copy_(bf16(p))
    plain = copy.deepcopy(reference).to(torch.bfloat16)
    mode = copy.deepcopy(plain)
    mode.args = dataclasses.replace(args, activation_dtype="float32")
    return mode, plain, reference


def test_fp32_activation_mode_computes_the_fp32_model_with_rounded_gemm_operands():
    """Logits and teacher-forced log-probs of the mode equal the reference's to fp32 round-off,
    10x closer than plain bf16's; gradients agree to bf16's precision. Planted: leaving the residual
    stream in bf16 (the mode off) or rounding the expert GEMMs' results to bf16 fails it."""
    mode, plain, reference = mode_and_reference()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, mode.args.vocab_size, (2, 24), generator=g)
    targets = torch.randint(0, mode.args.vocab_size, (40,), generator=g)
    index = torch.randperm(48, generator=g)[:40]
    with rounded_gemm_operands():
        expected = reference(tokens)
        expected_lp, _ = reference(tokens, targets=targets, target_index=index)
        expected_lp.sum().backward()
    logits = mode(tokens)
    logprobs, _ = mode(tokens, targets=targets, target_index=index)
    logprobs.sum().backward()
    assert logits.dtype == torch.float32 and logits.abs().max() > 8
    err, plain_err = rel_err(logits, expected), rel_err(plain(tokens), expected)
    assert err <= 1e-5 and plain_err >= 10 * err, (err, plain_err)
    assert (logprobs - expected_lp).abs().max() <= 1e-4
    grads = dict(mode.named_parameters())
    for name, p in reference.named_parameters():
        assert grads[name].grad.dtype == torch.bfloat16
        assert rel_err(grads[name].grad, p.grad) <= 2e-2, name

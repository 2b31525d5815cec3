"""Linears whose activations may be in a wider dtype than their weights (fp32 over bf16).

``GptOssModelArgs.activation_dtype = "float32"`` keeps the residual stream, norms, attention and
every linear's result in fp32 while the weights stay bf16 (FSDP mixed precision): a GEMM rounds
its activation operand to the weight's dtype, as any bf16 GEMM does, sums in fp32 and returns fp32
(the grouped expert GEMMs likewise: ``titan_rl.model.grouped_gemm``).
A bf16 engine and trainer round each GEMM's *result* at different row counts and kernels, which is
most of what separates their log-probs; without that rounding they agree to fp32 round-off, except
where the rounded GEMM operands themselves differ (benchmarks/README.md, ``bench_precision.py``).

On CUDA this is one tensor-core GEMM with an fp32 output (``torch.mm(..., out_dtype=float32)``,
1.0x to 1.2x the bf16-output time for the forward GEMMs ``bench_gemm_out.py`` timed at gpt-oss-20b
shapes on an H200); PyTorch
has no derivative for that overload, hence the autograd function here. Elsewhere the same numbers
come from fp32 matmuls of the rounded operands (a product of two bf16 values is exact in fp32).
Any other pair of dtypes is plain ``F.linear`` (the same dtype as before; a mismatch still raises).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from titan_rl.model.logprobs import cuda_out_dtype_gemm


def widens(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x`` is an fp32 activation over a bf16 / fp16 weight (``activation_dtype = "float32"``):
    the GEMMs here (and the grouped expert GEMMs) then round it and return fp32."""
    return x.dtype == torch.float32 and weight.dtype in (torch.bfloat16, torch.float16)


def wide_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """fp32 ``a @ b`` of two operands in the same low-precision dtype: fp32 sums and result."""
    if a.is_cuda and cuda_out_dtype_gemm(False):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


class _WideLinear(torch.autograd.Function):
    """``x W^T + b`` with ``x`` rounded to W's dtype and an fp32 result; the backward's GEMMs take
    the gradient rounded to W's dtype likewise (as a bf16 GEMM's backward would)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        rows = x.reshape(-1, x.shape[-1]).to(weight.dtype)  # [N, in]
        out = wide_mm(rows, weight.t())
        if bias is not None:
            out = out + bias.float()
        ctx.save_for_backward(rows, weight)
        ctx.x_dtype, ctx.x_shape, ctx.has_bias = x.dtype, x.shape, bias is not None
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @once_differentiable  # mm's out_dtype overload has no derivative on CUDA: the same everywhere
    def backward(ctx, grad):
        rows, weight = ctx.saved_tensors
        grad = grad.reshape(-1, grad.shape[-1])  # [N, out], fp32
        grad_low = grad.to(weight.dtype)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = wide_mm(grad_low, weight).to(ctx.x_dtype).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            grad_weight = grad_low.t() @ rows  # the weight's dtype, summed in fp32 by the GEMM
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0).to(weight.dtype)
        return grad_x, grad_weight, grad_bias


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """An fp32 ``x`` over a bf16 / fp16 weight: the fp32 result of the GEMM with ``x`` rounded to the
    weight's dtype. Otherwise ``F.linear``."""
    if widens(x, weight):
        return _WideLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and names) computed by ``linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

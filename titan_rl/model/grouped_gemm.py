"""Grouped GEMMs of expert-sorted rows: row block e of ``x [N, K]`` times ``w[e] [K, M]``.

``grouped_mm`` is ``torch._grouped_mm`` where its fused kernel runs (the group offsets read on the
device), a split by counts read on the host elsewhere. With ``model.activation_dtype = "float32"``
(an fp32 ``x`` over bf16 / fp16 experts) it returns fp32 results of the rounded operands, like the
mode's linears (``titan_rl.model.linear``): PyTorch's grouped GEMM returns its operands' dtype only
(torch 2.11 to 2.14: "Grouped gemm output dtype must match `mat_a` dtype"), and bf16-rounded expert
results kept the engine and the trainer apart (benchmarks/README.md, ``bench_precision.py``'s
"bf16 expert outputs" row: 9.5e-4 against 6.8e-4 with fp32 results on an H200). On CUDA the fp32
results come from the Triton kernel below (tensor-core products of the bf16 operands, fp32 sums
and results, the offsets read on the device: no host sync, so a decode step can be captured as a
CUDA graph); elsewhere from fp32 grouped GEMMs of the upcast operands, the same numbers up to the
order of the sums (a product of two bf16 values is exact in fp32). Triton ships with PyTorch's
CUDA builds and is imported only when the kernel first runs.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch
from torch.autograd.function import once_differentiable

from titan_rl.model.linear import widens

logger = logging.getLogger(__name__)


def fused_grouped_mm_on(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs here as one kernel that reads the group offsets on the
    device: on CPU (fp32/bf16/fp16), and on CUDA in bf16 on sm90 and sm100 (its fused kernel; on
    other GPUs and for fp16 or fp32 torch loops over the groups after copying the offsets to the
    host)."""
    if not hasattr(torch, "_grouped_mm") or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] in (9, 10)
    return device.type == "cpu"


def grouped_mm_aligned(dtype: torch.dtype, *widths: int) -> bool:
    """Whether rows of these widths are 16-byte aligned in ``dtype``, as ``torch._grouped_mm`` needs."""
    per_16_bytes = 16 // torch.empty(0, dtype=dtype).element_size()
    return all(width % per_16_bytes == 0 for width in widths)


def _fused_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The fused grouped GEMM runs here, and the rows are aligned as it needs."""
    return fused_grouped_mm_on(a.device, a.dtype) and grouped_mm_aligned(a.dtype, a.shape[-1], b.shape[-1])


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(counts, 0).to(torch.int32)


def _plain_grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Operands of one dtype, the result in it (autograd through ``torch._grouped_mm`` / ``mm``)."""
    if _fused_ok(x, w):
        return torch._grouped_mm(x, w, offs=_offsets(counts))
    blocks = x.split(counts.tolist())  # one host read
    return torch.cat([block @ w[e] for e, block in enumerate(blocks)], dim=0)


def wide_grouped_available(device: torch.device) -> bool:
    """Whether fp32 expert results of bf16 operands can be computed here: always off CUDA; on CUDA
    with Triton (it ships with PyTorch's CUDA builds) on sm80 or newer (bf16 tensor cores)."""
    return device.type != "cuda" or _triton_runs_on(device.index)


@functools.cache
def _triton_runs_on(device_index: int | None) -> bool:
    major, _ = torch.cuda.get_device_capability(device_index)
    return major >= 8 and importlib.util.find_spec("triton") is not None


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Row block e of ``x [N, K]`` (``counts[e]`` rows, in expert order) times ``w[e] [K, M]``.

    Where the fused ``torch._grouped_mm`` cannot run (``fused_grouped_mm_on``) the fallback splits
    by counts read on the host: one synchronization per call. An fp32 ``x`` over bf16 / fp16
    experts (``activation_dtype = "float32"``) is rounded to their dtype and the fp32 result of the
    rounded operands returned (``_WideGroupedMM``); on CUDA without Triton (or before sm80) the
    result is rounded to the experts' dtype first, with a warning."""
    if widens(x, w):
        return _fp32_results(x, w, counts)
    if x.dtype != w.dtype and w.dtype != torch.float32:
        return _plain_grouped_mm(x.to(w.dtype), w, counts).to(x.dtype)
    return _plain_grouped_mm(x, w, counts)


@torch.compiler.disable  # compiled blocks (parallelism.compile) call it as it is: a Triton launch
def _fp32_results(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    if wide_grouped_available(x.device):
        return _WideGroupedMM.apply(x, w, counts)
    _warn_rounded_results()
    return _plain_grouped_mm(x.to(w.dtype), w, counts).float()


@functools.cache
def _warn_rounded_results() -> None:
    logger.warning(
        "model.activation_dtype = 'float32': the grouped expert GEMMs' fp32 results need Triton "
        "(it comes with PyTorch's CUDA builds) and a GPU of sm80 or newer; without them their "
        "results are rounded to bf16, and the engine and trainer log-probs agree less closely"
    )


class _WideGroupedMM(torch.autograd.Function):
    """fp32 ``grouped(x rounded to w's dtype, w)``; the backward takes the gradient rounded to w's
    dtype as a bf16 GEMM's backward would: an fp32 input gradient (``grad @ w[e]^T``, the same wide
    GEMM) and a weight gradient in w's dtype with fp32 sums (``x_e^T grad_e``)."""

    @staticmethod
    def forward(ctx, x, w, counts):
        x_low = x.to(w.dtype)
        ctx.save_for_backward(x_low, w, counts)
        return _wide(x_low, w, counts)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x_low, w, counts = ctx.saved_tensors
        grad_low = grad.to(w.dtype).contiguous()
        grad_x = _wide(grad_low, w.transpose(-2, -1), counts) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            if _fused_ok(x_low, grad_low):
                grad_w = torch._grouped_mm(x_low.t(), grad_low, offs=_offsets(counts))  # [E, K, M]
            else:
                splits = counts.tolist()  # one host read
                pairs = zip(x_low.split(splits), grad_low.split(splits))
                grad_w = torch.stack([xe.t() @ ge for xe, ge in pairs])
        return grad_x, grad_w, None


def _wide(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """fp32 ``a_e @ b[e]`` of operands in one low-precision dtype (``b`` may be a transposed view)."""
    if a.is_cuda:
        with torch.cuda.device(a.device):  # Triton launches on the current device
            return triton_wide_grouped_mm(a, b, counts)
    return _plain_grouped_mm(a.float(), b.float().contiguous(), counts)


def triton_wide_grouped_mm(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """fp32 ``a[rows of e] @ b[e]`` for ``a [N, K]``, ``b [E, K, M]`` (any strides) and ``counts
    [E]`` rows per expert on ``a``'s device, with the Triton kernel.

    The grid's programs walk the row tiles of all experts in order: ``tile_ends`` (the cumulative
    tiles per expert, computed on the device) tells each program its expert, so at most E
    programs per column tile find nothing to do, whatever the row count. Under
    ``TRITON_INTERPRET=1`` (the tests' CPU check of the kernel) the tile products are taken in
    fp32, because Triton's interpreter multiplies bf16 tiles wrongly; the same numbers as the bf16
    tensor-core products."""
    rows, k = a.shape
    experts, _, m = b.shape
    out = torch.empty(rows, m, dtype=torch.float32, device=a.device)
    if rows == 0:  # an expert-parallel rank may receive no rows: no grid to launch
        return out
    config = launch_config(rows, experts)
    block_m = config["BLOCK_M"]
    row_ends = _offsets(counts)
    tile_ends = torch.cumsum((counts + block_m - 1) // block_m, 0).to(torch.int32)
    # sum over experts of cdiv(count, block_m) <= cdiv(rows, block_m) + experts
    grid = (_cdiv(rows, block_m) + experts, _cdiv(m, config["BLOCK_N"]))
    _kernel()[grid](
        a, b, out, row_ends, tile_ends, experts, k, m,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), out.stride(0),
        EXPERTS_POW2=1 << (experts - 1).bit_length(),
        PRODUCTS_IN_FP32=os.environ.get("TRITON_INTERPRET") == "1", **config,
    )  # fmt: skip
    return out


def launch_config(rows: int, experts: int) -> dict[str, int]:
    """Tile sizes and launch options for ``rows`` rows over ``experts``: 16-row tiles for a decode
    step's few rows per expert, 64 or 128 for a trainer's hundreds (Hopper's wgmma needs 64)."""
    block_m = 16 if rows <= 32 * experts else (64 if rows <= 128 * experts else 128)
    return {
        "BLOCK_M": block_m,
        "BLOCK_N": 128,
        "BLOCK_K": 64,
        "num_warps": 8 if block_m == 128 else 4,
        "num_stages": 3,
    }


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def _kernel():
    """The Triton kernel, built on first use (Triton is imported only here)."""
    import triton
    import triton.language as tl

    @triton.jit
    def wide_grouped_mm_kernel(
        a_ptr, b_ptr, out_ptr, row_ends_ptr, tile_ends_ptr, E, K, M,
        stride_an, stride_ak, stride_be, stride_bk, stride_bm, stride_on,
        EXPERTS_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, PRODUCTS_IN_FP32: tl.constexpr,
    ):  # fmt: skip
        # program (t, j): row tile t of all experts' tiles in order, column tile j. Its expert is
        # the first whose cumulative tile count exceeds t; past the last tile there is none.
        tile, tile_j = tl.program_id(0), tl.program_id(1)
        every = tl.arange(0, EXPERTS_POW2)
        tile_ends = tl.load(tile_ends_ptr + every, mask=every < E, other=2147483647)
        expert = tl.sum((tile_ends <= tile).to(tl.int32), axis=0)
        if expert < E:
            before = tl.maximum(expert - 1, 0)
            first_tile = tl.where(expert > 0, tl.load(tile_ends_ptr + before), 0)
            first_row = tl.where(expert > 0, tl.load(row_ends_ptr + before), 0)
            first_row += (tile - first_tile) * BLOCK_M
            end = tl.load(row_ends_ptr + expert)
            # 64-bit bases, 32-bit offsets within a tile and within one expert's weight
            a_tile = a_ptr + first_row.to(tl.int64) * stride_an
            out_tile = out_ptr + first_row.to(tl.int64) * stride_on
            b_expert = b_ptr + expert.to(tl.int64) * stride_be
            local = tl.arange(0, BLOCK_M)
            cols = tile_j * BLOCK_N + tl.arange(0, BLOCK_N)
            row_ok, col_ok = first_row + local < end, cols < M
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < K
                a = tl.load(
                    a_tile + local[:, None] * stride_an + ks[None, :] * stride_ak,
                    mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0,
                )
                b = tl.load(
                    b_expert + ks[:, None] * stride_bk + cols[None, :] * stride_bm,
                    mask=k_ok[:, None] & col_ok[None, :],
                    other=0.0,
                )
                if PRODUCTS_IN_FP32:
                    acc += tl.dot(a.to(tl.float32), b.to(tl.float32))
                else:
                    acc += tl.dot(a, b)  # bf16 tensor cores, fp32 sums
            out = out_tile + local[:, None] * stride_on + cols[None, :]
            tl.store(out, acc, mask=row_ok[:, None] & col_ok[None, :])

    return wide_grouped_mm_kernel


MOST_DECODE_ROWS = 12  # mean rows per expert up to which ``small_grouped_mm`` is the faster product


def small_grouped_mm(
    x: torch.Tensor, w: torch.Tensor, w_t: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """``grouped_mm(x, w, counts)`` for a few rows per expert on the CPU (decode steps), with
    ``w_t [E, M, K]``, a contiguous transposed copy of ``w``: expert blocks of 2 or more rows as
    ``(w_t[e] @ x_e^T)^T``, single rows as ``x_e @ w[e]``. The same products summed in another
    order; on CPU BLAS the first form streams the weights at the memory's rate where ``x_e @ w[e]``
    of 2-8 rows reached about half of it (benchmarks/README.md, "CPU results", eighth session)."""
    rows = counts.tolist()  # (the CPU: nothing to wait for)
    out = []
    for e, block in enumerate(x.split(rows)):
        if rows[e] == 1:
            out.append(block @ w[e])
        elif rows[e]:
            out.append(torch.mm(w_t[e], block.t()).t())
    return torch.cat(out) if out else x.new_empty(0, w.shape[-1])

"""model/grouped_gemm.py: fp32 results of the expert GEMMs over bf16 experts (the fp32-activation
mode), against per-expert fp32 matmuls of the rounded operands, forward and gradients; the Triton
kernel that computes them on CUDA, run by Triton's interpreter on the CPU and natively on a GPU."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import titan_rl.model.grouped_gemm as grouped_gemm
from tests.conftest import bf16, rel_err
from titan_rl.model.grouped_gemm import grouped_mm

REPO = Path(__file__).resolve().parents[3]


def per_expert(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """fp32 ``x_e @ w[e]``, one expert at a time (the reference)."""
    blocks = x.float().split(counts.tolist())
    return torch.cat([block @ w[e].float() for e, block in enumerate(blocks)])


def wide_case(device: str = "cpu", k: int = 64, m: int = 48, counts: tuple[int, ...] = (5, 0, 40, 3)):
    """fp32 rows over bf16 experts; one expert gets no row, one more rows than a kernel tile."""
    g = torch.Generator().manual_seed(0)
    experts = len(counts)
    counts = torch.tensor(counts, device=device)
    x = torch.randn(int(counts.sum()), k, generator=g).to(device).requires_grad_()
    w = (torch.randn(experts, k, m, generator=g) / 8).to(device, torch.bfloat16).requires_grad_()
    grad = torch.randn(x.shape[0], m, generator=g).to(device)
    return x, w, counts, grad


def check_wide_grouped_mm(device: str, counts: tuple[int, ...] = (5, 0, 40, 3), tol: float = 1e-6) -> None:
    x, w, counts, grad = wide_case(device, counts=counts)
    out = grouped_mm(x, w, counts)
    out.backward(grad)
    exact = per_expert(bf16(x.detach()), w.detach(), counts)
    assert out.dtype == torch.float32 and out.shape == exact.shape
    assert rel_err(out, exact) <= tol
    assert rel_err(bf16(exact), exact) > 1e-3  # what rounding the results would cost
    # backward: the gradient rounded to bf16, fp32 input gradient, bf16 weight gradient
    g_low = bf16(grad)
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.bfloat16
    assert rel_err(x.grad, per_expert(g_low, w.detach().transpose(-2, -1), counts)) <= tol
    splits = counts.tolist()
    pairs = zip(bf16(x.detach()).split(splits), g_low.split(splits))
    grad_w = torch.stack([xe.T @ ge for xe, ge in pairs])
    assert rel_err(w.grad, grad_w) <= 1e-2 and w.grad[1].abs().max() == 0  # expert 1 had no row


@pytest.mark.parametrize("fused", [True, False], ids=["torch_grouped_mm", "split_by_counts"])
def test_fp32_rows_over_bf16_experts_give_fp32_results_of_the_rounded_operands(monkeypatch, fused):
    """The CPU path (fp32 grouped GEMMs of the upcast operands), through torch._grouped_mm and
    through the split by counts. Planted: rounding the results to bf16 fails it."""
    if not fused:
        monkeypatch.setattr(grouped_gemm, "_fused_ok", lambda a, b: False)
    check_wide_grouped_mm("cpu")


def test_without_the_kernel_the_results_are_rounded_with_a_warning(monkeypatch, caplog):
    """Where the fp32 results cannot be computed (CUDA without Triton, or before sm80) the mode
    still runs: the plain bf16 grouped GEMM's results, upcast, and one warning that says why."""
    monkeypatch.setattr(grouped_gemm, "wide_grouped_available", lambda device: False)
    grouped_gemm._warn_rounded_results.cache_clear()
    x, w, counts, _ = wide_case()
    with caplog.at_level("WARNING", logger=grouped_gemm.__name__):
        out = grouped_mm(x.detach(), w.detach(), counts)
        grouped_mm(x.detach(), w.detach(), counts)
    assert out.dtype == torch.float32
    assert torch.equal(out, bf16(per_expert(bf16(x.detach()), w.detach(), counts)))
    assert [r.message for r in caplog.records if "Triton" in r.message] == [caplog.records[0].message]
    grouped_gemm._warn_rounded_results.cache_clear()


def test_the_cpu_decode_product_is_the_grouped_product():
    """``small_grouped_mm`` (the engine's CPU decode steps, transposed weight copies): the products
    of one expert at a time for blocks of 0, 1 and several rows, in fp32 up to the order of the sums."""
    from titan_rl.model.grouped_gemm import small_grouped_mm

    g = torch.Generator().manual_seed(int(torch.randint(0, 1000, ())))
    counts = torch.tensor([2, 0, 1, 5, 3, 0, 1, 8])
    x = torch.randn(int(counts.sum()), 96, generator=g)
    w = torch.randn(len(counts), 96, 80, generator=g)
    out = small_grouped_mm(x, w, w.transpose(1, 2).contiguous(), counts)
    torch.testing.assert_close(out, per_expert(x, w, counts), rtol=1e-5, atol=1e-5)
    empty = small_grouped_mm(x[:0], w, w.transpose(1, 2).contiguous(), torch.zeros_like(counts))
    assert empty.shape == (0, 80)


def test_same_dtypes_are_the_plain_grouped_gemm():
    x, w, counts, _ = wide_case()
    low = x.detach().to(torch.bfloat16)
    out = grouped_mm(low, w.detach(), counts)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, torch._grouped_mm(low, w.detach(), offs=torch.cumsum(counts, 0).int()))


INTERPRETED = """
import torch
from tests.unit.model.test_grouped_gemm import per_expert
from titan_rl.model.grouped_gemm import launch_config, triton_wide_grouped_mm

g = torch.Generator().manual_seed(0)
b = torch.randn(4, 80, 200, generator=g).to(torch.bfloat16)
# 48 rows over 4 experts: 16-row tiles; expert 2's 40 rows take three, expert 1 none; then the
# 64- and 128-row tiles of a trainer's micro-batch. 200 columns: two 128-column tiles, the second
# part masked; K = 80: two 64-wide steps, the second masked
for counts, block_m in (((5, 0, 40, 3), 16), ((100, 0, 300, 37), 64), ((300, 0, 1000, 37), 128)):
    assert launch_config(sum(counts), 4)["BLOCK_M"] == block_m
    a = torch.randn(sum(counts), 80, generator=g).to(torch.bfloat16)
    grad = torch.randn(sum(counts), 200, generator=g).to(torch.bfloat16)
    for name, rows, weights in (("forward", a, b), ("input gradient", grad, b.transpose(-2, -1))):
        exact = per_expert(rows, weights, torch.tensor(counts))
        out = triton_wide_grouped_mm(rows, weights, torch.tensor(counts))
        err = ((out - exact).abs().max() / exact.abs().max()).item()
        assert out.dtype == torch.float32 and err <= 1e-6, (name, block_m, err)
# an expert-parallel rank may receive no rows
assert triton_wide_grouped_mm(a[:0], b, torch.zeros(4, dtype=torch.long)).shape == (0, 200)
print("ok")
"""


def test_triton_kernel_in_the_interpreter():
    """The CUDA kernel's indexing (group offsets on the device, surplus row tiles, masked edges,
    the transposed weight of the backward) run by Triton's interpreter on the CPU, against fp32
    per-expert matmuls. (The interpreter takes the tile products in fp32: it multiplies bf16 tiles
    wrongly; on a GPU they are bf16 tensor-core products, checked by the CUDA test below.)"""
    triton = pytest.importorskip("triton")
    if tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 8):
        # Triton 3.6's interpreter fails on the loop over a runtime K ("only 0-dimensional arrays
        # can be converted to Python scalars"); its compiler is checked by the test below
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot run the kernel (3.8 can)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(INTERPRETED)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_triton_kernel_compiles_for_hopper_with_bf16_tensor_core_products(tmp_path, monkeypatch):
    """Ahead-of-time, no GPU needed: the kernel compiles for sm90 at the tile sizes a decode step
    (16 rows per tile) and a trainer (64, 128) launch, for the forward's weight layout and the
    input gradient's transposed one (unit strides specialized as a launch specializes them), and
    its PTX multiplies bf16 tiles into fp32 accumulators on tensor cores (mma.sync for 16 rows,
    Hopper's wgmma from 64)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # compile here, not from a cache
    pointers = {"a_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*fp32", "row_ends_ptr": "*i32"}
    pointers["tile_ends_ptr"] = "*i32"
    ints = ("E", "K", "M", "stride_an", "stride_ak", "stride_be", "stride_bk", "stride_bm", "stride_on")
    kernel = grouped_gemm._kernel()
    for rows in (128, 2048, 16384):  # 32 experts: a decode step of 32 tokens, micro-batches
        config = grouped_gemm.launch_config(rows, experts=32)
        options = {"num_warps": config.pop("num_warps"), "num_stages": config.pop("num_stages")}
        for unit_strides in (("stride_ak", "stride_bm"), ("stride_ak", "stride_bk")):
            constants = {**config, "EXPERTS_POW2": 32, "PRODUCTS_IN_FP32": False}
            constants |= dict.fromkeys(unit_strides, 1)
            signature = pointers | {name: "constexpr" if name in constants else "i32" for name in ints}
            signature |= dict.fromkeys(constants, "constexpr")
            source = ASTSource(fn=kernel, signature=signature, constexprs=constants)
            ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]
            products = re.findall(r"\b(?:wgmma\.mma_async|mma\.sync)[\w.]*", ptx)
            assert products and all(".f32.bf16.bf16" in p for p in products), (rows, set(products))
            assert products[0].startswith("wgmma") == (config["BLOCK_M"] >= 64), (rows, products[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_kernel_on_cuda_and_in_a_cuda_graph():
    """On a GPU: the Triton path's forward and gradients (as on the CPU above) at a decode step's
    and a trainer's tile sizes (16, 64 and 128 rows: ``launch_config``), to 1e-5 (tensor cores
    order the fp32 sums their own way; a bf16 rounding of the results is 1e-3 off), and a captured
    call replayed with other counts of the same total equals the eager call with them."""
    for counts in ((5, 0, 40, 3), (100, 0, 300, 37), (300, 0, 1000, 37)):
        check_wide_grouped_mm("cuda", counts, tol=1e-5)
    x, w, counts, _ = wide_case("cuda", k=128, m=256)
    x, w = x.detach(), w.detach()
    static_counts = counts.clone()
    grouped_mm(x, w, static_counts)  # warm-up: compiles the kernel outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = grouped_mm(x, w, static_counts)
    static_counts.copy_(torch.tensor([20, 8, 0, 20], device="cuda"))
    graph.replay()
    assert torch.equal(captured, grouped_mm(x, w, static_counts))
    assert rel_err(captured, per_expert(bf16(x), w, static_counts)) <= 1e-5

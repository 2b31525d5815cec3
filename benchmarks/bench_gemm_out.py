"""What fp32 outputs cost a bf16 GEMM: the measurement behind a "bf16 weights, fp32 activations" mode.

bench_precision.py found that rounding the activations, not the weights, is what separates a bf16
engine from a bf16 trainer; a mode whose GEMMs read bf16 operands but write fp32 results (and keep
everything between GEMMs in fp32) would close most of that gap. This script times, at
gpt-oss-20b's GEMM shapes and at a decode step's and a training micro-batch's row counts, one GEMM
three ways, in one run:

- ``bf16 out``: bf16 operands, bf16 result (``F.linear`` / ``torch._grouped_mm``), as the model runs.
- ``fp32 out``: bf16 operands, fp32 result (``torch.mm(..., out_dtype=torch.float32)`` /
  ``torch._grouped_mm(..., out_dtype=torch.float32)``), and whether autograd runs through it.
- ``fp32 out (titan_rl)``, the grouped GEMM only: the fp32-activation mode's expert GEMM
  (``titan_rl.model.grouped_gemm.grouped_mm`` of fp32 rows over bf16 experts; on CUDA its Triton
  kernel, since ``torch._grouped_mm`` has no fp32 output; elsewhere the fp32 upcast).
- ``fp32 upcast``: both operands cast to fp32 first (what such a mode costs without the overload).

Columns: median time over ``--iters`` runs after a warm-up, its ratio to ``bf16 out``, and the
result's max |difference| from the fp32 upcast's (fp32 out should agree to fp32 round-off; bf16
out is off by the final rounding). An overload the build lacks gets an ``unsupported: ...`` row.
CUDA only for the fp32-out rows (PyTorch has no CPU kernel for ``mm.dtype``); on a CPU the other
rows still run, at ``--tiny`` shapes. From the repo root:

    python benchmarks/bench_gemm_out.py            # CUDA, gpt-oss-20b shapes
    python benchmarks/bench_gemm_out.py --tiny     # a dry run anywhere
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from titan_rl.model.grouped_gemm import grouped_mm

TITAN = "fp32 out (titan_rl)"


def timed(fn: Callable[[], torch.Tensor], iters: int) -> tuple[float, torch.Tensor]:
    """Median seconds of ``fn`` over ``iters`` runs after one warm-up, and its last result."""
    out = fn()
    times = []
    for _ in range(iters):
        if out.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if out.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def backward_runs(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x, w) -> str:
    """Whether autograd differentiates ``fn(x, w)``: 'yes' or the error's first line."""
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    try:
        fn(x, w).float().sum().backward()
        return "yes" if x.grad is not None and w.grad is not None else "no gradient"
    except Exception as error:  # an op without a derivative formula says so here
        return str(error).splitlines()[0][:60]


def rows(name: str, variants: dict, x, w, iters: int) -> list[str]:
    """One table row per variant of one GEMM."""
    base, reference = None, variants["fp32 upcast"](x, w)
    lines = []
    for label, fn in variants.items():
        try:
            seconds, out = timed(lambda fn=fn: fn(x, w), iters)
        except Exception as error:
            lines.append(f"| {name} | {label} | unsupported: {str(error).splitlines()[0][:70]} | | | |")
            continue
        base = base or seconds
        diff = (out.float() - reference).abs().max().item()
        grad = backward_runs(fn, x, w) if label != "fp32 upcast" else "yes"
        lines.append(
            f"| {name} | {label} | {seconds * 1e6:,.0f} | {seconds / base:.2f}x | {diff:.2e} | {grad} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small shapes (a CPU dry run)")
    p.add_argument("--rows", type=int, nargs="+", default=[32, 4096], help="tokens per GEMM")
    p.add_argument("--iters", type=int, default=20)
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # gpt-oss-20b: hidden 2880, 64 query + 8 kv heads of 64, 32 experts top-4, intermediate 2880
    hidden, qkv, experts, top_k, inter, vocab = (
        (64, 128, 4, 2, 64, 512) if a.tiny else (2880, 5120, 32, 4, 2880, 201088)
    )
    token_rows = [4, 16] if a.tiny else a.rows
    bf16 = torch.bfloat16
    linear = {
        "bf16 out": lambda x, w: F.linear(x, w),
        "fp32 out": lambda x, w: torch.mm(x, w.t(), out_dtype=torch.float32),
        "fp32 upcast": lambda x, w: F.linear(x.float(), w.float()),
    }
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}\n")
    print("| GEMM | variant | time (us, median) | vs bf16 out | max \\|diff\\| vs fp32 upcast | autograd |")
    print("|---|---|---:|---:|---:|---|")
    g = torch.Generator(device=device).manual_seed(0)
    for n in token_rows:
        x = torch.randn(n, hidden, device=device, generator=g).to(bf16)
        for name, out_features in (("qkv", qkv), ("lm head", vocab)):
            w = (torch.randn(out_features, hidden, device=device, generator=g) * hidden**-0.5).to(bf16)
            print(
                "\n".join(
                    rows(f"{name} [{n} x {hidden}] x [{hidden} x {out_features}]", linear, x, w, a.iters)
                )
            )
        # the experts' gate_up GEMM: n * top_k routed rows, spread evenly over the experts
        per = max(1, n * top_k // experts)
        offsets = torch.arange(1, experts + 1, device=device, dtype=torch.int32) * per
        counts = torch.full((experts,), per, device=device)
        xe = torch.randn(per * experts, hidden, device=device, generator=g).to(bf16)
        we = (torch.randn(experts, hidden, 2 * inter, device=device, generator=g) * hidden**-0.5).to(bf16)
        grouped = {
            "bf16 out": lambda x, w, offs=offsets: torch._grouped_mm(x, w, offs=offs),
            "fp32 out": lambda x, w, offs=offsets: torch._grouped_mm(
                x, w, offs=offs, out_dtype=torch.float32
            ),
            # the fp32-activation mode's expert GEMM (titan_rl.model.grouped_gemm): on CUDA its
            # Triton kernel, elsewhere the fp32 upcast; the fp32 x is what the model passes it
            TITAN: lambda x, w, counts=counts: grouped_mm(x.float(), w, counts),
            "fp32 upcast": lambda x, w, per=per: torch.cat(
                [x[i * per : (i + 1) * per].float() @ w[i].float() for i in range(experts)]
            ),
        }
        name = f"experts gate_up [{per * experts} x {hidden}] x {experts} x [{hidden} x {2 * inter}]"
        print("\n".join(rows(name, grouped, xe, we, a.iters)), flush=True)


if __name__ == "__main__":
    main()

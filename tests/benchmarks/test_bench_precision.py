"""benchmarks/bench_precision.py on CPU with tiny shapes: a row per variant, and every patched
variant really computes something else than the plain one it patches."""

from __future__ import annotations

import pytest

from tests.benchmarks import run_benchmark, table_rows


@pytest.mark.timeout(240)
def test_bench_precision_rows_and_their_variants_apply():
    proc = run_benchmark(
        "bench_precision.py", "--preset", "debug", "--layers", "2", "--batch", "3", "--prompt", "8",
        "--new", "8",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    header, *rows = table_rows(proc.stdout)
    assert header[0] == "variant" and len(header) == 6, header
    by_name = {row[0]: [float(c.rstrip("%")) for c in row[1:]] for row in rows}
    assert list(by_name) == ["bf16", "fp32 residual", "fp32 router", "fp32 activations", "fp32"]
    fp32 = by_name["fp32"]
    assert fp32[0] <= 1e-5 and fp32[1] <= 1e-4 and fp32[4] == 0.0, fp32  # the floor: round-off
    assert by_name["bf16"][0] > 10 * fp32[0], by_name  # bf16 rounding shows
    # a patch that no longer applies would repeat the row it patches
    # (at these tiny shapes rounding the GEMM inputs can even make engine and trainer bitwise equal)
    assert by_name["fp32 activations"][:4] != fp32[:4], by_name
    assert by_name["fp32 residual"][:4] != by_name["bf16"][:4], by_name
    assert by_name["fp32 router"][:4] != by_name["bf16"][:4], by_name

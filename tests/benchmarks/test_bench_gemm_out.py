"""benchmarks/bench_gemm_out.py on CPU with tiny shapes: every GEMM gets its three rows, bf16 out is
off the fp32 result by bf16's rounding (not zero, not more), and a missing overload is a row."""

from __future__ import annotations

import pytest
import torch

from tests.benchmarks import run_benchmark, table_rows


@pytest.mark.timeout(120)
def test_bench_gemm_out_rows():
    proc = run_benchmark("bench_gemm_out.py", "--tiny", "--iters", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    header, *rows = table_rows(proc.stdout)
    # per row count: qkv and the LM head (3 rows each), the experts (4: titan_rl's grouped GEMM too)
    assert header[:2] == ["GEMM", "variant"] and len(rows) == 2 * (3 + 3 + 4), rows
    groups = [rows[i : i + 3] for i in (0, 3, 10, 13)] + [rows[i : i + 4] for i in (6, 16)]
    for gemm in groups:
        bf16, fp32_out, *titan, upcast = gemm
        assert [bf16[1], fp32_out[1], upcast[1]] == ["bf16 out", "fp32 out", "fp32 upcast"]
        if titan:  # the mode's expert GEMM: fp32 results (on the CPU, of the upcast operands)
            assert titan[0][1] == "fp32 out (titan_rl)" and titan[0][5] == "yes", titan
            assert float(titan[0][4]) <= 1e-5, titan
        # operands ~N(0, 1) and weights scaled by hidden^-0.5: results ~N(0, 1), bf16 spacing <= 2^-5
        assert 0 < float(bf16[4]) < 2**-4, bf16
        assert float(upcast[4]) == 0.0 and upcast[5] == "yes", upcast
        if not torch.cuda.is_available():  # PyTorch has no CPU fp32-out GEMM: reported, not fatal
            assert fp32_out[2].startswith("unsupported"), fp32_out

"""benchmarks/bench_model.py runs on CPU with tiny shapes and prints its side-by-side table."""

from __future__ import annotations

import re

import pytest

from tests.benchmarks import run_benchmark, table_rows


@pytest.mark.timeout(240)
def test_bench_model_prints_every_row_on_cpu():
    proc = run_benchmark(
        "bench_model.py", "--preset", "debug", "--layers", "2",
        "--seq", "32", "64", "--hf-attn", "eager", "--steps", "1", "--warmup", "0", "--ac-from", "64",
        "--profile", "3",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "profile of titan_rl at T=32: one step, top 3 ops" in proc.stderr  # --profile, every row
    assert "profile of HF eager at T=32" in proc.stderr
    check = re.search(r"loss check at T=32: titan_rl (\S+), transformers (\S+), rel diff (\S+)", out)
    assert check and float(check.group(3)) <= 1e-4, out
    for row in (
        r"\| titan_rl \| 32 \|",
        r"\| HF eager \(\w+ experts\) \| 32 \|",
        r"\| titan_rl \+ full AC \| 64 \|",
    ):
        assert re.search(row, out), f"missing row {row}:\n{out}"
    # every row measured something: tokens/s and TFLOP/s are positive numbers, MFU n/a on CPU
    rows = [cells for cells in table_rows(out) if cells[0].startswith(("titan_rl", "HF"))]
    assert len(rows) == 4
    for cells in rows:
        assert float(cells[2].replace(",", "")) > 0 and float(cells[4]) > 0 and cells[5] == "n/a", cells

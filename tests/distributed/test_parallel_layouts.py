"""Parallel layouts on CPU ranks (gloo) match one process; parameter + optimizer memory falls as 1/N.

One torchrun launch per world size runs all its layouts (see ``parallel_layouts_worker.py``).
Layouts with context parallelism (expert-parallel ranks borrowed from cp) run when
``titan_rl.parallel.context_parallel`` is present.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest

from tests.distributed.launcher import run_torchrun

WORKER = Path(__file__).with_name("parallel_layouts_worker.py")
LAYOUTS = {
    2: [
        "dp_shard=2",
        "dp_shard=2,ep=2",
        "dp_shard=2,ep=2,ac=full,reshard=0",
        "dp_replicate=2,ac=selective",
    ],
    4: [
        "dp_shard=4",
        "dp_shard=4,ep=2",
        "dp_shard=4,ep=4",
        "dp_replicate=2,dp_shard=2",
        "dp_replicate=2,dp_shard=2,ep=2,ac=full",
        "dp_shard=4,ep=4,ac=selective,reshard=0",
    ],
}
# context parallelism, both modes, alone and under FSDP (dp_shard=2 x cp=2) and with EP
LAYOUTS[2] += ["cp=2", "cp=2,cp_mode=ring", "cp=2,ep=2"]
LAYOUTS[4] += [
    "dp_shard=2,cp=2",
    "dp_shard=2,cp=2,cp_mode=ring",
    "dp_shard=2,cp=2,ep=4",
    "cp=4,ep=2,cp_mode=ring",
]
MEMORY = re.compile(r"memory (\S+) N=(\d+) rank=(\d+) bytes=(\d+)")


@functools.cache
def launch(nproc: int) -> str:
    return run_torchrun(WORKER, *LAYOUTS[nproc], nproc=nproc, timeout=150.0)


def memory(nproc: int) -> dict[str, int]:
    """Largest per-rank bytes of local parameters + AdamW state, by layout."""
    out: dict[str, int] = {}
    for layout, _, _, size in MEMORY.findall(launch(nproc)):
        out[layout] = max(out.get(layout, 0), int(size))
    return out


@pytest.mark.timeout(200)
@pytest.mark.parametrize("nproc", [2, 4])
def test_layouts_match_single_process(nproc: int) -> None:
    output = launch(nproc)
    assert output.count(": ok") == nproc, output[-3000:]
    for layout in LAYOUTS[nproc]:
        assert f"layout {layout}: worst rel err" in output, f"{layout} did not run:\n{output[-3000:]}"


@pytest.mark.timeout(400)
def test_memory_falls_with_dp_shard() -> None:
    by_n = {1: memory(2)["reference"], 2: memory(2)["dp_shard=2"], 4: memory(4)["dp_shard=4"]}
    print("params + AdamW state per rank (bytes):", by_n)
    for n, size in by_n.items():
        assert size <= 1.05 * by_n[1] / n, f"dp_shard={n}: {size} bytes per rank, expected ~{by_n[1] // n}"
    with_ep = memory(4)["dp_shard=4,ep=4"]  # experts split 4 ways by ep instead of FSDP: same total
    assert with_ep <= 1.05 * by_n[1] / 4, with_ep

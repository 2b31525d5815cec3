"""A scheduler's signal on one rank stops every rank at the same step (2 CPU processes, gloo)."""

from __future__ import annotations

from pathlib import Path

from tests.distributed.launcher import run_torchrun

WORKER = Path(__file__).with_name("stop_worker.py")


def test_a_signal_on_one_rank_stops_both():
    output = run_torchrun(WORKER, nproc=2, timeout=90)
    assert "rank 0: ok" in output and "rank 1: ok" in output

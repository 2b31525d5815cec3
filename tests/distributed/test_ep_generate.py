"""The native engine under expert parallelism on 2 CPU processes (gloo)."""

from __future__ import annotations

from pathlib import Path

from tests.distributed.launcher import run_torchrun

WORKER = Path(__file__).with_name("ep_generate_worker.py")


def test_ranks_that_sample_different_tokens_raise_instead_of_hanging():
    output = run_torchrun(WORKER, nproc=2, timeout=120)
    assert "rank 0: ok" in output and "rank 1: ok" in output

"""The native engine on 2 CPU processes with FSDP2 (gloo): prompts split, weights gathered once."""

from __future__ import annotations

from pathlib import Path

from tests.distributed.launcher import run_torchrun

WORKER = Path(__file__).with_name("native_generate_worker.py")


def test_ranks_share_the_prompts_and_gather_weights_once_per_generate():
    output = run_torchrun(WORKER, nproc=2, timeout=120)
    assert "rank 0: ok" in output and "rank 1: ok" in output

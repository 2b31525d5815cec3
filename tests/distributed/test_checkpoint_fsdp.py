"""Checkpoint resume and HF save/load with FSDP2 on 2 CPU processes (gloo)."""

from __future__ import annotations

from pathlib import Path

from tests.distributed.launcher import run_torchrun

WORKER = Path(__file__).with_name("checkpoint_fsdp_worker.py")


def test_fsdp2_resume_and_hf_round_trip(tmp_path):
    output = run_torchrun(WORKER, str(tmp_path), nproc=2, timeout=120)
    assert "rank 0: ok" in output and "rank 1: ok" in output


EP_WORKER = Path(__file__).with_name("checkpoint_ep_worker.py")


def test_expert_parallel_hf_save_load_and_weight_sync(tmp_path):
    """dp_shard=2 x ep=2: HF save (fp32 and MXFP4), load and ``hf_tensors`` equal one process."""
    output = run_torchrun(EP_WORKER, str(tmp_path), nproc=2, timeout=120)
    assert "rank 0: ok" in output and "rank 1: ok" in output, output[-3000:]

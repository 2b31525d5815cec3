"""Multi-turn episodes on 2 CPU processes (gloo): tools and rewards run once, on the episode's rank."""

from __future__ import annotations

from pathlib import Path

from tests.distributed.launcher import run_torchrun

WORKER = Path(__file__).with_name("agent_loop_worker.py")


def test_each_episodes_tools_and_reward_run_on_one_rank_and_every_rank_gets_them():
    output = run_torchrun(WORKER, nproc=2, timeout=120)
    assert "rank 0: ok" in output and "rank 1: ok" in output

"""The dump folder on 2 CPU processes (gloo): a rank that cannot see rank 0's folder (a node-local
disk on a multi-node run) and a folder another run holds stop every rank at startup."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.launcher import run_torchrun
from titan_rl.run_folder import claim_run_folder

WORKER = Path(__file__).with_name("run_folder_worker.py")


@pytest.mark.parametrize("case", ["ok", "cannot see", "in use"])
def test_every_rank_agrees_on_the_run_folder(tmp_path, case):
    shared = tmp_path / "shared"
    rank1 = tmp_path / "node-local" if case == "cannot see" else shared  # another node's own disk
    held = claim_run_folder(shared, shared=False) if case == "in use" else None  # another run's
    try:
        output = run_torchrun(WORKER, str(shared), str(rank1), case, nproc=2, timeout=90)
    finally:
        if held is not None:
            held.close()
    assert "rank 0: ok" in output and "rank 1: ok" in output

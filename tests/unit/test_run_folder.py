"""One run per dump folder (titan_rl.run_folder): a second run stops at startup."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from titan_rl import train
from titan_rl.run_folder import RunFolderError, claim_run_folder

SMOKE = str(Path(__file__).resolve().parents[2] / "train_configs/smoke_cpu.toml")


def test_a_second_claim_of_a_held_folder_names_the_holder_and_a_released_one_is_free(tmp_path):
    held = claim_run_folder(tmp_path / "run", shared=True)  # one process: nothing to share
    with pytest.raises(RunFolderError, match=f"in use by another run \\(pid {os.getpid()} on "):
        claim_run_folder(tmp_path / "run", shared=False)
    held.close()
    claim_run_folder(tmp_path / "run", shared=False).close()


def test_a_run_in_a_folder_another_run_holds_stops_before_writing(tmp_path, capsys):
    dump = tmp_path / "run"
    held = claim_run_folder(dump, shared=False)
    try:
        args = ["--config", SMOKE, f"--job.dump_folder={dump}", "--training.steps=1"]
        assert train.main(args) == 2
    finally:
        held.close()
    assert "is in use by another run" in capsys.readouterr().err
    assert sorted(p.name for p in dump.iterdir()) == [".lock"]  # no config.toml, no metrics
    assert train.main(args) == 0  # released: the same command runs


def test_a_folder_that_cannot_be_made_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(RunFolderError, match=f"cannot use job.dump_folder {blocker / 'run'}"):
        claim_run_folder(blocker / "run", shared=True)

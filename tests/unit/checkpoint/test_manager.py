"""Training-state checkpoints: bitwise resume, rotation, crash safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.unit.checkpoint.training import make_training, train
from titan_rl.checkpoint.hf import CheckpointError
from titan_rl.checkpoint.manager import CheckpointManager

REPO = Path(__file__).resolve().parents[3]


def test_resume_gives_bitwise_equal_steps(tmp_path):
    seed = int(torch.randint(0, 1000, ()))
    manager = CheckpointManager(tmp_path, interval=2, keep_last=3)
    model, optimizer, scheduler = make_training(seed)
    torch.manual_seed(seed + 1)
    reference = train(model, optimizer, scheduler, range(1, 5), manager)
    assert [p.name for p in manager.checkpoints()] == ["step-000002", "step-000004"]

    resumed, optimizer2, scheduler2 = make_training(seed + 2)
    torch.manual_seed(seed + 3)  # overwritten by the restored RNG state
    assert manager.load(resumed, optimizer2, scheduler2, path=tmp_path / "step-000002") == (2, {"cursor": 20})
    assert scheduler2.last_epoch == 2
    losses = train(resumed, optimizer2, scheduler2, range(3, 5))
    for a, b in zip(reference[2:], losses):
        assert torch.equal(a, b)
    for (name, a), b in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name
    assert (tmp_path / "step-000002" / "config.json").read_text().strip() == '{\n  "seed": 0\n}'


def tiny_state():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, optimizer


def test_rotation_latest_and_nothing_to_resume(tmp_path):
    manager = CheckpointManager(tmp_path, interval=2, keep_last=2)
    model, optimizer = tiny_state()
    assert manager.latest() is None and manager.load(model, optimizer) is None
    assert [s for s in range(1, 7) if manager.should_save(s)] == [2, 4, 6]
    for step in (2, 4, 6):
        assert manager.save(step, model, optimizer) == tmp_path / f"step-{step:06d}"
    assert [p.name for p in manager.checkpoints()] == ["step-000004", "step-000006"]
    (tmp_path / "step-000008.tmp").mkdir()  # an unfinished save is never "latest"
    assert manager.latest() == tmp_path / "step-000006"
    assert manager.load(model, optimizer) == (6, {})
    with pytest.raises(CheckpointError, match=r"step-000008\.tmp"):
        manager.load(model, optimizer, path=tmp_path / "step-000008.tmp")
    off = CheckpointManager(tmp_path / "off", interval=1, enable=False)
    assert not off.should_save(1) and off.save(1, model, optimizer) is None
    assert not (tmp_path / "off").exists()


CRASHING_CHILD = """
import sys, time
import titan_rl.checkpoint.manager as manager
from tests.unit.checkpoint.training import make_training, train

folder = sys.argv[1]
checkpoints = manager.CheckpointManager(folder, interval=2)
model, optimizer, scheduler = make_training(0)
train(model, optimizer, scheduler, [1, 2], checkpoints)
write = manager._dcp

def slow_write(*args):
    write(*args)
    time.sleep(120)  # the test kills us here, in the middle of saving step 4

manager._dcp = slow_write
train(model, optimizer, scheduler, [3, 4], checkpoints)
"""


def test_killed_save_leaves_the_previous_checkpoint(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", CRASHING_CHILD, str(tmp_path)], cwd=REPO, env=env)
    partial = tmp_path / "step-000004.tmp" / ".metadata"
    deadline = time.monotonic() + 60
    try:
        while not partial.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL, "the child ended before it was killed mid-save"
    assert partial.exists()

    manager = CheckpointManager(tmp_path, interval=2)
    assert manager.latest() == tmp_path / "step-000002"
    model, optimizer, scheduler = make_training(1)
    assert manager.load(model, optimizer, scheduler) == (2, {"cursor": 20})
    manager.save(4, model, optimizer, scheduler)  # a new save clears the debris
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002", "step-000004"]


@pytest.mark.parametrize("damaged", ["trainer_state.pt", ".metadata"])
def test_a_damaged_newest_checkpoint_resumes_the_one_before(tmp_path, damaged):
    """A node crash after the rename (before fsync) can leave empty files in a folder that looks
    complete: resuming it failed with EOFError on every restart; the one before is resumed instead."""
    manager = CheckpointManager(tmp_path, interval=2, keep_last=3)
    model, optimizer, scheduler = make_training(0)
    train(model, optimizer, scheduler, range(1, 5), manager)
    (tmp_path / "step-000004" / damaged).write_bytes(b"")
    with pytest.warns(UserWarning, match=f"skipping .*step-000004: {damaged} does not read"):
        assert manager.latest() == tmp_path / "step-000002"
    resumed, optimizer2, scheduler2 = make_training(1)
    with pytest.warns(UserWarning, match="skipping"):
        assert manager.load(resumed, optimizer2, scheduler2) == (2, {"cursor": 20})
    # the resumed run's next checkpoints are kept, not pruned as older than the damaged one
    manager.keep_last = 1
    manager.save(3, resumed, optimizer2, scheduler2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000003", "step-000004"]
    with pytest.warns(UserWarning, match="skipping"):
        assert manager.latest() == tmp_path / "step-000003"
    manager.save(5, resumed, optimizer2, scheduler2)  # past it: the damaged one is pruned like any other
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000005"]


def test_training_checkpoint_converts_to_hf(tmp_path):
    from titan_rl.checkpoint.hf import load_hf_model, save_hf_model
    from titan_rl.checkpoint.manager import convert_dcp_to_hf

    model, optimizer, scheduler = make_training(int(torch.randint(0, 1000, ())))
    train(model, optimizer, scheduler, [1, 2], CheckpointManager(tmp_path / "ckpt", interval=2))
    save_hf_model(model, tmp_path / "base")  # only its config.json is used
    out = tmp_path / "hf"
    convert_dcp_to_hf(
        tmp_path / "ckpt" / "step-000002", out, dtype=torch.float32, hf_config=tmp_path / "base"
    )
    for (name, a), b in zip(model.named_parameters(), load_hf_model(out).parameters()):
        assert torch.equal(a, b), name


def test_a_resume_restores_the_cuda_generator_of_its_own_device_only():
    """A checkpoint saved on 8-GPU nodes and resumed on 4-GPU nodes: old checkpoints hold every
    visible device's state (a list), new ones the rank's own; a device the saving node lacked
    restores nothing rather than indexing past the list."""
    from titan_rl.checkpoint.manager import cuda_rng_to_restore

    states = [torch.tensor([i], dtype=torch.uint8) for i in range(4)]
    assert torch.equal(cuda_rng_to_restore(states, 2), states[2])
    assert cuda_rng_to_restore(states, 5) is None
    assert torch.equal(cuda_rng_to_restore(states[1], 3), states[1])


def save_steps(manager: CheckpointManager, steps, load_path: str = "") -> None:
    """Complete checkpoints at ``steps`` as a run with ``checkpoint.load_path = load_path`` saves them."""
    model, optimizer, scheduler = make_training(0)
    for step in steps:
        config = {"checkpoint": {"load_path": load_path}}
        manager.save(step, model, optimizer, scheduler, config=config)


def test_a_branch_sets_aside_the_other_timelines_later_checkpoints_and_resumes_its_own(tmp_path, capsys):
    """Resuming from step 4 of a run that went on to 8 (typically past a collapse, with a lower LR):
    the old 6 and 8 must not be this run's newest (a restart without load_path, or keep_last,
    would pick them); a restart of the branch with the same load_path resumes the branch's own
    newest checkpoint instead of starting over from step 4."""
    manager = CheckpointManager(tmp_path, interval=1, keep_last=10)
    save_steps(manager, [2, 4, 6, 8])
    start = tmp_path / "step-000004"

    assert manager.resume_target(start) == start
    assert [p.name for p in manager.checkpoints()] == ["step-000002", "step-000004"]
    aside = sorted(p.name.split("-2")[0] for p in (tmp_path / "superseded").iterdir())
    assert aside == ["step-000006", "step-000008"]
    assert "set aside 2 later checkpoint(s)" in capsys.readouterr().out

    save_steps(manager, [5, 6], load_path=str(start))  # the branch, then a crash
    assert manager.resume_target(start) == tmp_path / "step-000006"  # the same command again
    assert [p.name for p in manager.checkpoints()][-2:] == ["step-000005", "step-000006"]
    assert manager.resume_target() == tmp_path / "step-000006"  # and without load_path


def test_a_load_path_outside_the_folder_sets_aside_what_the_folder_holds_from_other_runs(tmp_path):
    elsewhere = CheckpointManager(tmp_path / "old_run", interval=1)
    save_steps(elsewhere, [3])
    manager = CheckpointManager(tmp_path / "new_run", interval=1)
    save_steps(manager, [1, 7])  # an unrelated earlier run in the same dump folder
    start = tmp_path / "old_run" / "step-000003"
    assert manager.resume_target(start) == start
    assert manager.checkpoints() == []  # none of them is this run's past
    assert len(list((tmp_path / "new_run" / "superseded").iterdir())) == 2


def test_a_branch_restarts_after_keep_last_pruned_its_start(tmp_path):
    """keep_last = 2: the branch's own step 5 and 6 prune step 4, its load_path. Restarting with the
    same command (preflight included) resumes step 6 instead of failing on the missing step 4."""
    from titan_rl.config import load_config
    from titan_rl.preflight import resume_folder

    manager = CheckpointManager(tmp_path / "checkpoint", interval=1, keep_last=2)
    save_steps(manager, [2, 4, 6, 8])
    start = tmp_path / "checkpoint" / "step-000004"
    assert manager.resume_target(start) == start
    save_steps(manager, [5, 6], load_path=str(start))
    assert not start.exists()  # pruned
    cfg = load_config(
        None,
        [f"--job.dump_folder={tmp_path}", "--checkpoint.enable=true", f"--checkpoint.load_path={start}"],
    )
    assert resume_folder(cfg) == tmp_path / "checkpoint" / "step-000006"
    assert manager.resume_target(start) == tmp_path / "checkpoint" / "step-000006"

"""Crash safety and clear failures, end to end: kill -9 mid-step and mid-save, dead and hung ranks
without a launcher, and every malformed input as one line without a traceback."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.distributed.launcher import free_port
from tests.e2e.test_run_train import (
    DETERMINISTIC,
    ROOT,
    SMOKE_CONFIG,
    _pid_of_rank,
    read_metrics,
    run_train,
    start_run,
    steps_logged,
    wait_for,
)

CHECKPOINTED = ["--training.steps=6", "--checkpoint.enable=true", "--checkpoint.interval=2"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> list[dict]:
    """The uninterrupted 6-step run every crashed-and-resumed run must reproduce."""
    dump = tmp_path_factory.mktemp("straight")
    result = run_train(*CHECKPOINTED, f"--job.dump_folder={dump}")
    assert result.returncode == 0, result.stderr[-2000:]
    return read_metrics(dump)


def assert_same_run(resumed: list[dict], straight: list[dict]) -> None:
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight, resumed):
        assert {k: a[k] for k in DETERMINISTIC} == {k: b[k] for k in DETERMINISTIC}, a["step"]


def test_kill_9_mid_step_then_resume_is_bitwise(tmp_path, straight):
    """SIGKILL the whole run while it computes step 4; the restart resumes from step 2 exactly."""
    dump = tmp_path / "killed"
    proc = start_run(["./run_train.sh", *CHECKPOINTED, f"--job.dump_folder={dump}"])
    wait_for(lambda: steps_logged(dump) >= 3, proc)  # step 3 logged: step 4 is running
    os.kill(_pid_of_rank(0, str(dump)), signal.SIGKILL)  # the training process, not the launcher
    output, _ = proc.communicate(timeout=60)
    assert "error: rank 0" in output and "was killed by SIGKILL" in output, output[-2000:]
    assert (dump / "checkpoint" / "step-000002").is_dir()
    assert not (dump / "checkpoint" / "step-000004").exists(), "the kill came too late to be mid-step"

    again = run_train(*CHECKPOINTED, f"--job.dump_folder={dump}")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from step 2" in again.stdout
    assert_same_run(read_metrics(dump), straight)


SLOW_SAVE = """
import sys, time
import titan_rl.checkpoint.manager as manager
from titan_rl.train import main

write = manager._dcp

def write_then_hang(action, state, folder):
    write(action, state, folder)
    if action == "save" and folder.name == "step-000004.tmp":
        print("SAVING", flush=True)
        time.sleep(300)  # the test kills us here: DCP files written, checkpoint not complete

manager._dcp = write_then_hang
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_mid_checkpoint_save_then_resume_is_bitwise(tmp_path, straight):
    """SIGKILL the trainer while it writes the step-4 checkpoint: the partial folder is never loaded."""
    dump = tmp_path / "killed_saving"
    args = ["--config", SMOKE_CONFIG, *CHECKPOINTED, f"--job.dump_folder={dump}"]
    proc = start_run([sys.executable, "-c", SLOW_SAVE, *args], env={"PYTHONPATH": str(ROOT)})
    partial = dump / "checkpoint" / "step-000004.tmp"
    wait_for(lambda: (partial / ".metadata").exists(), proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert partial.is_dir() and not (dump / "checkpoint" / "step-000004").exists()

    again = run_train(*CHECKPOINTED, f"--job.dump_folder={dump}")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from step 2" in again.stdout
    assert not partial.exists()  # the next save cleared the debris
    assert_same_run(read_metrics(dump), straight)


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_failed_rank_is_named_without_a_launcher(tmp_path, how):
    """Two plain processes (no torchrun agent): SIGKILL or SIGSTOP rank 1 mid-run; rank 0 exits with a
    line naming rank 1, after at most the configured collective timeout, never hanging."""
    dump, port, timeout_s = tmp_path / how, free_port(), 6
    procs = []
    for rank in range(2):
        env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2"}
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        args = [sys.executable, "-m", "titan_rl.train", "--config", SMOKE_CONFIG, "--training.steps=1000"]
        args += ["--parallelism.dp_shard=2", f"--parallelism.collective_timeout_s={timeout_s}"]
        procs.append(start_run([*args, f"--job.dump_folder={dump}"], env=env))
    try:
        wait_for(lambda: steps_logged(dump) >= 1, procs[0])
        os.kill(procs[1].pid, signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        stopped = time.monotonic()
        output, _ = procs[0].communicate(timeout=timeout_s + 60)
        waited = time.monotonic() - stopped
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert procs[0].returncode == 3, output[-3000:]
    error = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "rank 1 stopped responding" in error[0], output[-3000:]
    assert "Traceback" not in output
    if how == "hung":  # nothing breaks the connection: only the timeout ends the wait
        assert "Timed out" in error[0] and timeout_s - 1 <= waited <= timeout_s + 30
    else:
        assert waited < timeout_s + 30


FAIL_ON_RANK_1 = """
import os, sys
import titan_rl.trainer
from titan_rl.train import main

original, calls = titan_rl.trainer.Trainer.train_step, []

def train_step(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 3 and os.environ["RANK"] == "1":
        raise RuntimeError("injected: an error of rank 1's own (an out-of-memory, a bug)")
    return original(self, *args, **kwargs)

titan_rl.trainer.Trainer.train_step = train_step
raise SystemExit(main(sys.argv[1:]))
"""


def test_an_error_on_one_rank_ends_the_run_at_once(tmp_path):
    """Rank 1 raises an error of its own mid-run (not a failed collective) while rank 0 waits in the
    step's collectives: rank 1 exits with its traceback and rank 0 names it, both long before the
    collective timeout. (A rank that waited in a barrier on its way out would hold both until then.)"""
    dump, port, timeout_s = tmp_path / "run", free_port(), 300
    script = tmp_path / "fail_on_rank_1.py"
    script.write_text(FAIL_ON_RANK_1)
    procs = []
    started = time.monotonic()
    for rank in range(2):
        env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "PYTHONPATH": str(ROOT)}
        env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        args = [sys.executable, str(script), "--config", SMOKE_CONFIG, "--training.steps=1000"]
        args += ["--parallelism.dp_shard=2", f"--parallelism.collective_timeout_s={timeout_s}"]
        procs.append(start_run([*args, f"--job.dump_folder={dump}"], env=env))
    try:
        outputs = [proc.communicate(timeout=240)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert time.monotonic() - started < 200  # setup and two steps included; the timeout is 300 s
    assert procs[1].returncode not in (0, None), outputs[1][-3000:]
    assert "injected: an error of rank 1's own" in outputs[1], outputs[1][-3000:]
    assert procs[0].returncode == 3, outputs[0][-3000:]
    error = [line for line in outputs[0].splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "rank 1 stopped responding" in error[0], outputs[0][-3000:]
    assert steps_logged(dump) == 2


# --- malformed inputs: one line, non-zero exit, no traceback; --debug shows it ---


def _hf_folder(folder: Path) -> Path:
    from titan_rl.checkpoint.hf import save_hf_model
    from titan_rl.model import GptOss, GptOssModelArgs
    from titan_rl.rl.tokenizer import build_tiny_tokenizer

    torch.manual_seed(0)
    save_hf_model(GptOss(GptOssModelArgs.from_preset("debug")), folder)
    build_tiny_tokenizer(512).save(folder)
    return folder


def _drop_tokenizer(folder: Path) -> list[str]:
    (folder / "tokenizer.json").unlink()
    return [f"--model.hf_path={folder}"], "no tokenizer.json in"


def _bad_tokenizer(folder: Path) -> list[str]:
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    return [f"--model.hf_path={folder}"], "is not a valid tokenizer.json"


def _drop_shard(folder: Path) -> list[str]:
    next(folder.glob("model-*.safetensors")).unlink()
    return [f"--model.hf_path={folder}"], "listed in model.safetensors.index.json is missing"


def _wrong_shape(folder: Path) -> list[str]:
    shard = next(folder.glob("model-*.safetensors"))
    tensors = load_file(shard)
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"][:, :-1].contiguous()
    save_file(tensors, shard, metadata={"format": "pt"})
    return [f"--model.hf_path={folder}"], "'model.embed_tokens.weight' has shape"


def _config_mismatch(folder: Path) -> list[str]:
    config = json.loads((folder / "config.json").read_text())
    config["num_local_experts"] *= 2
    (folder / "config.json").write_text(json.dumps(config))
    return [f"--model.hf_path={folder}"], "but config.json implies"


def _bad_dataset_line(folder: Path) -> list[str]:
    data = folder / "problems.jsonl"
    data.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?", "answer": 4\n')
    return ["--env.name=math", f"--env.data_path={data}"], "problems.jsonl:2: not valid JSON"


def _missing_key_line(folder: Path) -> list[str]:
    data = folder / "problems.jsonl"
    data.write_text('{"question": "1+1?", "answer": "2"}\n\n{"q": "2+2?", "answer": "4"}\n')
    return ["--env.name=math", f"--env.data_path={data}"], "problems.jsonl:3: each line needs"


def _missing_dataset(folder: Path) -> list[str]:
    return ["--env.name=math", f"--env.data_path={folder / 'nope.jsonl'}"], "nope.jsonl not found"


def _checkpoint_lost_a_file(folder: Path) -> list[str]:
    step = _training_checkpoint(folder)
    next(step.glob("*.distcp")).unlink()
    return [f"--checkpoint.load_path={step}"], ".distcp is missing"


def _checkpoint_incomplete(folder: Path) -> list[str]:
    step = _training_checkpoint(folder)
    (step / "trainer_state.pt").unlink()
    return [f"--checkpoint.load_path={step}"], "is not a complete checkpoint"


def _checkpoint_of_another_model(folder: Path) -> list[str]:
    from tests.conftest import tiny_model
    from titan_rl.checkpoint.manager import CheckpointManager

    model = tiny_model()
    step = CheckpointManager(folder / "other", interval=1).save(
        1, model, torch.optim.AdamW(model.parameters())
    )
    return [f"--checkpoint.load_path={step}"], "model.preset = 'debug'"


def _training_checkpoint(folder: Path) -> Path:
    dump = folder / "run"
    result = run_train("--training.steps=1", "--checkpoint.enable=true", f"--job.dump_folder={dump}")
    assert result.returncode == 0, result.stderr[-2000:]
    return dump / "checkpoint" / "step-000001"


def _missing_load_path(folder: Path) -> list[str]:
    return [f"--checkpoint.load_path={folder / 'gone'}"], "does not exist"


BREAKAGES = [
    _drop_tokenizer, _bad_tokenizer, _drop_shard, _wrong_shape, _config_mismatch, _bad_dataset_line,
    _missing_key_line, _missing_dataset, _checkpoint_lost_a_file, _checkpoint_incomplete,
    _checkpoint_of_another_model, _missing_load_path,
]  # fmt: skip


@pytest.mark.parametrize("breakage", BREAKAGES, ids=lambda f: f.__name__.strip("_"))
def test_malformed_input_is_one_line(tmp_path, breakage):
    args, message = breakage(_hf_folder(tmp_path / "hf"))
    if any("hf_path" in a for a in args) and "--env.name=math" not in args:
        args = [*args, "--env.name=tool_lookup"]
    args = [*args, "--training.seq_len=512"]  # agentic episodes must fit one row
    result = run_train(*args, "--training.steps=1", f"--job.dump_folder={tmp_path / 'out'}")
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_debug_shows_the_traceback(tmp_path):
    args, _ = _drop_tokenizer(_hf_folder(tmp_path / "hf"))
    result = run_train(*args, "--env.name=tool_lookup", "--training.seq_len=512", "--debug")
    assert result.returncode != 0 and "Traceback" in result.stderr


NAN_FROM_STEP_3 = """
import sys
import titan_rl.trainer as trainer
from titan_rl.train import main

loss_fn, steps = trainer.rl_loss, []
step = trainer.Trainer.train_step

def counting_step(self, *args):
    steps.append(1)
    return step(self, *args)

def poisoned_loss(*args, **kwargs):
    loss, metrics = loss_fn(*args, **kwargs)
    return (loss * float("nan") if len(steps) >= 3 else loss), metrics

trainer.Trainer.train_step, trainer.rl_loss = counting_step, poisoned_loss
sys.exit(main(sys.argv[1:]))
"""


def test_non_finite_steps_are_skipped_then_the_run_stops_with_its_checkpoint_intact(tmp_path):
    """From step 3 every loss is NaN: steps 3 and 4 are skipped and counted, the run stops after
    training.max_skipped_steps = 2 with one line naming its last checkpoint, which still loads."""
    from titan_rl.checkpoint.manager import CheckpointManager
    from titan_rl.model import GptOss, GptOssModelArgs

    dump = tmp_path / "nan"
    args = ["--config", SMOKE_CONFIG, "--training.steps=10", "--checkpoint.enable=true"]
    args += ["--checkpoint.interval=2", "--training.max_skipped_steps=2", f"--job.dump_folder={dump}"]
    proc = start_run([sys.executable, "-c", NAN_FROM_STEP_3, *args], env={"PYTHONPATH": str(ROOT)})
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 1, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "stopping at step 4: 2 consecutive steps" in errors[0], output[-3000:]
    assert "checkpoint/step-000002" in errors[0] and "Traceback" not in output
    rows = read_metrics(dump)
    assert [r["train/skipped_steps"] for r in rows] == [0, 0, 1, 2]
    manager = CheckpointManager(dump / "checkpoint", interval=2)
    assert [p.name for p in manager.checkpoints()] == ["step-000002"]
    model = GptOss(GptOssModelArgs.from_preset("debug"))
    step, _ = manager.load(model, torch.optim.AdamW(model.parameters()))
    assert step == 2 and all(torch.isfinite(p).all() for p in model.parameters())


def test_load_path_resumes_even_with_saving_off(tmp_path):
    """checkpoint.load_path is honoured whenever it is set; checkpoint.enable only controls saving."""
    first = run_train("--training.steps=2", "--checkpoint.enable=true", f"--job.dump_folder={tmp_path / 'a'}")
    assert first.returncode == 0, first.stderr[-2000:]
    step = tmp_path / "a" / "checkpoint" / "step-000002"
    again = run_train(
        "--training.steps=4", f"--checkpoint.load_path={step}", f"--job.dump_folder={tmp_path / 'b'}"
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from step 2" in again.stdout
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == [3, 4]
    assert not (tmp_path / "b" / "checkpoint").exists()


def test_a_resumed_hf_run_reads_its_weights_from_the_checkpoint_only(tmp_path):
    """A run from a HF folder that resumes a checkpoint does not read the folder's weights (the
    checkpoint replaces them; at 120b every rank would read every expert tensor whole): no loading
    bar, and steps 3-4 equal the straight run's."""
    from titan_rl.checkpoint.hf import save_hf_model
    from titan_rl.model import GptOss, GptOssModelArgs

    torch.manual_seed(0)
    save_hf_model(GptOss(GptOssModelArgs.from_preset("debug")), tmp_path / "hf", dtype=torch.float32)
    hf = f"--model.hf_path={tmp_path / 'hf'}"
    straight = run_train(hf, "--training.steps=4", *CHECKPOINTED[1:], f"--job.dump_folder={tmp_path / 'a'}")
    assert straight.returncode == 0, straight.stderr[-2000:]
    assert "loading" in straight.stderr  # the fresh start reads the folder (rank 0's progress bar)
    step = tmp_path / "a" / "checkpoint" / "step-000002"
    again = run_train(
        hf, "--training.steps=4", f"--checkpoint.load_path={step}", f"--job.dump_folder={tmp_path / 'b'}"
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed from step 2" in again.stdout and "loading" not in again.stderr
    resumed, reference = read_metrics(tmp_path / "b"), read_metrics(tmp_path / "a")[2:]
    assert [{k: r[k] for k in DETERMINISTIC} for r in resumed] == [
        {k: r[k] for k in DETERMINISTIC} for r in reference
    ]

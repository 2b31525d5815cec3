"""End to end: ./run_train.sh on CPU writes metrics.jsonl with the public schema and the config."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
import torch

from titan_rl import report

ROOT = Path(__file__).resolve().parents[2]
SMOKE_CONFIG = "train_configs/smoke_cpu.toml"  # seconds per run; the default config takes minutes
SCHEMA = [
    "step", "reward/mean", "reward/std", "loss", "ratio/mean", "ratio/min", "ratio/max", "clip_frac",
    "entropy/mean", "grad_norm", "mismatch/logp_abs_mean", "mismatch/logp_abs_max", "mismatch/k3",
    "response_len/mean", "tokens_per_s/train", "tokens_per_s/rollout", "time/rollout_s", "time/train_s",
    "time/weight_sync_s", "lr", "mem/peak_gb",
]  # fmt: skip


# fp32 CPU runs: engine and trainer log-probs of a sampled token differ by round-off (~1e-6); a
# misaligned batch (a token scored at the wrong position, wrong temperature) is ~0.1-1 off.
ROUND_OFF = 1e-4


def assert_engine_agrees(row: dict) -> None:
    """The test that can fail next to ratio == 1 (which holds by construction on-policy)."""
    assert row["mismatch/logp_abs_max"] <= ROUND_OFF, row["step"]
    assert row["mismatch/k3"] <= ROUND_OFF**2, row["step"]  # k3 ~ delta^2 / 2


def run_train(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["./run_train.sh", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "CONFIG_FILE": SMOKE_CONFIG, **(env or {})},
    )


def read_metrics(dump: Path) -> list[dict]:
    return report.read_metrics(dump / "metrics.jsonl")


def start_run(args: list[str], env: dict | None = None) -> subprocess.Popen:
    """A run in its own session (so a test can kill it all), stdout and stderr merged."""
    return subprocess.Popen(
        args,
        cwd=ROOT,
        env={**os.environ, "CONFIG_FILE": SMOKE_CONFIG, **(env or {})},  # same threads as run_train
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early:\n{proc.communicate()[0][-3000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.01)


def steps_logged(dump: Path) -> int:
    path = dump / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_five_steps_on_cpu_write_metrics_and_config(tmp_path):
    dump = tmp_path / "run"
    result = run_train("--training.steps=5", f"--job.dump_folder={dump}")
    assert result.returncode == 0, result.stderr[-2000:]
    # one line each, whatever the path's length (a log is not an 80-column terminal)
    assert f"report {dump / 'report.html'}" in result.stdout and "config OK: " in result.stdout
    rows = read_metrics(dump)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for row in rows:
        missing = [k for k in SCHEMA if k not in row]
        assert not missing, missing
        assert row["ratio/min"] == 1.0 and row["ratio/max"] == 1.0  # exactly: one forward, on-policy
        assert row["clip_frac"] == 0.0
        assert_engine_agrees(row)
    resolved = tomllib.loads((dump / "config.toml").read_text())
    assert resolved["training"]["steps"] == 5 and resolved["job"]["dump_folder"] == str(dump)
    report = (dump / "report.html").read_text()
    assert report.count("<svg") >= 6 and "reward/mean" in report and "5 steps" in report


def test_kl_to_reference_is_logged(tmp_path):
    dump = tmp_path / "kl"
    result = run_train("--training.steps=2", "--rl.kl_coef=0.1", f"--job.dump_folder={dump}")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = read_metrics(dump)
    assert rows[0]["kl/mean"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before any update
    assert rows[1]["kl/mean"] > 0
    for row in rows:  # the reference forward does not disturb the policy's log-probs
        assert_engine_agrees(row)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--training.stepz=5"], "unknown key training.stepz"),
        (["--training.steps=five"], "training.steps must be int"),
        (["--parallelism.dp_shard=2"], "!= world size 1; set parallelism.dp_shard = 1"),
        (["--rl.clip_eps_low=1.5"], "rl.clip_eps_low = 1.5 must be in [0, 1)"),
        (["--model.attn_backend=flash"], "model.attn_backend = 'flash' needs CUDA"),  # (this CPU)
    ],
)
def test_bad_config_is_one_clear_line(tmp_path, args, message):
    result = run_train(*args, f"--job.dump_folder={tmp_path}")
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert "[rank" not in result.stderr + result.stdout  # before the launch: no rank started


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CUDA-only setting on a machine without CUDA")
def test_a_layout_check_without_check_machine_ignores_this_machine():
    """The README's layout check of a GPU config from a login node: no CUDA needed."""
    command = ["python", "-m", "titan_rl.train", "--check-config", "--config", SMOKE_CONFIG]
    plain = subprocess.run([*command, "--model.attn_backend=flash"], cwd=ROOT, capture_output=True, text=True)
    assert plain.returncode == 0 and "config OK" in plain.stdout, plain.stderr
    machine = subprocess.run(
        [*command, "--check-machine", "--model.attn_backend=flash"], cwd=ROOT, capture_output=True, text=True
    )
    assert machine.returncode == 2 and "needs CUDA" in machine.stderr


def test_ctrl_c_ends_the_run_with_one_line_per_process_and_no_traceback(tmp_path):
    """A terminal's Ctrl-C reaches the launcher and the ranks (the process group): each says it was
    interrupted, nobody prints a traceback."""
    dump = tmp_path / "interrupted"
    proc = start_run(["./run_train.sh", "--training.steps=200", f"--job.dump_folder={dump}"])
    wait_for(lambda: steps_logged(dump) >= 1, proc)
    os.killpg(proc.pid, signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out and "interrupted" in out, out[-3000:]


def test_help_prints_once_and_launches_nothing():
    result = subprocess.run(
        ["./run_train.sh", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("usage: titan_rl.train") == 1 and "NPROC" in result.stdout
    assert "rank" not in result.stderr and "torch.distributed" not in result.stderr


def test_missing_config_file(tmp_path):
    result = run_train(env={"CONFIG_FILE": str(tmp_path / "missing.toml")})
    assert result.returncode != 0 and "not found" in result.stderr and "Traceback" not in result.stderr


DETERMINISTIC = ["loss", "reward/mean", "grad_norm", "entropy/mean", "ratio/mean", "lr", "response_len/mean"]


def test_resume_from_checkpoint_is_bitwise(tmp_path):
    """4 steps straight vs 2 steps, stop, resume for 2 more: steps 3-4 are identical."""
    common = ["--checkpoint.enable=true", "--checkpoint.interval=2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_train("--training.steps=4", f"--job.dump_folder={straight}", *common).returncode == 0
    first = run_train("--training.steps=2", f"--job.dump_folder={resumed}", *common)
    assert first.returncode == 0, first.stderr[-2000:]
    second = run_train("--training.steps=4", f"--job.dump_folder={resumed}", *common)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from step 2" in second.stdout
    a, b = read_metrics(straight), read_metrics(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for row_a, row_b in zip(a[2:], b[2:]):
        assert {k: row_a[k] for k in DETERMINISTIC} == {k: row_b[k] for k in DETERMINISTIC}


def test_resume_keeps_the_warmed_up_kl_reference(tmp_path):
    """With a supervised warmup the KL reference is the warmed-up policy, which a resumed run cannot
    rebuild (it does not repeat the warmup): the checkpoint carries it, and steps 3-4 are identical
    (with the initial weights as reference the penalized rewards, hence the loss, would differ).
    The resumed run says --sft.steps=0 (the warmup is behind it): the reference still comes back."""
    common = [
        "--checkpoint.enable=true", "--checkpoint.interval=2", "--env.name=tool_lookup", "--sft.steps=3",
        "--training.seq_len=256", "--env.max_episode_tokens=256", "--rollout.max_new_tokens=32",
        "--rollout.prompts_per_step=2", "--rl.kl_coef=0.5", "--rl.kl_penalty=reward",
    ]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    first = run_train("--training.steps=4", f"--job.dump_folder={straight}", *common)
    assert first.returncode == 0, first.stderr[-2000:]
    assert run_train("--training.steps=2", f"--job.dump_folder={resumed}", *common).returncode == 0
    second = run_train("--training.steps=4", f"--job.dump_folder={resumed}", *common, "--sft.steps=0")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed from step 2" in second.stdout and "holds no KL reference" not in second.stdout
    a, b = read_metrics(straight), read_metrics(resumed)
    keys = [*DETERMINISTIC, "kl/mean", "reward/penalized_mean"]
    assert all(row["kl/mean"] > 0 for row in a[1:])
    for row_a, row_b in zip(a[2:], b[2:]):
        assert {k: row_a[k] for k in keys} == {k: row_b[k] for k in keys}


def test_agentic_tool_task_with_sft_warmup(tmp_path):
    """The multi-turn tool environment through run_train.sh: warm-up, then RL with env metrics."""
    dump = tmp_path / "tool"
    result = run_train(
        "--env.name=tool_lookup",
        "--sft.steps=3",
        "--training.steps=2",
        "--training.seq_len=256",
        "--env.max_episode_tokens=256",
        "--rollout.max_new_tokens=32",
        "--rollout.prompts_per_step=4",
        f"--job.dump_folder={dump}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "sft    3/3" in result.stdout
    rows = read_metrics(dump)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert row["ratio/min"] == 1.0 and row["ratio/max"] == 1.0
        assert_engine_agrees(row)  # multi-turn: tool output between the sampled turns
        assert {"env/turns_mean", "env/tool_calls", "env/tool_errors", "env/parse_errors"} <= set(row)
        assert 0.0 <= row["reward/pass_rate"] <= 1.0 and row["reward/pass_rate"] <= row["reward/max"]


@pytest.mark.parametrize(
    "layout",
    [
        ["--parallelism.dp_shard=2"],
        ["--parallelism.dp_shard=2", "--parallelism.ep=2"],
        ["--parallelism.cp=2"],
        ["--parallelism.cp=2", "--parallelism.cp_mode=ring"],
    ],
    ids=["fsdp", "fsdp-ep", "cp-ulysses", "cp-ring"],
)
def test_two_processes_match_one(tmp_path, layout):
    """NPROC=2 with FSDP2, expert or context parallelism gives the single-process losses (fp32, rel 1e-5),
    the per-trajectory load-balancing loss included (its counts span the context-parallel shards)."""
    common = [
        "--training.steps=3",
        "--rollout.prompts_per_step=4",
        "--training.micro_batch_rows=2",
        "--rl.router_aux_loss_coef=0.1",
    ]
    single = run_train(*common, f"--job.dump_folder={tmp_path / 'one'}")
    assert single.returncode == 0, single.stderr[-2000:]
    # both ranks print: a rank that fails after rank 0's "done" (a teardown abort) shows its own stderr
    two_ranks = {"NPROC": "2", "LOG_RANK": "0,1"}
    double = run_train(*common, *layout, f"--job.dump_folder={tmp_path / 'two'}", env=two_ranks)
    assert double.returncode == 0, (double.stdout + double.stderr)[-3000:]
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        assert b["ratio/min"] == 1.0 and b["ratio/max"] == 1.0  # by construction; next to:
        assert_engine_agrees(b)  # the sharded trainer scores the engine's tokens as it sampled them
        assert b["reward/mean"] == a["reward/mean"]  # same rollouts on every rank
        for key in ("loss", "grad_norm", "entropy/mean", "router/balance_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key


def test_a_fresh_run_replaces_old_metrics(tmp_path):
    dump = tmp_path / "again"
    for steps in (3, 2):
        assert run_train(f"--training.steps={steps}", f"--job.dump_folder={dump}").returncode == 0
    assert [r["step"] for r in read_metrics(dump)] == [1, 2]


def _pid_of_rank(rank: int, marker: str) -> int | None:
    """The pid of the worker with ``RANK=rank`` whose command line contains ``marker``."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in cmdline and b"titan_rl.train" in cmdline and f"RANK={rank}".encode() in environ:
            return int(pid)
    return None


def test_a_dead_rank_stops_the_run_without_hanging(tmp_path):
    """SIGKILL one of 2 processes mid-run: the other is stopped within seconds, the failed rank is named."""
    dump = tmp_path / "dies"
    args = [
        "./run_train.sh",
        "--training.steps=1000",
        "--parallelism.dp_shard=2",
        f"--job.dump_folder={dump}",
    ]
    proc = start_run(args, env={"NPROC": "2", "LOG_RANK": "0,1"})
    try:
        wait_for(lambda: (dump / "metrics.jsonl").exists(), proc)
        pid = _pid_of_rank(1, str(dump))
        assert pid is not None, "rank 1 not found"
        os.kill(pid, signal.SIGKILL)
        killed = time.time()
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0 and time.time() - killed < 60
    assert "error: rank 1 (pid " in output and "was killed by SIGKILL" in output  # names the failed rank
    assert "Traceback" not in output, output


def test_vllm_where_it_cannot_run_is_one_clear_line(tmp_path):
    """No vLLM or no CUDA (this machine): one error line saying what to install or use instead."""
    import importlib.util

    import torch

    if importlib.util.find_spec("vllm") is not None and torch.cuda.is_available():
        pytest.skip("vLLM can run here")
    result = run_train("--rollout.engine=vllm", "--training.steps=1", f"--job.dump_folder={tmp_path}")
    assert result.returncode != 0
    assert "error: rollout.engine = 'vllm' needs" in result.stderr, result.stderr[-2000:]
    assert "rollout.engine = 'native'" in result.stderr and "Traceback" not in result.stderr


def test_sigusr1_to_the_launcher_checkpoints_the_step_on_both_ranks_and_the_run_resumes(tmp_path):
    """Slurm's --signal=USR1@600 notice, to the launcher only (torchrun forwards no SIGUSR1: it
    killed the launcher and orphaned the ranks): both ranks finish the step, save it (checkpoints
    every 1000 steps otherwise) and stop, exit 138; the same command resumes after it."""
    dump = tmp_path / "preempted"
    args = ["./run_train.sh", "--training.steps=200", f"--job.dump_folder={dump}", "--checkpoint.enable=true"]
    args += ["--checkpoint.interval=1000", "--parallelism.dp_shard=2"]
    proc = start_run(args, env={"NPROC": "2"})
    wait_for(lambda: steps_logged(dump) >= 1, proc)
    os.kill(proc.pid, signal.SIGUSR1)  # run_train.sh exec'd the launcher
    try:
        out, _ = proc.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGUSR1, out[-3000:]
    (saved,) = (dump / "checkpoint").glob("step-*")
    step = int(saved.name.split("-")[1])
    assert f"stopped after step {step} on SIGUSR1: checkpoint {saved} saved" in out, out[-3000:]
    assert "Traceback" not in out and "error:" not in out, out[-3000:]
    assert [r["step"] for r in read_metrics(dump)] == list(range(1, step + 1))
    resumed = run_train(
        "--training.steps=" + str(step + 1), f"--job.dump_folder={dump}", "--checkpoint.enable=true"
    )
    assert resumed.returncode == 0 and f"resumed from step {step}" in resumed.stdout, resumed.stderr[-2000:]

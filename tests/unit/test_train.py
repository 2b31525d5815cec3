"""train.py drives its rollout engine through the RolloutEngine protocol and nothing else."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from titan_rl import train
from titan_rl.report import read_metrics
from titan_rl.rl.rollout import NativeEngine

SMOKE = str(Path(__file__).resolve().parents[2] / "train_configs/smoke_cpu.toml")


class ProtocolOnlyEngine:
    """A third engine: exactly the protocol's methods (no ``generator``), recording their calls.

    Its RNG state is a dict, not the native engine's list: the trainer must store it as it is."""

    __slots__ = ("calls", "inner")

    def __init__(self, inner: NativeEngine) -> None:
        self.inner, self.calls = inner, []

    def generate(self, prompts, params):
        self.calls.append("generate")
        return self.inner.generate(prompts, params)

    def update_weights(self, model) -> None:
        self.calls.append("update_weights")
        self.inner.update_weights(model)

    def sleep(self) -> None:
        self.calls.append("sleep")

    def wake_up(self) -> None:
        self.calls.append("wake_up")

    def rng_state(self) -> dict:
        self.calls.append("rng_state")
        return {"native": self.inner.rng_state()}

    def set_rng_state(self, state: dict) -> None:
        self.calls.append(("set_rng_state", state))
        self.inner.set_rng_state(state["native"])


def smoke_args(dump: Path, steps: int) -> list[str]:
    """The smoke config's small run into ``dump``."""
    return [
        "--config",
        SMOKE,
        f"--job.dump_folder={dump}",
        f"--training.steps={steps}",
        "--rollout.prompts_per_step=2",
    ]


@pytest.fixture
def engines(monkeypatch) -> list[ProtocolOnlyEngine]:
    """Every engine train.py builds from now on is a ProtocolOnlyEngine; the list holds them."""
    built: list[ProtocolOnlyEngine] = []

    def build_engine(cfg, model):
        built.append(ProtocolOnlyEngine(NativeEngine(model, seed=cfg.job.seed)))
        return built[-1]

    monkeypatch.setattr(train, "build_engine", build_engine)
    return built


def test_the_trainer_uses_only_the_engine_protocol(tmp_path, engines):
    args = ["--config", SMOKE, f"--job.dump_folder={tmp_path}", "--checkpoint.enable=true"]
    args += ["--checkpoint.interval=2", "--rollout.prompts_per_step=2", "--rollout.max_new_tokens=4"]
    assert train.main([*args, "--training.steps=2"]) == 0
    step = ["wake_up", "generate", "sleep", "update_weights"]
    assert engines[0].calls == [*step, *step, "rng_state"]  # saved after step 2
    saved = engines[0].inner.rng_state()

    assert train.main([*args, "--training.steps=3"]) == 0  # resumes from step 2
    resumed = engines[1].calls
    assert resumed[0] == ("set_rng_state", {"native": saved})
    assert resumed[1:] == [*step, "rng_state"]


class OneAnswerEngine(ProtocolOnlyEngine):
    """Every prompt of a call gets the call's first completion: each group's rewards are equal."""

    __slots__ = ()

    def generate(self, prompts, params):
        first = self.inner.generate(prompts[:1], params)[0]
        return [first] * len(prompts)


@pytest.mark.parametrize("signal", [False, True])
def test_a_run_without_learning_signal_says_so(tmp_path, monkeypatch, capsys, signal):
    """Equal rewards in every group: reward/informative_groups is 0 and, after the patience, one
    warning names the steps. With the real engine's varied episodes neither happens."""
    engine = NativeEngine if signal else (lambda model, seed: OneAnswerEngine(NativeEngine(model, seed=seed)))
    monkeypatch.setattr(train, "build_engine", lambda cfg, model: engine(model, seed=cfg.job.seed))
    monkeypatch.setattr(train, "NO_SIGNAL_PATIENCE", 2)
    args = ["--config", SMOKE, f"--job.dump_folder={tmp_path}", "--training.steps=3"]
    assert train.main([*args, "--rollout.prompts_per_step=4", "--metrics.log_freq=100"]) == 0
    rows = read_metrics(tmp_path / "metrics.jsonl")
    fractions = [row["reward/informative_groups"] for row in rows]
    out = capsys.readouterr().out
    if signal:
        assert all(f > 0 for f in fractions) and "no learning signal" not in out
    else:
        assert fractions == [0.0, 0.0, 0.0]
        assert out.count("no learning signal") == 1 and "steps 1-2 had no learning signal" in out
        assert "No step of this run had any" in out and "earlier checkpoint" not in out  # nothing to resume


def test_a_run_that_lost_its_signal_is_told_to_go_back():
    from titan_rl.metrics import NoSignalWatch

    watch = NoSignalWatch(patience=2)
    assert watch.update(1, 0.5, 0.4) is None  # signal at first
    assert watch.update(2, 0.0, 0.0) is None
    warning = watch.update(3, 0.0, 0.0)
    assert "steps 2-3" in warning and "earlier checkpoint with a lower learning rate" in warning
    assert "every advantage and the gradient are zero" in warning
    # with a KL penalty (in the loss or the reward) the gradient is not zero: the warning says what moves
    watch = NoSignalWatch(patience=1, regularizers=("the KL penalty", "the entropy bonus"))
    warning = watch.update(1, 0.0, 0.0)
    assert "only the KL penalty and the entropy bonus can" in warning and "gradient are zero" not in warning


def test_a_solved_task_and_a_warmed_up_run_get_advice_that_fits():
    """All episodes passing is saturation, not collapse: no advice to go back or to lower the rate;
    a run that already had a supervised warm-up is not told to add one."""
    from titan_rl.metrics import NoSignalWatch

    solved = NoSignalWatch(patience=1, pass_reward=1.0).update(1, 0.0, 1.0)
    assert "the task is saturated" in solved and "lower learning rate" not in solved and "--sft" not in solved
    failing = NoSignalWatch(patience=1, pass_reward=1.0)
    assert "--sft.steps" in failing.update(1, 0.0, 0.0)
    warmed = NoSignalWatch(patience=1, pass_reward=1.0, warmup_hint=False).update(1, 0.0, 0.0)
    assert "--model.hf_path" in warmed and "--sft.steps" not in warmed


def test_a_resumed_run_takes_the_learning_rate_from_its_config(tmp_path, capsys):
    """The checkpoint's optimizer and scheduler state hold the old peak LR; the config's must win
    (a lower LR is the usual reason to resume from an earlier checkpoint), at the saved position
    of the schedule, and the startup line says what changed."""
    args = ["--config", SMOKE, "--rollout.prompts_per_step=2", "--lr_scheduler.warmup_steps=0"]
    first = [*args, f"--job.dump_folder={tmp_path / 'a'}", "--checkpoint.enable=true"]
    assert train.main([*first, "--checkpoint.interval=2", "--training.steps=2", "--optimizer.lr=1e-2"]) == 0
    saved = tmp_path / "a/checkpoint/step-000002"
    resumed = [*args, f"--job.dump_folder={tmp_path / 'b'}", f"--checkpoint.load_path={saved}"]
    assert train.main([*resumed, "--training.steps=4", "--optimizer.lr=1e-5", "--optimizer.eps=1e-6"]) == 0
    out = capsys.readouterr().out
    assert "resumed from step 2; optimizer.eps: 1e-08 -> 1e-06; optimizer.lr: 0.01 -> 1e-05" in out
    # the other keys that differ from the checkpoint's config.json, once (not the optimizer's again)
    (line,) = [line for line in out.splitlines() if line.startswith("config changed since that checkpoint")]
    assert line == (
        f'config changed since that checkpoint: job.dump_folder: "{tmp_path / "a"}" -> '
        f'"{tmp_path / "b"}"; checkpoint.enable: true -> false; checkpoint.interval: 2 -> 10; '
        "training.steps: 2 -> 4"
    )
    rows = read_metrics(tmp_path / "b/metrics.jsonl")
    # cosine over 4 steps from 1e-5 to 1e-6: factors at optimizer steps 2 and 3
    factors = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / 4)) for step in (2, 3)]
    assert [row["lr"] for row in rows] == pytest.approx([1e-5 * f for f in factors], rel=1e-12)


def test_config_changes_name_each_key_a_resumed_run_changed():
    from titan_rl.config import config_to_dict, load_config
    from titan_rl.config.loader import config_changes

    saved = config_to_dict(load_config(SMOKE, ["--rl.kl_coef=0.01", "--rollout.prompts_per_step=4"]))
    saved["rl"].pop("entropy_coef")  # a key an older version did not save
    now = load_config(SMOKE, ["--rl.kl_coef=0.02", "--rollout.prompts_per_step=8", "--rl.entropy_coef=0.1"])
    changes = config_changes(saved, now)
    assert len(changes) == 2 and "rl.kl_coef: 0.01 -> 0.02" in changes
    assert "rollout.prompts_per_step: 4 -> 8 (the tasks a step samples follow it" in " ".join(changes)
    assert (
        config_changes(saved, load_config(SMOKE, ["--rl.kl_coef=0.01", "--rollout.prompts_per_step=4"])) == []
    )
    assert config_changes({}, now) == []  # a checkpoint without config.json


def test_the_config_offers_exactly_the_engines_decode_modes():
    from titan_rl.config.loader import CHOICES
    from titan_rl.rl.rollout.native import DECODE_MODES

    assert CHOICES["rollout.decode"] == DECODE_MODES


def test_the_native_engine_takes_its_batching_keys_from_the_config():
    keys = ["--rollout.max_batch_rows=3", "--rollout.check_every=4", "--rollout.decode=static"]
    engine = train.build_engine(train.load_config(SMOKE, keys), object())
    assert (engine.max_batch_rows, engine.check_every, engine.decode) == (3, 4, "static")
    engine = train.build_engine(train.load_config(SMOKE), object())
    # all at once; by device; CUDA graphs where they can run, else rows leave as they finish
    assert (engine.max_batch_rows, engine.check_every, engine.decode) == (None, None, "auto")


def test_pass_rate_counts_episodes_that_reach_the_environments_pass_reward():
    """Partial credit (tool_lookup's 0.2 for a lookup without the answer) is not a pass; an
    environment without ``pass_reward`` reports no pass rate."""
    import torch

    from titan_rl.rl.envs.math_task import MathEnv
    from titan_rl.rl.envs.tool_task import FORMAT_CREDIT, ToolLookupEnv

    rewards = torch.tensor([[1.0, FORMAT_CREDIT, 0.0, 1.0], [FORMAT_CREDIT, 1.0, 1.0, 0.0]])
    for env in (ToolLookupEnv(num_tasks=4), MathEnv()):
        assert train.pass_rate(env, rewards) == {"reward/pass_rate": 0.5}
    assert train.pass_rate(object(), rewards) == {}


def test_a_resumed_run_with_more_steps_follows_the_longer_schedule(tmp_path, capsys):
    """7 steps, then the same run extended to 10: steps 8-10 use the 10-step cosine, as a fresh
    10-step run does (the saved optimizer held the 7-step schedule's rate for step 8)."""
    args = ["--config", SMOKE, "--rollout.prompts_per_step=2", "--lr_scheduler.warmup_steps=0"]
    args += ["--checkpoint.enable=true", "--checkpoint.interval=7"]
    fresh = [*args, f"--job.dump_folder={tmp_path / 'fresh'}", "--training.steps=10"]
    assert train.main(fresh) == 0
    extended = [*args, f"--job.dump_folder={tmp_path / 'ext'}"]
    assert train.main([*extended, "--training.steps=7"]) == 0
    assert train.main([*extended, "--training.steps=10"]) == 0
    assert "learning rate at this step" in capsys.readouterr().out
    want = [row["lr"] for row in read_metrics(tmp_path / "fresh/metrics.jsonl")][7:]
    got = [row["lr"] for row in read_metrics(tmp_path / "ext/metrics.jsonl")][7:]
    assert got == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("failing_step", [2, 3])
def test_a_checkpoint_that_cannot_be_written_is_a_warning_until_the_last(
    tmp_path, capsys, monkeypatch, failing_step
):
    """A full disk at a save crashed the run, and a restart repeated the same steps into the same full
    disk. Now the partial folder goes, the run goes on and saves at the next interval; only the final
    checkpoint failing is an error (exit 1)."""
    import titan_rl.checkpoint.manager as manager

    real = manager._dcp

    def full_disk(action, state, folder):
        if action == "save" and folder.name == f"step-{failing_step:06d}.tmp":
            raise OSError(28, "No space left on device")
        real(action, state, folder)

    monkeypatch.setattr(manager, "_dcp", full_disk)
    dump = tmp_path / "run"
    args = smoke_args(dump, steps=3)
    code = train.main([*args, "--checkpoint.enable=true", "--checkpoint.interval=1"])
    out, err = capsys.readouterr()
    saved = sorted(p.name for p in (dump / "checkpoint").iterdir())
    assert [row["step"] for row in read_metrics(dump / "metrics.jsonl")] == [1, 2, 3]
    if failing_step == 2:
        assert code == 0 and saved == ["step-000001", "step-000003"]
        assert "warning: checkpoint of step 2 not written (rank 0: OSError: [Errno 28] No space left" in out
        assert "the next checkpoint is due at step 3 (newest kept: step-000001)" in out
    else:
        assert code == 1 and saved == ["step-000001", "step-000002"]
        assert "error: the final checkpoint of step 3 not written" in err


def test_a_scheduler_signal_ends_the_step_saves_it_and_the_same_command_resumes(
    tmp_path, capsys, monkeypatch
):
    """SIGUSR1 (Slurm's --signal=USR1@600) during step 2 of 4 with checkpoints every 100 steps: the
    run finishes step 2, checkpoints it and exits 138 (it was killed with everything since the last
    checkpoint lost); the same command then resumes at step 3."""
    import os
    import signal

    real = train.collect_rollouts

    def signalled_at_step_2(engine, env, tokenizer, step, cfg):
        if step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(engine, env, tokenizer, step, cfg)

    monkeypatch.setattr(train, "collect_rollouts", signalled_at_step_2)
    dump = tmp_path / "run"
    args = smoke_args(dump, steps=4)
    args += ["--checkpoint.enable=true", "--checkpoint.interval=100"]
    assert train.main(args) == 128 + signal.SIGUSR1
    out = capsys.readouterr().out
    assert f"stopped after step 2 on SIGUSR1: checkpoint {dump / 'checkpoint/step-000002'} saved" in out
    assert [row["step"] for row in read_metrics(dump / "metrics.jsonl")] == [1, 2]
    # a second notice while the stopped rank exits is ignored (its default would kill it, exit -10)
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    monkeypatch.setattr(train, "collect_rollouts", real)
    assert train.main(args) == 0
    assert "resumed from step 2" in capsys.readouterr().out
    assert [row["step"] for row in read_metrics(dump / "metrics.jsonl")] == [1, 2, 3, 4]


@pytest.mark.parametrize("saving", [True, False])
def test_ctrl_c_says_whether_the_same_command_resumes(tmp_path, monkeypatch, capsys, saving):
    real = train.collect_rollouts

    def interrupted_at_step_2(engine, env, tokenizer, step, cfg):
        if step == 2:
            raise KeyboardInterrupt
        return real(engine, env, tokenizer, step, cfg)

    monkeypatch.setattr(train, "collect_rollouts", interrupted_at_step_2)
    args = [*smoke_args(tmp_path / "run", steps=3), f"--checkpoint.enable={str(saving).lower()}"]
    assert train.main(args) == 130
    err = capsys.readouterr().err
    assert ("resumes from the last checkpoint" in err) == saving
    assert ("checkpoint.enable is off: the same command starts over" in err) != saving
    assert (tmp_path / "run" / "report.html").is_file()  # the curves of the step it did


def test_resuming_a_finished_run_says_there_is_nothing_to_do(tmp_path, capsys, monkeypatch):
    args = [*smoke_args(tmp_path / "run", steps=2), "--checkpoint.enable=true", "--job.description=my run"]
    assert train.main(args) == 0
    assert capsys.readouterr().out.startswith("my run\n")  # job.description, at start-up
    monkeypatch.setattr(train, "build_model", lambda *a, **k: pytest.fail("built a model with nothing to do"))
    assert train.main([*args, "--training.steps=1"]) == 0
    out = capsys.readouterr().out
    assert "nothing to do: the checkpoint is at step 2 and training.steps = 1" in out


def test_a_rank_started_after_the_launchers_stop_stops_at_once(tmp_path, monkeypatch, capsys):
    """torchrun --max-restarts restarts ranks that stopped on SIGUSR1; the launcher's environment
    then says so, and a restarted rank exits 138 before building anything."""
    monkeypatch.setenv("TITAN_RL_STOPPED", "1")
    monkeypatch.setattr(train, "build_model", lambda *a, **k: pytest.fail("built a model after the stop"))
    assert train.main(smoke_args(tmp_path / "run", steps=2)) == 138
    assert "the launcher got SIGUSR1 before this (re)start" in capsys.readouterr().err


def test_titan_rls_own_warnings_are_one_line(tmp_path, capsys, monkeypatch):
    """A reward that raises: one 'warning: ...' line, not the file, line and source of the call in
    titan_rl that warned (Python's format); other libraries' warnings keep theirs."""
    import warnings

    from titan_rl.rl.calls import safe_reward

    def during_main(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            safe_reward(lambda: 1 / 0)
            warnings.warn_explicit("from elsewhere", UserWarning, "/elsewhere/lib.py", 7)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "collect_rollouts", during_main)
    with pytest.warns(UserWarning, match="from elsewhere"):  # handed on as before (here: pytest's)
        assert train.main(smoke_args(tmp_path / "run", steps=1)) == 130
    err = capsys.readouterr().err
    assert "warning: reward function raised ZeroDivisionError: division by zero; reward 0\n" in err
    assert "calls.py" not in err and "UserWarning" not in err

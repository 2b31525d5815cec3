"""MetricsLogger: the JSONL file spells non-finite values as strings (JSON has no NaN); wandb gets
them as numbers, so its series stay numeric."""

from __future__ import annotations

import json
import math

import pytest
import torch

from titan_rl.metrics import MetricsLogger


class RecordingRun:
    def __init__(self) -> None:
        self.logged: list[tuple[dict, int]] = []

    def log(self, data: dict, step: int) -> None:
        self.logged.append((data, step))


def test_non_finite_metrics_are_strings_in_the_file_and_numbers_for_wandb(tmp_path):
    run = RecordingRun()
    logger = MetricsLogger(tmp_path, wandb_run=run)
    logger.log(3, {"ratio/min": math.nan, "ratio/max": torch.tensor(1.5), "loss": -math.inf})
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(line) == {"step": 3, "ratio/min": "nan", "ratio/max": 1.5, "loss": "-inf"}
    ((data, step),) = run.logged
    assert step == 3 and data["ratio/max"] == 1.5 and data["loss"] == -math.inf
    assert isinstance(data["ratio/min"], float) and math.isnan(data["ratio/min"])


def test_a_resume_drops_a_line_cut_short_by_a_crash(tmp_path):
    """A process killed mid-append leaves half a JSON line; resuming keeps the complete records up to
    the checkpoint step and drops it (with a warning) instead of refusing to start."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.25}\n{"step": 3, "lo')
    logger = MetricsLogger(tmp_path)
    with pytest.warns(UserWarning, match="metrics.jsonl:3: not a complete JSON record"):
        logger.start(resumed_step=2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_records_a_resume_or_fresh_start_drops_move_aside(tmp_path):
    """Restarting from step 2 of a run that logged 4 steps (a branch before a collapse) keeps steps
    1-2 in metrics.jsonl and the collapsed run's 3-4 beside it, not deleted; a fresh start keeps all
    of them aside."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in (1, 2, 3, 4)))
    MetricsLogger(tmp_path).start(resumed_step=2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    (aside,) = tmp_path.glob("metrics.superseded-*.jsonl")
    assert [json.loads(line) for line in aside.read_text().splitlines()] == [
        {"step": 3, "loss": 0.3},
        {"step": 4, "loss": 0.4},
    ]
    MetricsLogger(tmp_path).start(resumed_step=0)  # within the same second: a file of its own
    assert path.read_text() == ""
    (second,) = set(tmp_path.glob("metrics.superseded-*.jsonl")) - {aside}
    assert [json.loads(line)["step"] for line in second.read_text().splitlines()] == [1, 2]
    assert not list(tmp_path.glob("*.tmp"))


def test_a_failing_wandb_stops_wandb_not_the_run(tmp_path, capsys):
    """wandb's service dying (BrokenPipeError from log) ended rank 0 and so the run."""

    class DyingRun(RecordingRun):
        def log(self, data: dict, step: int) -> None:
            if step == 2:
                raise BrokenPipeError("[Errno 32] Broken pipe")
            super().log(data, step)

    run = DyingRun()
    logger = MetricsLogger(tmp_path, wandb_run=run)
    for step in (1, 2, 3):
        logger.log(step, {"loss": 0.5})
    assert [step for _, step in run.logged] == [1]  # not called again after it failed
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    err = capsys.readouterr().err
    assert err.count("warning: wandb failed at step 2 (BrokenPipeError") == 1


def test_the_console_line_shows_what_the_step_has_and_its_seconds(tmp_path):
    from io import StringIO

    from rich.console import Console

    out = StringIO()
    console = Console(file=out, width=300)
    logger = MetricsLogger(tmp_path)
    times = {"time/rollout_s": 1.25, "time/train_s": 0.5, "time/weight_sync_s": 0.25}
    logger.log(1, {"reward/mean": 0.5, "loss": 0.0, **times}, console)
    logger.log(2, {"reward/mean": 0.5, "kl/mean": 0.0123, "router/balance_loss": 1.5}, console)
    first, second = out.getvalue().splitlines()
    assert "reward 0.500" in first and first.endswith("2.0s") and "kl" not in first
    assert "kl 0.0123" in second and "balance 1.500" in second and not second.endswith("s")

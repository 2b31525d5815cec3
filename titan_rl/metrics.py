"""Step metrics: one JSON object per step in metrics.jsonl, a compact console line, optional wandb."""

from __future__ import annotations

import itertools
import json
import math
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from titan_rl.files import write_replacing

CONSOLE_KEYS = [  # (a key a step lacks is left out: kl with a reference, balance with its loss)
    ("reward/mean", "reward", "{:.3f}"),
    ("loss", "loss", "{:+.4f}"),
    ("ratio/max", "ratio_max", "{:.4f}"),
    ("entropy/mean", "entropy", "{:.3f}"),
    ("kl/mean", "kl", "{:.4f}"),
    ("router/balance_loss", "balance", "{:.3f}"),
    ("grad_norm", "gnorm", "{:.3f}"),
    ("response_len/mean", "len", "{:.1f}"),
    ("tokens_per_s/train", "train_tok/s", "{:.0f}"),
]
STEP_TIMES = ("time/rollout_s", "time/train_s", "time/weight_sync_s")  # the console's "step" seconds


def reset_peak_memory() -> None:
    """Start a new peak for ``peak_memory_gb`` (GPU only: a process's peak RSS cannot be reset)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb() -> float:
    """Peak GPU memory allocated since ``reset_peak_memory``, or the process's peak RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kilobytes * 1024 / 1e9 if sys.platform != "darwin" else kilobytes / 1e9


def _number(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) else value


def _plain(value: Any) -> Any:
    value = _number(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN / Inf
    return value


class MetricsLogger:
    """Writes on rank 0 only; ``log_freq`` throttles the console, never the JSONL file."""

    def __init__(
        self, dump_folder: str | Path, log_freq: int = 1, rank: int = 0, wandb_run: Any = None
    ) -> None:
        self.enabled = rank == 0
        self.log_freq = log_freq
        self.wandb_run = wandb_run
        self.path = Path(dump_folder) / "metrics.jsonl"
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def start(self, resumed_step: int) -> None:
        """Keep only records up to ``resumed_step`` (0 for a fresh run), so each step appears once.

        The records past it (the steps of the run being resumed or restarted, e.g. the curves of a
        collapse a branch restarts before) move to ``metrics.superseded-<time>.jsonl`` beside it,
        never deleted; the file is replaced whole, so a kill during the rewrite loses nothing."""
        if not self.enabled or not self.path.exists():
            return
        kept, dropped = [], []
        for number, line in enumerate(self.path.read_text().splitlines(), 1):
            try:
                record = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:  # a line cut short when the process died mid-append
                warnings.warn(f"{self.path}:{number}: not a complete JSON record; dropped", stacklevel=2)
                continue
            if record is not None:
                (kept if record.get("step", 0) <= resumed_step else dropped).append(line)
        if dropped:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            aside = self.path.with_name(f"metrics.superseded-{stamp}.jsonl")
            for n in itertools.count(2):  # two restarts in one second
                if not aside.exists():
                    break
                aside = self.path.with_name(f"metrics.superseded-{stamp}-{n}.jsonl")
            write_replacing(aside, "".join(line + "\n" for line in dropped))
            print(
                f"{self.path.name}: {len(dropped)} record(s) after step {resumed_step} moved to {aside.name}",
                flush=True,
            )
        write_replacing(self.path, "".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, Any], console: Any = None) -> dict[str, Any]:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        if not self.enabled:
            return record
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:  # numbers as numbers: wandb takes NaN / inf, JSON does not
            try:
                self.wandb_run.log({k: _number(v) for k, v in metrics.items()}, step=step)
            except Exception as e:  # its service died, its disk filled: the run and metrics.jsonl go on
                self.wandb_run = None
                print(
                    f"warning: wandb failed at step {step} ({type(e).__name__}: {e}); logging to wandb "
                    f"stopped, {self.path} has every step",
                    file=sys.stderr,
                    flush=True,
                )
        if console is not None and (step % self.log_freq == 0 or step == 1):
            parts = [f"step {step:5d}"]
            for key, short, fmt in CONSOLE_KEYS:
                if isinstance(record.get(key), (int, float)):
                    parts.append(f"{short} {fmt.format(record[key])}")
            if all(isinstance(record.get(key), (int, float)) for key in STEP_TIMES):
                parts.append(f"{sum(record[key] for key in STEP_TIMES):.1f}s")
            console.print("  ".join(parts), highlight=False, soft_wrap=True)
        return record


class NoSignalWatch:
    """Says once when ``patience`` consecutive steps had no learning signal.

    A step has none when every group's episodes got equal rewards: every GRPO / RLOO advantage is
    then zero, the gradient is zero, and the policy cannot change, so the run will not recover by
    itself. That is what a collapsed policy (every reward 0) or a saturated task (every reward 1)
    looks like; ``reward/informative_groups`` in metrics.jsonl is the fraction of groups with signal.
    """

    def __init__(
        self,
        patience: int = 10,
        first_step: int = 1,
        regularizers: tuple[str, ...] = (),
        pass_reward: float | None = None,
        warmup_hint: bool = True,
    ) -> None:
        self.patience, self.first_step = patience, first_step  # first_step: this run's (a resume's)
        self.regularizers = regularizers  # what else moves the policy: "the KL penalty", ...
        self.pass_reward = pass_reward  # the environment's "solved" reward, when it has one
        self.warmup_hint = warmup_hint  # suggest --sft.steps (not when the run already warmed up)
        self.since: int | None = None  # first step of the current run of steps without signal
        self.warned = False

    def update(self, step: int, informative_fraction: float, mean_reward: float) -> str | None:
        """The warning to print at ``step``, or None."""
        if informative_fraction > 0:
            self.since, self.warned = None, False
            return None
        if self.since is None:
            self.since = step
        if self.warned or step - self.since + 1 < self.patience:
            return None
        self.warned = True
        if self.regularizers:
            terms = " and ".join(self.regularizers)
            effect = (
                f"the task's reward no longer moves the policy (only {terms} can): it will not recover "
                "by itself. "
            )
        else:
            effect = "every advantage and the gradient are zero and the policy cannot change. "
        head = (
            f"warning: steps {self.since}-{step} had no learning signal: in every group all episodes "
            f"got the same reward (mean {mean_reward:.3f}), so {effect}"
        )
        solved = self.pass_reward is not None and mean_reward >= self.pass_reward
        if solved:  # every episode passes: nothing is wrong, there is nothing left to learn
            return head + (
                "Every episode solves its task: the task is saturated for this policy. Stop here, or "
                "make the task harder (or give graded rewards) to keep learning."
            )
        if self.since == self.first_step:  # never any signal: nothing to go back to
            warmup = (
                ", or a supervised warmup: --sft.steps with an environment that has demonstration()"
                if self.warmup_hint
                else ""
            )
            return head + (
                "No step of this run had any: the policy cannot solve (or always solves) the task as "
                f"started. Start from a model that sometimes can (--model.hf_path{warmup}), give partial "
                "credit, or make the task easier (or harder)."
            )
        return head + (
            "A collapsed policy (all 0) or a saturated task (all 1) does this; resume from an earlier "
            "checkpoint with a lower learning rate, or change the task."
        )

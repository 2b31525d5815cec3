"""Step metrics: one JSON object per step in metrics.jsonl, a compact console line, optional wandb."""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch

CONSOLE_KEYS = [
    ("reward/mean", "reward", "{:.3f}"),
    ("loss", "loss", "{:+.4f}"),
    ("ratio/max", "ratio_max", "{:.4f}"),
    ("entropy/mean", "entropy", "{:.3f}"),
    ("grad_norm", "gnorm", "{:.3f}"),
    ("response_len/mean", "len", "{:.1f}"),
    ("tokens_per_s/train", "tok/s", "{:.0f}"),
]


def peak_memory_gb() -> float:
    """Peak GPU memory allocated, or the process's peak RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kilobytes * 1024 / 1e9 if sys.platform != "darwin" else kilobytes / 1e9


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
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
        """Keep only records up to ``resumed_step`` (0 for a fresh run), so each step appears once."""
        if not self.enabled or not self.path.exists():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= resumed_step
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, metrics: dict[str, Any], console: Any = None) -> dict[str, Any]:
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        if not self.enabled:
            return record
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(record, step=step)
        if console is not None and (step % self.log_freq == 0 or step == 1):
            parts = [f"step {step:5d}"]
            for key, short, fmt in CONSOLE_KEYS:
                if isinstance(record.get(key), (int, float)):
                    parts.append(f"{short} {fmt.format(record[key])}")
            console.print("  ".join(parts), highlight=False, soft_wrap=True)
        return record

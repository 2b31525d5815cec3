"""Engine / trainer log-prob mismatch in bf16, with and without rollout routing replay, side by side.

Runs the same training job twice (``python -m titan_rl.train``, one process, bf16 compute through
one-rank FSDP mixed precision): ``rl.rollout_routing_replay = false``, then ``true``. Same seed,
same config: the first step's rollouts are identical, so its row compares the two trainers on the
same tokens; later steps train on different log-probs and drift apart. Prints one markdown row per
step: ``mismatch/logp_abs_mean`` and ``mismatch/logp_abs_max`` (trainer vs engine log-probs of the
sampled tokens) of both runs, and the reward means. A routing flip (a near-tie of router logits that
bf16 rounds apart in engine and trainer) shows as a max of ~1e-1 without replay; with replay what
is left is bf16 rounding. Run from the repo root with titan_rl importable:

    python benchmarks/bench_routing_replay.py                        # debug_cpu.toml, 6 steps
    python benchmarks/bench_routing_replay.py --steps 3 -- --rollout.prompts_per_step=4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "train_configs" / "debug_cpu.toml"))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("overrides", nargs="*", help="more --section.key=value overrides (after --)")
    return p.parse_args(argv)


def run(config: str, steps: int, replay: bool, overrides: list[str], folder: Path) -> list[dict]:
    """One training run; its metrics, one dict per step."""
    cmd = [
        sys.executable, "-m", "titan_rl.train", "--config", config,
        f"--training.steps={steps}", "--parallelism.mixed_precision=bf16",
        f"--rl.rollout_routing_replay={str(replay).lower()}", f"--job.dump_folder={folder}",
        *overrides,
    ]  # fmt: skip
    print(f"[bench] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"training run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    with tempfile.TemporaryDirectory() as tmp:
        plain, replay = (
            run(a.config, a.steps, r, a.overrides, Path(tmp) / str(r).lower()) for r in (False, True)
        )
    mean, worst = "mismatch/logp_abs_mean", "mismatch/logp_abs_max"
    columns = ["step", "mean, no replay", "mean, replay", "max, no replay", "max, replay"]
    columns += ["reward, no replay", "reward, replay"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---:|" * len(columns))
    for p, r in zip(plain, replay, strict=True):
        cells = [p[mean], r[mean], p[worst], r[worst]]
        rewards = f"{p['reward/mean']:.3f} | {r['reward/mean']:.3f}"
        print(f"| {p['step']} | " + " | ".join(f"{v:.2e}" for v in cells) + f" | {rewards} |")
    worst_step = [max(run[key] for run in runs) for key in (mean, worst) for runs in (plain, replay)]
    print("| worst step | " + " | ".join(f"{v:.2e}" for v in worst_step) + " | | |")


if __name__ == "__main__":
    main()

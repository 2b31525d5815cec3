"""Engine / trainer log-prob mismatch in bf16, with and without rollout routing replay, side by side.

Runs the same training job twice (``python -m titan_rl.train``, one process, bf16 compute through
one-rank FSDP mixed precision): ``rl.rollout_routing_replay = false``, then ``true``; with
``--fp32-activations`` both again with ``model.activation_dtype = float32``. Same seed,
same config: the first step's rollouts are identical, so its row compares the two trainers on the
same tokens; later steps train on different log-probs and drift apart. Prints one markdown row per
step: ``mismatch/logp_abs_mean`` and ``mismatch/logp_abs_max`` (trainer vs engine log-probs of the
sampled tokens) of both runs, and the reward means. A routing flip (a near-tie of router logits that
bf16 rounds apart in engine and trainer) shows as a max of ~1e-1 without replay; with replay what
is left is bf16 rounding. Run from the repo root with titan_rl importable:

    python benchmarks/bench_routing_replay.py                        # debug_cpu.toml, 6 steps
    python benchmarks/bench_routing_replay.py --steps 3 -- --rollout.prompts_per_step=4
    python benchmarks/bench_routing_replay.py --fp32-activations    # + model.activation_dtype = float32
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


ARMS = {  # name -> its overrides
    "no replay": ["--rl.rollout_routing_replay=false"],
    "replay": ["--rl.rollout_routing_replay=true"],
}
FP32_ARMS = {
    "fp32 act.": ["--rl.rollout_routing_replay=false", "--model.activation_dtype=float32"],
    "fp32 act. + replay": ["--rl.rollout_routing_replay=true", "--model.activation_dtype=float32"],
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "train_configs" / "debug_cpu.toml"))
    p.add_argument("--steps", type=int, default=6)
    p.add_argument(
        "--fp32-activations", action="store_true",
        help="two more runs with model.activation_dtype = float32 (without and with replay)",
    )  # fmt: skip
    p.add_argument("overrides", nargs="*", help="more --section.key=value overrides (after --)")
    return p.parse_args(argv)


def run(config: str, steps: int, arm: list[str], overrides: list[str], folder: Path) -> list[dict]:
    """One training run; its metrics, one dict per step."""
    cmd = [
        sys.executable, "-m", "titan_rl.train", "--config", config,
        f"--training.steps={steps}", "--parallelism.mixed_precision=bf16",
        *arm, f"--job.dump_folder={folder}", *overrides,
    ]  # fmt: skip
    print(f"[bench] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"training run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    arms = {**ARMS, **(FP32_ARMS if a.fp32_activations else {})}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            name: run(a.config, a.steps, arm, a.overrides, Path(tmp) / f"run{i}")
            for i, (name, arm) in enumerate(arms.items())
        }
    keys = {"mean": "mismatch/logp_abs_mean", "max": "mismatch/logp_abs_max"}
    columns = ["step"] + [f"{kind}, {name}" for kind in (*keys, "reward") for name in arms]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---:|" * len(columns))
    for step, rows in enumerate(zip(*runs.values(), strict=True), start=1):
        cells = [f"{row[key]:.2e}" for key in keys.values() for row in rows]
        cells += [f"{row['reward/mean']:.3f}" for row in rows]
        print(f"| {step} | " + " | ".join(cells) + " |")
    worst = [f"{max(m[key] for m in metrics):.2e}" for key in keys.values() for metrics in runs.values()]
    print("| worst step | " + " | ".join(worst) + " |" + " |" * len(arms))


if __name__ == "__main__":
    main()

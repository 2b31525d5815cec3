"""benchmarks/bench_routing_replay.py: two bf16 runs, a row per step, the same first rollouts."""

from __future__ import annotations

import pytest

from tests.benchmarks import run_benchmark, table_rows


@pytest.mark.timeout(240)
def test_bench_routing_replay_compares_two_runs_step_by_step():
    proc = run_benchmark(
        "bench_routing_replay.py", "--steps", "2", "--",
        "--sft.steps=2", "--rollout.prompts_per_step=2", "--rollout.group_size=2", "--env.max_turns=2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    header, *rows = table_rows(proc.stdout)
    assert header[0] == "step" and len(header) == 7
    assert [row[0] for row in rows] == ["1", "2", "worst step"]
    for row in rows[:2]:
        means_and_maxes = [float(v) for v in row[1:5]]
        assert all(0 < v < 5 for v in means_and_maxes)
    assert rows[0][5] == rows[0][6]  # same seed, same weights: the first rollouts are the same
    assert "--rl.rollout_routing_replay=true" in proc.stderr and "mixed_precision=bf16" in proc.stderr

"""benchmarks/bench_generate.py runs on CPU with tiny shapes: a row per decode mode and one for HF
per batch size, the engine's log-probs agree with the trainer's teacher-forced ones to fp32
round-off, and a mode that cannot run (cuda_graph on a CPU) is reported without costing the rest."""

from __future__ import annotations

import pytest
import torch

from tests.benchmarks import import_benchmark, run_benchmark, table_rows

ROUND_OFF = 1e-4  # fp32 CPU; a token scored at the wrong position or temperature is ~0.1-1 off


@pytest.mark.timeout(240)
def test_bench_generate_prints_rows_and_engine_trainer_agreement_on_cpu():
    proc = run_benchmark(
        "bench_generate.py", "--preset", "debug", "--layers", "2",
        "--batch", "2", "3", "--prompt", "6", "--new", "5", "--repeats", "1", "--profile", "3",
        "--decode", "eager", "static", "cuda_graph",
    )  # fmt: skip
    for batch in (2, 3):  # --profile: one profiled generate per batch size and mode that ran
        for mode in ("eager", "static"):
            assert f"profile of titan_rl native ({mode}) at batch {batch}, top 3 ops" in proc.stderr, (
                proc.stderr[-2000:]
            )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "float32, cpu" in out, out
    rows = table_rows(out)
    header, rows = rows[0], rows[1:]
    assert header[-3:] == ["greedy tokens = HF", "engine vs trainer logp, mean", "max"], header
    if not torch.cuda.is_available():  # cuda_graph fails here: one row saying so, per batch size
        failed = [r for r in rows if r[2].startswith("failed:")]
        assert [(r[0], r[1]) for r in failed] == [("titan_rl native (cuda_graph)", b) for b in ("2", "3")]
        assert all("not CUDA" in r[2] for r in failed), failed
        rows = [r for r in rows if r not in failed]
    assert [(r[0], r[1]) for r in rows] == [
        ("titan_rl native (eager)", "2"), ("titan_rl native (static)", "2"), ("transformers generate", "2"),
        ("titan_rl native (eager)", "3"), ("titan_rl native (static)", "3"), ("transformers generate", "3"),
    ]  # fmt: skip
    for row in rows:
        assert float(row[2].replace(",", "")) > 0 and float(row[4].replace(",", "")) > 0, row
    for ours, batch in ((rows[0], 2), (rows[1], 2), (rows[3], 3), (rows[4], 3)):
        assert float(ours[6].rstrip("x")) > 0, ours  # ratio (paired median)
        equal, total = map(int, ours[7].split("/"))
        assert total == batch * 5 and 0 <= equal <= total, ours
        mean, largest = float(ours[8]), float(ours[9])
        assert 0 <= mean <= largest <= ROUND_OFF, ours
    assert rows[2][8:] == ["n/a", "n/a"] and rows[5][8:] == ["n/a", "n/a"]
    assert rows[2][6] == "1.00x" and rows[5][6] == "1.00x"  # HF against itself


def test_the_engine_routing_recorded_for_replay_is_the_routing_of_every_position():
    """fp32, where engine and trainer agree to round-off: the experts recorded from the engine's
    prefill and decode steps are the trainer's own for every input position, and replaying them in
    the trainer changes no log-prob. A routing assembled wrongly (a step left out, shifted, rows
    mixed) fails the first check, and replays experts the trainer did not choose."""
    from titan_rl.model import GptOss, GptOssModelArgs
    from titan_rl.rl.rollout import SamplingParams

    bench = import_benchmark("bench_generate")
    torch.manual_seed(0)
    model = GptOss(GptOssModelArgs.from_preset("debug")).eval()
    g = torch.Generator().manual_seed(3)
    prompts = torch.randint(0, model.args.vocab_size, (3, 7), generator=g).tolist()
    params = SamplingParams(temperature=bench.GREEDY_TEMPERATURE, top_k=1, max_new_tokens=6)
    completions, routing = bench.engine_routing(model, prompts, params)
    args = model.args
    assert routing.shape == (args.num_hidden_layers, 3, 7 + 6 - 1, args.num_experts_per_tok)
    trainer, trainer_routing = bench.trainer_logprobs(model, prompts, completions)
    assert torch.equal(routing.sort(-1).values, trainer_routing.sort(-1).values)
    replayed, _ = bench.trainer_logprobs(model, prompts, completions, expert_indices=routing)
    torch.testing.assert_close(replayed, trainer, rtol=0, atol=1e-5)
    other = (routing + 1) % args.num_local_experts  # the replay is honoured: other experts, other numbers
    assert (bench.trainer_logprobs(model, prompts, completions, other)[0] - trainer).abs().max() > 1e-3
    engine = torch.tensor([lp for c in completions for lp in c.logprobs])
    torch.testing.assert_close(engine, trainer, rtol=0, atol=ROUND_OFF)


@pytest.mark.timeout(240)
def test_bench_generate_says_where_a_bf16_difference_comes_from():
    proc = run_benchmark(
        "bench_generate.py", "--preset", "debug", "--layers", "2",
        "--dtype", "bfloat16", "--batch", "2", "3", "--prompt", "6", "--new", "5", "--repeats", "1",
        "--sources", "3",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    tables = proc.stdout.split("Where the bfloat16 engine / trainer difference comes from")
    assert len(tables) == 2, proc.stdout
    header, row = table_rows(tables[1])  # one row: --sources 3
    assert header[0] == "batch" and len(header) == 10 == len(row), (header, row)
    assert row[0] == "3"
    moved = float(row[5].rstrip("%"))
    assert 0 <= moved <= 100, row
    for mean, largest in ((row[1], row[2]), (row[3], row[4]), (row[6], row[7]), (row[8], row[9])):
        assert 0 <= float(mean) <= float(largest) < 5, row
    main_row = next(line for line in tables[0].splitlines() if "native (eager) | 3 |" in line)
    assert main_row.split("|")[-3:-1] == [f" {row[1]} ", f" {row[2]} "], (
        main_row,
        row,
    )  # same run, same numbers

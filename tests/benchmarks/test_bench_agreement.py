"""benchmarks/bench_agreement.py on CPU with tiny shapes: its Markov language, its training (which
must learn the language's next tokens, not something easier), and its table."""

from __future__ import annotations

import math

import pytest
import torch

from tests.benchmarks import import_benchmark, run_benchmark, table_rows

TINY = [
    "--preset", "debug", "--layers", "2", "--states", "64", "--batch", "3", "--prompt", "8",
    "--new", "6", "--train-batch", "8", "--seq", "32", "--lr", "3e-3",
]  # fmt: skip


def test_markov_language_follows_its_successors_and_knows_its_loss_floor():
    language = import_benchmark("bench_agreement").MarkovLanguage(50, 3, 0.5, seed=1)
    tokens = language.sample(20, 40)
    assert tokens.shape == (20, 40) and int(tokens.max()) < 50
    for before, after in zip(tokens[:, :-1].flatten().tolist(), tokens[:, 1:].flatten().tolist()):
        assert after in language.successors[before].tolist()
    # the floor against a Monte Carlo estimate: the true -log p of each next token of many samples
    # (they agree to 0.003 nats here; the unweighted mean of the tokens' entropies is 0.04 off)
    tokens = language.sample(4000, 10)
    current, nxt = tokens[:, :-1].flatten(), tokens[:, 1:].flatten()
    p_next = (language.probs[current] * (language.successors[current] == nxt[:, None])).sum(1)
    estimate = float(-p_next.log().mean())
    assert language.loss_floor(10) == pytest.approx(estimate, abs=0.015)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bench_agreement_trains_and_measures_each_checkpoint(dtype):
    proc = run_benchmark("bench_agreement.py", *TINY, "--steps", "0", "40", "--dtype", dtype)
    assert proc.returncode == 0, proc.stderr[-3000:]
    floor = float(proc.stdout.split("held-out loss floor ")[1].split(" nats")[0])
    header, *rows = table_rows(proc.stdout)
    assert header[:4] == ["trained steps", "held-out loss", "decoding", "mean logp, generated"], header
    assert [(r[0], r[2]) for r in rows] == [
        ("0", "greedy"),
        ("0", "T = 1"),
        ("40", "greedy"),
        ("40", "T = 1"),
    ]
    before, after = float(rows[0][1]), float(rows[2][1])
    # it learned, and only what the language allows: a loss well below its floor would mean the
    # targets leak (e.g. a token scored against itself; 0.8: the held-out sample's own spread)
    assert after < before - 1.0 and after > 0.8 * floor, (before, after, floor)
    for row in rows:
        cells = [float(c.rstrip("%")) for c in row[4:]]
        assert all(math.isfinite(c) and c >= 0 for c in cells), row
        assert float(row[3]) < 0, row  # the generated tokens' mean log-prob
    if dtype == "float32":  # engine and trainer agree to round-off; nothing routes differently
        for row in rows:
            assert float(row[4]) <= 1e-4 and float(row[5]) <= 1e-3 and row[8] == "0.00%", row
    else:  # bf16: a difference, but far below a token scored wrongly (~1)
        assert all(0 < float(row[4]) < 0.1 for row in rows), rows


def test_next_token_loss_scores_the_next_token():
    """The training loss against the model's logits, by hand: a shift bug (a token scored against
    itself, or two ahead) changes it."""
    bench = import_benchmark("bench_agreement")
    from titan_rl.model import GptOss, GptOssModelArgs

    torch.manual_seed(0)
    model = GptOss(GptOssModelArgs.from_preset("debug", num_hidden_layers=1)).eval()
    tokens = torch.randint(0, model.args.vocab_size, (2, 7))
    with torch.no_grad():
        logp = torch.log_softmax(model(tokens).float(), dim=-1)  # [2, 7, vocab]
        expected = -logp[:, :-1].gather(-1, tokens[:, 1:, None]).mean()
        got = bench.next_token_loss(model, tokens)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _checkpoint(folder):
    """A tiny HF folder with a tokenizer, and two text prompts."""
    from titan_rl.checkpoint.hf import save_hf_model
    from titan_rl.model import GptOss, GptOssModelArgs
    from titan_rl.rl.tokenizer import build_tiny_tokenizer

    torch.manual_seed(5)
    model = GptOss(GptOssModelArgs.from_preset("debug", num_hidden_layers=1))
    save_hf_model(model, folder, dtype=torch.float32)
    build_tiny_tokenizer(model.args.vocab_size).save(folder)
    prompts = folder / "prompts.txt"
    prompts.write_text("the cat sat on the mat\n\nlook up the weather in Paris\n")
    return prompts


@pytest.mark.timeout(240)
def test_bench_agreement_measures_a_checkpoint_as_it_is(tmp_path):
    """--hf-path: the folder's weights and the file's prompts, nothing trained. The prompts are the
    file's lines through the folder's tokenizer, and the greedy row's mean log-prob is the one a plain
    engine over that folder and those prompts gives."""
    from titan_rl.checkpoint.hf import load_hf_model
    from titan_rl.rl.rollout import NativeEngine, SamplingParams
    from titan_rl.rl.tokenizer import Tokenizer

    folder = tmp_path / "hf"
    prompts_file = _checkpoint(folder)
    args = ["--hf-path", str(folder), "--prompts-file", str(prompts_file), "--new", "5"]  # --steps: 0
    proc = run_benchmark("bench_agreement.py", *args, "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 layers" in proc.stdout, proc.stdout
    header, *rows = table_rows(proc.stdout)
    assert len(header) == 13 and [(r[0], r[1], r[2]) for r in rows] == [
        ("checkpoint", "n/a", "greedy"), ("checkpoint", "n/a", "T = 1")
    ]  # fmt: skip
    for row in rows:  # fp32: round-off
        assert float(row[4]) <= 1e-4 and row[8] == "0.00%", row
    tokenizer = Tokenizer.from_folder(folder)
    prompts = [tokenizer.encode(line) for line in prompts_file.read_text().splitlines() if line.strip()]
    assert f"2 prompts of {prompts_file} ({sum(map(len, prompts))} tokens)" in proc.stdout, proc.stdout
    model = load_hf_model(folder).eval()
    completions = NativeEngine(model, seed=0).generate(prompts, SamplingParams(max_new_tokens=5, top_k=1))
    expected = sum(sum(c.logprobs) for c in completions) / sum(len(c.logprobs) for c in completions)
    assert float(rows[0][3]) == pytest.approx(expected, abs=1e-3)

    proc = run_benchmark("bench_agreement.py", *args, "--skip-fp32")  # bf16, no fp32 copy
    assert proc.returncode == 0, proc.stderr[-3000:]
    header, *rows = table_rows(proc.stdout)
    assert header[-1] == "positions routed differently" and len(rows) == 2, header
    proc = run_benchmark("bench_agreement.py", "--hf-path", str(folder), "--steps", "0", "10")
    assert proc.returncode != 0 and "nothing is trained here" in proc.stderr
    (tmp_path / "blank.txt").write_text("\n  \n")
    proc = run_benchmark(
        "bench_agreement.py", "--hf-path", str(folder), "--prompts-file", str(tmp_path / "blank.txt")
    )
    assert proc.returncode != 0 and "no prompts" in proc.stderr, proc.stderr[-2000:]

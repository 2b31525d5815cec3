"""benchmarks/bench_precision.py on CPU with tiny shapes: a row per variant, and every patched
variant really computes something else than the plain one it patches."""

from __future__ import annotations

import pytest

from tests.benchmarks import import_benchmark, run_benchmark, table_rows


@pytest.mark.timeout(240)
def test_bench_precision_rows_and_their_variants_apply():
    proc = run_benchmark(
        "bench_precision.py", "--preset", "debug", "--layers", "2", "--batch", "3", "--prompt", "8",
        "--new", "8",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    header, *rows = table_rows(proc.stdout)
    assert header[0] == "variant" and len(header) == 6, header
    by_name = {row[0]: [float(c.rstrip("%")) for c in row[1:]] for row in rows}
    assert list(by_name) == [
        "bf16", "bf16, reduced split-K sums", "fp32 residual", "fp32 router", "fp32 activations",
        "fp32 activations, bf16 expert outputs", "model.activation_dtype = float32", "fp32"
    ]  # fmt: skip
    fp32 = by_name["fp32"]
    assert fp32[0] <= 1e-5 and fp32[1] <= 1e-4 and fp32[4] == 0.0, fp32  # the floor: round-off
    assert by_name["bf16"][0] > 10 * fp32[0], by_name  # bf16 rounding shows
    # a patch that no longer applies would repeat the row it patches
    # (at these tiny shapes rounding the GEMM inputs can even make engine and trainer bitwise equal)
    assert by_name["fp32 activations"][:4] != fp32[:4], by_name
    assert by_name["fp32 residual"][:4] != by_name["bf16"][:4], by_name
    assert by_name["fp32 router"][:4] != by_name["bf16"][:4], by_name
    # the real mode computes what its emulation does (on the CPU the same operations)
    assert by_name["model.activation_dtype = float32"] == by_name["fp32 activations"]


def test_fp32_activations_rounds_the_inputs_of_every_gemm_the_model_runs():
    """The variant's three patched names compute the plain function of bf16-rounded inputs, and the
    model's training forward and the engine's generate both go through each of them (a refactor
    that calls around one would leave that GEMM's inputs unrounded, and the row would lie)."""
    from unittest import mock

    import torch
    import torch.nn.functional as F

    import titan_rl.model.moe as moe
    from titan_rl.model import GptOss, GptOssModelArgs
    from titan_rl.model.logprobs import LogitsGemm
    from titan_rl.rl.rollout import NativeEngine, SamplingParams

    bench = import_benchmark("bench_precision")
    plain_linear, plain_grouped, plain_operand = F.linear, moe.grouped_mm, LogitsGemm.operand
    torch.manual_seed(0)
    model = GptOss(GptOssModelArgs.from_preset("debug", num_hidden_layers=1)).eval()
    x, w = torch.randn(6, 64), torch.randn(8, 64)
    experts, counts = torch.randn(2, 64, 8), torch.tensor([4, 2])
    gemm = LogitsGemm(w)
    with torch.no_grad(), bench.variant("fp32 activations"):
        rounded = bench.to_bf16(x)
        assert not torch.equal(rounded, x)
        assert torch.equal(F.linear(x, w), plain_linear(rounded, w))
        assert torch.equal(moe.grouped_mm(x, experts, counts), plain_grouped(rounded, experts, counts))
        assert torch.equal(gemm.operand(x), plain_operand(gemm, rounded))
        with (
            mock.patch.object(F, "linear", wraps=F.linear) as linear,
            mock.patch.object(moe, "grouped_mm", wraps=moe.grouped_mm) as grouped,
            mock.patch.object(
                LogitsGemm, "operand", autospec=True, side_effect=LogitsGemm.operand
            ) as operand,
        ):
            tokens = torch.randint(0, model.args.vocab_size, (2, 5))
            model(
                tokens, targets=tokens[:, 1:].flatten(), target_index=torch.tensor([0, 1, 2, 3, 5, 6, 7, 8])
            )
            trained = (linear.call_count, grouped.call_count, operand.call_count)
            NativeEngine(model).generate([[1, 2, 3]], SamplingParams(max_new_tokens=3, top_k=1))
            generated = (linear.call_count, grouped.call_count, operand.call_count)
    assert all(n > 0 for n in trained), trained  # q/k/v/o and the router; the experts; the LM head
    assert all(after > before for before, after in zip(trained, generated)), (trained, generated)
    with torch.no_grad(), bench.variant(bench.BF16_EXPERTS):  # the same, the experts' results rounded
        assert torch.equal(F.linear(x, w), plain_linear(rounded, w))
        grouped = plain_grouped(rounded, experts, counts)
        assert not torch.equal(bench.to_bf16(grouped), grouped)
        assert torch.equal(moe.grouped_mm(x, experts, counts), bench.to_bf16(grouped))
        assert torch.equal(gemm.operand(x), plain_operand(gemm, rounded))


@pytest.mark.timeout(240)
def test_bench_precision_on_weights_bench_agreement_trained(tmp_path):
    """bench_agreement.py --save-hf writes the trained weights; bench_precision.py --hf-path runs its
    variants on them (and they are not the random init: training changed them)."""
    import torch

    from titan_rl.checkpoint.hf import load_hf_model
    from titan_rl.model import GptOss

    folder = tmp_path / "trained"
    proc = run_benchmark(
        "bench_agreement.py", "--preset", "debug", "--layers", "2", "--states", "64", "--batch", "2",
        "--prompt", "8", "--new", "4", "--train-batch", "4", "--seq", "32", "--steps", "0", "5",
        "--save-hf", str(folder),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    trained = load_hf_model(folder)
    torch.manual_seed(0)  # bench_agreement's init
    initial = GptOss(trained.args)
    assert not torch.equal(trained.layers[0].mlp.router.weight, initial.layers[0].mlp.router.weight)
    proc = run_benchmark(
        "bench_precision.py", "--hf-path", str(folder), "--batch", "2", "--prompt", "8", "--new", "6",
        "--variants", "bf16", "fp32",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"config: {folder}: 2 layers" in proc.stdout, proc.stdout
    _, *rows = table_rows(proc.stdout)
    assert [row[0] for row in rows] == ["bf16", "fp32"]
    assert float(rows[1][1]) <= 1e-5 and float(rows[0][1]) > 0, rows

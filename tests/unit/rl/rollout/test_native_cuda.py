"""The native engine's CUDA-graph decode against its reference, the static decode it captures.

Both run the same kernels on the same fixed shapes; the graph only replays them without Python, so
tokens must be equal and log-probs equal or within 1e-3 (cuBLAS may pick another algorithm for a
captured GEMM, which moves a bf16 hidden state by an ulp; a wrong buffer or a frozen value moves
log-probs by 1e-1 or more). Needs CUDA on sm90 or sm100 (the fused grouped expert kernel
in bf16, which reads no counts on the host); skipped elsewhere. ``benchmarks/gpu_checks.py`` runs
this file on a lent GPU.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_model, trainer_logprob_gaps
from titan_rl.rl.rollout import NativeEngine, SamplingParams

needs_sm90 = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] not in (9, 10),
    reason="needs CUDA sm90 / sm100 (the fused bf16 grouped expert kernel)",
)


def bf16_model(seed: int):
    # hidden 32 and intermediate 24: bf16 rows of 64 and 48 bytes, as the grouped kernel needs
    return tiny_model(seed=seed).to("cuda", torch.bfloat16).eval()


@needs_sm90
@pytest.mark.parametrize("sampled", [False, True])
def test_cuda_graph_decode_returns_what_static_decode_returns(sampled):
    """7 prompts through 3 rows: refills (a new prefill written into a row the graph reads), parked
    rows (finished with nobody waiting), stop tokens and length ends, one capture per call. Sampled:
    with the routing recorded too (a third output of the captured step)."""
    model = bf16_model(seed=21)
    g = torch.Generator().manual_seed(21)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (9, 2, 5, 1, 12, 3, 7)]
    params = (
        SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=11)
        if sampled
        else SamplingParams(top_k=1, max_new_tokens=11)
    )
    # stop tokens that end some episodes early, picked from this model's own unstopped output (what a
    # random model emits on this GPU is not known in advance): the 5th tokens of prompts 0 and 2
    unstopped = NativeEngine(model, seed=5, max_batch_rows=3, check_every=4, decode="static").generate(
        prompts, params
    )
    params.stop_token_ids = (unstopped[0].tokens[4], unstopped[2].tokens[4])
    engine = dict(seed=5, max_batch_rows=3, check_every=4, record_routing=sampled)
    static = NativeEngine(model, decode="static", **engine)
    graph = NativeEngine(model, decode="cuda_graph", **engine)
    expected = static.generate(prompts, params)
    got = graph.generate(prompts, params)
    assert graph.captures == 1
    assert "stop" in {c.finish_reason for c in expected}  # rows freed early: refills or parking
    for completion, reference in zip(got, expected, strict=True):
        assert completion.tokens == reference.tokens
        assert completion.finish_reason == reference.finish_reason
        diff = (torch.tensor(completion.logprobs) - torch.tensor(reference.logprobs)).abs().max()
        assert diff <= 1e-3
        if sampled:  # the same experts at (nearly) every position; a bf16 near-tie may flip one
            assert completion.routing.shape == reference.routing.shape
            same = (completion.routing.sort(-1).values == reference.routing.sort(-1).values).all(-1).all(-1)
            assert same.float().mean() >= 0.95
    # a second call captures again (new cache, new prompts) and gives static's answer (each call draws
    # a new sampling seed from the engine's generator, so sampled tokens differ from the first call's)
    again = [c.tokens for c in static.generate(prompts, params)]
    assert [c.tokens for c in graph.generate(prompts, params)] == again
    assert graph.captures == 2


@needs_sm90
def test_cuda_graph_decode_refuses_an_fp32_model():
    model = tiny_model(seed=22).to("cuda").eval()
    with pytest.raises(ValueError, match="only in bf16 on sm90 or sm100"):
        NativeEngine(model, decode="cuda_graph").generate([[1, 2]], SamplingParams(max_new_tokens=2))


@needs_sm90
def test_fp32_activations_on_cuda_graph_decode_agree_with_the_trainer():
    """``activation_dtype = "float32"`` on CUDA (out_dtype GEMMs, fp32 KV cache): CUDA-graph decode
    gives static decode's tokens, and the engine's log-probs are the trainer's teacher-forced ones to
    1e-3 on average (plain bf16: about 3e-2 on this model, tests/unit/rl/rollout/test_native.py)."""
    model = tiny_model(seed=31, activation_dtype="float32").to("cuda", torch.bfloat16).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    g = torch.Generator().manual_seed(31)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (5, 9, 3, 7, 7, 4)]
    params = SamplingParams(top_k=1, max_new_tokens=10)
    expected = NativeEngine(model, decode="static").generate(prompts, params)
    graph = NativeEngine(model, decode="cuda_graph")
    got = graph.generate(prompts, params)
    assert graph.captures >= 1
    assert [c.tokens for c in got] == [c.tokens for c in expected]
    assert trainer_logprob_gaps(model, prompts, got).mean() <= 1e-3

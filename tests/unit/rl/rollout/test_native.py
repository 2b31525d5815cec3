"""The native engine: KV-cache decoding equals re-running the prefix; its log-probs equal the trainer's.

Its decode-only fast paths (one-query cache attention, the LM-head matmul, dropping
finished rows) are each checked against the reference they replace, on random inputs.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from tests.conftest import HostSyncs, rel_err, tiny_model, trainer_logprob_gaps
from titan_rl.model import token_logprobs_and_entropy
from titan_rl.model.attention import sink_softmax_attention
from titan_rl.model.kv_cache import KVCache, decode_sink_attention
from titan_rl.parallel.fsdp import fsdp_param_groups
from titan_rl.rl.rollout import NativeEngine, SamplingParams, native
from titan_rl.rl.rollout.native import share_of
from titan_rl.rl.rollout.noise import draw_call_seed, exponential_noise, row_keys
from titan_rl.rl.rollout.sampling import DecodeHead, filter_logits, sample_next


def sample_without_cache(model, prompts, params, seed):
    """Reference: one full forward over each prefix per new token, the engine's noise."""
    keys = row_keys(draw_call_seed(torch.Generator().manual_seed(seed)), torch.arange(len(prompts)))
    rows = [list(p) for p in prompts]
    tokens, logprobs = [[] for _ in prompts], [[] for _ in prompts]
    for step in range(params.max_new_tokens):
        lasts = [model(torch.tensor([r]))[0, -1] for r in rows]
        logits = torch.stack(lasts).float() / params.temperature
        noise = exponential_noise(keys, torch.full((len(prompts),), step), logits.shape[-1])
        sampled = (torch.softmax(logits, -1) / noise).argmax(-1)
        for i, token in enumerate(sampled.tolist()):
            rows[i].append(token)
            tokens[i].append(token)
            logprobs[i].append(torch.log_softmax(logits[i], -1)[token].item())
    return tokens, logprobs


def test_cached_generation_matches_full_recompute():
    model = tiny_model(seed=2).eval()
    prompts = [[5, 9, 13], [1, 2, 3, 4, 5, 6, 7], [42]]  # uneven lengths: left padding
    params = SamplingParams(temperature=0.9, max_new_tokens=14)  # well past the window (6)
    completions = NativeEngine(model, seed=3).generate(prompts, params)
    ref_tokens, ref_logprobs = sample_without_cache(model, prompts, params, seed=3)
    for completion, tokens, logprobs in zip(completions, ref_tokens, ref_logprobs):
        assert completion.tokens == tokens
        assert torch.allclose(torch.tensor(completion.logprobs), torch.tensor(logprobs), atol=1e-5)


def test_engine_logprobs_equal_trainer_logprobs():
    model = tiny_model(seed=4).eval()
    prompt = [7, 8, 9, 10]
    params = SamplingParams(temperature=0.7, max_new_tokens=10)
    (completion,) = NativeEngine(model, seed=0).generate([prompt], params)
    sequence = torch.tensor([prompt + completion.tokens])
    hidden = model(sequence, return_hidden=True)[:, len(prompt) - 1 : -1]
    trainer, _ = token_logprobs_and_entropy(hidden, model.lm_head.weight, sequence[:, len(prompt) :], 0.7)
    assert (trainer[0] - torch.tensor(completion.logprobs)).abs().max() < 1e-5


def test_stop_tokens_end_an_episode():
    model = tiny_model(seed=5).eval()
    params = SamplingParams(max_new_tokens=30, stop_token_ids=tuple(range(0, 96, 2)))  # half the vocab
    completions = NativeEngine(model, seed=1).generate([[1, 3], [5, 7, 9]], params)
    for completion in completions:
        assert completion.finish_reason == "stop" and completion.tokens[-1] % 2 == 0
        assert all(t % 2 for t in completion.tokens[:-1])


def test_greedy_equals_argmax_of_full_forward():
    model = tiny_model(seed=6).eval()
    prompts = [[3, 1, 4, 1, 5], [9, 2]]
    (a, b) = NativeEngine(model).generate(prompts, SamplingParams(top_k=1, max_new_tokens=12))
    for prompt, completion in zip(prompts, (a, b)):
        row = list(prompt)
        for _ in range(12):
            row.append(int(model(torch.tensor([row]))[0, -1].argmax()))
        assert completion.tokens == row[len(prompt) :]


# ---- sampling on the device, continuous batching ----


@pytest.mark.parametrize(
    ("temperature", "top_p", "top_k"),
    [(1.0, 1.0, 0), (0.7, 1.0, 0), (0.8, 0.9, 0), (1.3, 0.85, 9), (0.6, 1.0, 5)],
)
def test_device_sampler_draws_what_multinomial_draws_for_the_same_generator(temperature, top_p, top_k):
    """``sample_next`` against the host sampler it replaced (``torch.multinomial`` on the filtered,
    tempered softmax; log-prob from the unfiltered tempered log-softmax): same generator state,
    same tokens and log-probs, over many rows and 3 successive draws."""
    logits = 3 * torch.randn(64, 50, generator=torch.Generator().manual_seed(int(temperature * 10) + top_k))
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k)
    ours, theirs = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for _ in range(3):
        tokens, logprobs = sample_next(logits, params, torch.empty_like(logits).exponential_(generator=ours))
        tempered = logits / temperature
        probs = torch.softmax(filter_logits(tempered, top_p, top_k), dim=-1)
        expected = torch.multinomial(probs, 1, generator=theirs).squeeze(1)
        assert torch.equal(tokens, expected)
        # the same fp32 ops in another order (gather - logsumexp vs log_softmax): a few ulps
        assert (logprobs - torch.log_softmax(tempered, -1)[torch.arange(64), expected]).abs().max() < 1e-6


def test_share_of_splits_contiguously_and_covers_every_prompt():
    for count, world in ((5, 2), (1, 2), (8, 3), (0, 4)):
        shares = [share_of(count, world, rank) for rank in range(world)]
        assert [i for share in shares for i in share] == list(range(count))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def alone(model, prompts, params):
    """Each prompt generated by itself: the reference that batching must not change."""
    return [NativeEngine(model).generate([p], params)[0] for p in prompts]


def assert_same_completions(completions, reference):
    for completion, expected in zip(completions, reference, strict=True):
        assert completion.tokens == expected.tokens
        assert completion.finish_reason == expected.finish_reason
        # fp32 round-off of a different batch (GEMM blocking)
        assert (torch.tensor(completion.logprobs) - torch.tensor(expected.logprobs)).abs().max() < 1e-5


@pytest.mark.parametrize("decode", ["eager", "static"])
@pytest.mark.parametrize(("rows", "check_every"), [(2, 3), (3, 1)])
def test_continuous_batching_returns_what_each_prompt_alone_returns(monkeypatch, rows, check_every, decode):
    """More prompts than rows: finished rows (stop tokens, uneven lengths) take waiting prompts.
    ``static``: fixed shapes, finished rows parked in the batch, attention over fixed extents."""
    model = tiny_model(seed=13).eval()
    g = torch.Generator().manual_seed(13)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (9, 2, 5, 1, 12, 3, 7)]
    params = SamplingParams(top_k=1, max_new_tokens=11, stop_token_ids=(3, 40, 77))
    refills = []
    replace_rows = KVCache.replace_rows
    monkeypatch.setattr(
        KVCache, "replace_rows", lambda self, r, other: refills.append(len(r)) or replace_rows(self, r, other)
    )
    engine = NativeEngine(model, max_batch_rows=rows, check_every=check_every, decode=decode)
    completions = engine.generate(prompts, params)
    assert sum(refills) == len(prompts) - rows  # every waiting prompt went into a freed row
    reference = alone(model, prompts, params)
    assert {c.finish_reason for c in reference} == {"stop", "length"}  # both ways of ending occur
    assert_same_completions(completions, reference)


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_a_refilled_row_does_not_see_the_previous_occupant(decode):
    """Two rows: a 14-token prompt stops after 3 tokens and a 2-token prompt takes its row, while a
    13-token prompt decodes on in the other row, so attention reads slots up to its position ~20.
    The old occupant's keys at positions 2..16 sit in those slots of the full layer (and in the
    rings) unless the refill clears the row."""
    model = tiny_model(seed=14).eval()
    g = torch.Generator().manual_seed(15)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (14, 13, 2)]
    params = SamplingParams(top_k=1, max_new_tokens=10, stop_token_ids=(41,))
    reference = alone(model, prompts, params)
    assert [len(c.tokens) for c in reference[:2]] == [3, 10]  # the first ends early, the second not
    engine = NativeEngine(model, max_batch_rows=2, check_every=1, decode=decode)
    assert_same_completions(engine.generate(prompts, params), reference)


def test_the_host_reads_the_sampled_tokens_once_per_check_every_steps(monkeypatch):
    model = tiny_model(seed=15).eval()
    reads = []
    read = NativeEngine._read
    monkeypatch.setattr(NativeEngine, "_read", staticmethod(lambda *a: reads.append(1) or read(*a)))
    prompts = [[1, 2, 3], [4, 5]]
    params = SamplingParams(temperature=0.9, max_new_tokens=16)
    completions = NativeEngine(model, seed=2, check_every=8).generate(prompts, params)
    assert len(reads) == 2 and all(len(c.tokens) == 16 for c in completions)


@pytest.mark.parametrize("record_routing", [False, True], ids=["plain", "routing"])
@pytest.mark.parametrize("decode", ["eager", "static"])
def test_a_decode_step_reads_no_tensor_on_the_host(monkeypatch, decode, record_routing):
    """No tensor read by Python (``item``, ``tolist``, ``int``, ``bool``, ...) inside
    a decode step or a sampling step, where on a GPU it would wait for the device. Only the
    engine's reads between steps (``_read``) may look at tensors."""
    model = tiny_model(seed=17).eval()
    in_step = []

    def refusing(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args):
            assert not in_step, f"Tensor.{name} inside {in_step[0]}"
            return original(self, *args)

        return read

    def marking(name):
        original = getattr(NativeEngine, name)

        def step(self, *args):
            in_step.append(name)
            try:
                return original(self, *args)
            finally:
                in_step.pop()

        return step

    for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refusing(name))
    for name in ("_step", "_decode", "_sample"):
        monkeypatch.setattr(NativeEngine, name, marking(name))
    # the code a GPU runs: the CPU-only expert products of decode steps read their counts, for free
    monkeypatch.setattr(native, "cpu_decode_experts", lambda model: contextlib.nullcontext())
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, max_new_tokens=12, stop_token_ids=(5, 9))
    engine = NativeEngine(
        model, seed=1, max_batch_rows=2, check_every=4, decode=decode, record_routing=record_routing
    )
    completions = engine.generate([[1, 2, 3], [4], [5, 6, 7, 8], [60, 61]], params)
    assert all(0 < len(c.tokens) <= 12 for c in completions)
    assert all((c.routing is not None) == record_routing for c in completions)


def test_sampled_completions_do_not_depend_on_the_batching():
    """Noise keyed by prompt and token index: all rows at once, 2 rows refilled, or read every step
    give the same sampled completions (log-probs up to the fp32 round-off of another batch)."""
    model = tiny_model(seed=16).eval()
    g = torch.Generator().manual_seed(16)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (4, 1, 7, 3, 5)]
    params = SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=10, stop_token_ids=(3, 40))
    together = NativeEngine(model, seed=9).generate(prompts, params)
    assert len({tuple(c.tokens) for c in together}) == len(prompts)
    for engine in (
        NativeEngine(model, seed=9, max_batch_rows=2, check_every=4),
        NativeEngine(model, seed=9, check_every=3),
        NativeEngine(model, seed=9, max_batch_rows=2, check_every=4, decode="static"),
        NativeEngine(model, seed=9, check_every=3, decode="static"),
    ):
        assert_same_completions(engine.generate(prompts, params), together)
    other_seed = NativeEngine(model, seed=10).generate(prompts, params)
    assert [c.tokens for c in other_seed] != [c.tokens for c in together]


def test_static_decode_parks_finished_rows_and_keeps_its_shapes(monkeypatch):
    """``static`` must keep its shapes to a few (what CUDA graphs replay): one batch size, attention
    extents from a few powers of two (here from 4, capped at the row length 18), finished rows
    parked rather than dropped, while ``eager`` shrinks the batch and grows the extent by one a
    step. Planted: dropping finished rows in static mode fails it, and so does an extent one slot
    short of the longest position."""
    monkeypatch.setattr(NativeEngine, "min_extent", 4)
    model = tiny_model(seed=18).eval()
    g = torch.Generator().manual_seed(18)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (6, 2, 9, 4, 3)]
    params = SamplingParams(top_k=1, max_new_tokens=9, stop_token_ids=(3, 40, 77))
    shapes = {}
    decode = NativeEngine._decode

    def recording(self, cache, tokens, positions, reach):
        shapes[self.decode].add((tokens.shape[0], reach))
        return decode(self, cache, tokens, positions, reach)

    monkeypatch.setattr(NativeEngine, "_decode", recording)
    results = {}
    for mode in ("eager", "static"):
        shapes[mode] = set()
        results[mode] = NativeEngine(model, max_batch_rows=3, decode=mode).generate(prompts, params)
    assert len({len(c.tokens) for c in results["eager"]}) > 1  # rows end at different steps
    assert {rows for rows, _ in shapes["static"]} == {3}
    extents = {extent for _, extent in shapes["static"]}
    assert extents <= {4, 8, 16, 18} and len(extents) > 1, extents  # 18: 9 + 9, the row length
    assert len(shapes["eager"]) > len(shapes["static"])
    assert_same_completions(results["static"], results["eager"])


@pytest.mark.parametrize("params", [
    SamplingParams(top_k=1, max_new_tokens=9, stop_token_ids=(3, 40)),
    SamplingParams(temperature=0.8, top_p=0.9, top_k=20, max_new_tokens=9, stop_token_ids=(3, 40)),
])  # fmt: skip
@pytest.mark.parametrize("record_routing", [False, True], ids=["plain", "routing"])
def test_the_static_decode_step_is_code_a_cuda_graph_can_capture(monkeypatch, params, record_routing):
    """What ``cuda_graph`` captures is the static step: on CPU, the same code must make no op that
    waits for the device (a value read, a data-dependent shape) and no tensor from Python data
    (``torch.tensor([...])``: on CUDA a pageable copy), two things a capture refuses. A CPU run
    cannot see a ``.to(device)`` of a CPU tensor (a no-op here); the CUDA test catches that.
    Planted: ``torch.tensor([reach])`` in the step fails it."""
    model = tiny_model(seed=20).eval()
    seen, steps = [], []
    step = NativeEngine._step

    def watched(self, *args):
        with HostSyncs(host_data=True) as syncs:
            out = step(self, *args)
        seen.extend(syncs.calls)
        steps.append(1)
        return out

    monkeypatch.setattr(NativeEngine, "_step", watched)
    engine = NativeEngine(
        model, seed=3, max_batch_rows=2, check_every=3, decode="static", record_routing=record_routing
    )
    completions = engine.generate([[1, 2, 3], [4], [5, 6, 7, 8], [60, 61]], params)
    assert len(steps) >= 9 and seen == []
    assert all((c.routing is not None) == record_routing for c in completions)


def test_under_one_rank_fsdp_mixed_precision_the_engine_runs_the_plain_bf16_model(
    single_process_group, monkeypatch
):
    """One-GPU training wraps the model in one-rank FSDP (bf16 compute, fp32 masters). During a
    ``generate`` the weights are gathered once and FSDP's hooks are paused, so decode steps run the
    plain module: the completions must be the plain bf16 model's, with no FSDP forward hook run
    (they cost ~1 ms per module per step and would block a CUDA-graph capture); after it, the hooks
    are back for training. Planted: not pausing FSDP's hooks fails it."""
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    from titan_rl.parallel.parallel_dims import ParallelDims
    from titan_rl.parallel.parallelize import ParallelConfig, parallelize_gpt_oss

    plain = tiny_model(seed=24).to(torch.bfloat16).eval()
    dims = ParallelDims(1, 1, 1, 1, world_size=1, device_type="cpu")
    wrapped = parallelize_gpt_oss(tiny_model(seed=24), dims, ParallelConfig(mixed_precision="bf16"))
    calls = []
    pre_forward = FSDPParamGroup.pre_forward
    monkeypatch.setattr(
        FSDPParamGroup, "pre_forward", lambda *a, **k: calls.append(1) or pre_forward(*a, **k)
    )
    g = torch.Generator().manual_seed(24)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (5, 2, 8)]
    params = SamplingParams(top_k=1, max_new_tokens=7, stop_token_ids=(3,))
    for decode in ("eager", "static"):
        got = NativeEngine(wrapped, decode=decode).generate(prompts, params)
        assert calls == []
        expected = NativeEngine(plain, decode=decode).generate(prompts, params)
        assert [c.tokens for c in got] == [c.tokens for c in expected]
        assert_same_completions(got, expected)
    wrapped.train()
    wrapped(torch.tensor([prompts[0]])).float().sum().backward()  # training: FSDP's hooks run again
    assert len(calls) > 0


@pytest.mark.parametrize("decode", ["eager", "static"])
@pytest.mark.parametrize("check_every", [1, 3, 8])
def test_n_new_tokens_take_n_minus_one_decode_forwards(monkeypatch, decode, check_every):
    """The first token comes from the prefill, each later one from decoding its predecessor; the
    last token's own decode would be read by nobody when every row ends there by length. Planted:
    decoding it anyway (one more forward per generate call) fails it."""
    model = tiny_model(seed=26).eval()
    calls = []
    decode_fn = NativeEngine._decode
    monkeypatch.setattr(NativeEngine, "_decode", lambda self, *a: calls.append(1) or decode_fn(self, *a))
    engine = NativeEngine(model, check_every=check_every, decode=decode)
    completions = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(top_k=1, max_new_tokens=7))
    assert [len(c.tokens) for c in completions] == [7, 7]
    assert len(calls) == 6


def test_cuda_graph_decode_says_why_it_cannot_run_here():
    model = tiny_model(seed=19).eval()
    with pytest.raises(ValueError, match=r"cuda_graph.*not CUDA.*use decode = 'eager'"):
        NativeEngine(model, decode="cuda_graph").generate([[1, 2]], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="decode = 'fast'"):
        NativeEngine(model, decode="fast")


# ---- the decode-only fast paths, each against its reference ----


def greedy_reference(model, prompt, steps, stop=()):
    """Greedy tokens by a full forward over the whole prefix per step, cut after the first stop token."""
    row = list(prompt)
    for _ in range(steps):
        row.append(int(model(torch.tensor([row]))[0, -1].argmax()))
        if row[-1] in stop:
            break
    return row[len(prompt) :]


def test_decode_attention_equals_sink_softmax_reference():
    g = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, slots, dim = 3, 8, 2, 11, 16
    q = torch.randn(batch, 1, heads, dim, generator=g)
    keys, values = (torch.randn(batch, kv_heads, slots, dim, generator=g) for _ in range(2))
    sinks = torch.randn(heads, generator=g) * 2
    visible = torch.rand(batch, slots, generator=g) > 0.3
    visible[:, -1] = True  # the query's own key
    out = decode_sink_attention(q, keys, values, visible, sinks, dim**-0.5)
    allowed = visible[:, None, None, :]
    ref = sink_softmax_attention(q, keys.transpose(1, 2), values.transpose(1, 2), sinks, dim**-0.5, allowed)
    assert rel_err(out, ref) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_decode_head_gives_fp32_logits_for_any_row_count(dtype):
    """fp32 logits from operands in the weight's dtype, as the trainer's log-probs (bf16 logits would
    be off by ~4e-3 relative). On CPU the head is packed for 5 rows; rows leave or are fewer, so 1,
    5 and 9 rows must all be right. Planted: packing the weight with its rows reversed fails it, and
    so do bf16 results."""
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(300, 64, generator=g).to(dtype)
    head = DecodeHead(weight, rows=5)
    for rows in (1, 5, 9):
        x = torch.randn(rows, 64, generator=g).to(dtype)
        logits = head(x)
        assert logits.dtype == torch.float32
        assert rel_err(logits, x.float() @ weight.float().T) <= 1e-5


def test_bf16_engine_logprobs_of_a_prefilled_row_are_the_trainers():
    """The first token of each row comes from the prefill, the trainer's own forward: its log-prob
    must be the trainer's to fp32 round-off also in bf16, with logits in the tens (real models' range,
    where bf16 spacing is 0.06-0.125). Planted: the head returning bf16 logits fails it (1.1e-2)."""
    model = tiny_model(seed=23).to(torch.bfloat16).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    g = torch.Generator().manual_seed(23)
    prompts = [torch.randint(0, 96, (7,), generator=g).tolist() for _ in range(6)]
    completions = NativeEngine(model, seed=4).generate(prompts, SamplingParams(max_new_tokens=1))
    tokens = torch.tensor([p + c.tokens for p, c in zip(prompts, completions)])
    first = torch.tensor([c.tokens[0] for c in completions])
    with torch.no_grad():
        logits = model(tokens).float()[:, -2]  # [rows, vocab]: the next-token logits after the prompt
        trainer, _ = model(tokens, targets=first, target_index=torch.arange(6) * 8 + 6)
    assert logits.abs().max() > 8  # the range where bf16 rounding of the logits would show
    engine = torch.tensor([c.logprobs[0] for c in completions])
    assert (engine - trainer).abs().max() <= 1e-4


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_fp32_activations_bring_bf16_engine_logprobs_to_the_trainers(decode):
    """``activation_dtype = "float32"`` (bf16 weights, fp32 activations and GEMM results): the engine's
    log-probs of 120 greedy tokens are the trainer's teacher-forced ones to 1e-3 on average, at
    least 20x closer than plain bf16's (measured 1.2e-4 and bitwise equal, against 2.9e-2 and 0.12).
    Planted: the embedding's output left in bf16 (the mode off) fails it."""
    errors = {}
    for mode in ("auto", "float32"):
        gaps = []
        for seed in (30, 31):
            model = tiny_model(seed=seed, activation_dtype=mode).to(torch.bfloat16).eval()
            with torch.no_grad():
                model.lm_head.weight.mul_(20.0)  # logits in the tens, as real models'
            g = torch.Generator().manual_seed(seed)
            prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (5, 9, 3, 7, 7, 4)]
            params = SamplingParams(top_k=1, max_new_tokens=10)
            completions = NativeEngine(model, decode=decode).generate(prompts, params)
            gaps.append(trainer_logprob_gaps(model, prompts, completions))
        errors[mode] = torch.cat(gaps).mean().item()
    assert errors["float32"] <= 1e-3 and errors["auto"] >= 20 * errors["float32"], errors


def test_several_tokens_per_step_after_prefill_match_full_forward():
    """The cache's general path (T > 1 after the prefill), then decode steps, past the window (6)."""
    model = tiny_model(seed=7).eval()
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (5, 2, 8)]
    follow = torch.randint(0, 96, (3, 9), generator=g)  # 3 tokens at once, then 6 single steps
    width = max(map(len, prompts))
    tokens = torch.zeros(3, width, dtype=torch.long)
    positions = torch.full((3, width), -1)
    document_ids = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p) :], positions[i, width - len(p) :] = torch.tensor(p), torch.arange(len(p))
        document_ids[i, width - len(p) :] = 1
    lengths = torch.tensor([len(p) for p in prompts])[:, None]
    cache = KVCache(model.args, 3, width + follow.shape[1])
    with torch.no_grad():
        model(tokens, positions=positions, document_ids=document_ids, kv_cache=cache)
        steps = [model(follow[:, :3], positions=lengths + torch.arange(3), kv_cache=cache)]
        for t in range(3, follow.shape[1]):
            steps.append(model(follow[:, t : t + 1], positions=lengths + t, kv_cache=cache))
        cached = torch.cat(steps, dim=1)  # [3, 9, vocab]
        for i, p in enumerate(prompts):
            full = model(torch.tensor([p + follow[i].tolist()]))[0, len(p) :]
            assert rel_err(cached[i], full) <= 1e-5


def test_greedy_logprobs_equal_trainer_logprobs_for_uneven_prompts():
    model = tiny_model(seed=8).eval()
    prompts = [[4, 8, 15, 16, 23, 42, 7, 1, 2], [11], [60, 61, 62, 63]]
    for params in (
        SamplingParams(top_k=1, max_new_tokens=13),
        SamplingParams(temperature=0.8, max_new_tokens=13),
    ):
        for prompt, completion in zip(prompts, NativeEngine(model, seed=4).generate(prompts, params)):
            sequence = torch.tensor([prompt + completion.tokens])
            hidden = model(sequence, return_hidden=True)[:, len(prompt) - 1 : -1]
            targets = sequence[:, len(prompt) :]
            trainer, _ = token_logprobs_and_entropy(hidden, model.lm_head.weight, targets, params.temperature)
            assert (trainer[0] - torch.tensor(completion.logprobs)).abs().max() < 1e-5
            if params.top_k == 1:
                assert completion.tokens == greedy_reference(model, prompt, 13)


def test_finished_rows_leave_the_batch_and_the_others_continue_unchanged(monkeypatch):
    model = tiny_model(seed=9).eval()
    prompts = [[3, 1, 4], [1, 5, 9, 2, 6], [5], [3, 5, 8, 9]]
    free = [greedy_reference(model, p, 12) for p in prompts]
    stop = (free[0][2], free[2][6])  # row 0 stops by step 3, row 2 by step 7 (earlier if repeated)
    kept = []
    keep_rows = KVCache.keep_rows
    monkeypatch.setattr(
        KVCache, "keep_rows", lambda self, rows: kept.append(len(rows)) or keep_rows(self, rows)
    )
    params = SamplingParams(top_k=1, max_new_tokens=12, stop_token_ids=stop)
    completions = NativeEngine(model).generate(prompts, params)
    for prompt, completion in zip(prompts, completions):
        expected = greedy_reference(model, prompt, 12, stop)
        assert completion.tokens == expected
        assert completion.finish_reason == ("stop" if expected[-1] in stop else "length")
    assert kept and kept == sorted(kept, reverse=True) and min(kept) < len(prompts)


# ---- sampling: top-k / top-p against their definition ----

# float32 cumulative sums vs this float64 reference: a token whose preceding mass is this close to
# top_p may land on either side, and is not compared
BOUNDARY = 1e-5


def filtered_support(logits: torch.Tensor, top_p: float, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keep, ambiguous)`` masks like ``logits [B, vocab]``, by brute force in float64.

    top-k keeps token v iff fewer than k tokens have a larger logit (tokens tied with the k-th all
    stay). top-p then keeps v iff the tokens more probable than v under the renormalized top-k
    distribution have mass < top_p: the most probable tokens until their mass reaches top_p, the
    token that crosses top_p included, and tokens tied with it too (the result cannot depend on the
    order of the vocabulary).
    """
    keep = torch.zeros(logits.shape, dtype=torch.bool)
    ambiguous = torch.zeros(logits.shape, dtype=torch.bool)
    for b, row in enumerate(logits.double().tolist()):
        support = [v for v in range(len(row)) if top_k <= 0 or sum(z > row[v] for z in row) < top_k]
        if top_p < 1.0:
            weights = {v: math.exp(row[v] - max(row)) for v in support}
            total = sum(weights.values())
            before = {v: sum(w for u, w in weights.items() if row[u] > row[v]) / total for v in support}
            ambiguous[b, [v for v in support if abs(before[v] - top_p) < BOUNDARY]] = True
            support = [v for v in support if before[v] < top_p]
        keep[b, support] = True
    return keep, ambiguous


def random_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    """Half the rows continuous, half on a coarse grid: many exact ties, also at the cut-offs."""
    g = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(rows, vocab, generator=g)
    logits[rows // 2 :] = (logits[rows // 2 :] * 2).round() / 2
    return logits


@pytest.mark.parametrize(("top_p", "top_k"), [(1.0, 7), (0.7, 0), (0.9, 0), (0.4, 0), (0.8, 12), (0.95, 3)])
def test_filter_logits_keeps_exactly_the_defined_support(top_p, top_k):
    logits = random_logits(200, 40, seed=int(top_p * 100) + top_k)
    out = filter_logits(logits, top_p, top_k)
    keep, ambiguous = filtered_support(logits, top_p, top_k)
    kept = out > float("-inf")
    assert torch.equal(kept | ambiguous, keep | ambiguous), (kept ^ keep).nonzero()[:5]
    assert torch.equal(out[kept], logits[kept])  # kept logits untouched: softmax renormalizes them
    assert ambiguous.sum() <= 2  # the comparison left (almost) nothing out
    # the inputs reach the cases that matter: a tie straddling the cut-off, several tokens kept
    smallest_kept = torch.where(keep, logits, float("inf")).amin(-1, keepdim=True)
    assert ((logits == smallest_kept).sum(-1) > 1).any()
    assert (keep.sum(-1) > 1).any()


def test_top_p_keeps_the_token_that_crosses_the_threshold():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5, 0.3 (cumulative 0.8), 0.15 (0.95), 0.05
    logits = probs.log()[None]
    for top_p, support in ((0.4, [1]), (0.7, [1, 3]), (0.85, [1, 2, 3]), (0.99, [0, 1, 2, 3])):
        kept = filter_logits(logits, top_p, 0)[0] > float("-inf")
        assert kept.nonzero().flatten().tolist() == support, top_p


def test_top_p_drops_a_token_whose_mass_before_is_exactly_top_p():
    """The nucleus is complete once its mass reaches top_p: a token after it is out (vLLM's rule,
    probs_sum <= 1 - p masked), also at exact equality (the sampler kept it)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    probs = torch.softmax(logits, dim=-1)
    top_p = float((probs.cumsum(-1) - probs)[0, 2])  # in the sampler's own fp32 arithmetic
    kept = filter_logits(logits, top_p, 0)[0] > float("-inf")
    assert kept.tolist() == [True, True, False, False]
    above = float(torch.nextafter(torch.tensor(top_p), torch.tensor(1.0)))  # the next fp32 value
    kept = filter_logits(logits, above, 0)[0] > float("-inf")
    assert kept.tolist() == [True, True, True, False]


def test_filtered_support_does_not_depend_on_the_vocabulary_order():
    logits = random_logits(100, 40, seed=11)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    for top_p, top_k in ((0.7, 0), (1.0, 5), (0.8, 12)):
        assert torch.equal(
            filter_logits(logits[:, perm], top_p, top_k), filter_logits(logits, top_p, top_k)[:, perm]
        )


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """P(X^2 >= observed) for multinomial ``counts`` against ``probs`` (categories expected < 5
    times pooled into one), via the regularized upper incomplete gamma function."""
    n = counts.sum()
    expected = probs.double() * n
    small = expected < 5
    observed = torch.cat([counts[~small].double(), counts[small].sum(0, keepdim=True).double()])
    expected = torch.cat([expected[~small], expected[small].sum(0, keepdim=True)])
    observed, expected = observed[expected > 0], expected[expected > 0]
    statistic = ((observed - expected) ** 2 / expected).sum()
    dof = torch.tensor(observed.numel() - 1, dtype=torch.float64)
    return float(torch.special.gammaincc(dof / 2, statistic / 2))


@pytest.mark.parametrize(("top_p", "top_k"), [(0.8, 0), (0.9, 12)])  # top-p alone; top-k, then top-p
def test_sampled_frequencies_match_the_filtered_distribution(top_p, top_k):
    """The engine's first tokens for 3 prompts x 2000 samples against the filtered, renormalized,
    tempered distribution of the teacher-forced logits: nothing outside the support, and a
    chi-square test whose false-alarm rate is 1e-6 (fixed seeds: the outcome is deterministic)."""
    model = tiny_model(seed=10).eval()
    prompts, samples, temperature = [[3], [35], [60]], 2000, 0.6  # one-token prompts: a cheap prefill
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=1)
    completions = NativeEngine(model, seed=5).generate([p for p in prompts for _ in range(samples)], params)
    first = torch.tensor([c.tokens[0] for c in completions]).view(len(prompts), samples)
    with torch.no_grad():
        logits = torch.stack([model(torch.tensor([p]))[0, -1] for p in prompts]).double() / temperature
    keep, ambiguous = filtered_support(logits, top_p, top_k)
    assert not ambiguous.any()
    probs = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)
    for row in range(len(prompts)):
        counts = torch.bincount(first[row], minlength=logits.shape[-1])
        assert not counts[~keep[row]].any(), "sampled outside the top-k / top-p support"
        assert 1 < int(keep[row].sum()) < logits.shape[-1]  # the filter is active, not trivial
        expected = probs[row] * samples  # a token expected >= 30 times never drawn: chance e^-30
        assert counts[expected >= 30].all(), "a token of the support is never sampled"
        assert chi_square_p_value(counts[keep[row]], probs[row, keep[row]]) > 1e-6


def test_top_k_top_p_rollouts_sample_in_the_support_and_report_the_tempered_logprob():
    """Every sampled token is in the top-k / top-p support of the teacher-forced distribution; the
    reported log-prob is the tempered one before filtering (``Completion.logprobs``), which the
    trainer computes."""
    model = tiny_model(seed=12).eval()
    prompts = [[4, 8, 15, 16, 23], [42], [7, 7, 7, 1]]  # uneven: left padding
    params = SamplingParams(temperature=0.8, top_p=0.85, top_k=9, max_new_tokens=12)  # past the window
    for prompt, completion in zip(prompts, NativeEngine(model, seed=6).generate(prompts, params)):
        sequence = torch.tensor([prompt + completion.tokens])
        with torch.no_grad():
            logits = model(sequence)[0, len(prompt) - 1 : -1].double() / params.temperature
        keep, ambiguous = filtered_support(logits, params.top_p, params.top_k)
        sampled = torch.tensor(completion.tokens)
        steps = torch.arange(len(sampled))
        assert (keep | ambiguous)[steps, sampled].all(), "a sampled token outside the support"
        expected = torch.log_softmax(logits, dim=-1)[steps, sampled]
        assert (torch.tensor(completion.logprobs).double() - expected).abs().max() < 1e-5  # fp32 decode


def test_fsdp_param_groups_reads_the_state_of_either_torch_release():
    """torch 2.14 keeps a list, ``_fsdp_param_groups``; 2.11 (the lent GPU machines) one
    ``_fsdp_param_group``, None for a module without parameters of its own."""
    from types import SimpleNamespace

    first, second = object(), object()
    assert fsdp_param_groups(SimpleNamespace(_fsdp_param_groups=[first, second])) == [first, second]
    assert fsdp_param_groups(SimpleNamespace(_fsdp_param_group=first)) == [first]
    assert fsdp_param_groups(SimpleNamespace(_fsdp_param_group=None)) == []


def test_static_decode_runs_compiled_blocks_uncompiled():
    """``parallelism.compile`` compiles the blocks for training; the static modes must not compile
    (or recompile for every new cache length) inside generate: on a GPU that would happen inside a
    CUDA-graph capture. The completions are the uncompiled model's. Planted: without the compile
    stance, generate compiles graphs here."""
    from titan_rl.parallel.parallelize import apply_compile

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    plain = tiny_model(seed=27).to(torch.bfloat16).eval()  # compile needs bf16 (the grouped GEMM)
    compiled = tiny_model(seed=27).to(torch.bfloat16).eval()
    apply_compile(compiled, backend=backend)
    g = torch.Generator().manual_seed(27)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (6, 3, 9)]
    params = SamplingParams(top_k=1, max_new_tokens=6)
    got = NativeEngine(compiled, decode="static").generate(prompts, params)
    assert graphs == []
    assert_same_completions(got, NativeEngine(plain, decode="static").generate(prompts, params))
    compiled(torch.tensor(prompts[:1]))  # outside generate the blocks are still compiled
    assert len(graphs) > 0


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_cpu_decode_steps_multiply_the_experts_by_transposed_copies(monkeypatch, decode):
    """Eager decode on the CPU in fp32 runs the experts' few rows per step through transposed weight
    copies (the faster CPU product; benchmarks/README.md), made for the call and dropped after it;
    static decode (the stand-in of the captured GPU step) and training forwards do not."""
    import titan_rl.model.moe as moe

    calls = []
    real = moe.small_grouped_mm
    monkeypatch.setattr(moe, "small_grouped_mm", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    model = tiny_model(seed=18).eval()
    NativeEngine(model, seed=3, decode=decode).generate([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=6))
    assert (2 * 2 in calls) == (decode == "eager")  # a decode step: 2 rows, top-2 each
    assert all(block.mlp.experts.decode_copies is None for block in model.layers)

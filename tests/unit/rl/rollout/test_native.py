"""The native engine: KV-cache decoding equals re-running the prefix; its log-probs equal the trainer's.

Its decode-only fast paths (one-query cache attention, the padded MoE, the LM-head matmul, dropping
finished rows) are each checked against the reference they replace, on random inputs.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import rel_err, tiny_args, tiny_model
from titan_rl.model import token_logprobs_and_entropy
from titan_rl.model.attention import sink_softmax_attention
from titan_rl.model.kv_cache import KVCache, decode_sink_attention
from titan_rl.model.moe import Experts, MoE
from titan_rl.rl.rollout import NativeEngine, SamplingParams
from titan_rl.rl.rollout.native import decode_linear


def sample_without_cache(model, prompts, params, seed):
    """Reference: one full forward over each prefix per new token, same sampling order."""
    generator = torch.Generator().manual_seed(seed)
    rows = [list(p) for p in prompts]
    tokens, logprobs = [[] for _ in prompts], [[] for _ in prompts]
    for _ in range(params.max_new_tokens):
        lasts = [model(torch.tensor([r]))[0, -1] for r in rows]
        logits = torch.stack(lasts).float() / params.temperature
        sampled = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)
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


def test_decode_linear_equals_matmul():
    g = torch.Generator().manual_seed(1)
    x, weight = torch.randn(5, 64, generator=g), torch.randn(300, 64, generator=g)
    assert rel_err(decode_linear(x, weight), x @ weight.T) <= 1e-5


@pytest.mark.parametrize("forced", [False, True], ids=["routed", "replayed"])
def test_padded_experts_equal_sorted_path(monkeypatch, forced):
    torch.manual_seed(0)
    moe = MoE(tiny_args(num_local_experts=8, num_experts_per_tok=3))
    moe.init_weights(std=0.5)  # large enough that the clamps at +-7 are hit
    x = torch.randn(6, moe.router.weight.shape[1]) * 2
    indices = torch.stack([torch.randperm(8)[:3] for _ in range(6)]) if forced else None
    calls = []
    padded = Experts.forward_padded
    monkeypatch.setattr(Experts, "forward_padded", lambda *a: calls.append(1) or padded(*a))
    with torch.no_grad():
        out, chosen = moe(x, indices, decoding=True)
        assert calls, "6 tokens x 3 of 8 experts should take the padded path"
        ref, ref_chosen = moe(x, indices)  # not decoding: the sorted grouped path
    assert len(calls) == 1 and torch.equal(chosen, ref_chosen)
    assert rel_err(out, ref) <= 1e-6


def test_padded_experts_only_when_decoding_without_autograd_and_most_experts_chosen(monkeypatch):
    """Any other forward (the trainer's no-grad old-log-prob pass included) is the training path,
    bitwise: on-policy ratios stay exactly 1."""
    torch.manual_seed(1)
    moe = MoE(tiny_args(num_local_experts=8, num_experts_per_tok=2))
    moe.init_weights(std=0.5)
    calls = []
    monkeypatch.setattr(Experts, "forward_padded", lambda *a: calls.append(1))
    moe(torch.randn(6, moe.router.weight.shape[1]), decoding=True)  # autograd on: training path
    with torch.no_grad():
        moe(torch.randn(1, moe.router.weight.shape[1]), decoding=True)  # 2 of 8 experts: sorted path
        moe(torch.randn(6, moe.router.weight.shape[1]) * 3)  # not decoding
    assert not calls


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

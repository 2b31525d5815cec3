"""The native engine: KV-cache decoding equals re-running the prefix; its log-probs equal the trainer's."""

from __future__ import annotations

import torch

from tests.conftest import tiny_model
from titan_rl.model import token_logprobs_and_entropy
from titan_rl.rl.rollout import NativeEngine, SamplingParams


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

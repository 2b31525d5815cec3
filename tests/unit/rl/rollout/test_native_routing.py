"""The native engine records the experts every MoE layer chose at every position it ran
(``record_routing``): exactly the routing the trainer's own forward of prompt + completion takes
(fp32), in the right positions, through continuous batching, both decode modes and early stops."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_model
from titan_rl.model import GptOss, GptOssModelArgs
from titan_rl.rl.rollout import NativeEngine, SamplingParams


def trainer_routing(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The trainer's routing of the sequence ``prompt + tokens``: ``[positions, layers, top_k]``."""
    _, routing = model(torch.tensor([prompt + tokens]), return_expert_indices=True)
    return routing[:, 0].transpose(0, 1)


def same_experts(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per position: did every layer choose the same set of experts?  ``[positions]`` bool."""
    return (a.long().sort(-1).values == b.long().sort(-1).values).all(-1).all(-1)


@pytest.mark.parametrize("decode", ["eager", "static"])
@pytest.mark.parametrize(("rows", "check_every"), [(2, 3), (None, 1), (3, 4)])
def test_recorded_routing_is_the_trainers_at_every_position_before_the_last_token(decode, rows, check_every):
    """Uneven prompts, stop tokens, refilled rows, steps decoded in vain after a stop, a last step
    sampled and never decoded: each completion's routing covers prompt + tokens[:-1] (the tokens the
    engine ran to sample the next ones) and equals the trainer's forward of that sequence there.
    Planted, each fails: the decode routing shifted by one step; the prompt's routing read from the
    wrong end of the padding; the last token's routing kept."""
    model = tiny_model(seed=31).eval()
    g = torch.Generator().manual_seed(31)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (9, 2, 5, 1, 12, 3, 7)]
    params = SamplingParams(top_k=1, max_new_tokens=11, stop_token_ids=(3, 40, 77))
    engine = NativeEngine(
        model, max_batch_rows=rows, check_every=check_every, decode=decode, record_routing=True
    )
    completions = engine.generate(prompts, params)
    assert {c.finish_reason for c in completions} == {"stop", "length"}
    layers, top_k = model.args.num_hidden_layers, model.args.num_experts_per_tok
    for prompt, c in zip(prompts, completions):
        assert c.routing.dtype == torch.int16
        assert c.routing.shape == (len(prompt) + len(c.tokens) - 1, layers, top_k)
        own = trainer_routing(model, prompt, c.tokens[:-1])
        assert same_experts(c.routing, own).all()


def test_recording_changes_no_completion_and_every_mode_records_the_same():
    model = tiny_model(seed=32).eval()
    g = torch.Generator().manual_seed(32)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (4, 1, 7, 3, 5)]
    params = SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=10, stop_token_ids=(3, 40))
    plain = NativeEngine(model, seed=9).generate(prompts, params)
    assert all(c.routing is None for c in plain)
    recorded = [
        NativeEngine(model, seed=9, record_routing=True, **kw).generate(prompts, params)
        for kw in ({}, {"max_batch_rows": 2, "check_every": 4}, {"decode": "static", "check_every": 3})
    ]
    for run in recorded:
        assert [c.tokens for c in run] == [c.tokens for c in plain]
        for c, first in zip(run, recorded[0]):
            assert same_experts(c.routing, first.routing).all()


def test_in_bf16_replaying_the_recorded_routing_removes_the_routing_flips():
    """bf16, where engine and trainer round router logits differently: the trainer's own routing
    differs from the engine's at some positions, and there its log-probs are far off the engine's;
    replaying the recorded routing (int16, as trajectories carry it) gives the engine's experts at
    every position and leaves only rounding. Planted: the replay ignored fails it."""
    torch.manual_seed(0)
    model = (
        GptOss(
            GptOssModelArgs.from_preset(
                "debug", num_local_experts=16, num_experts_per_tok=4, initializer_range=0.1
            )
        )
        .to(torch.bfloat16)
        .eval()
    )
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (8,), generator=g).tolist() for _ in range(16)]
    params = SamplingParams(temperature=1.0, max_new_tokens=24)
    completions = NativeEngine(model, seed=2, record_routing=True).generate(prompts, params)
    engine = torch.tensor([lp for c in completions for lp in c.logprobs])
    rows = torch.tensor([p + c.tokens[:-1] for p, c in zip(prompts, completions)])  # equal lengths
    recorded = torch.stack([c.routing for c in completions]).permute(2, 0, 1, 3)  # [layers, B, T, k]
    targets = torch.tensor([t for c in completions for t in c.tokens])
    width = rows.shape[1]
    index = torch.tensor([b * width + 7 + j for b in range(len(prompts)) for j in range(24)])

    def trainer(expert_indices):
        with torch.no_grad():
            logprobs, _, used = model(
                rows,
                targets=targets,
                target_index=index,
                expert_indices=expert_indices,
                return_expert_indices=True,
            )
        return logprobs.float(), used

    own, own_routing = trainer(None)
    replayed, replayed_routing = trainer(recorded)
    flipped = (own_routing.sort(-1).values != recorded.long().sort(-1).values).any(-1).any(0)  # [B, T]
    assert flipped.any(), "the test needs routing flips between engine and trainer"
    assert torch.equal(replayed_routing.sort(-1).values, recorded.long().sort(-1).values)
    own_diff, replayed_diff = (own - engine).abs(), (replayed - engine).abs()
    assert replayed_diff.max() * 3 < own_diff.max()
    assert replayed_diff.mean() < own_diff.mean()


def test_one_new_token_records_the_prompts_routing_only():
    """One token per prompt: no step is decoded (the token is never fed), so the routing is the
    prompt's own, as the trainer routes it."""
    model = tiny_model(seed=33).eval()
    prompts = [[5, 9, 13], [1, 2, 3, 4, 5, 6, 7]]
    completions = NativeEngine(model, record_routing=True).generate(prompts, SamplingParams(max_new_tokens=1))
    for prompt, c in zip(prompts, completions):
        assert len(c.tokens) == 1 and c.routing.shape[0] == len(prompt)
        assert same_experts(c.routing, trainer_routing(model, prompt, [])).all()

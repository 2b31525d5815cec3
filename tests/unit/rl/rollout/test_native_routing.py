"""The native engine records the experts every MoE layer chose at every position it ran
(``record_routing``): exactly the routing the trainer's own forward of prompt + completion takes
(fp32), in the right positions, through continuous batching, both decode modes and early stops."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_model
from titan_rl.model.moe import UNROUTED
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
def test_recorded_routing_is_the_trainers_at_every_fed_position(decode, rows, check_every):
    """Uneven prompts, stop tokens, refilled rows: each completion's routing covers prompt + tokens,
    equals the trainer's forward of that sequence wherever the engine fed the token, and is -1 only
    at a last token drawn at ``max_new_tokens`` and never fed. Planted, each fails: the decode
    routing shifted by one step; the prompt's routing read from the wrong end of the padding."""
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
    unfed = 0
    for prompt, c in zip(prompts, completions):
        assert c.routing.dtype == torch.int16
        assert c.routing.shape == (len(prompt) + len(c.tokens), layers, top_k)
        fed = c.routing[:, 0, 0] != UNROUTED
        assert fed[:-1].all()  # only the last token can have been drawn and not fed
        unfed += int(not fed[-1])
        if not fed[-1]:
            assert c.finish_reason == "length" and (c.routing[-1] == UNROUTED).all()
        assert same_experts(c.routing[fed], trainer_routing(model, prompt, c.tokens)[fed]).all()
    # the run ends with rows at max_new_tokens whose last token is never fed, and other rows whose
    # last token (a stop, or a length cut while others go on) was
    assert 0 < unfed < len(prompts)


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
            fed = (c.routing[:, 0, 0] != UNROUTED) & (first.routing[:, 0, 0] != UNROUTED)
            assert same_experts(c.routing[fed], first.routing[fed]).all()

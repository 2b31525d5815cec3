"""Activation checkpointing (one process): recomputes the chosen blocks, same gradients, same names."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import rel_err, tiny_model
from titan_rl.parallel import ParallelConfig, ParallelDims, parallelize_gpt_oss


def grads_and_calls(config: ParallelConfig) -> tuple[dict[str, torch.Tensor], list[int]]:
    model = tiny_model(seed=0)
    names = [name for name, _ in model.named_parameters()]
    parallelize_gpt_oss(model, ParallelDims(1, 1, 1, 1, world_size=1, device_type="cpu"), config)
    assert [name for name, _ in model.named_parameters()] == names
    calls = [0] * len(model.layers)
    for i, block in enumerate(model.layers):  # counts forwards of each block, recomputation included
        block.self_attn.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    tokens = torch.randint(0, model.args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    document_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    logits = model(tokens, document_ids=document_ids)
    logits.float().logsumexp(-1).mean().backward()
    return {name: p.grad for name, p in model.named_parameters()}, calls


@pytest.mark.parametrize(
    ("config", "expected_calls"),
    [
        (ParallelConfig(activation_checkpoint="full"), [2, 2, 2]),
        (ParallelConfig(activation_checkpoint="selective"), [2, 1, 2]),
        (ParallelConfig(activation_checkpoint="selective", selective_every=3), [2, 1, 1]),
    ],
)
def test_checkpointing_recomputes_and_matches(config: ParallelConfig, expected_calls: list[int]) -> None:
    reference, calls = grads_and_calls(ParallelConfig())
    assert calls == [1, 1, 1]
    grads, calls = grads_and_calls(config)
    assert calls == expected_calls
    for name, grad in grads.items():
        assert rel_err(grad, reference[name]) < 1e-6, name

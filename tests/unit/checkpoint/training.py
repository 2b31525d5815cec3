"""A tiny training loop shared by the resume tests (single process and FSDP2 worker)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from tests.conftest import tiny_model
from titan_rl.checkpoint.manager import CheckpointManager


def make_training(seed: int, shard: Callable | None = None):
    """Tiny model (optionally FSDP-sharded by ``shard``), AdamW and a decaying LR schedule."""
    model = tiny_model(seed)
    if shard is not None:
        shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def train(
    model, optimizer, scheduler, steps: Iterable[int], manager: CheckpointManager | None = None
) -> list[torch.Tensor]:
    """Next-token loss on batches drawn from the torch RNG (so resuming must restore it)."""
    losses = []
    vocab = model.args.vocab_size
    for step in steps:
        tokens = torch.randint(0, vocab, (2, 12))
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.detach().clone())
        if manager is not None and manager.should_save(step):
            manager.save(step, model, optimizer, scheduler, extra={"cursor": step * 10}, config={"seed": 0})
    return losses

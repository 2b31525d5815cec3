"""Work every rank must agree on, done once: tool calls and rewards in a multi-process run.

Every rank runs the same episodes: the engines give every rank all completions. Tools and reward
functions need not be deterministic, though: a tool call that times out on one rank and not on
another (a wall-clock limit), or a reward that samples, would make the ranks' episodes differ.
The ranks would then pack different batches and call the engine a different number of times, and
a collective would hang. So each item is computed on one rank, its owner, and the results are
all-gathered: every rank applies the same ones. An item's owner is given by the caller and stays
fixed for an episode (its number in the step, modulo the ranks), so a stateful tool (a session
kept in the episode's state) always runs where its state lives, and the work is spread over the
ranks instead of repeated on each.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")


def ranks() -> tuple[int, int]:
    """(world size, this rank): (1, 0) without an initialized ``torch.distributed``."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(), dist.get_rank()


def computed_once(owners: list[int], compute: Callable[[list[int]], list[T]]) -> list[T]:
    """The results of items ``0 .. len(owners) - 1``, in order, on every rank; item i is computed on
    rank ``owners[i] % world`` only: ``compute(positions)`` returns the results of those positions.

    Collective: every rank must call it, with the same ``owners``. If ``compute`` raises on some
    rank, every rank raises after the gather (that rank its own error, the others a RuntimeError
    naming it) instead of the others waiting in the gather for it until the collective timeout."""
    world, rank = ranks()
    if world == 1:
        return compute(list(range(len(owners))))
    mine = [i for i, owner in enumerate(owners) if owner % world == rank]
    error: Exception | None = None
    try:
        results = compute(mine)
    except Exception as e:
        error, results = e, []
    parts: list[tuple[str | None, list[tuple[int, T]]] | None] = [None] * world
    dist.all_gather_object(parts, (None if error is None else repr(error), list(zip(mine, results))))
    if error is not None:
        raise error
    failed = [(r, why) for r, (why, _) in enumerate(parts) if why is not None]
    if failed:
        r, why = failed[0]
        raise RuntimeError(f"rank {r} failed to compute its share of the shared results: {why}")
    gathered: dict[int, T] = {i: result for _, part in parts for i, result in part}
    return [gathered[i] for i in range(len(owners))]

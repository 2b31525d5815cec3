"""The native engine's decode-step state: the batch rows it updates in place, and one step
captured as a CUDA graph (``NativeEngine``'s ``static`` and ``cuda_graph`` modes read and write the
same ``DecodeRows`` buffers every step)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class DecodeRows:
    """The device-side state of the batch rows between decode steps, updated in place (in the
    static modes these are the buffers a captured step reads and writes).

    ``hidden [R, hidden]``: the final hidden state each row's next token is sampled from.
    ``positions [R, 1]``: the position that token takes; -1 parks a row (static modes: a finished row
    that stays in the batch; its writes land in the cache's never-read padding slot).
    ``keys [R]``: the noise keys of the rows' prompts. ``drawn [R]``: tokens drawn so far per row.
    """

    hidden: torch.Tensor
    positions: torch.Tensor
    keys: torch.Tensor
    drawn: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.hidden, self.positions, self.keys, self.drawn)

    def select(self, rows: torch.Tensor) -> DecodeRows:
        return DecodeRows(*(t.index_select(0, rows) for t in self.tensors()))

    def clone(self) -> DecodeRows:
        return DecodeRows(*(t.clone() for t in self.tensors()))

    def copy_(self, other: DecodeRows) -> None:
        for mine, theirs in zip(self.tensors(), other.tensors()):
            mine.copy_(theirs)

    def index_copy_(self, rows: torch.Tensor, other: DecodeRows) -> None:
        """Rows ``rows`` (int64) take ``other``'s rows, in order, in place."""
        for mine, theirs in zip(self.tensors(), other.tensors()):
            mine.index_copy_(0, rows, theirs)


class CudaGraphStep:
    """One decode step captured as a CUDA graph on the static ``rows``; calling it replays it.

    The step runs once for warm-up on a side stream (lazy initialization, library handles, allocator
    blocks), then is captured. Both run with every row parked at position -1, so their key/value
    writes land in the cache's padding slot, which attention never reads; ``rows`` is restored after.
    The outputs live in the graph's memory pool and are overwritten by the next replay: the caller
    gets copies. The graphs of one call share ``pool`` (one step's activations, logits and sampling
    temporaries, not one set per extent): they never run at once, each writes its temporaries before
    reading them, and nothing of theirs outlives a replay but the copied outputs (vLLM shares one
    pool across its batch-size graphs alike).
    """

    def __init__(
        self, step: Callable[[], tuple[torch.Tensor | None, ...]], rows: DecodeRows, pool: tuple
    ) -> None:
        saved = rows.clone()
        rows.positions.fill_(-1)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = step()
        rows.copy_(saved)

    def __call__(self) -> tuple[torch.Tensor | None, ...]:
        self.graph.replay()
        return tuple(None if t is None else t.clone() for t in self.out)

"""``decode="cuda_graph"``'s orchestration on CPU, under a stand-in for CUDA graphs with their
semantics: capture records the ops the step runs (it executes them too, which a real capture does
not; the engine restores the rows' state after capturing either way), and replay re-runs exactly
those ops on the same tensors, with no Python in between. What the replayed step needs must
therefore live in its buffers: a value the step took from Python (a step counter, a reach, a
tensor made per step) stays frozen at its capture-time value, as on a GPU, and the replayed
completions part from the ``static`` decode's.

On a GPU, ``test_native_cuda.py`` runs the real capture; this file tests what surrounds it on every
machine: warm-up and capture with parked rows, state restored, outputs copied out of the graph's
buffers, refills and parked rows written into the buffers between replays.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.conftest import tiny_model
from titan_rl.rl.rollout import NativeEngine, SamplingParams


class Tape(TorchDispatchMode):
    """Records every aten op with its argument and result tensors (the tensors themselves, not
    copies: a CUDA graph keeps addresses)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


class ReplayedGraph:
    """``torch.cuda.CUDAGraph`` on CPU: ``replay()`` re-runs the recorded ops. An op that writes its
    arguments (``add_``, ``index_put_``, ``copy_``) writes them again; a view still views the same
    storage; any other op's new result is copied into the tensor it returned at capture, which the
    later ops read."""

    def __init__(self) -> None:
        self.tape = Tape()
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        for func, args, kwargs, out in self.tape.ops:
            if func.is_view:
                continue
            result = func(*args, **kwargs)
            if func._schema.is_mutable:
                continue
            outs, results = (out, result) if isinstance(out, tuple | list) else ((out,), (result,))
            for recorded, new in zip(outs, results, strict=True):
                if isinstance(recorded, torch.Tensor) and recorded.data_ptr() != new.data_ptr():
                    recorded.copy_(new)


class NoStream:
    def wait_stream(self, other) -> None:
        pass


@contextlib.contextmanager
def capture(graph: ReplayedGraph, pool=None):
    assert pool == "the call's pool"  # every graph of a call shares one
    with graph.tape:
        yield


@pytest.fixture
def replayed_graphs(monkeypatch):
    """CUDA's graph and stream API replaced by the stand-ins; every graph made is listed."""
    graphs = []

    def new_graph():
        graphs.append(ReplayedGraph())
        return graphs[-1]

    monkeypatch.setattr(torch.cuda, "CUDAGraph", new_graph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "the call's pool")
    monkeypatch.setattr(torch.cuda, "Stream", NoStream)
    monkeypatch.setattr(torch.cuda, "current_stream", NoStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(NativeEngine, "_check_graphable", lambda self: None)  # the device check
    return graphs


PARAMS = {
    "greedy": SamplingParams(top_k=1, max_new_tokens=10, stop_token_ids=(5, 42, 59, 65)),
    "sampled": SamplingParams(
        temperature=0.9, top_p=0.9, top_k=30, max_new_tokens=10, stop_token_ids=(3, 40)
    ),
}


@pytest.mark.parametrize("kind", list(PARAMS))
def test_replayed_decode_returns_what_static_decode_returns(replayed_graphs, monkeypatch, kind):
    """7 prompts through 3 rows (refills into rows the graphs read, parked rows at the end), read
    every 4 steps, attention extents from 8 (so graphs are captured mid-call as rows grow): the
    same completions as ``static``, one capture per extent, every other step a replay. Planted:
    not restoring the rows after the capture (the warm-up's hidden states and token counts stay)
    fails both, and so does handing out the graph's output buffers instead of copies (the next
    replay overwrites them); a step counter taken from Python fails ``sampled``."""
    monkeypatch.setattr(NativeEngine, "min_extent", 8)
    model = tiny_model(seed=25).eval()
    g = torch.Generator().manual_seed(25)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (9, 2, 5, 1, 12, 3, 7)]
    params = PARAMS[kind]
    expected = NativeEngine(model, seed=6, max_batch_rows=3, check_every=4, decode="static").generate(
        prompts, params
    )
    engine = NativeEngine(model, seed=6, max_batch_rows=3, check_every=4, decode="cuda_graph")
    got = engine.generate(prompts, params)
    assert engine.captures == len(replayed_graphs) >= 2  # prompts up to 12 + 10 tokens: 8, 16, 22
    assert engine.capture_seconds > 0  # what bench_generate reports as the capture cost per call
    assert sum(graph.replays for graph in replayed_graphs) >= max(len(c.tokens) for c in expected) - 1
    assert {c.finish_reason for c in expected} == {"stop", "length"}
    for completion, reference in zip(got, expected, strict=True):
        assert completion.tokens == reference.tokens
        assert completion.finish_reason == reference.finish_reason
        assert completion.logprobs == pytest.approx(reference.logprobs, abs=1e-6)


def test_auto_decode_replays_graphs_where_it_can_and_decodes_eagerly_elsewhere(replayed_graphs):
    """``decode="auto"`` (the config's default): CUDA graphs where the graphability check passes
    (here the stand-in's), the same completions as ``eager``; where it fails (this CPU, without the
    stand-in's check), ``eager`` with no graph. Planted: auto never resolving to cuda_graph fails it."""
    model = tiny_model(seed=41).eval()
    prompts = [[1, 2, 3], [4], [5, 6, 7, 8]]
    params = PARAMS["greedy"]
    auto = NativeEngine(model, decode="auto")
    got = auto.generate(prompts, params)
    assert auto.mode == "cuda_graph" and auto.captures >= 1 and replayed_graphs
    expected = NativeEngine(model, decode="eager").generate(prompts, params)
    assert [c.tokens for c in got] == [c.tokens for c in expected]


def test_auto_decode_is_eager_where_no_graph_can_run():
    model = tiny_model(seed=41).eval()
    auto = NativeEngine(model, decode="auto")
    auto.generate([[1, 2, 3]], SamplingParams(top_k=1, max_new_tokens=4))
    assert auto.mode == "eager" and auto.captures == 0

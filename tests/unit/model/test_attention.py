"""Every attention backend equals the eager reference, in outputs and in gradients."""

from __future__ import annotations

import functools
import zlib

import pytest
import torch

from tests.conftest import rel_err, tiny_model
from titan_rl.model.attention import eager_sink_attention
from titan_rl.model.sink_kernels import DocumentLayout, chunked_sink_attention, flash_sink_attention

B, T, H, KV, D = 2, 29, 4, 2, 16


def random_documents(batch: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    """Document ids ``[B, T]`` with 1 to 4 documents of random lengths per row."""
    rows = []
    for _ in range(batch):
        cuts = torch.randperm(seq - 1, generator=generator)[: torch.randint(0, 4, (1,), generator=generator)]
        boundaries = torch.zeros(seq, dtype=torch.long)
        boundaries[cuts + 1] = 1
        rows.append(boundaries.cumsum(0))
    return torch.stack(rows)


def inputs(seed: int, sink_scale: float, sink_shift: float):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g)
    k = torch.randn(B, T, KV, D, generator=g)
    v = torch.randn(B, T, KV, D, generator=g)
    sinks = torch.randn(H, generator=g) * sink_scale + sink_shift
    return q, k, v, sinks, random_documents(B, T, g)


def run(fn, q, k, v, sinks, grad_out, **kwargs):
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    out = fn(*leaves, D**-0.5, **kwargs)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves]


CHUNKED = {
    "aten_cpu": lambda *a, **kw: chunked_sink_attention(*a, kernel="aten_cpu", **kw),
    "aten_cpu_chunk7": lambda *a, **kw: chunked_sink_attention(*a, kernel="aten_cpu", chunk_size=7, **kw),
    "math_chunk5": lambda *a, **kw: chunked_sink_attention(*a, kernel="math", chunk_size=5, **kw),
}


@pytest.mark.parametrize("backend", list(CHUNKED))
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize(
    "sink_scale,sink_shift",
    [(0.5, 0.0), (1.0, 8.0), (1.0, -8.0)],  # small sinks, sinks taking most mass, negligible sinks
    ids=["small", "large", "negative"],
)
def test_backend_matches_eager(backend, window, packed, sink_scale, sink_shift):
    seed = zlib.crc32(repr((backend, window, packed, sink_shift)).encode())
    q, k, v, sinks, docs = inputs(seed, sink_scale, sink_shift)
    docs = docs if packed else None
    grad_out = torch.randn(B, T, H, D)
    ref_out, ref_grads = run(eager_sink_attention, q, k, v, sinks, grad_out, window=window, document_ids=docs)
    out, grads = run(CHUNKED[backend], q, k, v, sinks, grad_out, window=window, document_ids=docs)
    assert rel_err(out, ref_out) <= 1e-5
    for name, got, want in zip(["q", "k", "v", "sinks"], grads, ref_grads):
        assert rel_err(got, want) <= 1e-5, name


def test_sinks_change_the_output():
    """Guard against a backend that silently ignores the sinks: large sinks shrink the output."""
    q, k, v, sinks, _ = inputs(0, 1.0, 0.0)
    with_sinks = chunked_sink_attention(q, k, v, sinks + 6.0, D**-0.5)
    without = chunked_sink_attention(q, k, v, torch.full_like(sinks, -1e4), D**-0.5)
    assert with_sinks.abs().mean() < 0.2 * without.abs().mean()


@pytest.mark.parametrize("backend", ["eager", "chunked"])
def test_packed_row_equals_documents_run_separately(backend):
    model = tiny_model(seed=3)
    model.set_attention_backend(backend)
    lengths = [7, 11, 4]  # first and second longer than the window (6)
    docs = [torch.randint(0, model.args.vocab_size, (1, n)) for n in lengths]
    packed = torch.cat(docs, dim=1)
    document_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    with torch.no_grad():
        packed_logits = model(packed, document_ids=document_ids)
        separate = torch.cat([model(d) for d in docs], dim=1)
    assert rel_err(packed_logits, separate) <= 1e-5


def test_flash_backend_refuses_cpu_with_clear_error():
    q, k, v, sinks, _ = inputs(0, 1.0, 0.0)
    with pytest.raises(RuntimeError, match="attn_backend"):
        flash_sink_attention(q, k, v, sinks, D**-0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("packed", [False, True])
def test_flash_matches_eager_on_cuda(window, packed):
    q, k, v, sinks, docs = inputs(1, 1.0, 1.0)
    docs = docs.cuda() if packed else None
    grad_out = torch.randn(B, T, H, D)
    cast = [t.cuda().bfloat16() for t in (q, k, v)]
    ref_out, ref_grads = run(eager_sink_attention, *[t.float() for t in cast], sinks.cuda(), grad_out.cuda(),
                             window=window, document_ids=docs)  # fmt: skip
    out, grads = run(flash_sink_attention, *cast, sinks.cuda(), grad_out.cuda().bfloat16(),
                     window=window, document_ids=docs)  # fmt: skip
    assert rel_err(out.float(), ref_out) <= 2e-2
    for got, want in zip(grads, ref_grads):
        assert rel_err(got.float(), want) <= 5e-2


@pytest.mark.parametrize("window", [None, 40])
def test_default_chunking_on_long_rows_matches_eager(window):
    """T=300 with the default chunk rule: window layers use 128-query chunks reading only their window."""
    g = torch.Generator().manual_seed(window or 0)
    seq = 300
    q, k, v = (torch.randn(1, seq, n, D, generator=g) for n in (H, KV, KV))
    sinks = torch.randn(H, generator=g)
    docs = (torch.arange(seq) >= 170).long()[None]  # two documents
    grad_out = torch.randn(1, seq, H, D, generator=g)
    ref_out, ref_grads = run(eager_sink_attention, q, k, v, sinks, grad_out, window=window, document_ids=docs)
    out, grads = run(chunked_sink_attention, q, k, v, sinks, grad_out, window=window, document_ids=docs)
    assert rel_err(out, ref_out) <= 1e-5
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) <= 1e-5


def test_document_layout_from_the_host():
    """cu_seqlens: one varlen sequence per document and row (a document id repeated in the next row
    is another sequence), max_len the longest; built on the host for any target device."""
    document_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [2, 2, 5, 5, 5, 5, 5, 7]])
    layout = DocumentLayout.of(2, 8, document_ids, "cpu")
    assert layout.cu_seqlens.tolist() == [0, 3, 5, 8, 10, 15, 16] and layout.max_len == 5
    assert layout.cu_seqlens.dtype == torch.int32
    plain = DocumentLayout.of(3, 8, None)
    assert plain.cu_seqlens.tolist() == [0, 8, 16, 24] and plain.max_len == 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_flash_with_a_host_layout_and_gqa_matches_eager_on_cuda():
    q, k, v, sinks, docs = inputs(2, 1.0, 1.0)
    grad_out = torch.randn(B, T, H, D)
    cast = [t.cuda().bfloat16() for t in (q, k, v)]
    layout = DocumentLayout.of(B, T, docs, "cuda")
    ref_out, ref_grads = run(eager_sink_attention, *[t.float() for t in cast], sinks.cuda(), grad_out.cuda(),
                             document_ids=docs.cuda())  # fmt: skip
    out, grads = run(functools.partial(flash_sink_attention, layout=layout), *cast, sinks.cuda(),
                     grad_out.cuda().bfloat16(), document_ids=docs.cuda())  # fmt: skip
    assert rel_err(out.float(), ref_out) <= 2e-2
    for got, want in zip(grads, ref_grads):
        assert rel_err(got.float(), want) <= 5e-2

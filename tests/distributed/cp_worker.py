"""torchrun worker: context parallelism (ulysses, ring) vs one process, on 2 CPU ranks (gloo).

Runs every case in one launch, prints ``case NAME ok`` per case and exits non-zero on a mismatch.
Inputs are seeded alike on every rank; the single-process reference runs on each rank.
"""

from __future__ import annotations

import copy
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from tests.conftest import rel_err, tiny_model
from titan_rl.model.attention import eager_sink_attention
from titan_rl.model.model import positions_from_document_ids
from titan_rl.parallel.context_parallel import (
    apply_context_parallel,
    cp_positions,
    gather_sequence,
    shard_sequence,
)
from titan_rl.parallel.ring_attention import ring_sink_attention

TOL = 1e-5
worst = {"err": 0.0}


def check(err: float, what: str) -> None:
    worst["err"] = max(worst["err"], err)
    if not err <= TOL:  # also catches NaN
        raise SystemExit(f"rank {dist.get_rank()}: {what}: rel err {err:.2e} > {TOL:.0e}")


def packed_document_ids(batch: int, seq: int) -> torch.Tensor:
    """Rows of 2-4 documents of random lengths (some shorter than a cp chunk)."""
    rows = []
    for _ in range(batch):
        cuts = torch.randperm(seq - 1)[: int(torch.randint(1, 4, ()))] + 1
        starts = torch.zeros(seq, dtype=torch.long)
        starts[cuts] = 1
        rows.append(starts.cumsum(0))
    return torch.stack(rows)


def cp_attention(mode: str, cp_mesh: DeviceMesh, heads: int, kv_heads: int):
    """The attention function apply_context_parallel installs, from a one-layer model."""
    model = tiny_model(num_hidden_layers=1, num_attention_heads=heads, num_key_value_heads=kv_heads)
    apply_context_parallel(model, cp_mesh, mode)
    return model.layers[0].self_attn.attention_fn


def attention_case(cp_mesh, mode, *, heads=4, kv_heads=2, seq=16, window=None, docs=False, sink_shift=0.0):
    torch.manual_seed(1)
    batch, dim = 2, 8
    q = torch.randn(batch, seq, heads, dim)
    k, v = torch.randn(2, batch, seq, kv_heads, dim)
    sinks = torch.randn(heads) * 1.5 + sink_shift
    document_ids = packed_document_ids(batch, seq) if docs else None
    grad_out = torch.randn(batch, seq, heads, dim)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    ref = eager_sink_attention(*leaves, dim**-0.5, window, document_ids)
    ref.backward(grad_out)

    def shard(x):
        return None if x is None else shard_sequence(x, cp_mesh, mode)

    local = [shard(t).requires_grad_() for t in (q, k, v)]
    local_sinks = sinks.clone().requires_grad_()
    out = cp_attention(mode, cp_mesh, heads, kv_heads)(
        *local, local_sinks, dim**-0.5, window, shard(document_ids)
    )
    (out * shard(grad_out)).sum().backward()
    dist.all_reduce(local_sinks.grad, group=cp_mesh.get_group())  # partial per rank, like any parameter
    check(rel_err(gather_sequence(out.detach(), cp_mesh, mode), ref), "output")
    for name, mine, theirs in zip("qkv", local, leaves):
        check(rel_err(gather_sequence(mine.grad, cp_mesh, mode), theirs.grad), f"d{name}")
    check(rel_err(local_sinks.grad, leaves[3].grad), "d sinks")


def masked_loss(logits, targets, loss_mask, count):
    logprobs = F.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None])[..., 0]
    return -(logprobs * loss_mask).sum() / count


def model_case(cp_mesh, mode, *, docs=True, sink_shift=0.0, kv_heads=2, gathered_loss=False):
    """Loss, logits and every gradient (summed over cp) vs one process. ``gathered_loss``: every rank
    computes the whole loss from ``gather_sequence(logits)`` instead of its share."""
    model = tiny_model(seed=2, num_key_value_heads=kv_heads)
    with torch.no_grad():
        for block in model.layers:
            block.self_attn.sinks.add_(sink_shift)
    cp_model = apply_context_parallel(copy.deepcopy(model), cp_mesh, mode)
    torch.manual_seed(3)
    batch, seq = 2, 16
    tokens = torch.randint(0, model.args.vocab_size, (batch, seq))
    targets = torch.randint(0, model.args.vocab_size, (batch, seq))
    loss_mask = (torch.rand(batch, seq) < 0.7).float()
    document_ids = packed_document_ids(batch, seq) if docs else None
    positions = None if document_ids is None else positions_from_document_ids(document_ids)
    count = loss_mask.sum()

    ref_logits = model(tokens, positions, document_ids)
    ref_loss = masked_loss(ref_logits, targets, loss_mask, count)
    ref_loss.backward()

    def shard(x):
        return None if x is None else shard_sequence(x, cp_mesh, mode)

    logits = cp_model(shard(tokens), cp_positions(tokens, cp_mesh, mode, document_ids), shard(document_ids))
    group = cp_mesh.get_group()
    if gathered_loss:
        loss = masked_loss(gather_sequence(logits, cp_mesh, mode), targets, loss_mask, count)
        total = loss.detach()
    else:
        loss = masked_loss(logits, shard(targets), shard(loss_mask), count)
        total = loss.detach().clone()
        dist.all_reduce(total, group=group)
    loss.backward()
    check(rel_err(total, ref_loss.detach()), "loss")
    check(rel_err(gather_sequence(logits.detach(), cp_mesh, mode), ref_logits.detach()), "logits")
    reference = dict(model.named_parameters())
    for name, param in cp_model.named_parameters():
        dist.all_reduce(param.grad, group=group)
        check(rel_err(param.grad, reference[name].grad), f"grad of {name}")


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_default_dtype(torch.float32)
    # cp as a sub-mesh of a larger mesh, as parallelize builds it (dp_shard x cp); argv[1]: dp_shard
    dp_shard = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    mesh_shape = (dp_shard, dist.get_world_size() // dp_shard)
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("dp_shard", "cp"))
    cp = mesh["cp"]
    cases = {}
    for mode in ("ulysses", "ring"):
        for window in (None, 6):
            for docs in (False, True):
                name = f"attention {mode} window={window} docs={docs}"
                cases[name] = lambda m=mode, w=window, d=docs: attention_case(cp, m, window=w, docs=d)
        cases[f"attention {mode} seq=24 window=5 docs"] = lambda m=mode: attention_case(
            cp, m, seq=24, window=5, docs=True
        )
        cases[f"attention {mode} sinks+8"] = lambda m=mode: attention_case(cp, m, docs=True, sink_shift=8.0)
        cases[f"attention {mode} kv_heads=1"] = lambda m=mode: attention_case(cp, m, kv_heads=1, docs=True)
        if mode == "ring" or 6 % cp.size() == 0:  # ulysses splits heads over cp
            cases[f"attention {mode} heads=6 kv_heads=3"] = lambda m=mode: attention_case(
                cp, m, heads=6, kv_heads=3, window=6, docs=True
            )
        cases[f"model {mode} docs"] = lambda m=mode: model_case(cp, m)
        cases[f"model {mode} no docs"] = lambda m=mode: model_case(cp, m, docs=False)
        cases[f"model {mode} sinks+8"] = lambda m=mode: model_case(cp, m, sink_shift=8.0)
        cases[f"model {mode} kv_heads=1"] = lambda m=mode: model_case(cp, m, kv_heads=1)
        cases[f"model {mode} gathered loss"] = lambda m=mode: model_case(cp, m, gathered_loss=True)
    cases["ring kernel=math"] = lambda: ring_math_case(cp)
    for name, case in cases.items():
        start = time.perf_counter()
        case()
        if dist.get_rank() == 0:
            print(f"case {name} ok ({time.perf_counter() - start:.2f}s)", flush=True)
    print(f"rank {dist.get_rank()}: all {len(cases)} cases ok, worst rel err {worst['err']:.1e}", flush=True)
    dist.destroy_process_group()


def ring_math_case(cp_mesh) -> None:
    """The ring with the plain-torch kernel (the one used off CPU) against the eager reference."""
    torch.manual_seed(4)
    q = torch.randn(1, 16, 4, 8, requires_grad=True)
    k, v = (torch.randn(1, 16, 2, 8, requires_grad=True) for _ in range(2))
    sinks = torch.randn(4, requires_grad=True)
    ref = eager_sink_attention(q, k, v, sinks, 0.3, 6)
    ref.sum().backward()
    local = [shard_sequence(t.detach(), cp_mesh, "ring").requires_grad_() for t in (q, k, v)]
    local_sinks = sinks.detach().clone().requires_grad_()
    out = ring_sink_attention(*local, local_sinks, 0.3, 6, None, group=cp_mesh.get_group(), kernel="math")
    out.sum().backward()
    dist.all_reduce(local_sinks.grad, group=cp_mesh.get_group())
    check(rel_err(gather_sequence(out.detach(), cp_mesh, "ring"), ref.detach()), "math output")
    for mine, theirs in zip(local, (q, k, v)):
        check(rel_err(gather_sequence(mine.grad, cp_mesh, "ring"), theirs.grad), "math grad")
    check(rel_err(local_sinks.grad, sinks.grad), "math d sinks")


if __name__ == "__main__":
    main()

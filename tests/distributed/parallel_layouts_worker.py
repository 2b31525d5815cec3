"""torchrun worker: parallel layouts vs the single-process run (gloo, CPU, fp32).

Usage: ``parallel_layouts_worker.py LAYOUT [LAYOUT ...]`` with LAYOUT like
``dp_replicate=2,dp_shard=2`` or ``dp_shard=4,ep=2,ac=full,reshard=0`` (missing degrees are 1;
``ac``: none|full|selective; ``reshard``: reshard_after_forward; ``cp_mode``: ulysses|ring).

Every rank first runs the reference: the unparallelized model on the whole global batch for three
AdamW steps (packed documents, sliding-window layers, sinks; step 3 replays a forced routing).
Then, per layout, the same model and batches are parallelized; each data-parallel rank takes its
rows (and with cp > 1 its sequence shard, via ``context_parallel``'s helpers) and normalizes its
loss by the global token count (parallelize_gpt_oss sums gradients over the data ranks). Loss
(summed over ranks), gradient norm, every parameter gradient (each step) and the state dict after
three clipped steps must match the reference to rel 1e-5; a no-grad forward between each backward
and optimizer step (as old log-probs or rollouts do) must give the same loss and leave no stale
gathered parameters behind. Prints ``memory <layout> N=<ranks> rank=<r> bytes=<local params + AdamW
state>`` lines; exits non-zero on any mismatch.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from tests.conftest import randomize_biases, rel_err, tiny_model
from tests.distributed.worker_checks import check, finish
from titan_rl.model import token_logprobs_and_entropy
from titan_rl.parallel import ParallelConfig, ParallelDims, clip_grad_norm_, parallelize_gpt_oss

ROWS, SEQ, STEPS, CLIP, TOL = 4, 16, 3, 50.0, 1e-5


def say(line: str) -> None:
    """One write per line, so the ranks' lines do not run into each other in the shared output."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def make_model():
    """The tiny test model with random (not zero) biases, so every parameter is O(0.1)."""
    return randomize_biases(tiny_model(seed=0), seed=7)


def make_batches(args) -> list[dict[str, torch.Tensor]]:
    """Global batches: tokens, next-token targets, loss mask, packed document ids; one forced routing."""
    gen = torch.Generator().manual_seed(1234)
    batches = []
    for step in range(STEPS):
        batch = {
            "tokens": torch.randint(0, args.vocab_size, (ROWS, SEQ), generator=gen),
            "targets": torch.randint(0, args.vocab_size, (ROWS, SEQ), generator=gen),
            "loss_mask": torch.rand(ROWS, SEQ, generator=gen) < 0.8,
            "document_ids": (torch.rand(ROWS, SEQ, generator=gen) < 0.2).cumsum(1),
        }
        if step == STEPS - 1:  # replay a routing the router would not choose (distinct experts per token)
            scores = torch.rand(args.num_hidden_layers, ROWS, SEQ, args.num_local_experts, generator=gen)
            batch["expert_indices"] = scores.argsort(-1)[..., : args.num_experts_per_tok]
        batches.append(batch)
    return batches


Shard = Callable[[torch.Tensor, int], torch.Tensor]  # (global tensor, sequence dim) -> this rank's part


def loss_of(
    model, batch: dict[str, torch.Tensor], shard: Shard, positions: torch.Tensor | None
) -> torch.Tensor:
    """The trainer's path: hidden states, chunked log-probs with lm_head, sum / global token count."""
    forced = batch.get("expert_indices")
    hidden = model(
        shard(batch["tokens"], 1),
        positions,
        shard(batch["document_ids"], 1),
        expert_indices=None if forced is None else shard(forced, 2),  # [layers, B, T, k]
        return_hidden=True,
    )
    logprobs, _ = token_logprobs_and_entropy(hidden, model.lm_head.weight, shard(batch["targets"], 1))
    return -(logprobs * shard(batch["loss_mask"], 1)).sum() / batch["loss_mask"].sum()


def input_sharding(parallel_dims: ParallelDims) -> tuple[Shard, Callable[[dict], torch.Tensor | None]]:
    """This rank's rows (dp) and, with cp > 1, its sequence shard; and its (global) positions."""
    dp_mesh = parallel_dims.get_mesh("dp")
    per_rank = ROWS // dp_mesh.size()
    rows = slice(dp_mesh.get_local_rank() * per_rank, (dp_mesh.get_local_rank() + 1) * per_rank)
    if not parallel_dims.cp_enabled:
        return (lambda x, dim: x[(slice(None),) * (dim - 1) + (rows,)]), (lambda batch: None)
    from titan_rl.parallel.context_parallel import cp_positions, shard_sequence

    cp_mesh, mode = parallel_dims.get_mesh("cp"), parallel_dims.cp_mode

    def shard(x: torch.Tensor, dim: int) -> torch.Tensor:
        return shard_sequence(x[(slice(None),) * (dim - 1) + (rows,)], cp_mesh, mode, dim)

    return shard, lambda batch: cp_positions(
        batch["tokens"][rows], cp_mesh, mode, batch["document_ids"][rows]
    )


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_bytes(optimizer) -> int:
    """Bytes this rank stores for parameters (the optimizer's: sharded) and optimizer state."""
    tensors = [p for group in optimizer.param_groups for p in group["params"]]
    tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    return sum(t.to_local().nbytes if isinstance(t, DTensor) else t.nbytes for t in tensors)


def train(model, batches, shard: Shard, positions, clip, loss_group=None):
    """Three clipped AdamW steps, each with a no-grad forward between backward and optimizer step.
    Per step: summed loss, gradient norm, full gradients before clipping; then the full parameters
    and the bytes of local parameters + optimizer state after one step."""
    # eps well above fp32 round-off of the gradients: Adam divides by sqrt(v) + eps, which would
    # blow the round-off of near-zero gradient entries up to ~lr (sign flips) with the default 1e-8
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, eps=1e-4, weight_decay=0.1)
    history, memory = [], 0
    for step, batch in enumerate(batches):
        loss = loss_of(model, batch, shard, positions(batch))
        loss.backward()
        total = loss.detach().clone()
        if loss_group is not None:
            dist.all_reduce(total, group=loss_group)
        grads = {name: full(p.grad) for name, p in model.named_parameters()}
        norm = clip(model.parameters(), CLIP)
        history.append((total, norm, grads))
        with torch.no_grad():  # a no-grad pass (old log-probs, rollouts) between backward and step
            again = loss_of(model, batch, shard, positions(batch))
        check(torch.equal(again, loss.detach()), f"step {step}: no-grad forward {again} != {loss}")
        optimizer.step()
        optimizer.zero_grad()
        if step == 0:
            memory = local_bytes(optimizer)
    # after the no-grad pass and the step: the state dict (what checkpoints save) is current
    return history, {name: full(t) for name, t in model.state_dict().items()}, memory


def parse(layout: str) -> tuple[ParallelDims, ParallelConfig]:
    spec = dict(item.split("=") for item in layout.split(","))
    degrees = {key: int(spec.pop(key, 1)) for key in ("dp_replicate", "dp_shard", "cp", "ep")}
    config = ParallelConfig(
        activation_checkpoint=spec.pop("ac", "none"),
        reshard_after_forward=bool(int(spec.pop("reshard", 1))),
    )
    cp_mode = spec.pop("cp_mode", "ulysses")
    if spec:
        raise SystemExit(f"unknown layout keys {sorted(spec)} in {layout!r}")
    return ParallelDims(**degrees, world_size=dist.get_world_size(), cp_mode=cp_mode), config


def run_layout(layout: str, batches, reference) -> None:
    start = time.perf_counter()
    parallel_dims, config = parse(layout)
    parallel_dims.build_mesh()
    model = parallelize_gpt_oss(make_model(), parallel_dims, config)
    dp_cp = parallel_dims.get_mesh("dp_cp").get_group()
    history, params, memory = train(model, batches, *input_sharding(parallel_dims), clip_grad_norm_, dp_cp)
    ref_history, ref_params, _ = reference
    worst = 0.0
    for step, ((loss, norm, grads), (ref_loss, ref_norm, ref_grads)) in enumerate(zip(history, ref_history)):
        err = rel_err(loss, ref_loss)
        check(err < TOL, f"{layout} step {step}: loss {loss.item()} vs {ref_loss.item()} (rel {err:.2e})")
        err = rel_err(norm, ref_norm)
        check(
            err < TOL, f"{layout} step {step}: grad norm {norm.item()} vs {ref_norm.item()} (rel {err:.2e})"
        )
        for name, grad in grads.items():
            err = rel_err(grad, ref_grads[name])
            worst = max(worst, err)
            check(err < TOL, f"{layout} step {step}: grad of {name} rel err {err:.2e}")
    for name, param in params.items():
        err = rel_err(param, ref_params[name])
        worst = max(worst, err)
        check(err < TOL, f"{layout}: {name} after {STEPS} steps rel err {err:.2e}")
    say(f"memory {layout} N={dist.get_world_size()} rank={dist.get_rank()} bytes={memory}")
    if dist.get_rank() == 0:
        say(f"layout {layout}: worst rel err {worst:.2e}, {time.perf_counter() - start:.1f}s")


def main(layouts: list[str]) -> None:
    # full_tensor() of (efsdp, ep)-sharded expert grads warns that it takes two all_gathers: fine here
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    dist.init_process_group("gloo")
    torch.set_default_dtype(torch.float32)
    batches = make_batches(tiny_model(seed=0).args)
    whole = (lambda x, dim: x), (lambda batch: None)
    reference = train(make_model(), batches, *whole, torch.nn.utils.clip_grad_norm_)
    if dist.get_rank() == 0:
        say(f"memory reference N=1 rank=0 bytes={reference[2]}")
    for layout in layouts:
        run_layout(layout, batches, reference)
    finish(40)


if __name__ == "__main__":
    main(sys.argv[1:])

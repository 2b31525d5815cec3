"""FSDP2 (``fully_shard``) per transformer block and on the root; HSDP when dp_replicate > 1.

Non-expert parameters are sharded over dp_shard_cp; expert parameters (already DTensors over the ep
mesh when expert parallelism is on) over efsdp, each expert module its own FSDP unit. With
dp_replicate > 1 both meshes get a leading dp_replicate dimension (HSDP: shard within a replica,
all-reduce across replicas).

Gradients are *summed* over all data ranks (dp_replicate x dp_shard x cp), not averaged as FSDP
does by default: each rank's loss must be its share of the global loss, i.e. normalized by the
*global* token count, so that the sum of the ranks' losses is the single-process loss and the summed
gradients are its gradients. Expert parameters are reduced over fewer ranks (efsdp) than the rest,
but the tokens of all ep ranks already reached them through the all_to_all, so a plain sum is right
for both. (A custom divide factor for averaging is also avoided because torch 2.14 applies it twice
when the shard group has one rank and sum-only communication is forced, as gloo needs.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from titan_rl.model.model import GptOss
from titan_rl.parallel.expert_parallel import ExpertParallelExperts
from titan_rl.parallel.parallel_dims import ParallelDims


def mixed_precision_policy(name: str, device_type: str) -> MixedPrecisionPolicy:
    """``auto``: bf16 params with fp32 reduction on CUDA, plain fp32 on CPU; or ``bf16`` / ``fp32``."""
    if name == "auto":
        name = "bf16" if device_type == "cuda" else "fp32"
    if name == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if name == "fp32":
        return MixedPrecisionPolicy()
    raise ValueError(f"parallelism mixed_precision = {name!r} is not one of auto, bf16, fp32")


def apply_fsdp(
    model: GptOss,
    parallel_dims: ParallelDims,
    mp_policy: MixedPrecisionPolicy,
    reshard_after_forward: bool = True,
) -> None:
    """Shard ``model`` in place: expert modules, then each block, then the root; gradients summed."""
    mesh = parallel_dims.fsdp_mesh
    if model.args.activation_dtype == "float32":  # the residual stream enters each block unrounded
        mp_policy = dataclasses.replace(mp_policy, cast_forward_inputs=False)
    for block in model.layers:
        experts = block.mlp.experts
        if isinstance(experts, ExpertParallelExperts):
            fully_shard(
                experts,
                mesh=parallel_dims.expert_fsdp_mesh,
                mp_policy=mp_policy,
                reshard_after_forward=reshard_after_forward,
            )
        fully_shard(block, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    # The root's parameters (embedding, final norm, lm_head) stay gathered from forward to backward:
    # backward needs them at once, and the native engine reads ``model.lm_head.weight`` after a forward.
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=False)

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no AVG / PREMUL_SUM)
    _reshard_before_forward_after_no_grad(model)


def reshard(model: nn.Module) -> None:
    """Return every FSDP module of ``model`` to its sharded state (frees gathered parameters)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _reshard_before_forward_after_no_grad(model: GptOss) -> None:
    """Drop gathered parameters left by a no-grad forward when the next forward starts.

    Only backward reshards a module with ``reshard_after_forward=False`` (the root, or every block
    when so configured), so after a no-grad forward (old log-probs, rollouts) it keeps gathered
    copies; an optimizer step then makes them stale and FSDP would reuse them in the next forward.
    Resharding at the end of the no-grad forward instead would break reading
    ``model.lm_head.weight`` right after it, as the native engine's LM head does.
    Until the next forward, ``model.parameters()`` are those gathered copies (without gradients):
    after a no-grad forward that follows backward, call ``reshard(model)`` before clipping or
    reading parameters (``state_dict()`` and the optimizer always see the sharded, current ones).
    """
    gathered_without_grad = False

    def before_forward(module: nn.Module, args: Any) -> None:
        nonlocal gathered_without_grad
        if gathered_without_grad:
            reshard(model)
            gathered_without_grad = False

    def after_forward(module: nn.Module, args: Any, output: Any) -> None:
        nonlocal gathered_without_grad
        gathered_without_grad = not torch.is_grad_enabled()

    model.register_forward_pre_hook(before_forward, prepend=True)  # before FSDP's own pre-forward
    model.register_forward_hook(after_forward)


def fsdp_param_groups(state) -> list:
    """The parameter groups of an FSDP module's state: the list ``_fsdp_param_groups`` of newer torch
    (2.14), or the one ``_fsdp_param_group`` (None without parameters) of older releases such as
    2.11, the lent GPU machines' torch."""
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is not None:
        return list(groups)
    group = getattr(state, "_fsdp_param_group", None)
    return [] if group is None else [group]


@contextmanager
def gathered_weights(model: nn.Module) -> Iterator[None]:
    """Every FSDP module's full weights gathered once, kept for the duration, then resharded; in
    between the model runs as a plain module (the native rollout engine's ``generate``).

    Decode forwards then run no collectives, so ranks can run different numbers of steps. Every
    rank must enter (the gathers are collective), also one without prompts. The forward hooks of
    FSDP (per module: unshard, reshard, input casts, the root's stream bookkeeping) and of
    this module (``_reshard_before_forward_after_no_grad``) are paused
    meanwhile: with the weights gathered and held they have nothing to do, yet they cost Python
    time at every decode step (one-rank bf16 FSDP on CPU, 5 FSDP modules: 15.8 ms a step against
    10.7 ms for the same bf16 model unwrapped) and would keep a step from being captured as a CUDA
    graph. Nothing casts the forward's inputs to FSDP's compute dtype then; the engine's inputs are
    token ids and positions, and every activation starts from the gathered embedding, already in it.
    """
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not modules:
        yield
        return
    # FSDP has no public getter; its setter is public (the root is False, blocks as configured)
    saved = [all(g._reshard_after_forward for g in fsdp_param_groups(m._get_fsdp_state())) for m in modules]
    hook_dicts = [d for m in modules for d in (m._forward_pre_hooks, m._forward_hooks)]
    originals = [dict(d) for d in hook_dicts]
    states = {id(m._get_fsdp_state()) for m in modules}  # FSDP's hooks are its states' methods
    for hooks in hook_dicts:
        for key, fn in list(hooks.items()):
            if id(getattr(fn, "__self__", None)) in states or getattr(fn, "__module__", None) == __name__:
                del hooks[key]
    try:
        for module in modules:
            module.set_reshard_after_forward(False, recurse=False)
            module.unshard()
        yield
    finally:
        for hooks, original in zip(hook_dicts, originals):
            hooks.clear()
            hooks.update(original)  # in their original order (FSDP's and ours are prepended)
        for module, reshard_after_forward in zip(modules, saved):
            module.set_reshard_after_forward(reshard_after_forward, recurse=False)
            module.reshard()


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for gradients sharded over different meshes.

    With expert parallelism expert gradients live on the (efsdp, ep) mesh and the others on
    dp_shard_cp, and DTensor will not stack norms across meshes: take the 2-norm per mesh, combine
    them as plain tensors, then scale every gradient. Returns the total norm (a plain tensor, equal
    on all ranks). ``max_norm = inf`` only measures.
    """
    by_mesh: dict[object, list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            by_mesh.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p.grad)
    norms = []
    for grads in by_mesh.values():
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if not norms:
        return torch.tensor(0.0)
    total = torch.linalg.vector_norm(torch.stack(norms), 2.0)
    if max_norm != float("inf"):
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for grads in by_mesh.values():
            torch._foreach_mul_(grads, coef.to(grads[0].device))
    return total

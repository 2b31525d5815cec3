"""``parallelize_gpt_oss``: EP, CP, activation checkpointing, compile and FSDP2 on an unmodified model.

Usage (every rank)::

    parallel_dims = ParallelDims(dp_replicate=1, dp_shard=4, cp=1, ep=2, world_size=4)
    parallel_dims.build_mesh()
    model = parallelize_gpt_oss(GptOss(args), parallel_dims, ParallelConfig(activation_checkpoint="full"))

Gradients are summed over the data ranks: normalize each rank's loss by the global token count
(see ``fsdp.py``). The order matters: expert parallelism swaps the expert modules, context
parallelism re-places the attention computation, checkpointing and compile wrap whole blocks, and
FSDP comes last so that it shards the parameters as the other steps left them. None of them
changes the model's math.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from titan_rl.model.model import GptOss
from titan_rl.parallel.activation_checkpoint import AC_MODES, apply_activation_checkpointing
from titan_rl.parallel.expert_parallel import apply_expert_parallel
from titan_rl.parallel.fsdp import apply_fsdp, mixed_precision_policy
from titan_rl.parallel.parallel_dims import ParallelDims


@dataclass
class ParallelConfig:
    """How the model is parallelized beyond the mesh degrees (which live in ``ParallelDims``)."""

    activation_checkpoint: str = "none"
    """``none``, ``full`` (every block) or ``selective`` (every ``selective_every``-th block)."""
    selective_every: int = 2
    """With ``selective``: checkpoint blocks 0, n, 2n, ... for n = this."""
    compile: bool = False
    """``torch.compile`` each block in place (parameter names unchanged); meant for CUDA + bf16
    (on CPU in fp32, tracing ``torch._grouped_mm`` fails)."""
    compile_backend: str = "inductor"
    """Backend for ``torch.compile``."""
    reshard_after_forward: bool = True
    """FSDP frees gathered parameters after each block's forward (re-gathers them in backward)."""
    mixed_precision: str = "auto"
    """``auto`` (bf16 compute + fp32 gradient reduction on CUDA, fp32 on CPU), ``bf16`` or ``fp32``;
    bf16 keeps the parameters, gradients and optimizer state in their own dtype (fp32 masters)."""

    def __post_init__(self) -> None:
        if self.activation_checkpoint not in AC_MODES:
            raise ValueError(
                f"activation_checkpoint = {self.activation_checkpoint!r} is not one of {', '.join(AC_MODES)}"
            )
        if self.selective_every < 1:
            raise ValueError(f"selective_every = {self.selective_every} must be >= 1")
        if self.mixed_precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"mixed_precision = {self.mixed_precision!r} is not one of auto, bf16, fp32")


def apply_compile(model: GptOss, backend: str = "inductor") -> None:
    """Compile each block in place (blocks repeat, so one compiled graph serves them all)."""
    for block in model.layers:
        block.compile(backend=backend)


def parallelize_gpt_oss(
    model: GptOss, parallel_dims: ParallelDims, config: ParallelConfig | None = None
) -> GptOss:
    """Apply EP, CP, activation checkpointing, compile and FSDP2 in place; returns ``model``.

    Builds the mesh if ``parallel_dims.build_mesh()`` has not run (a collective: call this on every
    rank). With one process, FSDP2 runs on a one-rank mesh only for bf16 mixed precision (fp32
    master weights, gradients and optimizer state; bf16 compute), exactly as it does on N ranks.
    """
    config = config or ParallelConfig()
    parallel_dims.validate_model(model.args)
    mp_policy = mixed_precision_policy(config.mixed_precision, parallel_dims.device_type)
    # one mechanism for every layout: mixed precision is FSDP2's policy, on a one-rank mesh too
    use_fsdp = parallel_dims.distributed or mp_policy.param_dtype is not None
    if use_fsdp:
        parallel_dims.build_mesh()
    if parallel_dims.ep_enabled:
        apply_expert_parallel(model, parallel_dims.get_mesh("ep"))
    if parallel_dims.cp_enabled:
        from titan_rl.parallel.context_parallel import apply_context_parallel

        apply_context_parallel(model, parallel_dims.get_mesh("cp"), parallel_dims.cp_mode)
    if config.activation_checkpoint != "none":
        apply_activation_checkpointing(model, config.activation_checkpoint, config.selective_every)
    if config.compile:
        if (mp_policy.param_dtype or next(model.parameters()).dtype) == torch.float32:
            raise ValueError(
                "parallelism.compile = true needs bf16 compute (the grouped expert GEMM traces only in "
                "bf16): set parallelism.mixed_precision = 'bf16' (the default on CUDA) or "
                "model.dtype = 'bfloat16'"
            )
        apply_compile(model, config.compile_backend)
    if use_fsdp:
        apply_fsdp(model, parallel_dims, mp_policy, reshard_after_forward=config.reshard_after_forward)
    return model


GEMM_REDUCTIONS = ("full", "reduced")
SPLIT_K_FLAGS = ("allow_bf16_reduced_precision_reduction", "allow_fp16_reduced_precision_reduction")
"""The process-wide flags of ``torch.backends.cuda.matmul`` that ``set_gemm_reductions`` sets."""


def set_gemm_reductions(mode: str) -> None:
    """How cuBLAS sums the partial results of a bf16 / fp16 GEMM it splits along K (split-K), for
    the whole process: ``full`` in fp32, ``reduced`` in bf16 / fp16 where cuBLAS finds that faster
    (PyTorch's default: ``torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction``).

    It reaches cuBLAS matmuls (the linears, the router, the LM head), not ``torch._grouped_mm``'s
    expert kernels. Which GEMMs cuBLAS splits is its heuristic; few output tiles and a long K make
    it likely: a decode step's few-row GEMMs, the router's, weight gradients. Reduced sums could
    round the rollout engine's activations where the trainer's, from other GEMM shapes, are not.
    vLLM runs in the trainer's process, so its torch GEMMs follow the setting too. No effect on CPU.
    """
    if mode not in GEMM_REDUCTIONS:
        raise ValueError(f"gemm_reductions = {mode!r}: use one of {', '.join(GEMM_REDUCTIONS)}")
    for flag in SPLIT_K_FLAGS:
        setattr(torch.backends.cuda.matmul, flag, mode == "reduced")


def precision_summary(model: GptOss, config: ParallelConfig, device_type: str) -> str:
    """One line for the startup message: what the weights are stored in and what computes in."""
    weights = next(model.parameters()).dtype
    policy = mixed_precision_policy(config.mixed_precision, device_type)
    compute = policy.param_dtype or weights
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    activations = (
        ", fp32 activations" if model.args.activation_dtype == "float32" and compute != torch.float32 else ""
    )
    if compute == weights:
        return f"{name[weights]} weights and compute{activations}"
    return f"{name[compute]} compute{activations}, {name[weights]} master weights, gradients and AdamW state"

"""Shared test helpers: tiny random GPT-OSS models, a matmul counter."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from titan_rl.model import GptOss, GptOssModelArgs


def tiny_args(**overrides) -> GptOssModelArgs:
    """A random-test config: GQA ratio 2, window 6, 4 experts top-2, 3 layers (sliding, full, sliding)."""
    base = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=6,
        initializer_range=0.2,
        rope_original_max_position_embeddings=32,
        rope_factor=4.0,
    )
    base.update(overrides)
    if "num_hidden_layers" in overrides and "layer_types" not in overrides:
        base["layer_types"] = []
    return GptOssModelArgs(**base)


def tiny_model(seed: int = 0, **overrides) -> GptOss:
    torch.manual_seed(seed)
    model = GptOss(tiny_args(**overrides))
    with torch.no_grad():  # sinks of both signs and sizes, so the sink column matters
        for block in model.layers:
            block.self_attn.sinks.normal_(0.0, 1.5)
    return model


def randomize_biases(model: GptOss, seed: int) -> GptOss:
    """Every bias random (std 0.2) instead of init's zeros, so every parameter is O(0.1) and none
    drops out of a comparison; returns ``model``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


@torch.no_grad()
def trainer_logprob_gaps(model: GptOss, prompts: list[list[int]], completions) -> torch.Tensor:
    """|engine log-prob - trainer log-prob| of every generated token (on the CPU): the trainer's
    are the model's teacher-forced log-probs (``targets``) of prompt + completion, one row each."""
    device = model.lm_head.weight.device
    gaps = []
    for prompt, completion in zip(prompts, completions, strict=True):
        sequence = torch.tensor([prompt + completion.tokens], device=device)
        positions = torch.arange(len(prompt) - 1, sequence.shape[1] - 1, device=device)
        trainer, _ = model(sequence, targets=sequence[0, len(prompt) :], target_index=positions)
        gaps.append((trainer.cpu() - torch.tensor(completion.logprobs)).abs())
    return torch.cat(gaps)


def bf16(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to bf16, back in fp32 (what a bf16 GEMM operand holds)."""
    return x.to(torch.bfloat16).float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def _fp32_default():
    torch.set_default_dtype(torch.float32)
    yield


@pytest.fixture(autouse=True)
def _split_k_sums_restored():
    """Every ``Trainer`` sets the process-wide split-K flags (``parallelism.gemm_reductions``): each
    test starts from and leaves PyTorch's own setting, so no GPU test depends on the order."""
    from titan_rl.parallel.parallelize import SPLIT_K_FLAGS

    matmul = torch.backends.cuda.matmul
    saved = [getattr(matmul, flag) for flag in SPLIT_K_FLAGS]
    yield
    for flag, value in zip(SPLIT_K_FLAGS, saved):
        setattr(matmul, flag, value)


def read_hf_folder(folder) -> dict[str, torch.Tensor]:
    """Every tensor a HF folder stores, by its stored name."""
    from safetensors import safe_open

    from titan_rl.checkpoint.hf import shard_names

    tensors = {}
    for file, names in shard_names(folder).items():
        with safe_open(folder / file, framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in names})
    return tensors


aten = torch.ops.aten


@pytest.fixture
def single_process_group():
    """Mixed precision on one process builds a one-rank process group; leave none behind."""
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class HostSyncs(TorchDispatchMode):
    """Records the ops that make the host wait for the device on CUDA: reading a value (``.item()``,
    ``int()``, ``bool()`` -> ``_local_scalar_dense``) and data-dependent shapes (``nonzero`` behind
    boolean-mask indexing, ``masked_select``, ``unique``, ``bincount``).

    ``host_data=True`` also records tensors made from Python data (``torch.tensor([...])`` ->
    ``lift_fresh``): on CUDA a copy from pageable host memory, which a CUDA graph cannot capture."""

    SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "bincount", "repeat_interleave")

    def __init__(self, host_data: bool = False) -> None:
        super().__init__()
        self.host_data = host_data
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        if any(name.startswith(s) or f"_{s}" in name for s in self.SYNCING):
            self.calls.append(name)
        if self.host_data and name.startswith("lift_fresh"):
            self.calls.append(f"{name} (a tensor from host data)")
        indices = args[1] if name.startswith("index") and len(args) > 1 else None
        if isinstance(indices, list | tuple) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices
        ):
            self.calls.append(f"{name} with a boolean mask")  # nonzero inside the op
        return func(*args, **(kwargs or {}))


class MatmulCounter(TorchDispatchMode):
    """Multiply-adds of every matmul the ops under it run (forward or backward), and the row blocks
    of each grouped matmul. Counting aten ops, not our functions, keeps it true to what runs
    whichever way the MoE is written; an unknown matmul-like op is an error, not a silent zero."""

    PLAIN = (aten.mm, aten.bmm)
    WITH_BIAS = (aten.addmm, aten.baddbmm)

    def __init__(self) -> None:
        super().__init__()
        self.macs = 0
        self.group_rows: list[list[int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in self.PLAIN or packet in self.WITH_BIAS or packet is aten._grouped_mm:
            a, b = args[1:3] if packet in self.WITH_BIAS else args[:2]
            # [M, K] @ [K, N], [B, M, K] @ [B, K, N], grouped [M, K] @ [E, K, N] or [K, M] @ [M, N]
            self.macs += a.numel() * b.shape[-1]
            if packet is aten._grouped_mm:
                ends = kwargs.get("offs", args[2] if len(args) > 2 else None).tolist()
                self.group_rows.append([end - start for start, end in zip([0, *ends], ends)])
        elif "mm" in packet.__name__ or packet in (aten.dot, aten.mv, aten.linear, aten.matmul):
            raise AssertionError(f"MatmulCounter does not know {func}: teach it this op's cost")
        return func(*args, **kwargs)


def moe_macs(moe, tokens: int, expert_rows: int) -> int:
    """Router over every token, plus gate_up [H, 2I] and down [I, H] for ``expert_rows`` rows."""
    experts, hidden = moe.num_experts, moe.router.weight.shape[1]
    intermediate = moe.experts.down_proj.shape[1]
    return tokens * hidden * experts + expert_rows * 3 * hidden * intermediate

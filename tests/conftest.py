"""Shared test helpers: tiny random GPT-OSS models."""

from __future__ import annotations

import pytest
import torch

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


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def _fp32_default():
    torch.set_default_dtype(torch.float32)
    yield


def read_hf_folder(folder) -> dict[str, torch.Tensor]:
    """Every tensor a HF folder stores, by its stored name."""
    from safetensors import safe_open

    from titan_rl.checkpoint.hf import shard_names

    tensors = {}
    for file, names in shard_names(folder).items():
        with safe_open(folder / file, framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in names})
    return tensors

"""Presets and HF config reading follow GPT_OSS.md and transformers' GptOssConfig."""

from __future__ import annotations

import math

import pytest
import torch

from titan_rl.model.args import FULL, SLIDING, GptOssModelArgs
from titan_rl.model.rope import rope_inv_freq

# The fields of openai/gpt-oss-20b's config.json that matter to the model.
GPT_OSS_20B_CONFIG = {
    "architectures": ["GptOssForCausalLM"],
    "model_type": "gpt_oss",
    "vocab_size": 201088,
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "num_hidden_layers": 24,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "num_local_experts": 32,
    "num_experts_per_tok": 4,
    "sliding_window": 128,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "rms_norm_eps": 1e-05,
    "rope_theta": 150000,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
    "swiglu_limit": 7.0,
    "initial_context_length": 4096,
    "max_position_embeddings": 131072,
    "attention_bias": True,
    "tie_word_embeddings": False,
}


@pytest.mark.parametrize(
    "preset,layers,experts,total_b,active_b", [("20b", 24, 32, 21, 3.6), ("120b", 36, 128, 117, 5.1)]
)
def test_presets_match_published_shapes(preset, layers, experts, total_b, active_b):
    args = GptOssModelArgs.from_preset(preset)
    assert (args.num_hidden_layers, args.num_local_experts, args.num_experts_per_tok) == (layers, experts, 4)
    assert (args.hidden_size, args.intermediate_size, args.vocab_size) == (2880, 2880, 201088)
    assert (args.num_attention_heads, args.num_key_value_heads, args.head_dim) == (64, 8, 64)
    assert args.sliding_window == 128 and args.layer_types[:3] == [SLIDING, FULL, SLIDING]
    assert args.yarn_attention_factor == pytest.approx(0.1 * math.log(32) + 1)
    counts = args.num_params()
    assert counts["total"] / 1e9 == pytest.approx(total_b, rel=0.03)
    assert counts["active"] / 1e9 == pytest.approx(active_b, rel=0.05)


def test_from_hf_config_reads_released_20b_config():
    args = GptOssModelArgs.from_hf_config(GPT_OSS_20B_CONFIG)
    assert args == GptOssModelArgs.from_preset("20b")


def test_rope_parameters_and_rope_scaling_are_equivalent():
    new_style = dict(GPT_OSS_20B_CONFIG)
    rope = dict(new_style.pop("rope_scaling"), rope_theta=150000)
    new_style.pop("rope_theta")
    new_style["rope_parameters"] = rope
    assert GptOssModelArgs.from_hf_config(new_style) == GptOssModelArgs.from_hf_config(GPT_OSS_20B_CONFIG)


def test_hf_config_round_trip():
    args = GptOssModelArgs.from_preset("debug", rope_truncate=True, sliding_window=16)
    assert GptOssModelArgs.from_hf_config(args.to_hf_config()) == args


@pytest.mark.parametrize("truncate", [False, True])
def test_yarn_inv_freq_matches_transformers(truncate):
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    args = GptOssModelArgs.from_preset("20b", rope_truncate=truncate)
    config = dict(args.to_hf_config())
    for key in ("architectures", "model_type", "rope_scaling"):
        config.pop(key)
    rotary = GptOssRotaryEmbedding(transformers.GptOssConfig(**config))
    ours = rope_inv_freq(args)
    assert torch.allclose(ours, rotary.inv_freq, rtol=1e-6, atol=0)
    assert args.yarn_attention_factor == pytest.approx(rotary.attention_scaling)


def test_yarn_keeps_high_and_interpolates_low_frequencies():
    args = GptOssModelArgs.from_preset("20b")
    plain = 1.0 / (args.rope_theta ** (torch.arange(0, 64, 2).float() / 64))
    yarn = rope_inv_freq(args)
    assert torch.allclose(yarn[:4], plain[:4])  # fastest rotations untouched
    assert torch.allclose(yarn[-4:], plain[-4:] / args.rope_factor)  # slowest ones interpolated


@pytest.mark.parametrize(
    "change,message",
    [
        ({"layer_types": ["sliding_attention"]}, "layer_types has 1 entries"),
        ({"num_key_value_heads": 3}, "multiple of"),
        ({"num_experts_per_tok": 9, "num_local_experts": 8}, "num_experts_per_tok=9"),
        ({"layer_types": ["sparse"] * 2}, "unknown layer types"),
    ],
)
def test_invalid_args_say_what_to_change(change, message):
    with pytest.raises(ValueError, match=message):
        GptOssModelArgs.from_preset("debug", **change)


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="120b"):
        GptOssModelArgs.from_preset("7b")

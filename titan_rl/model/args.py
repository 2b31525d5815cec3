"""GPT-OSS hyper-parameters: presets and reading a Hugging Face ``config.json``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"
ACTIVATION_DTYPES = ("auto", "float32")


def alternating_layer_types(n_layers: int) -> list[str]:
    """GPT-OSS layout: sliding window on even layers (0, 2, ...), full attention on odd ones."""
    return [SLIDING if i % 2 == 0 else FULL for i in range(n_layers)]


@dataclass
class GptOssModelArgs:
    """Shapes and constants of a GPT-OSS model (names follow HF's GptOssConfig where they exist)."""

    vocab_size: int = 201_088
    hidden_size: int = 2880
    intermediate_size: int = 2880  # per expert
    num_hidden_layers: int = 24
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 64
    num_local_experts: int = 32
    num_experts_per_tok: int = 4
    sliding_window: int = 128
    layer_types: list[str] = field(default_factory=list)  # empty -> alternating, sliding first
    rms_norm_eps: float = 1e-5
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    rope_theta: float = 150_000.0
    rope_type: str = "yarn"  # "yarn" or "default"
    rope_factor: float = 32.0
    rope_original_max_position_embeddings: int = 4096
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_truncate: bool = False
    rope_attention_factor: float | None = None  # None -> 0.1 * ln(factor) + 1 (YaRN)
    max_position_embeddings: int = 131_072
    attn_backend: str = "auto"  # "auto" | "eager" | "chunked" | "flash"
    activation_dtype: str = "auto"  # "auto": the weights' dtype; "float32" (titan_rl.model.linear)
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if not self.layer_types:
            self.layer_types = alternating_layer_types(self.num_hidden_layers)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers = "
                f"{self.num_hidden_layers}; give one of {SLIDING!r} / {FULL!r} per layer"
            )
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            raise ValueError(f"unknown layer types {bad}; use {SLIDING!r} or {FULL!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} > num_local_experts={self.num_local_experts}"
            )
        if self.activation_dtype not in ACTIVATION_DTYPES:
            raise ValueError(
                f"activation_dtype = {self.activation_dtype!r}: use one of {', '.join(ACTIVATION_DTYPES)}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")

    def window_of(self, layer: int) -> int | None:
        """Sliding window of one layer, or None for full causal attention."""
        return self.sliding_window if self.layer_types[layer] == SLIDING else None

    @property
    def yarn_attention_factor(self) -> float:
        """Scale applied to cos/sin (YaRN's 'concentration')."""
        if self.rope_type != "yarn":
            return 1.0
        if self.rope_attention_factor is not None:
            return self.rope_attention_factor
        return 0.1 * math.log(self.rope_factor) + 1.0 if self.rope_factor > 1 else 1.0

    def num_params(self) -> dict[str, int]:
        """Total and active parameter counts; active = used per token (the embedding lookup excluded)."""
        h, i, e = self.hidden_size, self.intermediate_size, self.num_local_experts
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = h * (q + 2 * kv) + (q + 2 * kv) + q * h + h + self.num_attention_heads
        expert = h * 2 * i + 2 * i + i * h + h
        router = e * h + e
        layer_fixed = attn + router + 2 * h
        unembed = self.vocab_size * h + h  # lm_head + final norm
        total = self.vocab_size * h + unembed + self.num_hidden_layers * (layer_fixed + e * expert)
        active = unembed + self.num_hidden_layers * (layer_fixed + self.num_experts_per_tok * expert)
        return {"total": total, "active": active}

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> GptOssModelArgs:
        """``debug`` (tiny, for CPU tests), ``20b`` or ``120b``; keyword overrides win."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        base = PRESETS[name]
        if "num_hidden_layers" in overrides and "layer_types" not in overrides:
            overrides["layer_types"] = alternating_layer_types(overrides["num_hidden_layers"])
        overrides.setdefault("layer_types", list(base.layer_types))
        return replace(base, **overrides)

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> GptOssModelArgs:
        """Read a HF ``config.json`` dict (``rope_scaling`` or the newer ``rope_parameters``)."""
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        n_layers = config["num_hidden_layers"]
        n_heads = config["num_attention_heads"]
        args: dict[str, Any] = {
            "vocab_size": config["vocab_size"],
            "hidden_size": config["hidden_size"],
            "intermediate_size": config["intermediate_size"],
            "num_hidden_layers": n_layers,
            "num_attention_heads": n_heads,
            "num_key_value_heads": config.get("num_key_value_heads") or n_heads,
            "head_dim": config.get("head_dim") or config["hidden_size"] // n_heads,
            "num_local_experts": config.get("num_local_experts", config.get("num_experts")),
            "num_experts_per_tok": config["num_experts_per_tok"],
            "sliding_window": config.get("sliding_window") or 128,
            "layer_types": list(config.get("layer_types") or alternating_layer_types(n_layers)),
            "rms_norm_eps": config.get("rms_norm_eps", 1e-5),
            "swiglu_limit": config.get("swiglu_limit", 7.0),
            "swiglu_alpha": config.get("swiglu_alpha", 1.702),
            "rope_theta": rope.get("rope_theta", config.get("rope_theta", 150_000.0)),
            "max_position_embeddings": config.get("max_position_embeddings", 131_072),
            "initializer_range": config.get("initializer_range", 0.02),
        }
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        args["rope_type"] = rope_type
        if rope_type == "yarn":
            args.update(
                rope_factor=rope["factor"],
                rope_original_max_position_embeddings=rope.get(
                    "original_max_position_embeddings", config.get("initial_context_length", 4096)
                ),
                rope_beta_fast=rope.get("beta_fast") or 32.0,
                rope_beta_slow=rope.get("beta_slow") or 1.0,
                rope_truncate=rope.get("truncate", True),  # HF's default when the key is absent
                rope_attention_factor=rope.get("attention_factor"),
            )
        elif rope_type != "default":
            raise ValueError(f"unsupported rope type {rope_type!r}; GPT-OSS uses 'yarn'")
        if not config.get("attention_bias", True):
            raise ValueError("attention_bias=false is not GPT-OSS; q/k/v/o projections have biases")
        if config.get("tie_word_embeddings", False):
            raise ValueError("tie_word_embeddings=true is not GPT-OSS; embeddings are untied")
        return cls(**args)

    def to_hf_config(self) -> dict[str, Any]:
        """The HF ``config.json`` dict describing these args (inverse of ``from_hf_config``)."""
        rope: dict[str, Any] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        if self.rope_type == "yarn":
            rope.update(
                factor=self.rope_factor,
                beta_fast=self.rope_beta_fast,
                beta_slow=self.rope_beta_slow,
                truncate=self.rope_truncate,
                original_max_position_embeddings=self.rope_original_max_position_embeddings,
            )
            if self.rope_attention_factor is not None:
                rope["attention_factor"] = self.rope_attention_factor
        return {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_local_experts": self.num_local_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "rms_norm_eps": self.rms_norm_eps,
            "swiglu_limit": self.swiglu_limit,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(rope),
            "rope_parameters": rope,
            "initial_context_length": self.rope_original_max_position_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": True,
            "attention_dropout": 0.0,
            "tie_word_embeddings": False,
            "initializer_range": self.initializer_range,
        }


PRESETS: dict[str, GptOssModelArgs] = {
    "debug": GptOssModelArgs(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,
        max_position_embeddings=4096,
    ),
    "20b": GptOssModelArgs(num_hidden_layers=24, num_local_experts=32),
    "120b": GptOssModelArgs(num_hidden_layers=36, num_local_experts=128),
}

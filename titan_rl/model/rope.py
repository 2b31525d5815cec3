"""Rotary position embedding with YaRN scaling, as HF transformers and OpenAI's reference compute it.

Positions are always explicit (``[B, T]``), so documents packed into one row restart at 0.
The rotation is the "half split" form: the first and second halves of each head are the pair
rotated together (not interleaved even/odd), and YaRN's attention factor multiplies cos and sin.
"""

from __future__ import annotations

import math

import torch

from titan_rl.model.args import GptOssModelArgs


def _correction_dim(num_rotations: float, dim: int, base: float, max_position: int) -> float:
    """Rotary dimension whose wavelength makes ``num_rotations`` turns over ``max_position``."""
    return dim * math.log(max_position / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_inv_freq(args: GptOssModelArgs, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies ``[head_dim // 2]`` in fp32 (YaRN blend of interpolation/extrapolation)."""
    dim = args.head_dim
    base = args.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    extrapolation = 1.0 / pos_freqs
    if args.rope_type != "yarn":
        return extrapolation
    interpolation = 1.0 / (args.rope_factor * pos_freqs)
    orig = args.rope_original_max_position_embeddings
    low = _correction_dim(args.rope_beta_fast, dim, base, orig)
    high = _correction_dim(args.rope_beta_slow, dim, base, orig)
    if args.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1.0 - ramp  # 1 for high frequencies (kept), 0 for low ones (interpolated)
    return interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight


def rope_cos_sin(
    inv_freq: torch.Tensor, positions: torch.Tensor, attention_factor: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[B, T, head_dim // 2]`` for integer ``positions [B, T]``, computed in fp32."""
    angles = positions[..., None].float() * inv_freq.float()
    return (angles.cos() * attention_factor).to(dtype), (angles.sin() * attention_factor).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, T, heads, head_dim]`` by ``cos``/``sin [B, T, head_dim // 2]``."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)

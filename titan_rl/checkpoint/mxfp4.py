"""MXFP4 (OCP microscaling FP4) expert weights, as the released GPT-OSS checkpoints store them.

A block is 32 e2m1 values packed into 16 bytes (low nibble first) that share one E8M0 scale byte:
``value = FP4_VALUES[code] * 2 ** (scale - 127)``. Blocks run along the last dimension of the
stored matrix ``[E, rows, cols]``: ``blocks [E, rows, cols / 32, 16]``, ``scales [E, rows, cols / 32]``.
"""

from __future__ import annotations

import torch

BLOCK_SIZE = 32  # values per block (16 bytes)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP4_MAX = 6.0
# Midpoints between neighbouring magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6 (round-to-nearest thresholds).
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
# 2 ** (byte - 127) for every E8M0 byte; exact in fp32 (2**-127 is a subnormal), 255 is NaN by the spec.
_SCALE_VALUES = [2.0 ** (b - 127) if b < 255 else float("nan") for b in range(256)]


def _check_shapes(blocks: torch.Tensor, scales: torch.Tensor) -> None:
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[-1] != BLOCK_SIZE // 2 or blocks.shape[:-1] != scales.shape:
        raise ValueError(
            f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match: "
            f"expected blocks [..., groups, 16] and scales [..., groups]"
        )


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 ``blocks [..., G, 16]`` and ``scales [..., G]`` -> values ``[..., G * 32]`` in ``dtype``.

    Every product fp4 * 2**k is exact in fp32 (at most 2 significant bits), so casting the fp32
    result to bf16 is exact too; scales near 255 overflow to inf, as in any MXFP4 decoder.
    """
    _check_shapes(blocks, scales)
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    scale_lut = torch.tensor(_SCALE_VALUES, dtype=torch.float32, device=blocks.device)
    codes = torch.stack((blocks & 0x0F, blocks >> 4), dim=-1).flatten(-2).int()  # [..., G, 32]
    values = lut[codes] * scale_lut[scales.int()].unsqueeze(-1)
    return values.flatten(-2).to(dtype)


def quantize_mxfp4(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values ``[..., cols]`` (cols a multiple of 32) -> uint8 ``blocks [..., cols/32, 16]``, ``scales``.

    Each block takes the smallest power-of-two scale with ``max|x| <= 6 * scale`` (so nothing clips),
    then every value rounds to the nearest e2m1 grid point, ties to the even code.
    """
    if values.shape[-1] % BLOCK_SIZE:
        raise ValueError(f"MXFP4 needs the last dimension to be a multiple of 32, got {tuple(values.shape)}")
    x = values.float().contiguous().unflatten(-1, (-1, BLOCK_SIZE))  # [..., G, 32]
    if not torch.isfinite(x).all():
        raise ValueError("cannot quantize non-finite values (inf or NaN) to MXFP4")
    amax = x.abs().amax(dim=-1)  # [..., G]
    mantissa, exponent = torch.frexp(amax)  # amax = mantissa * 2**exponent, mantissa in [0.5, 1)
    # smallest e with amax <= 6 * 2**e = 0.75 * 2**(e + 3)
    shared = exponent - 3 + (mantissa > 0.75).int()
    shared = torch.where(amax == 0, torch.full_like(shared, -127), shared).clamp(-127, 127)
    inverse = torch.tensor(_SCALE_VALUES, dtype=torch.float32, device=x.device)[127 - shared]  # 2**-e
    scaled = x * inverse.unsqueeze(-1)  # exact: a power-of-two multiply
    magnitude = scaled.abs()
    midpoints = torch.tensor(_MIDPOINTS, dtype=torch.float32, device=x.device)
    below = torch.bucketize(magnitude, midpoints)  # midpoints strictly below |x|
    tie = torch.bucketize(magnitude, midpoints, right=True) != below
    codes = below + (tie & (below % 2 == 1)).int()  # on a tie go up only when that is the even code
    codes = (codes | (torch.signbit(scaled).int() << 3)).to(torch.uint8)  # [..., G, 32]
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)  # [..., G, 16], low nibble first
    return blocks.contiguous(), (shared + 127).to(torch.uint8)

"""MXFP4 blocks: decoding equals transformers', encoding stays within one half e2m1 step."""

from __future__ import annotations

import pytest
import torch

from titan_rl.checkpoint.mxfp4 import dequantize_mxfp4, quantize_mxfp4

GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def random_blocks(shape: tuple[int, ...], low: int, high: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random packed codes ``[*shape, 16]`` and E8M0 scales in ``[low, high]``."""
    blocks = torch.randint(0, 256, (*shape, 16), dtype=torch.uint8)
    scales = torch.randint(low, high + 1, shape, dtype=torch.uint8)
    return blocks, scales


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_matches_transformers(dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = random_blocks((3, 10, 4), 0, 254)
    scales[0, :7, 0] = torch.tensor([0, 1, 126, 127, 128, 253, 254], dtype=torch.uint8)  # extremes
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [E, cols, rows]
    ours = dequantize_mxfp4(blocks, scales, dtype)  # [E, rows, cols]
    assert ours.dtype == dtype and not ours.isnan().any()
    assert torch.equal(ours.transpose(1, 2), theirs)


def test_quantize_error_is_within_half_a_step():
    # blocks whose magnitudes span many binades, plus one all-zero block
    magnitude = 10.0 ** torch.empty(4, 8, 6, 1).uniform_(-6, 2)
    x = (torch.randn(4, 8, 6, 32) * magnitude).flatten(-2)
    x[0, 0, :32] = 0.0
    blocks, scales = quantize_mxfp4(x)
    assert blocks.shape == (4, 8, 6, 16) and scales.shape == (4, 8, 6)
    y = dequantize_mxfp4(blocks, scales).unflatten(-1, (6, 32))
    scale = torch.exp2(scales.float() - 127).unsqueeze(-1)
    x_blocks = x.unflatten(-1, (6, 32))
    scaled = x_blocks.abs() / scale
    assert (scaled <= 6).all(), "a value was clipped"
    amax = x_blocks.abs().amax(-1, keepdim=True)
    assert ((amax > 3 * scale) | (amax == 0)).all(), "a block's scale is larger than needed"
    upper_index = torch.bucketize(scaled, GRID).clamp(max=len(GRID) - 1)
    half_step = (GRID[upper_index] - GRID[(upper_index - 1).clamp(min=0)]) / 2
    assert ((y - x_blocks).abs() <= half_step * scale).all()


def test_values_on_the_grid_round_trip_exactly():
    blocks, scales = random_blocks((2, 5, 3), 100, 150)
    blocks[0, 0, 0] = 0x80  # -0 and +0 codes
    values = dequantize_mxfp4(blocks, scales)
    again = dequantize_mxfp4(*quantize_mxfp4(values))
    assert torch.equal(again, values)
    assert torch.equal(torch.signbit(again), torch.signbit(values))


def test_ties_round_to_the_even_code():
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
    x = torch.cat([ties, -ties, torch.zeros(16)]) * 2.0**-5  # amax 6 * 2**-5 fixes the scale
    blocks, scales = quantize_mxfp4(x)
    assert scales.item() == 127 - 5
    expected = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0])
    assert torch.equal(dequantize_mxfp4(blocks, scales)[:16] * 2.0**5, torch.cat([expected, -expected]))


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_mxfp4(torch.ones(2, 48))
    with pytest.raises(ValueError, match="non-finite"):
        quantize_mxfp4(torch.tensor([float("inf")] + [0.0] * 31))
    with pytest.raises(ValueError, match="do not match"):
        dequantize_mxfp4(*random_blocks((2, 3), 0, 1)[:1], torch.zeros(2, 4, dtype=torch.uint8))

"""The counter-based sampling noise: Exp(1), and no visible dependence between rows, steps, tokens."""

from __future__ import annotations

import torch

from tests.unit.rl.rollout.test_native import chi_square_p_value
from titan_rl.rl.rollout.noise import draw_call_seed, exponential_noise, row_keys


def test_noise_is_exponential_and_independent_across_rows_steps_and_tokens():
    """200 rows x 50 steps x 96 tokens of counter-based noise: its uniforms exp(-E) fall evenly in
    20 bins (chi-square, false-alarm rate 1e-6), and neighbouring rows, steps and token ids are
    uncorrelated (|r| < 6 / sqrt(n): a false alarm about 1e-9 each under independence)."""
    keys = row_keys(draw_call_seed(torch.Generator().manual_seed(8)), torch.arange(200))
    noise = torch.stack([exponential_noise(keys, torch.full((200,), t), 96) for t in range(50)], 1)
    uniform = torch.exp(-noise.double())  # [rows, steps, tokens]
    counts = torch.histc(uniform, bins=20, min=0, max=1)
    assert chi_square_p_value(counts, torch.full((20,), 1 / 20)) > 1e-6
    for a, b in (
        (uniform[1:], uniform[:-1]),
        (uniform[:, 1:], uniform[:, :-1]),
        (uniform[..., 1:], uniform[..., :-1]),
    ):
        r = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
        assert abs(r) < 6 / a.numel() ** 0.5


def test_row_keys_are_distinct_within_a_call():
    keys = row_keys(draw_call_seed(torch.Generator().manual_seed(1)), torch.arange(100_000))
    assert keys.unique().numel() == 100_000 and int(keys.max()) < 2**32

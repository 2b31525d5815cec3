"""Sampling noise that depends only on (generate call, prompt, token index, vocabulary id).

The native engine samples by the exponential race ``argmax(p / E)``. Drawing ``E`` from one
generator over the whole batch would tie every row's draws to the batch it decodes in: which
prompts share it, in which order, on which rank. A counter-based hash of (call seed, prompt index,
the row's own step, token id) instead gives each prompt the same noise however the prompts are
split across ranks or scheduled into rows, so one process and N processes, or all-at-once and
continuous batching, sample the same completions. It is plain integer arithmetic on the device:
no generator state, no host sync.

Values live in int64 tensors but stay below 2**32, and every multiplier is below 2**31, so no
product overflows.
"""

from __future__ import annotations

import torch

MASK = 0xFFFFFFFF


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (xor-shift / odd-multiply rounds) of ``x`` (int64, < 2**32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & MASK
    return x ^ (x >> 16)


def draw_call_seed(generator: torch.Generator) -> int:
    """One 32-bit seed per ``generate`` call from the engine's (checkpointed) CPU generator; every
    rank holds the same generator state, so every rank draws the same seed."""
    return int(torch.randint(0, 2**32, (1,), generator=generator))


def row_keys(seed: int, prompt_ids: torch.Tensor) -> torch.Tensor:
    """Keys ``[B]`` of prompts ``prompt_ids`` (their indices in the ``generate`` call): distinct for
    distinct prompts of one call (``seed + id`` mod 2**32 through a bijection)."""
    return mix32((prompt_ids + seed) & MASK)


def exponential_noise(keys: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exp(1) noise ``[B, vocab]`` (fp32) for rows with ``keys [B]`` at their token index ``steps [B]``."""
    at_step = mix32(keys ^ ((steps * 0x27D4EB2F) & MASK))  # [B]
    ids = (torch.arange(vocab, device=keys.device) * 0x165667B1) & MASK
    bits = mix32(mix32(at_step[:, None] ^ ids))
    uniform = ((bits >> 8).float() + 0.5) * 2.0**-24  # 24 bits: exact in fp32, never 0 or 1
    return -torch.log(uniform)

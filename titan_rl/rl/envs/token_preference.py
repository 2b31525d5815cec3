"""A toy task a tiny model learns on CPU in a few steps: prefer tokens from a target set.

Reward = share of response tokens whose id is divisible by ``target_modulus``. A random policy
scores about ``1 / target_modulus``; a policy that learned the task scores 1.
"""

from __future__ import annotations

import torch


class TokenPreferenceEnv:
    def __init__(self, vocab_size: int, prompt_len: int = 8, target_modulus: int = 8, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self.prompt_len = prompt_len
        self.target_modulus = target_modulus
        self.seed = seed

    def prompts(self, step: int, count: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return torch.randint(0, self.vocab_size, (count, self.prompt_len), generator=generator).tolist()

    def reward(self, prompt: list[int], response: list[int]) -> float:
        if not response:
            return 0.0
        return sum(token % self.target_modulus == 0 for token in response) / len(response)

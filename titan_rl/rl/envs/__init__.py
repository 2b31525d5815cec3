"""Environments: prompts in, rewards out."""

from titan_rl.rl.envs.base import Environment
from titan_rl.rl.envs.token_preference import TokenPreferenceEnv

__all__ = ["Environment", "TokenPreferenceEnv"]

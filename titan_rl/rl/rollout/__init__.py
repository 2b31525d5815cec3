"""Rollout engines: generate tokens and their log-probs from the current policy."""

from titan_rl.rl.rollout.engine import RolloutEngine
from titan_rl.rl.rollout.native import Completion, NativeEngine
from titan_rl.rl.rollout.sampling import SamplingParams

__all__ = ["Completion", "NativeEngine", "RolloutEngine", "SamplingParams"]

"""Group-relative advantages of outcome rewards (RL.md, "Advantages").

A prompt is sampled ``group_size`` times; each trajectory's advantage compares its reward with the
rest of its group. A token's advantage is its trajectory's advantage.
"""

from __future__ import annotations

import torch
from torch import Tensor

ESTIMATORS = ("grpo", "dr_grpo", "rloo")


def informative_groups(rewards: Tensor) -> Tensor:
    """``[num_groups, group_size]`` -> bool ``[num_groups]``: False where all rewards of the group are equal.

    Such groups carry no learning signal (every advantage is zero); DAPO dynamic sampling drops them.
    """
    _check_rewards(rewards)
    return (rewards != rewards[:, :1]).any(dim=1)


def group_advantages(rewards: Tensor, estimator: str = "grpo", eps: float = 1e-6) -> Tensor:
    """Advantages of ``rewards [num_groups, group_size]``, same shape, fp32.

    - ``grpo``: ``(R_i - mean_G R) / (std_G R + eps)`` with the *population* std (``unbiased=False``,
      divide by G): the group is the whole sample, and G = 2 gives advantages of exactly +-1 (eps = 0).
    - ``dr_grpo``: ``R_i - mean_G R`` (Dr.GRPO: no std normalization).
    - ``rloo``: ``R_i - mean_{j != i} R_j`` (leave-one-out baseline; needs group_size >= 2).

    Groups whose rewards are all equal get exactly zero (not a rounding residue of the mean).
    """
    _check_rewards(rewards)
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; valid: {', '.join(ESTIMATORS)}")
    rewards = rewards.float()
    group_size = rewards.shape[1]
    mean = rewards.mean(dim=1, keepdim=True)
    if estimator == "grpo":
        std = rewards.std(dim=1, keepdim=True, unbiased=False)
        advantages = (rewards - mean) / (std + eps)
    elif estimator == "dr_grpo":
        advantages = rewards - mean
    else:
        if group_size < 2:
            raise ValueError(
                f"rloo needs group_size >= 2 (got {group_size}); sample more completions per prompt"
            )
        leave_one_out_mean = (rewards.sum(dim=1, keepdim=True) - rewards) / (group_size - 1)
        advantages = rewards - leave_one_out_mean
    informative = informative_groups(rewards)[:, None]
    return torch.where(informative, advantages, torch.zeros_like(advantages))


def _check_rewards(rewards: Tensor) -> None:
    if rewards.dim() != 2 or rewards.shape[1] == 0:
        raise ValueError(
            f"rewards must have shape [num_groups, group_size] with group_size >= 1, "
            f"got {tuple(rewards.shape)}"
        )

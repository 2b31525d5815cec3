"""group_advantages / informative_groups against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from titan_rl.rl.advantages import group_advantages, informative_groups

REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]])


def test_grpo_uses_population_std():
    # group 1: mean 0.5, population std 0.5; group 2: mean 0.25, population std sqrt(0.1875)
    s3 = math.sqrt(3.0)
    expected = torch.tensor([[1.0, -1.0, -1.0, 1.0], [-1 / s3, -1 / s3, -1 / s3, s3]])
    torch.testing.assert_close(group_advantages(REWARDS, "grpo", eps=0.0), expected)
    # G = 2: population std gives exactly +-1 (the unbiased std would give +-1/sqrt(2))
    torch.testing.assert_close(
        group_advantages(torch.tensor([[0.0, 1.0]]), eps=0.0), torch.tensor([[-1.0, 1.0]])
    )


def test_grpo_eps_in_denominator():
    advantages = group_advantages(torch.tensor([[0.0, 1.0]]), "grpo", eps=0.5)
    torch.testing.assert_close(advantages, torch.tensor([[-0.5, 0.5]]))  # 0.5 / (0.5 + 0.5)


def test_dr_grpo_subtracts_mean_only():
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [-0.25, -0.25, -0.25, 0.75]])
    torch.testing.assert_close(group_advantages(REWARDS, "dr_grpo"), expected)


def test_rloo_leave_one_out_baseline():
    expected = torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3], [-1 / 3, -1 / 3, -1 / 3, 1.0]])
    torch.testing.assert_close(group_advantages(REWARDS, "rloo"), expected)


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_equal_rewards_give_exact_zero(estimator):
    # 0.1 and 0.7 are not exact in binary, so the group mean alone would leave a residue
    rewards = torch.tensor([[0.1, 0.1, 0.1], [0.7, 0.7, 0.7], [1.0, 0.0, 0.5]])
    advantages = group_advantages(rewards, estimator)
    assert advantages.dtype == torch.float32
    assert torch.equal(advantages[:2], torch.zeros(2, 3))
    assert (advantages[2] != 0).sum() == 2  # the middle reward equals the mean


def test_informative_groups():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.3, 0.3, 0.3], [2.0, 2.0, 2.5]])
    assert informative_groups(rewards).tolist() == [False, True, False, True]


def test_errors():
    with pytest.raises(ValueError, match="grpo, dr_grpo, rloo"):
        group_advantages(REWARDS, "ppo")
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(torch.tensor([[1.0], [0.0]]), "rloo")
    with pytest.raises(ValueError, match="num_groups, group_size"):
        group_advantages(torch.tensor([1.0, 0.0]))

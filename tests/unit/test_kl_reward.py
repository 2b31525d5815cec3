"""The KL to a frozen reference as a reward penalty (``rl.kl_penalty = "reward"``), the reference
after the supervised warmup, and the reference in checkpoints.

The per-trajectory KL is checked against each trajectory run alone through an unwrapped copy of the
reference (plain ``log_softmax`` of its logits), not against the trainer's packed forward."""

from __future__ import annotations

import copy

import pytest
import torch
from rich.console import Console

from tests.conftest import randomize_biases, tiny_model
from titan_rl.checkpoint.manager import CheckpointManager, has_reference
from titan_rl.config import ConfigError, load_config
from titan_rl.model import GptOss, GptOssModelArgs
from titan_rl.rl.advantages import group_advantages
from titan_rl.rl.collect import build_env, build_tokenizer, collect_rollouts
from titan_rl.rl.losses import kl_estimate
from titan_rl.rl.packing import pack_trajectories
from titan_rl.rl.rollout import NativeEngine
from titan_rl.train import rl_advantages, supervised_warmup
from titan_rl.trainer import Trainer

COEF = 0.3


def config(*overrides: str):
    return load_config(
        None,
        [
            "--training.seq_len=64",
            "--rollout.prompts_per_step=3",
            "--rollout.temperature=0.8",
            f"--rl.kl_coef={COEF}",
            "--optimizer.lr=0.05",
            *overrides,
        ],
    )


def trainer_and_rollouts(cfg, step: int = 1):
    model = randomize_biases(tiny_model(seed=0), seed=1)
    trainer = Trainer(model, cfg)
    engine = NativeEngine(model, seed=1)
    env = build_env(cfg, model.args.vocab_size)
    return trainer, engine, env


def rollouts(engine, env, cfg, step: int):
    trajectories, _ = collect_rollouts(engine, env, None, step, cfg)
    rewards = torch.tensor([t.reward for t in trajectories]).view(-1, cfg.rollout.group_size)
    return trajectories, rewards


def one_at_a_time_kl(reference, trajectories, temperature: float, estimator: str) -> torch.Tensor:
    """Each trajectory alone through ``reference``: sum over its sampled tokens of the estimator of
    KL(policy || reference), the policy's log-prob being the engine's."""
    out = []
    with torch.no_grad():
        for t in trajectories:
            tokens = torch.tensor([t.tokens])
            logits = reference(tokens)[0, :-1].double() / temperature  # position p predicts p + 1
            ref = logits.log_softmax(-1).gather(-1, tokens[0, 1:, None])[:, 0]
            mask = torch.tensor(t.loss_mask[1:]).bool()
            engine = torch.tensor(t.rollout_logprobs[1:], dtype=torch.float64)
            out.append(kl_estimate(engine[mask], ref[mask], estimator).sum())
    return torch.stack(out)


def train_a_step(trainer, engine, env, cfg):
    """One RL step, so that the policy (and what it samples next) is no longer the reference."""
    trajectories, rewards = rollouts(engine, env, cfg, 1)
    advantages = group_advantages(rewards).flatten().tolist()
    trainer.train_step(pack_trajectories(trajectories, advantages, cfg.training.seq_len), len(trajectories))


@pytest.mark.parametrize("estimator,advantage", [("k1", "grpo"), ("k3", "grpo"), ("k3", "rloo")])
def test_reward_penalty_is_each_trajectorys_kl_to_the_reference(estimator, advantage):
    """Advantages of R - kl_coef * KL: the KL through the estimator's baseline (the group mean; the
    others' mean for rloo), GRPO's std from the task rewards alone."""
    cfg = config("--rl.kl_penalty=reward", f"--rl.kl_estimator={estimator}", f"--rl.advantage={advantage}")
    trainer, engine, env = trainer_and_rollouts(cfg)
    reference = copy.deepcopy(trainer.reference)  # the weights before training, unwrapped
    train_a_step(trainer, engine, env, cfg)
    trajectories, rewards = rollouts(engine, env, cfg, 2)  # sampled by the trained policy
    want = one_at_a_time_kl(reference, trajectories, cfg.rollout.temperature, estimator)
    assert want.abs().min() > 1e-3  # the policy moved: every trajectory has a KL to speak of

    advantages, metrics = rl_advantages(trainer, trajectories, rewards, cfg)

    kl = want.view_as(rewards)
    size = kl.shape[1]
    if advantage == "rloo":
        baseline = (kl.sum(1, keepdim=True) - kl) / (size - 1)
    else:
        baseline = kl.mean(1, keepdim=True)
    expected = group_advantages(rewards, advantage).double() - COEF * (kl - baseline)
    assert torch.allclose(advantages.double(), expected, atol=1e-5)
    tokens = sum(sum(t.loss_mask) for t in trajectories)
    assert metrics["kl/mean"] == pytest.approx(float(want.sum()) / tokens, rel=1e-5)
    assert metrics["kl/trajectory_mean"] == pytest.approx(float(want.mean()), rel=1e-5)
    penalized = rewards.double().flatten() - COEF * want
    assert metrics["reward/penalized_mean"] == pytest.approx(float(penalized.mean()), rel=1e-5)


def test_a_group_with_equal_task_rewards_gets_only_the_kl_term():
    """All episodes of a group failed: the KL differences must stay kl_coef-sized, not be divided
    by the group's (zero) reward std into advantages of +-1."""
    cfg = config("--rl.kl_penalty=reward", "--rl.kl_coef=0.01")
    trainer, engine, env = trainer_and_rollouts(cfg)
    reference = copy.deepcopy(trainer.reference)
    train_a_step(trainer, engine, env, cfg)
    trajectories, rewards = rollouts(engine, env, cfg, 2)
    advantages, _ = rl_advantages(trainer, trajectories, torch.zeros_like(rewards), cfg)
    kl = one_at_a_time_kl(reference, trajectories, cfg.rollout.temperature, "k3").view_as(rewards)
    expected = -0.01 * (kl - kl.mean(1, keepdim=True))  # GRPO of R - 0.01 KL: std 1 per group
    assert torch.allclose(advantages.double(), expected, atol=1e-5)
    assert (expected.std(1) < 0.9).all()  # (so the check above tells the two apart)


def test_loss_mode_leaves_the_rewards_alone():
    cfg = config()  # rl.kl_penalty = "loss"
    trainer, engine, env = trainer_and_rollouts(cfg)
    trajectories, rewards = rollouts(engine, env, cfg, 1)
    advantages, metrics = rl_advantages(trainer, trajectories, rewards, cfg)
    assert torch.equal(advantages, group_advantages(rewards)) and metrics == {}


def test_reward_mode_keeps_the_kl_out_of_the_loss():
    """The same batch: the reward-mode step's gradient is the no-KL step's, not the loss-mode one's
    (k1's gradient at the reference, kl_coef x grad logp, is not 0)."""
    grad_norms = {}
    for name, overrides in {
        "none": ["--rl.kl_coef=0"],
        "reward": ["--rl.kl_penalty=reward", "--rl.kl_estimator=k1"],
        "loss": ["--rl.kl_estimator=k1"],
    }.items():
        cfg = config(*overrides)
        trainer, engine, env = trainer_and_rollouts(cfg)
        trajectories, rewards = rollouts(engine, env, cfg, 1)
        batch = pack_trajectories(trajectories, group_advantages(rewards).flatten().tolist(), 64)
        metrics = trainer.train_step(batch, len(trajectories))
        grad_norms[name] = metrics["grad_norm"]
        assert ("kl/mean" in metrics) == (name == "loss")
    assert grad_norms["reward"] == pytest.approx(grad_norms["none"], rel=1e-6)
    assert abs(grad_norms["loss"] / grad_norms["none"] - 1) > 1e-3


def test_reward_penalty_needs_a_coefficient():
    with pytest.raises(ConfigError, match=r"rl\.kl_coef > 0"):
        load_config(None, ["--rl.kl_penalty=reward"])


def test_the_reference_is_the_policy_after_the_supervised_warmup():
    """Without the reset the KL would pull RL back to the weights before the warmup."""
    cfg = config(
        "--env.name=tool_lookup",
        "--sft.steps=2",
        "--sft.batch_size=2",
        "--training.seq_len=256",
        "--env.max_episode_tokens=256",
    )
    torch.manual_seed(0)  # the debug preset: the built-in tokenizer's 512-token vocabulary
    model = GptOss(GptOssModelArgs.from_preset("debug", num_local_experts=8, num_experts_per_tok=2))
    trainer = Trainer(model, cfg)
    initial = copy.deepcopy(trainer.reference.state_dict())
    env = build_env(cfg, model.args.vocab_size)
    supervised_warmup(trainer, env, build_tokenizer(cfg, model.args.vocab_size), cfg, Console(quiet=True))
    policy = model.state_dict()
    for name, value in trainer.reference.state_dict().items():
        assert torch.equal(value, policy[name]), name
    moved = max((initial[n] - policy[n]).abs().max().item() for n in policy)
    assert moved > 1e-3  # the warmup changed the weights the reference now holds


def test_checkpoints_carry_the_reference(tmp_path):
    cfg = config()
    trainer, engine, env = trainer_and_rollouts(cfg)
    train_a_step(trainer, engine, env, cfg)
    trainer.reset_reference()  # a reference that is not the initial weights
    saved = copy.deepcopy(trainer.reference.state_dict())
    manager = CheckpointManager(tmp_path, interval=1)
    plain = manager.save(1, trainer.model, trainer.optimizer, trainer.lr_scheduler)
    with_ref = manager.save(
        2, trainer.model, trainer.optimizer, trainer.lr_scheduler, reference=trainer.reference
    )
    assert not has_reference(plain) and has_reference(with_ref)

    for folder in (with_ref, plain):
        fresh, _, _ = trainer_and_rollouts(cfg)  # its reference: the initial weights
        initial = copy.deepcopy(fresh.reference.state_dict())
        assert any(not torch.equal(v, saved[n]) for n, v in initial.items())
        manager.load(fresh.model, fresh.optimizer, fresh.lr_scheduler, folder, reference=fresh.reference)
        expected = saved if folder == with_ref else initial  # no reference saved: left as it was
        for name, value in fresh.reference.state_dict().items():
            assert torch.equal(value, expected[name]), (folder.name, name)

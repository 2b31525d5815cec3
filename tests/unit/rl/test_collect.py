"""Single-turn rollouts: a reward function that raises scores 0 and is counted, the run goes on."""

from __future__ import annotations

import pytest
import torch

from titan_rl.config import load_config
from titan_rl.model import GptOss, GptOssModelArgs
from titan_rl.rl.collect import build_env, collect_rollouts
from titan_rl.rl.rollout import NativeEngine


def test_a_raising_single_turn_reward_is_contained_and_counted():
    cfg = load_config(None, ["--rollout.prompts_per_step=3", "--rollout.group_size=2"])
    torch.manual_seed(0)
    model = GptOss(GptOssModelArgs.from_preset("debug"))
    env = build_env(cfg, model.args.vocab_size)
    honest = env.reward
    calls = []

    def flaky(prompt, response):
        calls.append(len(calls))
        if len(calls) % 3 == 0:
            raise KeyError("a bug in the user's reward")
        return honest(prompt, response)

    env.reward = flaky
    with pytest.warns(UserWarning, match="reward function raised KeyError"):
        trajectories, metrics = collect_rollouts(NativeEngine(model, seed=0), env, None, 1, cfg)
    assert len(trajectories) == 6 and metrics == {"env/errors": 2.0, "env/reward_errors": 2.0}
    for i, t in enumerate(trajectories):
        response = t.tokens[len(t.tokens) - t.response_len :]
        expected = 0.0 if (i + 1) % 3 == 0 else honest(t.tokens[: len(t.tokens) - t.response_len], response)
        assert t.reward == expected

"""The pre-launch check (``titan_rl/preflight.py``): inputs it refuses before any process starts."""

from __future__ import annotations

import os

import pytest

from titan_rl.config import ConfigError, load_config
from titan_rl.preflight import check_inputs
from titan_rl.rl.collect import build_env
from titan_rl.rl.envs.python_tool import IsolationUnavailable


def test_the_python_tool_without_isolation_needs_the_explicit_opt_in(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)  # an unprivileged trainer: no namespaces
    args = [
        "--env.name=math",
        "--env.python_tool=true",
        "--training.seq_len=512",
        "--env.max_episode_tokens=512",
    ]
    cfg = load_config(None, args)
    with pytest.raises(ConfigError) as refused:
        check_inputs(cfg)
    message = str(refused.value)
    assert "\n" not in message and "not running as root" in message and "task data" in message
    assert "--env.allow_unisolated_python_tool=true" in message
    with pytest.raises(IsolationUnavailable):  # the trainer refuses too, should the check be skipped
        build_env(cfg, 512)
    opted_in = load_config(None, [*args, "--env.allow_unisolated_python_tool=true"])
    check_inputs(opted_in)
    assert not build_env(opted_in, 512).python.isolated


def test_an_agentic_env_on_a_big_preset_without_its_tokenizer_is_refused_before_launch():
    """The built-in tokenizer has 512 tokens: a 20b-shaped agentic run without model.hf_path failed
    at its first rollout, after building the model (the layout-only check, which blanks hf_path
    where the weights are absent, still passes)."""
    agentic = ["--env.name=tool_lookup", "--training.seq_len=512"]
    cfg = load_config(None, ["--model.preset=20b", *agentic])
    with pytest.raises(ConfigError) as refused:
        check_inputs(cfg)
    assert "built-in 512-token tokenizer" in str(refused.value)
    check_inputs(cfg, machine=False)
    check_inputs(load_config(None, agentic))  # the debug preset's vocab is 512


def test_a_model_only_dcp_folder_as_load_path_says_how_to_train_from_it(tmp_path):
    from tests.conftest import tiny_model
    from titan_rl.checkpoint.manager import save_model_dcp

    save_model_dcp(tiny_model(), tmp_path / "dcp")
    with pytest.raises(ConfigError, match=r"model-only DCP folder .* --model\.hf_path"):
        check_inputs(load_config(None, [f"--checkpoint.load_path={tmp_path / 'dcp'}"]))


def test_opening_prompts_longer_than_the_episode_budget_are_refused_before_launch():
    """Found before the model is built (it was the first rollout's error): the math env with its
    Python tool needs a longer budget than the default, more in the gpt-oss style."""
    tool = [
        "--env.name=math",
        "--sft.steps=0",
        "--env.python_tool=true",
        "--env.allow_unisolated_python_tool=true",
    ]
    with pytest.raises(
        ConfigError, match=r"leaves no room to sample: math's opening prompts are \d+\+ tokens"
    ):
        check_inputs(load_config(None, tool))
    roomy = ["--env.max_episode_tokens=1024", "--training.seq_len=1024"]
    check_inputs(load_config(None, [*tool, *roomy]))
    with pytest.raises(ConfigError, match="system_prompt = 'minimal'"):
        check_inputs(
            load_config(
                None,
                [
                    *tool,
                    "--env.system_prompt=gpt-oss",
                    "--env.max_episode_tokens=400",
                    "--training.seq_len=400",
                ],
            )
        )
    check_inputs(load_config(None, [*tool, "--model.preset=20b"]), machine=False)  # layout-only: skipped

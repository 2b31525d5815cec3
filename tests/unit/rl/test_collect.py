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


def test_a_hung_nan_or_exiting_reward_scores_zero_and_is_counted():
    """env.reward_timeout_s bounds each reward call (a hung reward blocked the run, and with several
    ranks every other rank until the collective timeout); a NaN reward made its group's advantages NaN
    and the step was skipped as the model's fault; sys.exit in a reward ended the rank."""
    import math
    import sys
    import threading
    import time

    cfg = load_config(
        None, ["--rollout.prompts_per_step=2", "--rollout.group_size=2", "--env.reward_timeout_s=0.5"]
    )
    torch.manual_seed(0)
    model = GptOss(GptOssModelArgs.from_preset("debug"))
    env = build_env(cfg, model.args.vocab_size)
    release = threading.Event()
    behaviours = [lambda: release.wait(), lambda: math.nan, lambda: sys.exit(3), lambda: 0.75]

    def reward(prompt, response):
        return behaviours[reward.calls.pop(0)]()

    reward.calls = [0, 1, 2, 3]
    env.reward = reward
    start = time.monotonic()
    try:
        with pytest.warns(UserWarning) as caught:
            trajectories, metrics = collect_rollouts(NativeEngine(model, seed=0), env, None, 1, cfg)
    finally:
        release.set()  # the abandoned call's thread ends
    assert time.monotonic() - start < 10
    assert [t.reward for t in trajectories] == [0.0, 0.0, 0.0, 0.75]
    assert metrics == {"env/errors": 3.0, "env/reward_errors": 3.0}
    text = " | ".join(str(w.message) for w in caught)
    assert "ran past 0.5 s" in text and "returned nan" in text and "raised SystemExit" in text


@pytest.mark.parametrize("timeout_s", [0.0, 5.0])
def test_safe_reward_on_or_off_the_main_thread(timeout_s, monkeypatch):
    import signal

    import titan_rl.rl.calls as calls
    from titan_rl.rl.calls import safe_reward

    monkeypatch.setattr(calls, "_rewards_need_main_thread", False)  # (the test sets it)

    assert safe_reward(lambda a, b: a + b, 1, 2.5, timeout_s=timeout_s) == (3.5, False)
    with pytest.warns(UserWarning, match="returned 'x', not a finite number"):
        assert safe_reward(lambda: "x", timeout_s=timeout_s) == (0.0, True)
    with pytest.warns(UserWarning, match="returned inf"):
        assert safe_reward(lambda: float("inf"), timeout_s=timeout_s) == (0.0, True)
    with pytest.warns(UserWarning, match="returned '1.0', not a finite number"):  # text, not a score
        assert safe_reward(lambda: "1.0", timeout_s=timeout_s) == (0.0, True)
    assert safe_reward(lambda: True, timeout_s=timeout_s) == (1.0, False)  # a pass / fail score

    def main_thread_only():  # what signal.alarm-based time limits in reward code need
        signal.signal(signal.SIGUSR2, signal.getsignal(signal.SIGUSR2))
        return 1.0

    if timeout_s == 0:
        assert safe_reward(main_thread_only, timeout_s=timeout_s) == (1.0, False)
    else:  # it fails on a worker thread: rerun on this one (scoring 0 trained on no signal at all)
        with pytest.warns(UserWarning, match="needs the main thread"):
            assert safe_reward(main_thread_only, timeout_s=timeout_s) == (1.0, False)
        assert calls._rewards_need_main_thread  # later calls go there at once
        assert safe_reward(main_thread_only, timeout_s=timeout_s) == (1.0, False)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C still stops the run
        safe_reward(lambda: (_ for _ in ()).throw(KeyboardInterrupt()), timeout_s=0.0)


def test_hung_rewards_run_concurrently_under_their_time_limit():
    """A judge service that stopped answering: one time limit for the rank's share, not one per call
    (64 calls x 60 s held the other ranks past the collective timeout)."""
    import threading
    import time

    from titan_rl.rl.calls import safe_rewards

    release = threading.Event()
    start = time.monotonic()
    try:
        with pytest.warns(UserWarning, match="ran past 0.3 s"):
            scores = safe_rewards([release.wait] * 8 + [lambda: 2.0], timeout_s=0.3, concurrency=16)
    finally:
        release.set()
    assert time.monotonic() - start < 1.5  # 8 sequential limits would be 2.4 s
    assert scores == [(0.0, True)] * 8 + [(2.0, False)]


@pytest.mark.parametrize("limit", [1.0, 8.0])
def test_the_python_tool_runs_under_env_tool_timeout_s(limit):
    """env.tool_timeout_s is the Python tool's limit too (less a second of start-up): code running
    past it is stopped by the sandbox, and code shorter (6 s, past the sandbox's 5 s default) finishes."""
    import time

    cfg = load_config(
        None,
        ["--env.name=math", "--training.seq_len=512", "--env.python_tool=true",
         "--env.allow_unisolated_python_tool=true",
         f"--env.tool_timeout_s={limit}"],
    )  # fmt: skip
    env = build_env(cfg, 512)
    start = time.monotonic()
    out = env.call_tool(None, "python", {"code": "import time\ntime.sleep(6)\nprint('finished')"})
    elapsed = time.monotonic() - start
    if limit < 6:
        assert "finished" not in out and "timed out" in out and elapsed < limit + 3, (out, elapsed)
    else:
        assert out.strip() == "finished", out

"""The agent loop: token layout, masks and log-probs, contained tool failures, and the real engine."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch

from tests.conftest import tiny_model
from titan_rl.model import token_logprobs_and_entropy
from titan_rl.model.moe import UNROUTED
from titan_rl.rl.agent_loop import (
    AgentLoopConfig,
    demonstration_trajectory,
    episode_stats,
    run_episodes,
    run_tool_calls,
    start_episode,
    step_episodes,
)
from titan_rl.rl.envs.agentic import EpisodeStart, Message, ToolSpec, final_answer, tool_call, tool_result
from titan_rl.rl.envs.tool_task import ToolLookupEnv
from titan_rl.rl.harmony import generation_prompt, render_conversation, render_message
from titan_rl.rl.rollout import Completion, NativeEngine, SamplingParams
from titan_rl.rl.routing_replay import extend_routing, pad_routing
from titan_rl.rl.tokenizer import build_tiny_tokenizer

TOKENIZER = build_tiny_tokenizer()
PROMPT = generation_prompt(TOKENIZER)


def spec(name: str) -> ToolSpec:
    return ToolSpec(name, f"The {name} tool.", {"type": "object", "properties": {"text": {"type": "string"}}})


class ScriptedToolsEnv:
    """Tools that echo, raise, hang, return megabytes or return a non-string."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def __len__(self) -> int:
        return 4

    def reset(self, index: int) -> EpisodeStart:
        names = ("echo", "boom", "sleep", "huge", "notext")
        return EpisodeStart([Message("user", f"task {index}")], [spec(n) for n in names], state=index)

    def call_tool(self, state, name, arguments):
        if name == "boom":
            raise RuntimeError("kaboom")
        if name == "sleep":
            self.release.wait(30)
            return "late"
        if name == "huge":
            return "x" * 5_000_000
        if name == "notext":
            return 42
        return f"echo {arguments['text']}"

    def reward(self, transcript) -> float:
        return 1.0 if transcript.final_answer == "done" else 0.0


_counter = iter(range(1, 10**6))


def sampled_turn(message: Message, stop: str | None = None) -> Completion:
    """A turn as the engine returns it, with distinct made-up log-probs to check their alignment."""
    tokens = render_message(message, TOKENIZER, stop)[len(PROMPT) :]
    return Completion(tokens, [-next(_counter) / 1000 for _ in tokens], "stop")


def context(message: Message) -> list[int]:
    return render_message(message, TOKENIZER) + PROMPT


def test_episode_with_two_tool_calls_has_the_right_tokens_mask_and_logprobs():
    env, config = ScriptedToolsEnv(), AgentLoopConfig()
    episode = start_episode(env, 0, group=3, tokenizer=TOKENIZER)
    prompt = render_conversation(env.reset(0).messages, env.reset(0).tools, TOKENIZER) + PROMPT
    assert episode.tokens == prompt and episode.loss_mask == [0] * len(prompt)
    script = [tool_call("echo", '{"text": "a"}'), tool_call("echo", '{"text": "b"}'), final_answer("done")]
    turns = [sampled_turn(script[0]), sampled_turn(script[1]), sampled_turn(script[2], "<|return|>")]
    for turn in turns:
        step_episodes(env, TOKENIZER, [episode], [turn], config)
    env_a, env_b = context(tool_result("echo", "echo a")), context(tool_result("echo", "echo b"))
    a, b, final = turns
    assert episode.tokens == prompt + a.tokens + env_a + b.tokens + env_b + final.tokens
    zeros = lambda ids: [0] * len(ids)
    assert episode.loss_mask == zeros(prompt) + [1] * len(a.tokens) + zeros(env_a) + [1] * len(
        b.tokens
    ) + zeros(env_b) + [1] * len(final.tokens)
    expected_logprobs = (
        [0.0] * len(prompt) + a.logprobs + [0.0] * len(env_a) + b.logprobs + [0.0] * len(env_b)
    )
    assert episode.rollout_logprobs == expected_logprobs + final.logprobs
    trajectory = episode.to_trajectory(env.reward(episode.transcript))
    assert (trajectory.reward, trajectory.group, trajectory.turns) == (1.0, 3, 3)
    assert (trajectory.tool_calls, trajectory.tool_errors, episode.end) == (2, 0, "answer")
    # a scripted demonstration is laid out exactly like the sampled episode
    replies = [script[0], tool_result("echo", "echo a"), script[1], tool_result("echo", "echo b"), script[2]]
    demo = demonstration_trajectory(env.reset(0), replies, TOKENIZER)
    assert demo.tokens == trajectory.tokens and demo.loss_mask == trajectory.loss_mask
    assert (demo.turns, demo.tool_calls) == (3, 2)


def test_raising_hanging_huge_and_malformed_tool_calls_are_contained():
    env = ScriptedToolsEnv()
    config = AgentLoopConfig(tool_timeout_s=0.3, max_tool_result_chars=100)
    cases = {  # sampled turn -> what the model must be told
        "boom": (
            tool_call("boom", "{}"),
            "functions.boom to=assistant",
            "Error: boom raised RuntimeError: kaboom",
        ),
        "sleep": (
            tool_call("sleep", "{}"),
            "functions.sleep to=assistant",
            "Error: sleep timed out after 0.3 s",
        ),
        "huge": (
            tool_call("huge", "{}"),
            "functions.huge",
            "x" * 100 + "\n[... 4999900 more characters truncated]",
        ),
        "notext": (tool_call("notext", "{}"), "functions.notext", "Error: notext returned int, not text"),
        "unknown": (
            tool_call("nope", "{}"),
            "functions.nope",
            "Error: unknown tool 'functions.nope'; available: functions.boom, functions.echo",
        ),
        "bad_json": (tool_call("echo", "{text: a}"), "functions.echo", "Error: arguments are not valid JSON"),
        "garbage": (
            Message("assistant", "hm"),
            "system<|message|>",
            "Error: invalid assistant message: missing",
        ),
    }
    episodes = [start_episode(env, 0, i, TOKENIZER) for i in range(len(cases))]
    turns = [
        sampled_turn(message, "<|end|>" if name == "garbage" else None)
        for name, (message, *_) in cases.items()
    ]
    begin = time.monotonic()
    step_episodes(env, TOKENIZER, episodes, turns, config)
    assert time.monotonic() - begin < 2.0, "tool calls must run concurrently and time out"
    env.release.set()
    for episode, turn, (name, (_, author, error)) in zip(episodes, turns, cases.items()):
        assert episode.end is None, f"{name}: the episode must go on"
        reply = episode.tokens[episode.loss_mask.index(1) + len(turn.tokens) :]
        assert set(episode.loss_mask[-len(reply) :]) == {0} and reply[-len(PROMPT) :] == PROMPT
        text = TOKENIZER.decode(reply)
        assert text.startswith(f"<|start|>{author}") and error in text, (name, text)
    by_name = dict(zip(cases, episodes))
    assert by_name["sleep"].timeouts == 1 and sum(e.timeouts for e in episodes) == 1
    assert [by_name[n].tool_errors for n in cases] == [1, 1, 0, 1, 1, 1, 0]
    assert [by_name[n].parse_errors for n in cases] == [0, 0, 0, 0, 0, 1, 1]
    step_episodes(
        env, TOKENIZER, episodes, [sampled_turn(final_answer("done"), "<|return|>") for _ in episodes], config
    )
    trajectories = [e.to_trajectory(env.reward(e.transcript)) for e in episodes]
    assert all(e.end == "answer" for e in episodes) and all(t.reward == 1.0 for t in trajectories)
    stats = episode_stats(episodes, trajectories)
    assert (stats["tool_errors"], stats["timeouts"], stats["parse_errors"], stats["tool_calls"]) == (
        5,
        1,
        2,
        4,
    )


def test_episodes_end_at_a_cut_off_turn_max_turns_and_the_token_budget():
    env = ScriptedToolsEnv()
    call = tool_call("echo", '{"text": "a"}')
    cut = start_episode(env, 0, 0, TOKENIZER)
    unfinished = sampled_turn(call)
    step_episodes(
        env,
        TOKENIZER,
        [cut],
        [Completion(unfinished.tokens[:-1], unfinished.logprobs[:-1], "length")],
        AgentLoopConfig(),
    )
    assert cut.end == "cut_off" and cut.loss_mask[-1] == 1
    capped = start_episode(env, 0, 0, TOKENIZER)
    for _ in range(2):
        step_episodes(env, TOKENIZER, [capped], [sampled_turn(call)], AgentLoopConfig(max_turns=2))
    assert capped.end == "max_turns" and capped.loss_mask[-1] == 1, "no environment text after the last turn"
    assert len(capped.transcript.tool_calls) == 1, "the call of the last turn is not run"
    budget = start_episode(env, 0, 0, TOKENIZER)
    step_episodes(
        env,
        TOKENIZER,
        [budget],
        [sampled_turn(call)],
        AgentLoopConfig(max_episode_tokens=len(budget.tokens) + 30),
    )
    assert budget.end == "budget" and budget.loss_mask[-1] == 1


def test_hung_tools_cannot_starve_the_concurrency_cap():
    release = threading.Event()
    calls = [("hang", lambda: release.wait(30) and "late")] * 3 + [("quick", lambda: "ok")] * 2
    begin = time.monotonic()
    outcomes = run_tool_calls(calls, AgentLoopConfig(tool_timeout_s=0.2, max_concurrent_tools=2))
    release.set()
    assert time.monotonic() - begin < 2.0
    assert [o.timed_out for o in outcomes] == [True, True, True, False, False]
    assert [o.text for o in outcomes[3:]] == ["ok", "ok"]


def test_calls_that_never_return_are_capped_not_piled_up():
    """Each abandoned call keeps a thread (Python cannot stop one): a tool that never returns left a
    thread per call, every step, until the process could start no more. Past max_stranded_calls new
    calls fail at once (tools and rewards alike) and run again once the stranded ones return."""
    from titan_rl.rl.calls import safe_reward, stranded_calls

    deadline = time.monotonic() + 10
    while stranded_calls() and time.monotonic() < deadline:  # earlier tests' released calls ending
        time.sleep(0.01)
    assert stranded_calls() == 0
    release = threading.Event()
    config = AgentLoopConfig(tool_timeout_s=0.1, max_stranded_calls=2)
    try:
        outcomes = run_tool_calls([("hang", lambda: release.wait(30) and "late")] * 2, config)
        assert [o.timed_out for o in outcomes] == [True, True]
        with pytest.warns(UserWarning, match="still running past their time limit"):
            outcomes = run_tool_calls([("quick", lambda: "ok")], config)
        assert (
            outcomes[0].text
            == "Error: quick not run: 2 earlier calls are still running past their time limit"
        )
        with pytest.warns(UserWarning, match="reward calls not run"):
            assert safe_reward(lambda: 1.0, timeout_s=5.0, max_stranded=config.max_stranded_calls) == (
                0.0,
                True,
            )
    finally:
        release.set()
    deadline = time.monotonic() + 10
    while stranded_calls() >= config.max_stranded_calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [o.text for o in run_tool_calls([("quick", lambda: "ok")], config)] == ["ok"]


class RecordingEngine:
    """Passes every call to the real engine and keeps what went in and came out."""

    def __init__(self, engine: NativeEngine) -> None:
        self.engine, self.calls = engine, []

    def generate(self, prompts, params):
        completions = self.engine.generate(prompts, params)
        for prompt, c in zip(prompts, completions):
            self.calls.append((list(prompt), list(c.tokens), list(c.logprobs)))
        return completions

    def update_weights(self, model) -> None:
        self.engine.update_weights(model)


def test_real_engine_episodes_train_exactly_the_sampled_tokens():
    model = tiny_model(seed=0, vocab_size=TOKENIZER.vocab_size).eval()
    with torch.no_grad():  # a random model that stops often, so episodes have several turns
        for name in ("<|call|>", "<|end|>", "<|return|>"):
            model.lm_head.weight[TOKENIZER.special[name]] *= 3
    engine = RecordingEngine(
        NativeEngine(model, seed=7)
    )  # a seed whose episodes cover the scenarios asserted below
    config = AgentLoopConfig(max_turns=3, max_new_tokens_per_turn=24, max_episode_tokens=180)
    sampling = SamplingParams(temperature=0.9)
    trajectories, stats = run_episodes(engine, TOKENIZER, ToolLookupEnv(), [5, 7, 9], 2, sampling, config)
    assert [t.group for t in trajectories] == [0, 0, 1, 1, 2, 2]
    assert sum(t.turns >= 2 for t in trajectories) >= 2, "the test needs multi-turn episodes"
    assert any(len(t.tokens) == 180 for t in trajectories), "and a last turn clipped to the token budget"
    assert all(len(t.tokens) <= 180 for t in trajectories)
    sampled_at = {}  # prompt -> what the engine sampled after it (the group's twins share prompts)
    for prompt, tokens, logprobs in engine.calls:
        sampled_at.setdefault(tuple(prompt), []).append((tokens, logprobs))
    for trajectory in trajectories:
        tokens, mask, logprobs = trajectory.tokens, trajectory.loss_mask, trajectory.rollout_logprobs
        starts = [t for t in range(1, len(mask)) if mask[t] and not mask[t - 1]]
        assert len(starts) == trajectory.turns
        for start in starts:  # each trained run is exactly what the engine sampled, given exactly this prefix
            end = mask.index(0, start) if 0 in mask[start:] else len(mask)
            candidates = sampled_at[tuple(tokens[:start])]
            assert (tokens[start:end], logprobs[start:end]) in [
                (t[: end - start], lp[: end - start]) for t, lp in candidates
            ]
            if end < len(mask):  # environment text: a message, then the next <|start|>assistant
                following = tokens[end : starts[starts.index(start) + 1]]
                assert following[0] == TOKENIZER.special["<|start|>"] and following[-len(PROMPT) :] == PROMPT
        assert all(lp == 0.0 for lp, m in zip(logprobs, mask) if not m)
        # token-in / token-out: the trainer's log-probs of the stored sequence match the engine's
        sequence = torch.tensor([tokens])
        with torch.no_grad():
            hidden = model(sequence, return_hidden=True)[:, :-1]
            trainer, _ = token_logprobs_and_entropy(hidden, model.lm_head.weight, sequence[:, 1:], 0.9)
        trained = torch.tensor(mask[1:], dtype=torch.bool)
        assert (trainer[0][trained] - torch.tensor(logprobs[1:])[trained]).abs().max() < 1e-4
    assert stats["episodes"] == 6 and stats["turns_mean"] == sum(t.turns for t in trajectories) / 6


def test_real_engine_episodes_carry_the_routing_the_engine_ran():
    """``record_routing``: every trajectory's routing covers all its tokens (a last turn clipped to
    the budget included), holds at each position the experts the trainer's own forward of the
    stored sequence chooses (fp32), and leaves only the last token unrouted: each turn's last token
    and the environment's reply take the experts of the next turn's prefill."""
    model = tiny_model(seed=0, vocab_size=TOKENIZER.vocab_size).eval()
    with torch.no_grad():  # as in the test above: several turns, a clipped last turn
        for name in ("<|call|>", "<|end|>", "<|return|>"):
            model.lm_head.weight[TOKENIZER.special[name]] *= 3
    engine = NativeEngine(model, seed=7, record_routing=True)
    config = AgentLoopConfig(max_turns=3, max_new_tokens_per_turn=24, max_episode_tokens=180)
    sampling = SamplingParams(temperature=0.9)
    trajectories, _ = run_episodes(engine, TOKENIZER, ToolLookupEnv(), [5, 7, 9], 2, sampling, config)
    assert sum(t.turns >= 2 for t in trajectories) >= 2 and any(len(t.tokens) == 180 for t in trajectories)
    shape = (model.args.num_hidden_layers, model.args.num_experts_per_tok)
    for trajectory in trajectories:
        routing = trajectory.routing
        assert routing.shape == (len(trajectory.tokens), *shape)
        routed = routing[:, 0, 0] != UNROUTED
        assert routed[:-1].all() and not routed[-1]  # the last token conditioned nothing
        with torch.no_grad():
            _, own = model(torch.tensor([trajectory.tokens]), return_expert_indices=True)
        own = own[:, 0].transpose(0, 1)
        assert torch.equal(routing[routed].long().sort(-1).values, own[routed].sort(-1).values)


def test_extend_routing_keeps_the_first_recorded_experts():
    """Each turn's call re-routes the earlier positions (its prefill); a position keeps the routing
    under which the engine sampled after it, and only unrouted positions take the new call's."""
    first = torch.tensor([[[1, 2]], [[3, 4]], [[UNROUTED, UNROUTED]]], dtype=torch.int16)  # 3 positions
    second = torch.tensor([[[5, 6]], [[3, 4]], [[7, 0]], [[2, 1]]], dtype=torch.int16)  # 4 positions
    merged = extend_routing(first, second)
    assert merged.tolist() == [[[1, 2]], [[3, 4]], [[7, 0]], [[2, 1]]]
    assert extend_routing(None, second).tolist() == second.tolist()
    assert extend_routing(first, None) is first
    assert pad_routing(first, 5)[3:].eq(UNROUTED).all() and torch.equal(pad_routing(first, 5)[:3], first)
    with pytest.raises(ValueError, match="a routing of 3 positions for 2 tokens"):
        pad_routing(first, 2)


def test_a_raising_reward_function_is_contained_and_counted():
    class BrokenReward(ToolLookupEnv):
        def reward(self, transcript):
            raise ZeroDivisionError("bug in the user's reward")

    model = tiny_model(seed=1, vocab_size=TOKENIZER.vocab_size).eval()
    config = AgentLoopConfig(max_turns=2, max_new_tokens_per_turn=8, max_episode_tokens=160)
    with pytest.warns(UserWarning, match="reward function raised ZeroDivisionError"):
        trajectories, stats = run_episodes(
            NativeEngine(model, seed=0), TOKENIZER, BrokenReward(), [1, 2], 2, SamplingParams(), config
        )
    assert [t.reward for t in trajectories] == [0.0] * 4
    assert stats["reward_errors"] == 4 and stats["errors"] >= 4


class LongFirstTaskEnv(ScriptedToolsEnv):
    def reset(self, index: int) -> EpisodeStart:
        start = super().reset(index)
        return EpisodeStart([Message("user", "word " * (300 if index == 0 else 1))], start.tools, index)


def test_opening_prompts_over_the_episode_budget():
    """Every task's: the settings cannot work, a clear error naming them (such episodes failed later,
    in packing, with advice about rollout.max_new_tokens). One long task among others: a warning,
    its episodes end before sampling, the run goes on."""
    env = LongFirstTaskEnv()
    budget = len(start_episode(env, 1, 0, TOKENIZER).tokens) + 40  # task 1 fits, task 0 does not
    engine = NativeEngine(tiny_model(seed=0, vocab_size=TOKENIZER.vocab_size), seed=0)
    config = AgentLoopConfig(max_episode_tokens=budget, max_new_tokens_per_turn=8, max_turns=1)
    with pytest.raises(ValueError, match=r"raise env\.max_episode_tokens") as minimal:
        run_episodes(engine, TOKENIZER, env, [0, 0], 1, SamplingParams(), config)
    assert "system_prompt" not in str(minimal.value)  # already the minimal style: no such advice
    gpt_oss = dataclasses.replace(config, system_style="gpt-oss")
    with pytest.raises(ValueError, match=r"env\.system_prompt = 'minimal' drops the gpt-oss system message"):
        run_episodes(engine, TOKENIZER, env, [0, 0], 1, SamplingParams(), gpt_oss)
    with pytest.warns(UserWarning, match="task 0's opening prompt"):
        trajectories, _ = run_episodes(engine, TOKENIZER, env, [0, 1], 2, SamplingParams(), config)
    assert [sum(t.loss_mask) == 0 for t in trajectories] == [True, True, False, False]


def test_gpt_oss_episodes_call_the_builtin_python_tool_with_raw_code():
    """In the gpt-oss style the math env's python tool is gpt-oss's built-in: the model sends raw
    code to=python on the analysis channel, the code runs, its output comes back from python on
    that channel; a malformed call is answered by python too. In the minimal style the same tool is
    functions.python with JSON arguments."""
    from titan_rl.rl.envs.math_task import MathEnv, MathProblem
    from titan_rl.rl.envs.python_tool import PythonSandbox

    env = MathEnv([MathProblem("What is 6 times 7?", "42")], python=PythonSandbox(isolate=False))
    config = AgentLoopConfig(system_style="gpt-oss")
    episode = start_episode(env, 0, group=0, tokenizer=TOKENIZER, style="gpt-oss")
    assert "## python\n\nUse this tool to execute Python code" in TOKENIZER.decode(episode.tokens)
    call = Message("assistant", "print(6 * 7)", channel="analysis", recipient="python")
    broken = Message("assistant", "print(1)", channel="analysis", recipient="python")
    turns = [
        sampled_turn(call),
        sampled_turn(broken, "<|end|>"),
        sampled_turn(final_answer("42"), "<|return|>"),
    ]
    start = len(episode.tokens)
    for turn in turns:
        step_episodes(env, TOKENIZER, [episode], [turn], config)
    output = Message("python", "42\n", channel="analysis", recipient="assistant")
    error = Message(
        "python", "Error: a message to python must end with <|call|>, not <|end|>", channel="analysis",
        recipient="assistant",
    )  # fmt: skip
    a, b, final = turns
    assert episode.tokens[start:] == a.tokens + context(output) + b.tokens + context(error) + final.tokens
    (ran,) = episode.transcript.tool_calls
    assert (ran.name, ran.arguments, ran.result, ran.ok) == ("python", {"code": "print(6 * 7)"}, "42\n", True)
    assert env.reward(episode.transcript) == 1.0 and episode.tool_errors == 1

    minimal = start_episode(env, 0, group=0, tokenizer=TOKENIZER, style="minimal")
    step_episodes(env, TOKENIZER, [minimal], [sampled_turn(call)], AgentLoopConfig())
    assert minimal.transcript.tool_calls == [] and minimal.parse_errors == 1  # to=python: not a function

    # in the gpt-oss style python is not offered as a function: functions.python runs nothing, and
    # the error comes from functions.python (the recipient it called), naming how to call python
    as_function = start_episode(env, 0, group=0, tokenizer=TOKENIZER, style="gpt-oss")
    before = len(as_function.tokens)
    function_call = tool_call("python", '{"code": "print(1)"}')
    step_episodes(env, TOKENIZER, [as_function], [sampled_turn(function_call)], config)
    unknown = tool_result("python", "Error: unknown tool 'functions.python'; available: python")
    assert as_function.tokens[before:] == sampled_turn(function_call).tokens + context(unknown)
    assert as_function.transcript.tool_calls == [] and as_function.tool_errors == 1

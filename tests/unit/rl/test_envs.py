"""The built-in agentic environments: the lookup tool task and GSM8K-style math."""

from __future__ import annotations

import json
import re
from fractions import Fraction

import pytest

from titan_rl.rl.agent_loop import AgentLoopConfig, demonstration_trajectory, start_episode, step_episodes
from titan_rl.rl.envs.agentic import ToolCall, Transcript
from titan_rl.rl.envs.math_task import (
    SAMPLE_PATH,
    MathEnv,
    MathProblem,
    extract_answer,
    is_correct,
    load_math_jsonl,
)
from titan_rl.rl.envs.python_tool import PythonSandbox
from titan_rl.rl.envs.tool_task import FORMAT_CREDIT, ToolLookupEnv
from titan_rl.rl.harmony import generation_prompt, render_message
from titan_rl.rl.rollout import Completion
from titan_rl.rl.tokenizer import build_tiny_tokenizer

TOKENIZER = build_tiny_tokenizer()


def test_lookup_tasks_are_deterministic_and_need_the_tool():
    env = ToolLookupEnv(num_tasks=50, seed=1)
    assert len(env) == 50 and env.task(3) == ToolLookupEnv(num_tasks=50, seed=1).task(3)
    assert env.task(3) != ToolLookupEnv(num_tasks=50, seed=2).task(3)
    start = env.reset(3)
    task = start.state
    assert start.messages[-1].content == f"What is the value of {task.key}?"
    assert task.answer not in "".join(m.content for m in start.messages)
    assert [t.name for t in start.tools] == ["lookup"]
    assert env.call_tool(task, "lookup", {"key": task.key}) == task.answer
    for bad in ({"key": "nope"}, {"name": task.key}, {"key": task.key, "x": 1}):
        with pytest.raises((KeyError, ValueError)):
            env.call_tool(task, "lookup", bad)
    with pytest.raises(IndexError):
        env.task(50)


def test_lookup_reward():
    env = ToolLookupEnv()
    task = env.task(0)
    looked_up = [ToolCall("lookup", {"key": task.key}, task.answer, ok=True)]
    assert env.reward(Transcript(task, tool_calls=looked_up, final_answer=f" {task.answer}\n")) == 1.0
    assert env.reward(Transcript(task, tool_calls=looked_up, final_answer="nope")) == FORMAT_CREDIT
    assert env.reward(Transcript(task, tool_calls=looked_up)) == FORMAT_CREDIT
    failed = [ToolCall("lookup", {"key": "x"}, "Error", ok=False)]
    assert env.reward(Transcript(task, tool_calls=failed, final_answer="nope")) == 0.0
    assert env.reward(Transcript(task)) == 0.0


def test_lookup_demonstration_played_through_the_loop_earns_full_reward():
    env, prompt = ToolLookupEnv(), generation_prompt(TOKENIZER)
    replies = env.demonstration(4)
    episode = start_episode(env, 4, 0, TOKENIZER)
    for message in replies[0::2]:  # the assistant turns; the loop adds the tool result itself
        stop = "<|return|>" if message.channel == "final" else None
        tokens = render_message(message, TOKENIZER, stop)[len(prompt) :]
        step_episodes(
            env, TOKENIZER, [episode], [Completion(tokens, [0.0] * len(tokens), "stop")], AgentLoopConfig()
        )
    assert episode.end == "answer" and env.reward(episode.transcript) == 1.0
    demo = demonstration_trajectory(env.reset(4), replies, TOKENIZER)
    assert demo.tokens == episode.tokens and demo.loss_mask == episode.loss_mask
    assert len(demo.tokens) < 160 and demo.response_len < 40, "short enough for a tiny CPU model"


def test_the_shipped_math_sample_is_consistent():
    problems = load_math_jsonl(SAMPLE_PATH)
    assert len(problems) >= 20
    equation = re.compile(r"((?:\d+(?:\.\d+)?\s*[-+*/]\s*)+\d+(?:\.\d+)?)\s*=\s*(\d+(?:\.\d+)?)")
    for row in map(json.loads, SAMPLE_PATH.read_text().splitlines()):
        solution, gold = row["answer"].split("####")
        steps = equation.findall(solution)
        assert steps, row["question"]
        for left, right in steps:  # every step of the worked solution is right
            assert Fraction(eval(left)) == Fraction(right), (row["question"], left, right)
        assert Fraction(steps[-1][1]) == Fraction(gold.strip())


def test_math_loader_reads_gsm8k_and_bare_answers_and_names_bad_lines(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(
        '{"question": "1+1?", "answer": "1 + 1 = 2\\n#### 2"}\n\n{"question": "q", "answer": 7}\n'
    )
    assert load_math_jsonl(good) == [MathProblem("1+1?", "2"), MathProblem("q", "7")]
    for name, text, message in [
        ("bad.jsonl", '{"question": "q", "answer": "1"}\n{oops\n', r"bad\.jsonl:2: not valid JSON"),
        (
            "keys.jsonl",
            '{"q": "x", "answer": "1"}\n',
            r"keys\.jsonl:1: each line needs 'question' and 'answer'",
        ),
        ("empty.jsonl", "\n", "no problems found"),
    ]:
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_math_jsonl(path)
    with pytest.raises(FileNotFoundError, match="is a folder, not a JSONL file"):
        load_math_jsonl(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_math_jsonl(tmp_path / "missing.jsonl")


@pytest.mark.parametrize(
    ("answer", "gold", "correct"),
    [
        ("42", "42", True),
        ("The answer is 5,400.", "5400", True),
        ("$20.00", "20", True),
        ("First 3, then \\boxed{48} and 9", "48", True),
        ("-3", "-3", True),
        ("41", "42", False),
        ("no idea", "42", False),
        (None, "42", False),
        ("Paris", "paris", True),
        # fractions are read whole (they were "3 then 4": a gold 3/4 expected 3 and got 4)
        ("3/4", "3/4", True),
        ("0.75", "3/4", True),
        ("1/2 of them", "0.5", True),
        ("\\boxed{\\frac{3}{4}}", "0.75", True),
        ("so \\dfrac{1}{2}", "1/2", True),
        ("3/4", "3", False),
        ("$18/hour", "18", True),
    ],
)
def test_exact_answer_matching(answer, gold, correct):
    assert is_correct(answer, gold) == correct


def test_extract_answer_takes_the_last_number():
    assert extract_answer("12 apples and 30 pears: 42") == 42
    assert extract_answer("nothing") is None


def test_math_env_with_and_without_the_python_tool():
    plain = MathEnv()
    start = plain.reset(0)
    assert start.tools == [] and [m.role for m in start.messages] == ["system", "developer", "user"]
    problem = start.state
    assert plain.reward(Transcript(problem, final_answer=f"It is {problem.answer}.")) == 1.0
    assert plain.reward(Transcript(problem, final_answer="0")) == 0.0
    with pytest.raises(ValueError, match="unknown tool"):
        plain.call_tool(problem, "python", {"code": "print(1)"})
    tooled = MathEnv([MathProblem("2 ** 10?", "1024")], python=PythonSandbox())
    start = tooled.reset(0)
    assert [t.name for t in start.tools] == ["python"] and "python tool" in start.messages[1].content
    assert tooled.call_tool(start.state, "python", {"code": "print(2 ** 10)"}) == "1024\n"
    with pytest.raises(ValueError, match="one string argument"):
        tooled.call_tool(start.state, "python", {"source": "print(1)"})

"""README's "Writing an environment" example: short, correct, and it runs through the real agent loop."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from titan_rl.model import GptOss, GptOssModelArgs
from titan_rl.rl.agent_loop import AgentLoopConfig, run_episodes
from titan_rl.rl.envs.agentic import Message, ToolCall, Transcript, final_answer, tool_call
from titan_rl.rl.harmony import generation_prompt, render_message
from titan_rl.rl.rollout import Completion, NativeEngine, SamplingParams
from titan_rl.rl.tokenizer import build_tiny_tokenizer

README = Path(__file__).resolve().parents[2] / "README.md"
TOKENIZER = build_tiny_tokenizer()
QUESTION = re.compile(r"What is (\d+) \* (\d+)\?")
TOOL_RESULT = re.compile(
    r"functions\.multiply to=assistant<\|channel\|>commentary<\|message\|>(.*?)<\|end\|>"
)


def readme_block(marker: str) -> str:
    """The ```python block of README.md whose first line is ``# readme-example: MARKER``."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    found = [b for b in blocks if b.splitlines()[0].strip() == f"# readme-example: {marker}"]
    assert len(found) == 1, (
        f"README.md needs exactly one python block starting with '# readme-example: {marker}'"
    )
    return found[0]


@pytest.fixture(scope="module")
def example() -> dict:
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(readme_block("environment"), "README.md (environment)", "exec"), namespace)
    return namespace


def operands(env, index: int) -> tuple[int, int]:
    a, b = QUESTION.search(env.reset(index).messages[-1].content).groups()
    return int(a), int(b)


def check_well_formed(trajectories, groups: int, group_size: int) -> None:
    assert [t.group for t in trajectories] == [g for g in range(groups) for _ in range(group_size)]
    for t in trajectories:
        assert len(t.tokens) == len(t.loss_mask) == len(t.rollout_logprobs) > 0
        assert set(t.loss_mask) <= {0, 1} and t.loss_mask[0] == 0 and sum(t.loss_mask) > 0
        assert all(lp == 0.0 for lp, m in zip(t.rollout_logprobs, t.loss_mask) if not m)
        assert all(lp <= 0.0 for lp, m in zip(t.rollout_logprobs, t.loss_mask) if m)
        assert all(0 <= token < TOKENIZER.vocab_size for token in t.tokens)
        assert 0.0 <= t.reward <= 1.0


def test_the_environment_block_is_short_and_implements_the_protocol(example):
    code = readme_block("environment")
    assert len(code.splitlines()) < 30, f"the README example has {len(code.splitlines())} lines; keep it < 30"
    env = example["MultiplyEnv"]()
    for method in ("__len__", "reset", "call_tool", "reward"):  # titan_rl.rl.envs.AgentEnvironment
        assert callable(getattr(env, method))
    assert len(env) > 0
    start = env.reset(7)
    assert [tool.name for tool in start.tools] == ["multiply"]
    assert start.messages and all(isinstance(m, Message) for m in start.messages)
    json.dumps(start.tools[0].parameters)  # a JSON schema


def test_tool_and_reward_on_hand_made_transcripts(example):
    env = example["MultiplyEnv"]()
    for index in (0, 5, 123, len(env) - 1):
        start = env.reset(index)
        a, b = operands(env, index)
        assert start.state == a * b
        assert env.call_tool(start.state, "multiply", {"a": a, "b": b}) == str(a * b)
        right, wrong = str(a * b), str(a * b + 1)
        call = ToolCall("multiply", {"a": a, "b": b}, right, ok=True)
        failed = ToolCall("multiply", {"a": "x"}, "Error: ...", ok=False)
        transcript = lambda answer, calls, s=start: Transcript(s.state, list(s.messages), calls, answer)
        assert env.reward(transcript(right, [call])) == 1.0
        assert env.reward(transcript(f" {right}\n", [])) == 1.0
        assert env.reward(transcript(wrong, [call])) == 0.1
        assert env.reward(transcript(None, [call])) == 0.1
        assert env.reward(transcript(wrong, [failed])) == 0.0
        assert env.reward(transcript(None, [])) == 0.0
    with pytest.raises((KeyError, ValueError)):
        env.call_tool(env.reset(0).state, "multiply", {"a": "seven"})


class ScriptedEngine:
    """Plays a correct episode: call multiply with the question's numbers, then answer what it returned."""

    def __init__(self) -> None:
        self.prefix = generation_prompt(TOKENIZER)

    def turn(self, message: Message, stop: str | None = None) -> Completion:
        tokens = render_message(message, TOKENIZER, stop)[len(self.prefix) :]
        return Completion(tokens, [-0.5] * len(tokens), "stop")

    def generate(self, prompts, params):
        out = []
        for prompt in prompts:
            text = TOKENIZER.decode(list(prompt))
            a, b = (int(x) for x in QUESTION.search(text).groups())
            result = TOOL_RESULT.search(text)
            if result:  # the tool answered: repeat its result as the final answer
                out.append(self.turn(final_answer(result.group(1)), "<|return|>"))
            else:
                out.append(self.turn(tool_call("multiply", json.dumps({"a": a, "b": b}))))
        return out

    def update_weights(self, model) -> None:
        pass


def test_a_correct_episode_through_the_agent_loop_gets_reward_1(example):
    env = example["MultiplyEnv"]()
    config = AgentLoopConfig(max_turns=3, max_new_tokens_per_turn=64, max_episode_tokens=512)
    trajectories, stats = run_episodes(
        ScriptedEngine(), TOKENIZER, env, [0, 9, 200], 2, SamplingParams(), config
    )
    check_well_formed(trajectories, groups=3, group_size=2)
    assert [t.reward for t in trajectories] == [1.0] * 6
    assert [(t.turns, t.tool_calls, t.tool_errors) for t in trajectories] == [(2, 1, 0)] * 6
    assert stats["end_answer"] == 1.0 and stats["errors"] == 0


def test_real_episodes_with_the_tiny_model(example):
    env = example["MultiplyEnv"]()
    torch.manual_seed(0)
    model = GptOss(GptOssModelArgs.from_preset("debug")).eval()
    config = AgentLoopConfig(max_turns=3, max_new_tokens_per_turn=32, max_episode_tokens=256)
    sampling = SamplingParams(temperature=1.0)
    trajectories, stats = run_episodes(
        NativeEngine(model, seed=0), TOKENIZER, env, [0, 1, 2], 2, sampling, config
    )
    check_well_formed(trajectories, groups=3, group_size=2)
    assert all(len(t.tokens) <= 256 for t in trajectories)
    assert stats["episodes"] == 6 and stats["reward_errors"] == 0


def test_the_episodes_block_runs(example, capsys):
    namespace = dict(example)
    torch.manual_seed(0)
    exec(compile(readme_block("episodes"), "README.md (episodes)", "exec"), namespace)
    check_well_formed(namespace["trajectories"], groups=2, group_size=4)
    assert namespace["stats"]["episodes"] == 8
    assert capsys.readouterr().out.strip()


def test_run_train_trains_on_the_readme_environment_by_module_path(tmp_path):
    """The README's command: the example saved as my_envs.py, --env.name=my_envs:MultiplyEnv."""
    import os
    import subprocess

    (tmp_path / "my_envs.py").write_text(readme_block("environment"))
    dump = tmp_path / "run"
    args = ["--env.name=my_envs:MultiplyEnv", "--sft.steps=0", "--training.steps=2"]
    args += ["--training.seq_len=256", "--env.max_episode_tokens=256", "--rollout.max_new_tokens=24"]
    result = subprocess.run(
        ["./run_train.sh", *args, "--rollout.prompts_per_step=2", f"--job.dump_folder={dump}"],
        cwd=README.parent,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": str(tmp_path), "CONFIG_FILE": "train_configs/smoke_cpu.toml"},
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    rows = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("env/tool_calls" in r for r in rows)


@pytest.mark.parametrize(
    "name,message",
    [
        ("no_such_module_xyz:Env", "cannot import 'no_such_module_xyz'"),
        ("my_envs:Missing", "my_envs has no class or function 'Missing'"),
        ("my_envs:NotAnEnv", "NotAnEnv lacks __len__, call_tool, reward"),
    ],
)
def test_a_bad_user_environment_is_one_config_error(tmp_path, monkeypatch, name, message):
    from titan_rl.config import ConfigError, load_config
    from titan_rl.preflight import check_inputs

    (tmp_path / "my_envs.py").write_text("class NotAnEnv:\n    def reset(self, index):\n        pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(None, [f"--env.name={name}", "--training.seq_len=512"])
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_inputs(cfg)


def test_a_factory_function_is_checked_when_built_and_sft_needs_demonstrations(tmp_path, monkeypatch):
    from titan_rl.config import ConfigError, load_config
    from titan_rl.preflight import check_inputs
    from titan_rl.rl.collect import build_env

    (tmp_path / "fn_envs.py").write_text(
        readme_block("environment")
        + "\n\ndef make():\n    return MultiplyEnv()\n\n\ndef broken():\n    return 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(None, ["--env.name=fn_envs:make", "--training.seq_len=512"])
    check_inputs(cfg)
    assert type(build_env(cfg, 512)).__name__ == "MultiplyEnv"
    broken = load_config(None, ["--env.name=fn_envs:broken", "--training.seq_len=512"])
    with pytest.raises(ConfigError, match="int lacks __len__, reset, call_tool, reward"):
        build_env(broken, 512)
    for name in ("fn_envs:MultiplyEnv", "math"):
        with pytest.raises(ConfigError, match=r"sft\.steps = 5"):
            check_inputs(load_config(None, [f"--env.name={name}", "--sft.steps=5", "--training.seq_len=512"]))


def test_an_environment_that_cannot_be_built_or_started_is_a_one_line_error(tmp_path, monkeypatch):
    """Mistakes in your own environment: a factory that needs arguments (before launch), no tasks, and
    reset() returning something else than an EpisodeStart (errors, not tracebacks from the agent loop)."""
    from titan_rl.config import ConfigError, load_config
    from titan_rl.preflight import check_inputs
    from titan_rl.rl.agent_loop import start_episode
    from titan_rl.rl.collect import build_env
    from titan_rl.rl.tokenizer import build_tiny_tokenizer

    (tmp_path / "bad_envs.py").write_text(
        readme_block("environment")
        + "\n\nclass NeedsArgs(MultiplyEnv):\n    def __init__(self, path):\n        super().__init__()\n"
        + "\n\nclass Empty(MultiplyEnv):\n    def __len__(self):\n        return 0\n"
        + "\n\nclass Tuple(MultiplyEnv):\n    def reset(self, index):\n"
        + "        return tuple(super().reset(index).messages)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    def cfg(name):
        return load_config(None, [f"--env.name=bad_envs:{name}", "--training.seq_len=512"])

    with pytest.raises(ConfigError, match="NeedsArgs must be callable with no arguments"):
        check_inputs(cfg("NeedsArgs"))
    with pytest.raises(ConfigError, match="has no tasks"):
        build_env(cfg("Empty"), 512)
    env = build_env(cfg("Tuple"), 512)
    with pytest.raises(ValueError, match=r"Tuple.reset\(0\) returned tuple, not an EpisodeStart"):
        start_episode(env, 0, 0, build_tiny_tokenizer())

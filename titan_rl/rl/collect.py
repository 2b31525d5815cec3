"""From config to trajectories: build the environment (and tokenizer), run one step's episodes."""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable

from titan_rl.config import ConfigError, JobConfig
from titan_rl.rl.agent_loop import AgentLoopConfig, demonstration_trajectory, run_episodes
from titan_rl.rl.calls import safe_rewards
from titan_rl.rl.envs import (
    AgentEnvironment,
    Environment,
    MathEnv,
    PythonSandbox,
    SandboxLimits,
    TokenPreferenceEnv,
    ToolLookupEnv,
)
from titan_rl.rl.rollout import RolloutEngine, SamplingParams
from titan_rl.rl.routing_replay import pad_routing
from titan_rl.rl.shared import computed_once
from titan_rl.rl.tokenizer import TINY_VOCAB, Tokenizer, build_tiny_tokenizer
from titan_rl.rl.types import Trajectory

AGENTIC = ("tool_lookup", "math")  # and every user environment, "module:Factory"
AGENT_METHODS = ("__len__", "reset", "call_tool", "reward")


def is_agentic(cfg: JobConfig) -> bool:
    """Multi-turn Harmony episodes (they need a tokenizer), as opposed to the single-turn toy."""
    return cfg.env.name in AGENTIC or ":" in cfg.env.name


def build_env(cfg: JobConfig, vocab_size: int, run_tools: bool = True) -> Environment | AgentEnvironment:
    """The configured environment; ``run_tools`` False builds one only to render its prompts (its
    Python tool does not probe the sandbox's isolation)."""
    env = cfg.env
    if ":" in env.name:
        built = load_user_env(env.name)()
        check_agent_env(built, env.name)
        if len(built) == 0:
            raise ConfigError(f"env.name = {env.name!r}: the environment has no tasks (len() is 0)")
        return built
    if env.name == "token_preference":
        return TokenPreferenceEnv(vocab_size, env.prompt_len, env.target_modulus, seed=cfg.job.seed)
    if env.name == "tool_lookup":
        return ToolLookupEnv(env.num_tasks, env.keys_per_task, seed=cfg.job.seed)
    isolate = None if env.allow_unisolated_python_tool else True  # None: fall back with a warning
    isolate = isolate if run_tools else False
    # the code's wall-clock (and CPU) limit is the tool call's less its start-up (a second, at most half
    # the limit), so the sandbox stops it first and the model sees what it printed and why it stopped
    limits = SandboxLimits(timeout_s=max(env.tool_timeout_s - 1.0, env.tool_timeout_s / 2))
    python = PythonSandbox(limits, isolate=isolate) if env.python_tool else None
    return MathEnv.from_jsonl(env.data_path, python) if env.data_path else MathEnv(python=python)


def load_user_env(name: str) -> Callable[[], AgentEnvironment]:
    """``env.name = "package.module:Factory"``: a class (or function) that builds an AgentEnvironment
    with no arguments; its module must be importable (e.g. on PYTHONPATH). A class is checked for
    the AgentEnvironment methods here, before anything is built; what a function returns is
    checked by ``build_env``."""
    module_name, _, attribute = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            f"env.name = {name!r}: cannot import {module_name!r} ({e}); is it on PYTHONPATH?"
        ) from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ConfigError(f"env.name = {name!r}: {module_name} has no class or function {attribute!r}")
    if isinstance(factory, type):
        check_agent_env(factory, name)
    try:  # built on every rank with no arguments: say so now rather than with a traceback there
        inspect.signature(factory).bind()
    except TypeError as e:
        raise ConfigError(
            f"env.name = {name!r}: {attribute} must be callable with no arguments ({e})"
        ) from None
    except ValueError:
        pass  # no signature to read (a builtin): the call will tell
    return factory


def check_agent_env(env: object, name: str) -> None:
    """A ConfigError naming the AgentEnvironment methods ``env`` (a class or instance) lacks."""
    missing = [m for m in AGENT_METHODS if not callable(getattr(env, m, None))]
    if missing:
        what = env.__name__ if isinstance(env, type) else type(env).__name__
        raise ConfigError(
            f"env.name = {name!r}: an AgentEnvironment needs {', '.join(AGENT_METHODS)}; "
            f"{what} lacks {', '.join(missing)}"
        )


def build_tokenizer(cfg: JobConfig, vocab_size: int) -> Tokenizer | None:
    """The checkpoint's tokenizer.json, or the project's tiny tokenizer for the debug model."""
    if not is_agentic(cfg):
        return None
    if cfg.model.hf_path:
        return Tokenizer.from_folder(cfg.model.hf_path)
    check_tiny_tokenizer_fits(cfg, vocab_size)
    return build_tiny_tokenizer(vocab_size)


def check_tiny_tokenizer_fits(cfg: JobConfig, vocab_size: int) -> None:
    """An agentic run without ``model.hf_path`` uses the built-in 512-token tokenizer: the model's
    vocabulary must be its size (the debug preset's)."""
    if is_agentic(cfg) and not cfg.model.hf_path and vocab_size != TINY_VOCAB:
        raise ConfigError(
            f"env.name = {cfg.env.name!r} without model.hf_path uses the built-in 512-token tokenizer, "
            f"but the model's vocab is {vocab_size}; use model.preset = 'debug' or give model.hf_path"
        )


def check_opening_prompts(cfg: JobConfig, vocab_size: int, tasks: int = 8) -> None:
    """A ConfigError when none of the first ``tasks`` opening prompts of a built-in agentic
    environment fits in ``env.max_episode_tokens`` (the run's first rollout would fail so, after
    the model is built); your own environments are checked there."""
    if not is_agentic(cfg) or ":" in cfg.env.name:
        return
    from titan_rl.rl.agent_loop import start_episode

    tokenizer = build_tokenizer(cfg, vocab_size)
    env, style = build_env(cfg, vocab_size, run_tools=False), system_style(cfg, tokenizer)
    shortest = min(
        len(start_episode(env, i, 0, tokenizer, style).tokens) for i in range(min(tasks, len(env)))
    )
    budget = cfg.env.max_episode_tokens
    if shortest >= budget:
        shorter = (
            " or env.system_prompt = 'minimal' (drops the gpt-oss system message)"
            if style == "gpt-oss"
            else ""
        )
        raise ConfigError(
            f"env.max_episode_tokens = {budget} leaves no room to sample: {cfg.env.name}'s opening prompts "
            f"are {shortest}+ tokens ({style} style); raise it (and training.seq_len){shorter}"
        )


def sampling_params(cfg: JobConfig) -> SamplingParams:
    r = cfg.rollout
    return SamplingParams(
        temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens
    )


def collect_rollouts(
    engine: RolloutEngine, env, tokenizer: Tokenizer | None, step: int, cfg: JobConfig
) -> tuple[list[Trajectory], dict[str, float]]:
    """``prompts_per_step`` tasks x ``group_size`` episodes for RL step ``step`` (1-based)."""
    per_step, group = cfg.rollout.prompts_per_step, cfg.rollout.group_size
    if tokenizer is not None:  # multi-turn agentic episodes
        indices = [((step - 1) * per_step + i) % len(env) for i in range(per_step)]
        loop = AgentLoopConfig(
            max_turns=cfg.env.max_turns,
            max_episode_tokens=cfg.env.max_episode_tokens,
            max_new_tokens_per_turn=cfg.rollout.max_new_tokens,
            tool_timeout_s=cfg.env.tool_timeout_s,
            reward_timeout_s=cfg.env.reward_timeout_s,
            reward_concurrency=cfg.env.reward_concurrency,
            system_style=system_style(cfg, tokenizer),
        )
        trajectories, stats = run_episodes(engine, tokenizer, env, indices, group, sampling_params(cfg), loop)
        return trajectories, {f"env/{k}": v for k, v in stats.items()}
    prompts = env.prompts(step, per_step)
    repeated = [p for p in prompts for _ in range(group)]
    completions = engine.generate(repeated, sampling_params(cfg))
    rewards = computed_once(  # each on one rank, shared: a reward that samples cannot split the ranks
        list(range(len(repeated))),
        lambda mine: safe_rewards(
            [functools.partial(env.reward, repeated[i], completions[i].tokens) for i in mine],
            cfg.env.reward_timeout_s,
            concurrency=cfg.env.reward_concurrency,
        ),
    )
    trajectories = [
        Trajectory(
            tokens=prompt + c.tokens,
            loss_mask=[0] * len(prompt) + [1] * len(c.tokens),
            rollout_logprobs=[0.0] * len(prompt) + c.logprobs,
            reward=reward,
            group=i // group,
            routing=pad_routing(c.routing, len(prompt) + len(c.tokens)),
        )
        for i, (prompt, c, (reward, _)) in enumerate(zip(repeated, completions, rewards))
    ]
    errors = float(sum(failed for _, failed in rewards))  # a raising (hung, NaN) reward scores 0
    return trajectories, {"env/errors": errors, "env/reward_errors": errors}


def system_style(cfg: JobConfig, tokenizer: Tokenizer | None = None) -> str:
    """``env.system_prompt`` resolved: ``auto`` is gpt-oss for a released model (``model.hf_path``),
    minimal for a model with the built-in tokenizer (a debug-preset model, e.g. one converted to HF)."""
    style = cfg.env.system_prompt
    if style != "auto":
        return style
    tiny = tokenizer is not None and tokenizer.vocab_size <= TINY_VOCAB
    return "gpt-oss" if cfg.model.hf_path and not tiny else "minimal"


def demonstrations(
    env, tokenizer: Tokenizer | None, step: int, count: int, style: str = "minimal"
) -> list[Trajectory]:
    """Scripted correct episodes for the supervised warm-up (tasks from the end of the task list)."""
    if tokenizer is None or not hasattr(env, "demonstration"):
        raise ConfigError(
            f"sft.steps > 0 needs an environment with demonstrations (tool_lookup), not {env!r}"
        )
    indices = [len(env) - 1 - (step * count + i) % len(env) for i in range(count)]
    return [demonstration_trajectory(env.reset(i), env.demonstration(i), tokenizer, style) for i in indices]


__all__ = [
    "AGENTIC",
    "build_env",
    "build_tokenizer",
    "check_agent_env",
    "collect_rollouts",
    "demonstrations",
    "is_agentic",
    "load_user_env",
]

"""Multi-turn rollouts: the engine samples assistant turns, the environment answers them.

Every episode is one growing token sequence, token-in / token-out: the engine is prompted with
exactly ``episode.tokens``, its sampled tokens are appended unchanged (mask 1, engine log-probs),
and the environment's reply is rendered and appended (mask 0, log-prob 0) followed by the next
``<|start|>assistant``. Sampled tokens are decoded only to parse them, never re-encoded, so the
trainer sees exactly the tokens the engine conditioned on.

All active episodes generate together in one ``engine.generate`` call per round; all tool calls
of a round run concurrently in daemon threads with a timeout (a hung tool is abandoned, its
thread left to finish on its own). With several processes every rank runs every episode, but each
episode's tool calls and reward run on one rank and their results are shared
(``titan_rl.rl.shared``), so the ranks' episodes stay equal whatever the tools do.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from titan_rl.rl.calls import run_calls, safe_rewards, too_many_stranded
from titan_rl.rl.envs.agentic import (
    AgentEnvironment,
    EpisodeStart,
    Message,
    ToolCall,
    Transcript,
)
from titan_rl.rl.harmony import (
    STOP_TOKENS,
    ParseError,
    builtin_tools,
    generation_prompt,
    parse_assistant,
    render_conversation,
    render_message,
    tool_recipients,
    tool_reply,
)
from titan_rl.rl.rollout.engine import RolloutEngine
from titan_rl.rl.rollout.native import Completion
from titan_rl.rl.rollout.sampling import SamplingParams
from titan_rl.rl.routing_replay import extend_routing, pad_routing
from titan_rl.rl.shared import computed_once
from titan_rl.rl.tokenizer import Tokenizer
from titan_rl.rl.types import Trajectory


@dataclass
class AgentLoopConfig:
    max_turns: int = 8
    """Assistant turns (engine calls) per episode."""
    max_episode_tokens: int = 4096
    """Token budget of the whole episode: prompt, sampled turns and environment text."""
    max_new_tokens_per_turn: int = 512
    """Longest single assistant turn; a turn cut off here ends the episode."""
    tool_timeout_s: float = 10.0
    """Wall-clock limit of one tool call; the model gets an error message after it."""
    reward_timeout_s: float = 60.0
    """Wall-clock limit of one reward call (``safe_rewards``; 0: on the main thread, unlimited)."""
    reward_concurrency: int = 1
    """Reward calls running at once on a rank (with a time limit)."""
    max_tool_result_chars: int = 4000
    """Longer tool results (and error texts) are truncated before they are tokenized."""
    max_concurrent_tools: int = 16
    """Tool calls running at once across all episodes."""
    max_stranded_calls: int = 256
    """Abandoned tool / reward calls (past their time limit) still running, a thread each, past which
    new calls fail at once instead of starting more threads."""
    system_style: str = "minimal"
    """How the conversation's system and developer messages render (``harmony.render_conversation``):
    minimal, or gpt-oss for the released models."""


@dataclass
class EpisodeRollout:
    """A running episode: its token sequence so far and what happened in it."""

    start: EpisodeStart
    group: int
    transcript: Transcript
    number: int = 0  # its place among the step's episodes: the rank that runs its tools and reward
    tokens: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    rollout_logprobs: list[float] = field(default_factory=list)
    routing: torch.Tensor | None = None  # the engine's experts per position (routing_replay.py)
    turns: int = 0
    tool_errors: int = 0
    timeouts: int = 0
    parse_errors: int = 0
    # once finished: "answer", "max_turns", "budget" (no room for the next turn) or "cut_off" (a turn
    # hit max_new_tokens_per_turn or the budget before its stop token)
    end: str | None = None

    def append(self, tokens: list[int], sampled: bool, logprobs: list[float] | None = None) -> None:
        self.tokens += tokens
        self.loss_mask += [int(sampled)] * len(tokens)
        self.rollout_logprobs += logprobs if sampled and logprobs is not None else [0.0] * len(tokens)

    def to_trajectory(self, reward: float) -> Trajectory:
        return Trajectory(
            tokens=self.tokens,
            loss_mask=self.loss_mask,
            rollout_logprobs=self.rollout_logprobs,
            reward=reward,
            group=self.group,
            turns=self.turns,
            tool_calls=len(self.transcript.tool_calls),
            tool_errors=self.tool_errors,
            routing=pad_routing(self.routing, len(self.tokens)),
        )


def start_episode(
    env: AgentEnvironment, index: int, group: int, tokenizer: Tokenizer, style: str = "minimal"
) -> EpisodeRollout:
    """Reset task ``index``; the prompt (conversation + ``<|start|>assistant``) is context, mask 0."""
    start = env.reset(index)
    if not isinstance(start, EpisodeStart):
        raise ValueError(
            f"{type(env).__name__}.reset({index}) returned {type(start).__name__}, not an EpisodeStart "
            "(titan_rl.rl.envs.agentic.EpisodeStart(messages, tools, state))"
        )
    episode = EpisodeRollout(start, group, Transcript(state=start.state, messages=list(start.messages)))
    conversation = render_conversation(start.messages, start.tools, tokenizer, style)
    episode.append(conversation + generation_prompt(tokenizer), False)
    return episode


def truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}\n[... {len(text) - limit} more characters truncated]"


@dataclass
class ToolOutcome:
    text: str  # what the model sees (a result or an "Error: ..." message), already truncated
    ok: bool
    timed_out: bool = False


def run_tool_calls(calls: list[tuple[str, Callable[[], Any]]], config: AgentLoopConfig) -> list[ToolOutcome]:
    """Run ``(name, zero-argument call)`` pairs concurrently; each is limited to ``tool_timeout_s`` from
    the moment it starts. Raises, hangs, non-text and huge results all become an outcome. With
    ``max_stranded_calls`` abandoned calls still running, none starts (each gets an error)."""
    busy = too_many_stranded(config.max_stranded_calls, "tool calls") if calls else None
    if busy is not None:
        return [ToolOutcome(f"Error: {name} not run: {busy}", False) for name, _ in calls]
    threads = run_calls([call for _, call in calls], config.tool_timeout_s, config.max_concurrent_tools)
    limit, outcomes = config.max_tool_result_chars, []
    for (name, _), thread in zip(calls, threads):
        if thread.abandoned:
            outcome = ToolOutcome(f"Error: {name} timed out after {config.tool_timeout_s:g} s", False, True)
        elif thread.error is not None:
            error = f"Error: {name} raised {type(thread.error).__name__}: {thread.error}"
            outcome = ToolOutcome(truncate(error, limit), False)
        elif not isinstance(thread.value, str):
            outcome = ToolOutcome(f"Error: {name} returned {type(thread.value).__name__}, not text", False)
        else:
            outcome = ToolOutcome(truncate(thread.value, limit), True)
        outcomes.append(outcome)
    return outcomes


def step_episodes(
    env: AgentEnvironment,
    tokenizer: Tokenizer,
    episodes: list[EpisodeRollout],
    completions: list[Completion],
    config: AgentLoopConfig,
) -> None:
    """Apply one sampled turn to each episode: append it, parse it, run its tool call, append the reply."""
    replies: dict[int, Message] = {}
    # (episode position, tool name, arguments, the result's message from its text, called as a built-in)
    calls: list[tuple[int, str, dict[str, Any], Callable[[str], Message], bool]] = []
    prompt = generation_prompt(tokenizer)
    for i, (episode, completion) in enumerate(zip(episodes, completions)):
        episode.routing = extend_routing(episode.routing, completion.routing)
        episode.append(completion.tokens, True, completion.logprobs)
        episode.turns += 1
        if completion.finish_reason != "stop":
            episode.end = "cut_off"
            continue
        builtins = builtin_tools(episode.start.tools, config.system_style)
        turn = parse_assistant(completion.tokens, tokenizer, builtins)
        if isinstance(turn, ParseError):
            episode.parse_errors += 1
            if turn.tool is not None:
                episode.tool_errors += 1
                replies[i] = tool_reply(turn.tool, f"Error: {turn.reason}", turn.builtin, turn.channel)
            else:
                replies[i] = Message("system", f"Error: invalid assistant message: {turn.reason}")
            continue
        episode.transcript.messages.append(turn.message)
        if turn.is_final:
            episode.transcript.final_answer = turn.message.content
            episode.end = "answer"
        elif turn.tool_name is not None and episode.turns < config.max_turns:
            reply = functools.partial(
                tool_reply, turn.tool_name, builtin=turn.builtin, channel=turn.message.channel
            )
            calls.append((i, turn.tool_name, turn.arguments or {}, reply, turn.builtin))
    _dispatch(env, episodes, calls, replies, config)
    for i, episode in enumerate(episodes):
        if episode.end is not None:
            continue
        if episode.turns >= config.max_turns:
            episode.end = "max_turns"
            continue
        context = (render_message(replies[i], tokenizer) if i in replies else []) + prompt
        if len(episode.tokens) + len(context) >= config.max_episode_tokens:
            episode.end = "budget"
            continue
        episode.append(context, False)
        if i in replies:
            episode.transcript.messages.append(replies[i])


def _dispatch(
    env: AgentEnvironment,
    episodes: list[EpisodeRollout],
    calls: list[tuple[int, str, dict[str, Any], Callable[[str], Message], bool]],
    replies: dict[int, Message],
    config: AgentLoopConfig,
) -> None:
    """Run the well-formed tool calls; unknown tools (or a built-in called as a function) are
    answered without calling anything."""
    runnable = []
    for i, name, arguments, reply, builtin in calls:
        tools = episodes[i].start.tools
        builtins = builtin_tools(tools, config.system_style)
        if name not in {tool.name for tool in tools} or (name in builtins) != builtin:
            episodes[i].tool_errors += 1
            called = name if builtin else f"functions.{name}"
            offered = ", ".join(tool_recipients(tools, builtins))
            replies[i] = reply(f"Error: unknown tool {called!r}; available: {offered}")
            continue
        state = episodes[i].start.state
        call = lambda s=state, n=name, a=arguments: env.call_tool(s, n, a)
        runnable.append((i, name, arguments, reply, call))
    if not runnable:  # (the same on every rank: their episodes are equal)
        return
    outcomes = computed_once(  # each on its episode's rank, where a stateful tool's state lives
        [episodes[i].number for i, *_ in runnable],
        lambda mine: run_tool_calls([(runnable[k][1], runnable[k][4]) for k in mine], config),
    )
    for (i, name, arguments, reply, _), outcome in zip(runnable, outcomes):
        episode = episodes[i]
        episode.transcript.tool_calls.append(ToolCall(name, arguments, outcome.text, outcome.ok))
        episode.tool_errors += not outcome.ok
        episode.timeouts += outcome.timed_out
        replies[i] = reply(outcome.text)


def run_episodes(
    engine: RolloutEngine,
    tokenizer: Tokenizer,
    env: AgentEnvironment,
    task_indices: list[int],
    group_size: int,
    sampling: SamplingParams,
    config: AgentLoopConfig,
) -> tuple[list[Trajectory], dict[str, float]]:
    """``group_size`` episodes per task (group id = position in ``task_indices``), run to the end.

    ``sampling`` gives temperature / top-p / top-k; the loop sets ``max_new_tokens`` and the stop
    tokens itself. Returns the trajectories (rewards from ``env.reward``) and summed / mean stats.
    """
    episodes = [
        start_episode(env, index, group, tokenizer, config.system_style)
        for group, index in enumerate(task_indices)
        for _ in range(group_size)
    ]
    for number, episode in enumerate(episodes):
        episode.number = number
    full = [  # opening prompts that leave no room to sample anything
        (index, len(e.tokens))
        for e, index in zip(episodes, (i for i in task_indices for _ in range(group_size)))
        if len(e.tokens) >= config.max_episode_tokens
    ]
    if full:
        index, length = full[0]
        what = (
            f"task {index}'s opening prompt is {length} tokens, which leaves no room in "
            f"env.max_episode_tokens = {config.max_episode_tokens}"
        )
        if len(full) == len(episodes):  # every task: the settings, not one long task
            shorter = (
                ", or shorten the prompt (env.system_prompt = 'minimal' drops the gpt-oss system message)"
                if config.system_style == "gpt-oss"
                else ""
            )
            raise ValueError(
                f"{what} (nor does any other task's): raise env.max_episode_tokens (and training.seq_len)"
                + shorter
            )
        warnings.warn(f"{what}: its episodes end before sampling (reward as scored)", stacklevel=2)
        for episode in episodes:
            if len(episode.tokens) >= config.max_episode_tokens:
                episode.end = "budget"
    stop_ids = tuple(tokenizer.special[name] for name in STOP_TOKENS)
    while active := [e for e in episodes if e.end is None]:
        room = [
            min(config.max_new_tokens_per_turn, config.max_episode_tokens - len(e.tokens)) for e in active
        ]
        params = dataclasses.replace(sampling, max_new_tokens=max(room), stop_token_ids=stop_ids)
        completions = [  # an episode whose budget is below the batch's keeps only its share
            c if len(c.tokens) <= limit else cut(c, limit, len(e.tokens))
            for c, e, limit in zip(engine.generate([e.tokens for e in active], params), active, room)
        ]
        step_episodes(env, tokenizer, active, completions, config)
    rewards = computed_once(
        [e.number for e in episodes],
        lambda mine: safe_rewards(
            [functools.partial(env.reward, episodes[i].transcript) for i in mine],
            config.reward_timeout_s,
            config.max_stranded_calls,
            config.reward_concurrency,
        ),
    )
    trajectories = [e.to_trajectory(reward) for e, (reward, _) in zip(episodes, rewards)]
    stats = episode_stats(episodes, trajectories)
    stats["reward_errors"] = float(sum(failed for _, failed in rewards))
    stats["errors"] = stats["tool_errors"] + stats["parse_errors"] + stats["reward_errors"]
    return trajectories, stats


def cut(completion: Completion, limit: int, prompt_len: int) -> Completion:
    """The first ``limit`` tokens of ``completion`` (to a prompt of ``prompt_len`` tokens), cut off."""
    routing = completion.routing
    return Completion(
        completion.tokens[:limit],
        completion.logprobs[:limit],
        "length",
        None if routing is None else routing[: prompt_len + limit - 1],
    )


def episode_stats(episodes: list[EpisodeRollout], trajectories: list[Trajectory]) -> dict[str, float]:
    count = max(len(episodes), 1)
    stats: dict[str, float] = {
        "episodes": float(len(episodes)),
        "reward_mean": sum(t.reward for t in trajectories) / count,
        "turns_mean": sum(e.turns for e in episodes) / count,
        "tool_calls": float(sum(len(e.transcript.tool_calls) for e in episodes)),
        "tool_errors": float(sum(e.tool_errors for e in episodes)),
        "timeouts": float(sum(e.timeouts for e in episodes)),
        "parse_errors": float(sum(e.parse_errors for e in episodes)),
        "response_tokens_mean": sum(t.response_len for t in trajectories) / count,
        "episode_tokens_mean": sum(len(t.tokens) for t in trajectories) / count,
    }
    for reason in ("answer", "max_turns", "budget", "cut_off"):
        stats[f"end_{reason}"] = sum(e.end == reason for e in episodes) / count
    return stats


def demonstration_trajectory(
    start: EpisodeStart, replies: list[Message], tokenizer: Tokenizer, style: str = "minimal"
) -> Trajectory:
    """A scripted episode laid out exactly as the loop lays out a sampled one (for SFT warm-up).

    ``replies`` alternate assistant messages (mask 1, stop ``<|call|>`` / ``<|return|>`` / ``<|end|>``)
    and environment messages (mask 0, each followed by ``<|start|>assistant``)."""
    prompt = generation_prompt(tokenizer)
    tokens = render_conversation(start.messages, start.tools, tokenizer, style) + prompt
    mask = [0] * len(tokens)
    for message in replies:
        if message.role == "assistant":
            stop = "<|return|>" if message.channel == "final" else None  # else <|call|> or <|end|>
            sampled = render_message(message, tokenizer, stop)[len(prompt) :]
            tokens, mask = tokens + sampled, mask + [1] * len(sampled)
        else:
            context = render_message(message, tokenizer) + prompt
            tokens, mask = tokens + context, mask + [0] * len(context)
    turns = sum(m.role == "assistant" for m in replies)
    calls = sum(m.role == "assistant" and m.recipient is not None for m in replies)
    return Trajectory(tokens, mask, [0.0] * len(tokens), reward=1.0, group=0, turns=turns, tool_calls=calls)

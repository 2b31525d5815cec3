"""A synthetic tool-use task small enough for a tiny model to learn on CPU.

Each task hides a few key -> value pairs behind a ``lookup`` tool and asks "What is the value of
KEY?". The correct episode is: call ``functions.lookup`` with ``{"key": KEY}``, read the result,
answer the value in the final channel. The value is random per task, so it cannot be guessed from
the question (1 in 90 by chance).

Reward (in [0, 1]):
- 1.0 if the final answer, stripped, equals the value;
- 0.2 if not, but at least one lookup call succeeded (valid JSON, existing key): format credit;
- 0.0 otherwise (no answer and no successful call, malformed calls only, ...).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

from titan_rl.rl.envs.agentic import (
    EpisodeStart,
    Message,
    ToolSpec,
    Transcript,
    final_answer,
    tool_call,
    tool_result,
)

KEYS = ("red", "blue", "green", "yellow", "orange", "purple", "black", "white")
KEYS += ("cat", "dog", "fish", "bird", "lion", "bear", "wolf", "fox", "owl")
LOOKUP = ToolSpec(
    name="lookup",
    description="Look up the value stored under a key.",
    parameters={"type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]},
)
INSTRUCTIONS = "Look up the key with the lookup tool, then answer with its value only."
FORMAT_CREDIT = 0.2


@dataclass(frozen=True)
class LookupTask:
    table: dict[str, str]  # the keys the tool knows, each with its value
    key: str  # the one the question asks about

    @property
    def answer(self) -> str:
        return self.table[self.key]


class ToolLookupEnv:
    """``num_tasks`` deterministic tasks (from ``seed``) of ``keys_per_task`` keys each."""

    pass_reward = 1.0  # the right value (FORMAT_CREDIT is for a successful lookup alone)

    def __init__(self, num_tasks: int = 1000, keys_per_task: int = 3, seed: int = 0) -> None:
        if not 1 <= keys_per_task <= len(KEYS):
            raise ValueError(f"keys_per_task must be in 1..{len(KEYS)}, got {keys_per_task}")
        self.num_tasks, self.keys_per_task, self.seed = num_tasks, keys_per_task, seed

    def __len__(self) -> int:
        return self.num_tasks

    def task(self, index: int) -> LookupTask:
        if not 0 <= index < self.num_tasks:
            raise IndexError(f"task index {index} outside 0..{self.num_tasks - 1}")
        rng = random.Random(self.seed * 1_000_003 + index)
        keys = rng.sample(KEYS, self.keys_per_task)
        table = {key: str(rng.randint(10, 99)) for key in keys}
        return LookupTask(table, rng.choice(keys))

    def reset(self, index: int) -> EpisodeStart:
        task = self.task(index)
        messages = [Message("developer", INSTRUCTIONS), Message("user", f"What is the value of {task.key}?")]
        return EpisodeStart(messages, [LOOKUP], state=task)

    def call_tool(self, state: LookupTask, name: str, arguments: dict[str, Any]) -> str:
        if name != "lookup":
            raise ValueError(f"unknown tool {name!r}")
        if set(arguments) != {"key"}:
            raise ValueError(f"lookup takes exactly one argument, key; got {sorted(arguments)}")
        key = arguments["key"]
        if key not in state.table:
            raise KeyError(f"no value stored under {key!r}")
        return state.table[key]

    def reward(self, transcript: Transcript) -> float:
        task: LookupTask = transcript.state
        if transcript.final_answer is not None and transcript.final_answer.strip() == task.answer:
            return 1.0
        return FORMAT_CREDIT if any(call.ok for call in transcript.tool_calls) else 0.0

    def demonstration(self, index: int) -> list[Message]:
        """The messages after the prompt in a correct episode (for ``demonstration_trajectory``)."""
        task = self.task(index)
        return [
            tool_call("lookup", json.dumps({"key": task.key})),
            tool_result("lookup", task.answer),
            final_answer(task.answer),
        ]

"""Multi-turn environments: a conversation and tools in, a reward out.

The agent loop (``titan_rl.rl.agent_loop``) owns tokens, masks, timeouts and error handling; an
environment only deals in messages: it starts an episode, answers tool calls with text and scores
the finished transcript.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class ToolSpec:
    """A function the assistant may call as ``functions.{name}`` with JSON arguments.

    ``builtin``: a gpt-oss built-in tool (``python``): with the ``gpt-oss`` system style its
    description goes in the system message's ``# Tools`` section, the model calls it as
    ``to={name}`` with the raw text of its one string parameter as the message (no JSON), and its
    result comes back from ``{name}``; with the ``minimal`` style it is a function like the others.
    """

    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema of the arguments object: {"type": "object", "properties": ...}
    builtin: bool = False
    builtin_description: str | None = None  # a built-in's text in the system message (default: description)

    def __post_init__(self) -> None:
        properties = self.parameters.get("properties", {})
        if self.builtin and [p.get("type") for p in properties.values()] != ["string"]:
            raise ValueError(
                f"built-in tool {self.name!r} takes its message as one string parameter; "
                f"its parameters are {self.parameters}"
            )

    @property
    def text_argument(self) -> str:
        """The parameter a built-in tool's raw message fills."""
        return next(iter(self.parameters["properties"]))


@dataclass(frozen=True)
class Message:
    """One Harmony message.

    ``role`` is system / developer / user / assistant, or ``functions.NAME`` for a tool result;
    ``recipient`` is ``functions.NAME`` on an assistant tool call and ``assistant`` on a tool result;
    ``channel`` (analysis / commentary / final) is set on assistant and tool messages only.
    """

    role: str
    content: str
    channel: str | None = None
    recipient: str | None = None
    constrain: str | None = None  # "json" on tool calls: renders ``<|constrain|>json``


def tool_result(name: str, content: str) -> Message:
    """The message a tool's output becomes: from ``functions.NAME`` to the assistant."""
    return Message(role=f"functions.{name}", content=content, channel="commentary", recipient="assistant")


def tool_call(name: str, arguments_json: str) -> Message:
    """An assistant message calling ``functions.NAME`` (used for demonstrations and tests)."""
    return Message(
        "assistant", arguments_json, channel="commentary", recipient=f"functions.{name}", constrain="json"
    )


def final_answer(content: str) -> Message:
    return Message("assistant", content, channel="final")


@dataclass
class EpisodeStart:
    """What an episode begins with; ``state`` is the environment's private data (e.g. the answer)."""

    messages: list[Message]
    tools: list[ToolSpec]
    state: Any = None


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    result: str = ""
    ok: bool = True  # False when the tool raised, timed out, or the name was unknown


@dataclass
class Transcript:
    """A finished episode as the environment sees it when scoring it."""

    state: Any
    messages: list[Message] = field(default_factory=list)  # initial, assistant and tool messages
    tool_calls: list[ToolCall] = field(default_factory=list)  # well-formed calls that were dispatched
    final_answer: str | None = None  # content of the final-channel message; None if none came


class AgentEnvironment(Protocol):
    """A multi-turn task. ``call_tool`` may raise or hang: the agent loop runs it in a worker
    thread with a timeout and turns failures into error messages, so it must be thread-safe.
    ``reward`` runs on a worker thread under ``env.reward_timeout_s`` (0: on the main thread),
    ``env.reward_concurrency`` calls at once (1 by default; more needs it thread-safe too)."""

    def __len__(self) -> int:
        """Number of distinct tasks; ``reset`` accepts 0 .. len - 1."""
        ...

    def reset(self, index: int) -> EpisodeStart: ...

    def call_tool(self, state: Any, name: str, arguments: dict[str, Any]) -> str: ...

    def reward(self, transcript: Transcript) -> float: ...

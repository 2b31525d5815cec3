"""The Harmony chat format: messages and tool schemas to token ids, sampled tokens back to messages.

A message renders as
``<|start|>{role}[ to={recipient}]<|channel|>{channel}[ <|constrain|>json]<|message|>{content}{stop}``
where stop is ``<|call|>`` on tool calls, ``<|return|>`` on a sampled final answer and ``<|end|>``
otherwise. Special tokens are placed by id; text pieces go through ``Tokenizer.encode`` (which never
emits a special token). The role is encoded on its own, so ``generation_prompt`` (``<|start|>assistant``)
is a token prefix of every rendered assistant message: a demonstration tokenizes exactly like a
sampled turn.

Parsing never raises on model output: anything malformed comes back as a ``ParseError`` with a reason.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from titan_rl.rl.envs.agentic import Message, ToolSpec, tool_result
from titan_rl.rl.tokenizer import Tokenizer

CHANNELS = ("analysis", "commentary", "final")
STOP_TOKENS = ("<|call|>", "<|return|>", "<|end|>")  # what ends a sampled assistant turn
TOOL_NAMESPACE = "functions."
TOOL_CHANNEL_NOTE = "Calls to these tools must go to the commentary channel: 'functions'."
SYSTEM_STYLES = ("minimal", "gpt-oss")
# The system message gpt-oss was trained with (openai/harmony docs/format.md, "Example system
# message"; its renderer's defaults): identity, knowledge cutoff, a date, reasoning effort and the
# valid channels; persona and task instructions go in the developer message under "# Instructions".
# The date is fixed: a rollout must not depend on the day it runs.
GPT_OSS_HEADER = (
    "You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\n"
    "Current date: 2025-06-28\n\n"
    "Reasoning: medium"
)
VALID_CHANNELS = "# Valid channels: analysis, commentary, final. Channel must be included for every message."
GPT_OSS_SYSTEM = f"{GPT_OSS_HEADER}\n\n{VALID_CHANNELS}"


def generation_prompt(tokenizer: Tokenizer) -> list[int]:
    """``<|start|>assistant``: appended to the context before each assistant turn is sampled."""
    return [tokenizer.special["<|start|>"], *tokenizer.encode("assistant")]


def builtin_tools(tools: list[ToolSpec], style: str) -> dict[str, ToolSpec]:
    """The tools that render as gpt-oss built-ins (``ToolSpec.builtin``, ``gpt-oss`` style only)."""
    return {tool.name: tool for tool in tools if tool.builtin} if style == "gpt-oss" else {}


def tool_reply(name: str, text: str, builtin: bool = False, channel: str | None = None) -> Message:
    """A tool's result (or error) as the model expects it: from ``functions.NAME`` on the commentary
    channel, or for a call to a built-in (``to=NAME``) from ``NAME`` on its call's channel."""
    if builtin:
        return Message(name, text, channel=channel or "analysis", recipient="assistant")
    return tool_result(name, text)


def tool_recipients(tools: list[ToolSpec], builtins: dict[str, ToolSpec]) -> list[str]:
    """How each tool is called: ``functions.NAME``, or ``NAME`` for a built-in."""
    return sorted(t.name if t.name in builtins else f"{TOOL_NAMESPACE}{t.name}" for t in tools)


def default_stop(message: Message) -> str:
    return "<|call|>" if message.role == "assistant" and message.recipient else "<|end|>"


def render_message(message: Message, tokenizer: Tokenizer, stop: str | None = None) -> list[int]:
    """One message to ids; ``stop`` defaults to ``<|call|>`` for tool calls, else ``<|end|>``."""
    special = tokenizer.special
    ids = [special["<|start|>"], *tokenizer.encode(message.role)]
    if message.recipient:
        ids += tokenizer.encode(f" to={message.recipient}")
    if message.channel:
        ids += [
            special["<|channel|>"],
            *tokenizer.encode(message.channel + (" " if message.constrain else "")),
        ]
    if message.constrain:
        ids += [special["<|constrain|>"], *tokenizer.encode(message.constrain)]
    ids += [special["<|message|>"], *tokenizer.encode(message.content)]
    return [*ids, special[stop or default_stop(message)]]


def _typescript_type(schema: dict[str, Any]) -> str:
    if "enum" in schema:
        return " | ".join(json.dumps(value) for value in schema["enum"])
    kind = schema.get("type", "any")
    if isinstance(kind, list):  # JSON schema's union: "type": ["string", "null"]
        return " | ".join(_typescript_type({**schema, "type": k}) for k in kind)
    if kind == "array":
        return f"{_typescript_type(schema.get('items', {}))}[]"
    return {"integer": "number", "object": "object"}.get(kind, kind)


def _comment(text: str) -> list[str]:
    """``text`` as ``//`` comment lines (every line of a multi-line description)."""
    return [f"// {line}" for line in str(text).splitlines() or [""]]


def render_tools(tools: list[ToolSpec]) -> str:
    """Tool schemas as the TypeScript-like ``namespace functions`` block of the developer message."""
    lines = ["# Tools", "", "## functions", "", "namespace functions {", ""]
    for tool in tools:
        lines += _comment(tool.description)
        properties = tool.parameters.get("properties", {})
        if not properties:
            lines += [f"type {tool.name} = () => any;", ""]
            continue
        required = set(tool.parameters.get("required", []))
        lines.append(f"type {tool.name} = (_: {{")
        for name, schema in properties.items():
            if "description" in schema:
                lines += _comment(schema["description"])
            optional = "" if name in required else "?"
            lines.append(f"{name}{optional}: {_typescript_type(schema)},")
        lines += ["}) => any;", ""]
    lines.append("} // namespace functions")
    return "\n".join(lines)


def render_conversation(
    messages: list[Message], tools: list[ToolSpec], tokenizer: Tokenizer, style: str = "minimal"
) -> list[int]:
    """The whole conversation; tool schemas join the developer message (one is added if missing).

    ``style``: ``minimal`` renders the environment's messages as they are (for models trained from
    scratch, such as the debug presets: short prompts); ``gpt-oss`` renders what the released
    gpt-oss models were trained on: their own system message (``GPT_OSS_SYSTEM``), and the
    environment's system and developer texts as the developer message's ``# Instructions``.
    """
    if style not in SYSTEM_STYLES:
        raise ValueError(f"unknown system style {style!r}; valid: {', '.join(SYSTEM_STYLES)}")
    if style == "gpt-oss":
        messages = _gpt_oss_preamble(messages, tools)
        return [token for message in messages for token in render_message(message, tokenizer)]
    messages = list(messages)
    if tools:
        section = render_tools(tools)
        developer = next((i for i, m in enumerate(messages) if m.role == "developer"), None)
        if developer is None:
            developer = sum(1 for m in messages if m.role == "system")  # right after the system messages
            messages.insert(developer, Message("developer", section))
        else:
            old = messages[developer]
            messages[developer] = Message("developer", f"{old.content}\n\n{section}")
        for i, m in enumerate(messages):
            if m.role == "system" and TOOL_CHANNEL_NOTE not in m.content:
                messages[i] = Message("system", f"{m.content}\n{TOOL_CHANNEL_NOTE}")
    return [token for message in messages for token in render_message(message, tokenizer)]


def _gpt_oss_preamble(messages: list[Message], tools: list[ToolSpec]) -> list[Message]:
    """gpt-oss's system message (with the built-in tools' ``# Tools`` section), then a developer
    message of ``# Instructions`` (the environment's system and developer texts) and the function
    tools, then the rest of the conversation. The sections follow openai/harmony's renderer
    (``src/encoding.rs``: a built-in's description as plain lines under ``## NAME``)."""
    builtins = sorted(builtin_tools(tools, "gpt-oss").values(), key=lambda tool: tool.name)
    functions = [tool for tool in tools if not tool.builtin]
    sections = [GPT_OSS_HEADER]
    if builtins:
        texts = [f"## {t.name}\n\n{t.builtin_description or t.description}" for t in builtins]
        sections.append("\n\n".join(["# Tools", *texts]))
    sections.append(VALID_CHANNELS + (f"\n{TOOL_CHANNEL_NOTE}" if functions else ""))
    system = "\n\n".join(sections)
    instructions = "\n\n".join(m.content for m in messages if m.role in ("system", "developer"))
    parts = ([f"# Instructions\n\n{instructions}"] if instructions else []) + (
        [render_tools(functions)] if functions else []
    )
    developer = [Message("developer", "\n\n".join(parts))] if parts else []
    rest = [m for m in messages if m.role not in ("system", "developer")]
    return [Message("system", system), *developer, *rest]


@dataclass
class AssistantTurn:
    """A well-formed sampled assistant message."""

    message: Message
    stop: str  # "<|call|>", "<|return|>" or "<|end|>"
    arguments: dict[str, Any] | None = None  # parsed JSON arguments of a tool call
    builtin: bool = False  # a call to a built-in tool (its recipient is the tool's name)

    @property
    def tool_name(self) -> str | None:
        recipient = self.message.recipient
        if recipient is None or self.builtin:
            return recipient
        return recipient[len(TOOL_NAMESPACE) :]

    @property
    def is_final(self) -> bool:
        return self.message.channel == "final"


@dataclass
class ParseError:
    """Why a sampled turn is not a valid Harmony message; ``tool`` is set when the turn did address
    a ``functions.NAME`` recipient, so the error can come back as that tool's result."""

    reason: str
    tool: str | None = None
    channel: str | None = None  # the turn's channel (a built-in's error comes back on it)
    builtin: bool = False  # the turn addressed a built-in (``to=NAME``): its error comes from NAME


_HEADER = re.compile(
    r"^(?:\s*to=(?P<before>\S+?))?\s*<\|channel\|>(?P<channel>\w+)(?:\s+to=(?P<after>\S+?))?"
    r"(?:\s*<\|constrain\|>(?P<constrain>\w+)|\s+(?P<content_type>json|code))?\s*$"
)


def _header_text(ids: list[int], tokenizer: Tokenizer) -> str:
    """Decode text runs and write special tokens by name, so a regex can read the header."""
    names = {v: k for k, v in tokenizer.special.items()}
    parts, run = [], []
    for token in ids:
        if token in names:
            parts += [tokenizer.decode(run), names[token]]
            run = []
        else:
            run.append(token)
    return "".join([*parts, tokenizer.decode(run)])


def parse_assistant(
    ids: list[int], tokenizer: Tokenizer, builtins: dict[str, ToolSpec] | None = None
) -> AssistantTurn | ParseError:
    """Parse the tokens sampled after ``<|start|>assistant`` (header rest, content, stop token).
    ``builtins`` (``builtin_tools``): tools called by their own name with a raw text message."""
    special, names = tokenizer.special, {v: k for k, v in tokenizer.special.items()}
    stop_ids = {special[s] for s in STOP_TOKENS}
    for token in ids[:-1]:
        if token in stop_ids:
            return ParseError(f"text after {names[token]}: a turn must end at its first stop token")
        if token == special["<|start|>"]:
            return ParseError("<|start|> inside an assistant message")
    if not ids or ids[-1] not in stop_ids:
        return ParseError("no stop token: the message was cut off before <|end|>, <|call|> or <|return|>")
    if special["<|message|>"] not in ids:
        return ParseError("missing <|message|> after the header")
    split = ids.index(special["<|message|>"])
    header, body, stop = ids[:split], ids[split + 1 : -1], names[ids[-1]]
    stray = [names[t] for t in body if t in names]
    if stray:
        return ParseError(f"special token {stray[0]} inside the message content")
    header_text = _header_text(header, tokenizer)
    if "<|channel|>" not in header_text:
        return ParseError("missing <|channel|>: every assistant message needs a channel")
    match = _HEADER.match(header_text)
    if match is None:
        return ParseError(f"malformed header {header_text!r}")
    channel, recipient = match["channel"], match["before"] or match["after"]
    constrain = match["constrain"] or match["content_type"]
    if channel not in CHANNELS:
        return ParseError(f"unknown channel {channel!r}; valid channels: {', '.join(CHANNELS)}")
    content = tokenizer.decode(body)
    message = Message("assistant", content, channel=channel, recipient=recipient, constrain=constrain)
    if recipient is None:
        if stop == "<|call|>":
            return ParseError("<|call|> without a recipient: tool calls need to=functions.NAME")
        if stop == "<|return|>" and channel != "final":
            return ParseError(f"<|return|> ends final-channel messages only, not {channel}")
        return AssistantTurn(message, stop)
    builtin = (builtins or {}).get(recipient)
    if builtin is not None:
        if stop != "<|call|>":
            reason = f"a message to {recipient} must end with <|call|>, not {stop}"
            return ParseError(reason, recipient, channel, builtin=True)
        if channel == "final":
            reason = f"calls to {recipient} go to the analysis channel, not final"
            return ParseError(reason, recipient, builtin=True)
        return AssistantTurn(message, stop, {builtin.text_argument: content}, builtin=True)
    if not recipient.startswith(TOOL_NAMESPACE) or recipient == TOOL_NAMESPACE:
        also = "".join(f" or {name}" for name in sorted(builtins or {}))
        return ParseError(f"unknown recipient {recipient!r}; call tools as functions.NAME{also}")
    tool = recipient[len(TOOL_NAMESPACE) :]
    if stop != "<|call|>":
        return ParseError(f"a message to {recipient} must end with <|call|>, not {stop}", tool=tool)
    if channel == "final":
        return ParseError("tool calls go to the commentary channel, not final", tool=tool)
    try:
        arguments = json.loads(content)
    except json.JSONDecodeError as error:
        return ParseError(f"arguments are not valid JSON ({error})", tool=tool)
    if not isinstance(arguments, dict):
        return ParseError(f"arguments must be a JSON object, got {type(arguments).__name__}", tool=tool)
    return AssistantTurn(message, stop, arguments)

"""Harmony rendering and parsing: round trips, and hand-written well-formed / malformed turns."""

from __future__ import annotations

import pytest

from titan_rl.rl.envs.agentic import Message, ToolSpec, final_answer, tool_call, tool_result
from titan_rl.rl.harmony import (
    AssistantTurn,
    ParseError,
    generation_prompt,
    parse_assistant,
    render_conversation,
    render_message,
    render_tools,
)
from titan_rl.rl.tokenizer import build_tiny_tokenizer

TOKENIZER = build_tiny_tokenizer()
LOOKUP = ToolSpec("lookup", "Look up a key.", {"type": "object", "properties": {"key": {"type": "string"}}})


def sampled(text_and_specials: list[str]) -> list[int]:
    """Tokens as the engine would sample them: special tokens by id, the rest as text."""
    ids = []
    for piece in text_and_specials:
        ids += [TOKENIZER.special[piece]] if piece in TOKENIZER.special else TOKENIZER.encode(piece)
    return ids


def after_prompt(ids: list[int]) -> list[int]:
    prompt = generation_prompt(TOKENIZER)
    assert ids[: len(prompt)] == prompt, "an assistant message must start with the generation prompt"
    return ids[len(prompt) :]


def test_render_matches_the_harmony_layout():
    text = TOKENIZER.decode(render_message(tool_call("lookup", '{"key": "fox"}'), TOKENIZER))
    assert text == (
        "<|start|>assistant to=functions.lookup<|channel|>commentary <|constrain|>json<|message|>"
        '{"key": "fox"}<|call|>'
    )
    text = TOKENIZER.decode(render_message(tool_result("lookup", "42"), TOKENIZER))
    assert text == "<|start|>functions.lookup to=assistant<|channel|>commentary<|message|>42<|end|>"
    assert (
        TOKENIZER.decode(render_message(Message("user", "hi"), TOKENIZER))
        == "<|start|>user<|message|>hi<|end|>"
    )


@pytest.mark.parametrize(
    ("message", "stop"),
    [
        (tool_call("lookup", '{"key": "fox", "n": [1, 2]}'), "<|call|>"),
        (final_answer("The answer is 42."), "<|return|>"),
        (final_answer("42"), "<|end|>"),
        (Message("assistant", "Let me think: 6 * 7.", channel="analysis"), "<|end|>"),
        (Message("assistant", "Looking it up.", channel="commentary"), "<|end|>"),
    ],
)
def test_render_then_parse_round_trips(message, stop):
    turn = parse_assistant(after_prompt(render_message(message, TOKENIZER, stop)), TOKENIZER)
    assert isinstance(turn, AssistantTurn)
    assert turn.message == message and turn.stop == stop
    assert turn.is_final == (message.channel == "final")
    if message.recipient:
        assert turn.tool_name == "lookup" and turn.arguments == {"key": "fox", "n": [1, 2]}


def test_content_that_spells_special_tokens_round_trips_as_text():
    message = final_answer("a <|call|> b <|start|>user")
    turn = parse_assistant(after_prompt(render_message(message, TOKENIZER, "<|return|>")), TOKENIZER)
    assert isinstance(turn, AssistantTurn) and turn.message.content == message.content


def test_well_formed_variants_are_accepted():
    # recipient after the channel (what gpt-oss usually samples) and "json" without <|constrain|>
    turn = parse_assistant(
        sampled(
            [
                "<|channel|>",
                "commentary to=functions.lookup json",
                "<|message|>",
                '{"key": "owl"}',
                "<|call|>",
            ]
        ),
        TOKENIZER,
    )
    assert isinstance(turn, AssistantTurn) and turn.tool_name == "lookup" and turn.arguments == {"key": "owl"}
    assert turn.message.constrain == "json"


MALFORMED = [
    (["<|channel|>", "final", "<|message|>", "42"], "no stop token", None),  # missing <|end|>: cut off
    (
        [" to=functions.lookup", "<|channel|>", "commentary", "<|message|>", "{key: 1}", "<|call|>"],
        "not valid JSON",
        "lookup",
    ),
    (
        [" to=functions.lookup", "<|channel|>", "commentary", "<|message|>", "[1]", "<|call|>"],
        "JSON object",
        "lookup",
    ),
    (
        [" to=browser.search", "<|channel|>", "commentary", "<|message|>", "{}", "<|call|>"],
        "unknown recipient",
        None,
    ),
    (
        [" to=functions.lookup", "<|channel|>", "commentary", "<|message|>", "{}", "<|call|>", "more"],
        "text after <|call|>",
        None,
    ),
    (["<|channel|>", "final", "<|message|>", "4", "<|return|>", "<|start|>"], "text after <|return|>", None),
    (["<|channel|>", "final", "<|message|>", "4", "<|start|>", "x", "<|end|>"], "<|start|> inside", None),
    (["<|channel|>", "final", "4", "<|return|>"], "missing <|message|>", None),
    (["<|message|>", "4", "<|return|>"], "missing <|channel|>", None),
    (["<|channel|>", "thoughts", "<|message|>", "hm", "<|end|>"], "unknown channel", None),
    (["<|channel|>", "commentary", "<|message|>", "{}", "<|call|>"], "without a recipient", None),
    (["<|channel|>", "analysis", "<|message|>", "done", "<|return|>"], "final-channel messages only", None),
    (
        [" to=functions.lookup", "<|channel|>", "commentary", "<|message|>", "{}", "<|end|>"],
        "must end with <|call|>",
        "lookup",
    ),
    (
        ["<|channel|>", "final", "<|message|>", "4", "<|channel|>", "<|return|>"],
        "inside the message content",
        None,
    ),
    (["garbage", "<|channel|>", "final", "<|message|>", "4", "<|return|>"], "malformed header", None),
    ([], "no stop token", None),
]


@pytest.mark.parametrize(("pieces", "reason", "tool"), MALFORMED)
def test_malformed_turns_are_parse_errors_not_exceptions(pieces, reason, tool):
    result = parse_assistant(sampled(pieces), TOKENIZER)
    assert isinstance(result, ParseError)
    assert reason in result.reason
    assert result.tool == tool


def test_conversation_puts_tool_schemas_in_the_developer_message():
    messages = [Message("system", "You are helpful."), Message("user", "What is the value of fox?")]
    text = TOKENIZER.decode(render_conversation(messages, [LOOKUP], TOKENIZER))
    assert text.startswith("<|start|>system<|message|>You are helpful.\nCalls to these tools must go to the ")
    assert "<|end|><|start|>developer<|message|># Tools\n\n## functions\n\nnamespace functions {" in text
    assert text.endswith("<|start|>user<|message|>What is the value of fox?<|end|>")
    with_developer = [Message("developer", "Be brief."), *messages[1:]]
    text = TOKENIZER.decode(render_conversation(with_developer, [LOOKUP], TOKENIZER))
    assert text.startswith("<|start|>developer<|message|>Be brief.\n\n# Tools")
    assert render_conversation(messages, [], TOKENIZER) == [
        t for m in messages for t in render_message(m, TOKENIZER)
    ]


def test_tool_schema_rendering():
    spec = ToolSpec(
        "convert",
        "Convert units.",
        {
            "type": "object",
            "properties": {
                "value": {"type": "number", "description": "the amount"},
                "unit": {"type": "string", "enum": ["km", "mi"]},
                "tags": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["value"],
        },
    )
    text = render_tools([spec, ToolSpec("now", "The time.", {"type": "object"})])
    assert (
        '// Convert units.\ntype convert = (_: {\n// the amount\nvalue: number,\nunit?: "km" | "mi",\n'
        in text
    )
    assert "tags?: string[],\n}) => any;" in text
    assert "// The time.\ntype now = () => any;" in text
    assert text.endswith("} // namespace functions")


def test_the_gpt_oss_style_renders_the_system_message_the_released_models_know():
    """openai/harmony docs/format.md: the system message holds identity, knowledge cutoff, date,
    reasoning effort and the valid channels (plus the tools' channel note when there are tools);
    the environment's own system and developer texts go in the developer message, under
    "# Instructions", before the tools."""
    messages = [
        Message("system", "You solve lookups."),
        Message("developer", "Answer with the value only."),
        Message("user", "What is fox?"),
    ]
    text = TOKENIZER.decode(render_conversation(messages, [LOOKUP], TOKENIZER, "gpt-oss"))
    assert text.startswith(
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
        "Knowledge cutoff: 2024-06\nCurrent date: 2025-06-28\n\nReasoning: medium\n\n"
        "# Valid channels: analysis, commentary, final. Channel must be included for every message.\n"
        "Calls to these tools must go to the commentary channel: 'functions'.<|end|>"
        "<|start|>developer<|message|># Instructions\n\nYou solve lookups.\n\nAnswer with the value only."
        "\n\n# Tools\n\n## functions\n\nnamespace functions {"
    ), text
    assert text.endswith("} // namespace functions<|end|><|start|>user<|message|>What is fox?<|end|>")
    plain = TOKENIZER.decode(render_conversation(messages[2:], [], TOKENIZER, "gpt-oss"))
    assert plain.startswith("<|start|>system<|message|>You are ChatGPT") and "Calls to these" not in plain
    assert "<|start|>developer" not in plain  # no instructions, no tools: no developer message
    with pytest.raises(ValueError, match="system style"):
        render_conversation(messages, [], TOKENIZER, "chatml")


def test_system_prompt_auto_is_gpt_oss_for_a_released_model():
    from titan_rl.config import load_config
    from titan_rl.rl.collect import system_style

    assert system_style(load_config(None, [])) == "minimal"
    assert system_style(load_config(None, ["--model.hf_path=/models/gpt-oss-20b"])) == "gpt-oss"
    assert system_style(load_config(None, ["--model.hf_path=/m", "--env.system_prompt=minimal"])) == "minimal"
    # a debug-preset model converted to HF: its tokenizer is the built-in one, its prompts the short ones
    assert system_style(load_config(None, ["--model.hf_path=/m"]), TOKENIZER) == "minimal"
    forced = load_config(None, ["--model.hf_path=/m", "--env.system_prompt=gpt-oss"])
    assert system_style(forced, TOKENIZER) == "gpt-oss"


def test_episodes_and_demonstrations_render_the_configured_style():
    from titan_rl.rl.agent_loop import demonstration_trajectory, start_episode
    from titan_rl.rl.envs.tool_task import ToolLookupEnv

    env = ToolLookupEnv(num_tasks=4)
    for style, head in (
        ("minimal", "<|start|>developer"),
        ("gpt-oss", "<|start|>system<|message|>You are ChatGPT"),
    ):
        episode = start_episode(env, 1, 0, TOKENIZER, style)
        assert TOKENIZER.decode(episode.tokens).startswith(head)
        demo = demonstration_trajectory(env.reset(1), env.demonstration(1), TOKENIZER, style)
        assert demo.tokens[: len(episode.tokens)] == episode.tokens  # SFT sees the prompts RL sees


def test_tool_schemas_with_type_unions_and_multi_line_descriptions():
    """A JSON-schema type union ("type": ["string", "null"]) crashed rendering (unhashable list);
    every line of a multi-line description is a comment (openai/harmony's renderer)."""
    spec = ToolSpec(
        "note",
        "Save a note.\nReturns its id.",
        {"type": "object", "properties": {"text": {"type": ["string", "null"], "description": "the\ntext"}}},
    )
    text = render_tools([spec])
    assert (
        "// Save a note.\n// Returns its id.\ntype note = (_: {\n// the\n// text\ntext?: string | null,\n"
        in text
    )


# ---------------------------------------------------------------- gpt-oss built-in tools

PYTHON = ToolSpec(
    "python",
    "Runs code.\nSecond line.",
    {"type": "object", "properties": {"code": {"type": "string"}}},
    builtin=True,
)


def test_a_builtin_tool_goes_in_the_gpt_oss_system_message():
    """openai/harmony (docs/format.md "Python tool", src/encoding.rs): built-ins are a "# Tools"
    section of the system message, "## NAME" then the description as plain lines, before the valid
    channels; function tools stay in the developer message (and only they add the channel note)."""
    messages = [Message("user", "2 + 2?")]
    both = TOKENIZER.decode(render_conversation(messages, [PYTHON, LOOKUP], TOKENIZER, "gpt-oss"))
    assert both.startswith(
        "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
        "Knowledge cutoff: 2024-06\nCurrent date: 2025-06-28\n\nReasoning: medium\n\n"
        "# Tools\n\n## python\n\nRuns code.\nSecond line.\n\n"
        "# Valid channels: analysis, commentary, final. Channel must be included for every message.\n"
        "Calls to these tools must go to the commentary channel: 'functions'.<|end|>"
        "<|start|>developer<|message|># Tools\n\n## functions\n\nnamespace functions {\n\n// Look up a key."
    ), both
    assert "type python" not in both
    alone = TOKENIZER.decode(render_conversation(messages, [PYTHON], TOKENIZER, "gpt-oss"))
    assert alone.startswith("<|start|>system<|message|>You are ChatGPT") and "'functions'" not in alone
    assert "<|start|>developer" not in alone and "## python\n\nRuns code.\nSecond line.\n\n# Valid" in alone
    minimal = TOKENIZER.decode(render_conversation(messages, [PYTHON], TOKENIZER, "minimal"))
    assert "type python = (_: {\ncode?: string,\n}) => any;" in minimal  # a function there


@pytest.mark.parametrize(
    "pieces",
    [
        ["<|channel|>", "analysis to=python code", "<|message|>", "print(6 * 7)", "<|call|>"],
        [" to=python", "<|channel|>", "analysis", "<|message|>", "print(6 * 7)", "<|call|>"],
        ["<|channel|>", "commentary to=python", "<|message|>", "print(6 * 7)", "<|call|>"],
    ],
)
def test_a_builtin_call_carries_raw_code(pieces):
    turn = parse_assistant(sampled(pieces), TOKENIZER, {"python": PYTHON})
    assert isinstance(turn, AssistantTurn) and turn.builtin
    assert turn.tool_name == "python" and turn.arguments == {"code": "print(6 * 7)"}
    unknown = parse_assistant(sampled(pieces), TOKENIZER)  # no built-ins (minimal style)
    assert isinstance(unknown, ParseError) and "unknown recipient 'python'" in unknown.reason


@pytest.mark.parametrize(
    ("pieces", "reason", "channel"),
    [
        (["<|channel|>", "final to=python", "<|message|>", "1", "<|call|>"], "analysis channel", None),
        (
            ["<|channel|>", "analysis to=python", "<|message|>", "1", "<|end|>"],
            "end with <|call|>",
            "analysis",
        ),
        (["<|channel|>", "analysis to=browser.search", "<|message|>", "{}", "<|call|>"], "or python", None),
    ],
)
def test_malformed_builtin_calls_are_errors_from_that_tool(pieces, reason, channel):
    error = parse_assistant(sampled(pieces), TOKENIZER, {"python": PYTHON})
    assert isinstance(error, ParseError) and reason in error.reason
    assert error.tool == (None if "browser" in pieces[1] else "python") and error.channel == channel


def test_a_builtin_spec_needs_one_string_parameter():
    with pytest.raises(ValueError, match="one string parameter"):
        ToolSpec(
            "python", "x", {"type": "object", "properties": {"a": {"type": "string"}, "b": {}}}, builtin=True
        )

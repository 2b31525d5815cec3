"""GSM8K-style math word problems with an exact-answer reward and an optional Python tool.

Data: JSONL, one ``{"question": ..., "answer": ...}`` per line. ``answer`` is either the bare
answer or a GSM8K solution ending in ``#### ANSWER``. A small self-written sample ships in
``data/math_sample.jsonl`` (``SAMPLE_PATH``).

Reward: 1.0 when the number in the final answer (``\\boxed{..}`` if present, else the last number
in the text; commas, ``$`` and trailing zeros ignored) equals the gold number, else 0.0.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from titan_rl.rl.envs.agentic import EpisodeStart, Message, ToolSpec, Transcript
from titan_rl.rl.envs.python_tool import PythonSandbox

SAMPLE_PATH = Path(__file__).parent / "data" / "math_sample.jsonl"
SYSTEM = "You are a helpful assistant that solves math word problems."
INSTRUCTIONS = "Solve the problem. In the final channel, give only the final number."
PYTHON_INSTRUCTIONS = " You may run Python with the python tool; print what you need to see."
# The python tool's system-message text: its first paragraph is the one the released gpt-oss models
# were trained with (openai/harmony docs/format.md, "Python tool"); the second says what this sandbox
# is (a fresh process per call, as gpt-oss's own reference tool, not a stateful notebook).
PYTHON_DESCRIPTION = (
    "Use this tool to execute Python code in your chain of thought. The code will not be shown to the "
    "user. This tool should be used for internal reasoning, but not for code that is intended to be "
    "visible to the user (e.g. when creating plots, tables, or files).\n"
    "When you send a message containing Python code to python, it will be executed in a fresh sandboxed "
    "process (nothing is kept between calls; no network), and what it prints is returned to you: use "
    "print statements to see results. It times out after {timeout_s:g} seconds."
)


def python_tool_spec(timeout_s: float) -> ToolSpec:
    """The ``python`` tool: gpt-oss's built-in (``to=python`` with raw code) in the gpt-oss system
    style, a ``functions.python`` function taking ``{"code": ...}`` in the minimal one."""
    return ToolSpec(
        name="python",
        description="Run Python 3 code in a sandbox (no network, no files outside its folder); returns "
        "what it prints.",
        parameters={"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]},
        builtin=True,
        builtin_description=PYTHON_DESCRIPTION.format(timeout_s=timeout_s),
    )


# a number: 1,234.5, .5, -3, or a fraction 3/4 (a/b, read whole: "3/4" is not 3 then 4)
_NUMBER = re.compile(r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:/\d+(?:\.\d+)?)?")
_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")  # one level of braces: \boxed{\frac{3}{4}}
_FRAC = re.compile(r"\\[dt]?frac\{\s*(-?[\d.,]+)\s*\}\{\s*(-?[\d.,]+)\s*\}")  # LaTeX \frac{a}{b}


@dataclass(frozen=True)
class MathProblem:
    question: str
    answer: str  # the gold answer alone (the part after "####" for GSM8K solutions)


def load_math_jsonl(path: str | Path) -> list[MathProblem]:
    """Read ``{"question", "answer"}`` lines; errors name the file and line."""
    problems = []
    if not Path(path).is_file():
        what = "is a folder, not a JSONL file" if Path(path).is_dir() else "not found"
        raise FileNotFoundError(f"math dataset {path} {what} (env.data_path)")
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error})") from None
            if not isinstance(row, dict) or not {"question", "answer"} <= set(row):
                found = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(
                    f"{path}:{number}: each line needs 'question' and 'answer' keys, got {found}"
                )
            answer = str(row["answer"])
            problems.append(MathProblem(str(row["question"]), answer.rsplit("####", 1)[-1].strip()))
    if not problems:
        raise ValueError(f"{path}: no problems found (expected JSONL lines with 'question' and 'answer')")
    return problems


def _numbers(text: str) -> list[Fraction]:
    """Every number in ``text``, in order: dollar signs and thousands separators dropped, ``a/b``
    and ``\\frac{a}{b}`` as the fraction (a zero denominator is not a number)."""
    text = _FRAC.sub(r"\1/\2", text.replace("$", ""))
    found = []
    for match in _NUMBER.findall(text):
        try:
            found.append(Fraction(match.replace(",", "")))
        except (ValueError, ZeroDivisionError):
            continue
    return found


def parse_number(text: str) -> Fraction | None:
    """``"$1,234.50"`` -> 1234.5, ``"3/4"`` -> 3/4; the first number, None if there is none."""
    numbers = _numbers(text)
    return numbers[0] if numbers else None


def extract_answer(text: str) -> Fraction | None:
    """The model's answer: the last ``\\boxed{..}`` if any, else the last number in the text."""
    boxed = _BOXED.findall(text)
    numbers = _numbers(boxed[-1] if boxed else text)
    return (numbers[0] if boxed else numbers[-1]) if numbers else None


def is_correct(final_answer: str | None, gold: str) -> bool:
    if final_answer is None:
        return False
    expected = parse_number(gold)
    if expected is None:  # a non-numeric gold answer: exact text match
        return final_answer.strip().lower() == gold.strip().lower()
    return extract_answer(final_answer) == expected


class MathEnv:
    """One task per problem; ``python`` (a ``PythonSandbox``) adds the ``python`` tool."""

    pass_reward = 1.0  # the right answer

    def __init__(
        self, problems: list[MathProblem] | None = None, python: PythonSandbox | None = None
    ) -> None:
        self.problems = problems if problems is not None else load_math_jsonl(SAMPLE_PATH)
        self.python = python

    @classmethod
    def from_jsonl(cls, path: str | Path, python: PythonSandbox | None = None) -> MathEnv:
        return cls(load_math_jsonl(path), python)

    def __len__(self) -> int:
        return len(self.problems)

    def reset(self, index: int) -> EpisodeStart:
        problem = self.problems[index]
        instructions = INSTRUCTIONS + (PYTHON_INSTRUCTIONS if self.python else "")
        messages = [
            Message("system", SYSTEM),
            Message("developer", instructions),
            Message("user", problem.question),
        ]
        tools = [python_tool_spec(self.python.limits.timeout_s)] if self.python else []
        return EpisodeStart(messages, tools, state=problem)

    def call_tool(self, state: MathProblem, name: str, arguments: dict[str, Any]) -> str:
        if name != "python" or self.python is None:
            raise ValueError(f"unknown tool {name!r}")
        code = arguments.get("code")
        if not isinstance(code, str) or set(arguments) != {"code"}:
            raise ValueError('python takes one string argument: {"code": "..."}')
        return self.python.run(code)

    def reward(self, transcript: Transcript) -> float:
        return float(is_correct(transcript.final_answer, transcript.state.answer))

"""Environments: single-turn (``Environment``) and multi-turn agentic (``AgentEnvironment``)."""

from titan_rl.rl.envs.agentic import AgentEnvironment, EpisodeStart, Message, ToolCall, ToolSpec, Transcript
from titan_rl.rl.envs.base import Environment
from titan_rl.rl.envs.math_task import MathEnv, MathProblem, load_math_jsonl
from titan_rl.rl.envs.python_tool import PythonSandbox, SandboxLimits
from titan_rl.rl.envs.token_preference import TokenPreferenceEnv
from titan_rl.rl.envs.tool_task import ToolLookupEnv

__all__ = [
    "AgentEnvironment",
    "Environment",
    "EpisodeStart",
    "MathEnv",
    "MathProblem",
    "Message",
    "PythonSandbox",
    "SandboxLimits",
    "TokenPreferenceEnv",
    "ToolCall",
    "ToolLookupEnv",
    "ToolSpec",
    "Transcript",
    "load_math_jsonl",
]

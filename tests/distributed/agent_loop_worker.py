"""torchrun worker: multi-turn episodes on 2 CPU ranks (gloo) with a tool and a reward that answer
differently on each rank. Exits non-zero on a mismatch.

Every rank runs every episode; episode n's tool calls and reward must run on rank n % 2 only and
be shared, so both ranks end with the same trajectories, and a stateful tool's state (a call
counter kept in the episode's state) advances where the calls run.
"""

from __future__ import annotations

import torch.distributed as dist

from titan_rl.rl.agent_loop import AgentLoopConfig, run_episodes
from titan_rl.rl.envs.agentic import EpisodeStart, Message, ToolSpec, final_answer, tool_call
from titan_rl.rl.harmony import generation_prompt, render_message
from titan_rl.rl.rollout import Completion, SamplingParams
from titan_rl.rl.tokenizer import build_tiny_tokenizer

TOKENIZER = build_tiny_tokenizer()
TOOL = ToolSpec("where", "Which rank runs this call.", {"type": "object", "properties": {}})


class RankDependentEnv:
    """A tool whose answer names the rank it ran on and counts the episode's calls; a reward that
    adds the rank it ran on to the number of tool calls."""

    def __len__(self) -> int:
        return 3

    def reset(self, index: int) -> EpisodeStart:
        return EpisodeStart([Message("user", f"task {index}")], [TOOL], state={"calls": 0})

    def call_tool(self, state, name, arguments) -> str:
        state["calls"] += 1
        return f"rank {dist.get_rank()} call {state['calls']}"

    def reward(self, transcript) -> float:
        return dist.get_rank() + len(transcript.tool_calls)


class ScriptedEngine:
    """Every episode calls the tool in its first two turns, then answers; no collective inside."""

    def __init__(self) -> None:
        self.calls = 0

    def generate(self, prompts, params):
        final = self.calls >= 2
        self.calls += 1
        message = final_answer("done") if final else tool_call("where", "{}")
        tokens = render_message(message, TOKENIZER, "<|return|>" if final else None)
        tokens = tokens[len(generation_prompt(TOKENIZER)) :]
        return [Completion(tokens, [-0.5] * len(tokens), "stop") for _ in prompts]


def check(ok: bool, what: str) -> None:
    if not ok:
        raise SystemExit(f"rank {dist.get_rank()}: {what}")


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    config = AgentLoopConfig(max_turns=4, tool_timeout_s=30.0)
    trajectories, stats = run_episodes(
        ScriptedEngine(), TOKENIZER, RankDependentEnv(), [0, 1, 2], 2, SamplingParams(), config
    )
    check(len(trajectories) == 6 and stats["tool_calls"] == 12, f"episodes / calls: {stats}")
    for n, trajectory in enumerate(trajectories):
        text = TOKENIZER.decode(trajectory.tokens)
        owner = n % 2
        check(
            f"rank {owner} call 1" in text and f"rank {owner} call 2" in text,
            f"episode {n}: its tool calls did not run (in order) on rank {owner} alone: {text!r}",
        )
        check(f"rank {1 - owner} call" not in text, f"episode {n} saw rank {1 - owner}'s tool")
        check(
            trajectory.reward == owner + 2, f"episode {n}: reward {trajectory.reward} not from rank {owner}"
        )
    mine = [(t.tokens, t.loss_mask, t.rollout_logprobs, t.reward) for t in trajectories]
    every = [None, None]
    dist.all_gather_object(every, mine)
    check(every[0] == every[1], "the ranks' trajectories differ")
    print(f"rank {rank}: ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

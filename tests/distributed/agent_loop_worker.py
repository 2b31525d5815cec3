"""torchrun worker: multi-turn episodes on 2 CPU ranks (gloo) with a tool and a reward that answer
differently on each rank. Exits non-zero on a mismatch.

Every rank runs every episode; episode n's tool calls and reward must run on rank n % 2 only and
be shared, so both ranks end with the same trajectories, and a stateful tool's state (a call
counter kept in the episode's state) advances where the calls run. Episodes end in different
rounds (task 1 calls the tool twice, task 0 once, 3 episodes per task), so in the second round an
episode's place among the active ones is not its number. A share that raises on one rank raises
on both, instead of leaving the other waiting in the gather.
"""

from __future__ import annotations

import re

import torch.distributed as dist

from titan_rl.rl.agent_loop import AgentLoopConfig, run_episodes
from titan_rl.rl.envs.agentic import EpisodeStart, Message, ToolSpec, final_answer, tool_call
from titan_rl.rl.harmony import generation_prompt, render_message
from titan_rl.rl.rollout import Completion, SamplingParams
from titan_rl.rl.shared import computed_once
from titan_rl.rl.tokenizer import build_tiny_tokenizer

TOKENIZER = build_tiny_tokenizer()
TOOL = ToolSpec("where", "Which rank runs this call.", {"type": "object", "properties": {}})
GROUP = 3  # episodes per task: task 1's are episodes 3, 4, 5, active at places 0, 1, 2 in round 2


def wanted_calls(task: int) -> int:
    return 2 if task == 1 else 1


class RankDependentEnv:
    """A tool whose answer names the rank it ran on and counts the episode's calls; a reward that
    adds the rank it ran on to the number of tool calls."""

    def __len__(self) -> int:
        return 2

    def reset(self, index: int) -> EpisodeStart:
        return EpisodeStart([Message("user", f"task {index}")], [TOOL], state={"calls": 0})

    def call_tool(self, state, name, arguments) -> str:
        state["calls"] += 1
        return f"rank {dist.get_rank()} call {state['calls']}"

    def reward(self, transcript) -> float:
        return dist.get_rank() + len(transcript.tool_calls)


class ScriptedEngine:
    """An episode calls the tool ``wanted_calls(task)`` times, then answers (read from its prompt);
    no collective inside."""

    def generate(self, prompts, params):
        out = []
        for prompt in prompts:
            text = TOKENIZER.decode(prompt)
            task = int(re.search(r"task (\d+)", text).group(1))
            final = text.count("<|start|>functions.where") >= wanted_calls(task)
            message = final_answer("done") if final else tool_call("where", "{}")
            tokens = render_message(message, TOKENIZER, "<|return|>" if final else None)
            tokens = tokens[len(generation_prompt(TOKENIZER)) :]
            out.append(Completion(tokens, [-0.5] * len(tokens), "stop"))
        return out


def check(ok: bool, what: str) -> None:
    if not ok:
        raise SystemExit(f"rank {dist.get_rank()}: {what}")


def check_episodes(rank: int) -> None:
    config = AgentLoopConfig(max_turns=4, tool_timeout_s=30.0)
    trajectories, stats = run_episodes(
        ScriptedEngine(), TOKENIZER, RankDependentEnv(), [0, 1], GROUP, SamplingParams(), config
    )
    check(len(trajectories) == 6 and stats["tool_calls"] == 9, f"episodes / calls: {stats}")
    for n, trajectory in enumerate(trajectories):
        text, owner, calls = TOKENIZER.decode(trajectory.tokens), n % 2, wanted_calls(n // GROUP)
        results = re.findall(r"rank \d call \d", text)
        expected = [f"rank {owner} call {k}" for k in range(1, calls + 1)]
        check(results == expected, f"episode {n}: tool results {results}, not {expected}")
        check(
            trajectory.reward == owner + calls, f"episode {n}: reward {trajectory.reward}, not rank {owner}'s"
        )
    mine = [(t.tokens, t.loss_mask, t.rollout_logprobs, t.reward) for t in trajectories]
    every = [None, None]
    dist.all_gather_object(every, mine)
    check(every[0] == every[1], "the ranks' trajectories differ")


def check_a_failing_share(rank: int) -> None:
    def fails_on_rank_1(mine: list[int]) -> list[int]:
        if rank == 1:
            raise ValueError("rank 1's share broke")
        return [i * 10 for i in mine]

    try:
        computed_once([0, 1, 2, 3], fails_on_rank_1)
        check(False, "a share that raised on rank 1 returned")
    except ValueError as e:
        check(rank == 1 and "rank 1's share broke" in str(e), f"raised {e!r}")
    except RuntimeError as e:
        check(rank == 0 and "rank 1 failed" in str(e) and "share broke" in str(e), f"raised {e!r}")
    # and the ranks are still in step: the next shared computation works
    check(computed_once([0, 1, 2, 3], lambda mine: [i * 10 for i in mine]) == [0, 10, 20, 30], "results")


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    check_episodes(rank)
    check_a_failing_share(rank)
    print(f"rank {rank}: ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

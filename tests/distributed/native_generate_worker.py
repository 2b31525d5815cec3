"""torchrun worker: the native engine on 2 CPU ranks (gloo) with FSDP2. Exits non-zero on mismatch.

Each rank generates its share of the prompts and returns all completions, equal to one process's
(greedy and sampled, fp32); the FSDP weight all-gathers per ``generate`` do not grow with the new tokens.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.fsdp._fully_shard import _fsdp_param_group
from torch.distributed.tensor import DTensor

from tests.conftest import tiny_model
from titan_rl.parallel.parallel_dims import ParallelDims
from titan_rl.parallel.parallelize import ParallelConfig, parallelize_gpt_oss
from titan_rl.rl.rollout import NativeEngine, SamplingParams

SEED = 21
# the sharded batch differs from the single process's, so the MoE may take its other (padded or
# sorted) path for some steps: fp32 round-off, far below any token's log-prob gap in this model
LOGPROB_TOL = 1e-5


def check(ok: bool, what: str) -> None:
    if not ok:
        raise SystemExit(f"rank {dist.get_rank()}: {what}")


def same(completions, reference, what: str) -> None:
    check(len(completions) == len(reference), f"{what}: {len(completions)} completions, not {len(reference)}")
    for n, (c, r) in enumerate(zip(completions, reference)):
        check(c.tokens == r.tokens and c.finish_reason == r.finish_reason, f"{what}: prompt {n} differs")
        err = max((abs(a - b) for a, b in zip(c.logprobs, r.logprobs)), default=0.0)
        check(err < LOGPROB_TOL, f"{what}: prompt {n} log-probs differ by {err:.2e}")
        check((c.routing is None) == (r.routing is None), f"{what}: prompt {n} routing recorded once")
        if r.routing is not None:  # the experts, gathered from the rank that generated the prompt
            check(
                torch.equal(c.routing.sort(-1).values, r.routing.sort(-1).values),
                f"{what}: prompt {n} routing differs",
            )


def main() -> None:
    g = torch.Generator().manual_seed(SEED)
    prompts = [
        torch.randint(0, 96, (int(n),), generator=g).tolist() for n in torch.randint(1, 9, (5,), generator=g)
    ]
    plain = tiny_model(seed=SEED).eval()
    params = {new: SamplingParams(top_k=1, max_new_tokens=new, stop_token_ids=(5, 17)) for new in (4, 16)}
    # one process's answer, before torch.distributed exists
    reference = {new: NativeEngine(plain).generate(prompts, p) for new, p in params.items()}
    sampling = SamplingParams(temperature=0.9, top_k=30, max_new_tokens=12, stop_token_ids=(5, 17))
    sampled = NativeEngine(plain, seed=4, record_routing=True).generate(prompts, sampling)

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    dims = ParallelDims(1, dist.get_world_size(), 1, 1, world_size=dist.get_world_size(), device_type="cpu")
    model = parallelize_gpt_oss(tiny_model(seed=SEED).eval(), dims, ParallelConfig())
    engine = NativeEngine(model)

    gathers, shares = [0], []
    all_gather = _fsdp_param_group.foreach_all_gather  # what an FSDP unshard calls, once per module
    _fsdp_param_group.foreach_all_gather = lambda *a, **k: (
        gathers.__setitem__(0, gathers[0] + 1) or all_gather(*a, **k)
    )
    inner = engine._generate
    engine._generate = lambda mine, *a: shares.append(len(mine)) or inner(mine, *a)

    counts = {}
    for new, p in params.items():
        gathers[0] = 0
        same(engine.generate(prompts, p), reference[new], f"{new} new tokens")
        counts[new] = gathers[0]
    check(shares == [3, 3] if rank == 0 else shares == [2, 2], f"generated shares {shares}")
    check(counts[4] > 0, "no FSDP all-gather counted: the counting patch missed FSDP's gather")
    check(counts[4] == counts[16], f"weight all-gathers per generate grow with new tokens: {counts}")
    blocks = len(model.layers) + 1  # every block and the root, once
    check(counts[4] == blocks, f"{counts[4]} all-gathers for {blocks} FSDP modules")

    # queued prompts refill freed rows on each rank, still with no gathers per token
    gathers[0] = 0
    queued = NativeEngine(model, max_batch_rows=1)
    same(queued.generate(prompts, params[16]), reference[16], "one row per rank")
    check(gathers[0] == blocks, f"{gathers[0]} all-gathers with refilled rows, not {blocks}")

    # sampling noise is keyed by prompt: the ranks' shares sample what one process samples
    # (with the routing recorded: every rank returns each prompt's experts too)
    same(NativeEngine(model, seed=4, record_routing=True).generate(prompts, sampling), sampled, "sampled")

    # a rank without prompts still joins the gathers, and gets the other rank's completion
    shares.clear()
    same(engine.generate(prompts[:1], params[4]), reference[4][:1], "one prompt on two ranks")
    check(shares == ([1] if rank == 0 else []), f"one prompt: shares {shares}")

    # afterwards the weights are sharded again and training runs as usual
    check(all(isinstance(p, DTensor) for p in model.parameters()), "parameters left unsharded")
    model(torch.tensor([prompts[0]])).sum().backward()
    check(all(p.grad is not None for p in model.parameters()), "backward after generate left no gradients")
    dist.destroy_process_group()
    print(f"rank {rank}: ok, all-gathers per generate {counts}")


if __name__ == "__main__":
    main()

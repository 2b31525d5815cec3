"""torchrun worker: the native engine on an expert-parallel model (dp_shard=2 x ep=2 on 2 CPU ranks,
gloo). Every rank decodes every row, so the ranks must sample the same tokens; if they did not,
they would stop at different steps and a MoE all-to-all would hang. A rank whose sampler is made to
differ must make every rank raise at the next host read instead. Exits non-zero on a mismatch."""

from __future__ import annotations

import torch
import torch.distributed as dist

from tests.conftest import tiny_model
from tests.distributed.worker_checks import check, finish
from titan_rl.parallel import ParallelConfig, ParallelDims, parallelize_gpt_oss
from titan_rl.rl.rollout import NativeEngine, SamplingParams, native


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    dims = ParallelDims(dp_replicate=1, dp_shard=2, cp=1, ep=2, world_size=dist.get_world_size())
    dims.build_mesh()
    model = parallelize_gpt_oss(tiny_model(5), dims, ParallelConfig()).eval()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (4, 7, 3)]
    params = SamplingParams(temperature=1.0, max_new_tokens=6)

    completions = NativeEngine(model, seed=3).generate(prompts, params)
    every = [None, None]
    dist.all_gather_object(every, [c.tokens for c in completions])
    check(every[0] == every[1], "the ranks' completions differ")

    real = native.sample_next

    def off_by_one_on_rank_1(logits, params, noise):
        tokens, logprobs = real(logits, params, noise)
        return (tokens + rank) % logits.shape[-1], logprobs

    native.sample_next = off_by_one_on_rank_1
    try:
        NativeEngine(model, seed=3).generate(prompts, params)
        check(False, "ranks that sampled different tokens went on decoding")
    except RuntimeError as e:
        check("sampled different tokens" in str(e), f"raised {e!r}")
    finally:
        native.sample_next = real
    finish()


if __name__ == "__main__":
    main()

"""Three RL steps of the Trainer on a fixed batch, for the mixed-precision tests.

``run_steps(precision)`` is imported by ``test_mixed_precision.py`` for one process, and run here
under torchrun (gloo) for N processes: ``mixed_precision_worker.py PRECISION FILE [LAYOUT]`` saves
the result on rank 0 with ``torch.save``. Per step it reports the loss (an entropy bonus makes it
depend on the weights; on-policy the policy term alone is constant), the entropy and the gradient
norm; after the steps, the update of the full fp32 weights (all parameters, flattened) and what the
run stored and computed in.
"""

from __future__ import annotations

import os
import sys

import torch

from titan_rl.config import load_config
from titan_rl.model import GptOss, GptOssModelArgs
from titan_rl.rl.packing import pack_trajectories
from titan_rl.rl.types import Trajectory
from titan_rl.trainer import Trainer

STEPS = 3


def fixed_batch(vocab: int):
    """12 trajectories of different lengths, prompts masked out, random advantages."""
    gen = torch.Generator().manual_seed(3)
    trajectories, advantages = [], []
    for i in range(12):
        prompt, response = 5 + i % 4, 6 + (7 * i) % 13
        tokens = torch.randint(0, vocab, (prompt + response,), generator=gen).tolist()
        mask = [0] * prompt + [1] * response
        logprobs = [-2.0 * m for m in mask]
        trajectories.append(Trajectory(tokens, mask, logprobs, reward=0.0, group=i // 4))
        advantages.append(float(torch.randn((), generator=gen)))
    return pack_trajectories(trajectories, advantages, seq_len=64), len(trajectories)


FP32_ACTIVATIONS = "bf16_fp32_activations"  # bf16 mixed precision with model.activation_dtype = float32


def run_steps(precision: str, world_size: int = 1, layout: str = "") -> dict:
    """``precision``: fp32, bf16 or ``FP32_ACTIVATIONS``; ``layout``: ``cp=2`` (all ranks one
    context-parallel group) or ``ep=2`` (experts split over the data-parallel ranks), else FSDP over
    every rank."""
    activations = "float32" if precision == FP32_ACTIVATIONS else "auto"
    precision = "bf16" if precision == FP32_ACTIVATIONS else precision
    degree = {"cp=2": ["--parallelism.dp_shard=1", "--parallelism.cp=2"], "ep=2": ["--parallelism.ep=2"]}
    cfg = load_config(
        None,
        [
            f"--parallelism.mixed_precision={precision}",
            f"--parallelism.dp_shard={world_size}",
            *degree.get(layout, []),
            "--rl.entropy_coef=0.05",
            "--optimizer.lr=0.003",
            "--training.micro_batch_rows=2",
        ],
    )
    torch.manual_seed(0)
    model = GptOss(GptOssModelArgs.from_preset("debug", initializer_range=0.1, activation_dtype=activations))
    batch, num_seqs = fixed_batch(model.args.vocab_size)
    start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    from titan_rl.parallel import ParallelDims

    trainer = Trainer(model, cfg, ParallelDims.from_config(cfg.parallelism, world_size))
    block_dtypes = set()
    trainer.model.layers[0].register_forward_hook(lambda m, i, out: block_dtypes.add(str(out[0].dtype)))
    steps = []
    for _ in range(STEPS):
        metrics = trainer.train_step(batch, num_seqs)
        steps.append({k: metrics[k] for k in ("loss", "entropy/mean", "grad_norm")})
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in trainer.model.parameters()]
    state = [t for s in trainer.optimizer.state.values() for t in s.values() if t.numel() > 1]
    return {
        "steps": steps,
        "update": torch.cat([p.detach().flatten() for p in full]) - start,
        "param_dtypes": sorted({str(p.dtype) for p in trainer.model.parameters()}),
        "optimizer_state_dtypes": sorted({str(t.dtype) for t in state}),
        "block_output_dtypes": sorted(block_dtypes),
        "precision": trainer.precision,
    }


if __name__ == "__main__":
    torch.distributed.init_process_group("gloo")
    result = run_steps(sys.argv[1], int(os.environ["WORLD_SIZE"]), *sys.argv[3:4])
    if torch.distributed.get_rank() == 0:
        torch.save(result, sys.argv[2])
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()

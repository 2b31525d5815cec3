"""torchrun worker: ``Trainer`` on data / expert / context-parallel ranks vs ``Trainer`` in one process.

Usage: ``trainer_parallel_worker.py LAYOUT [LAYOUT ...]``, LAYOUT like ``dp_shard=2,ep=2`` or
``cp=2,aggregation=seq-mean-token-mean`` (missing degrees are 1); ``routing=1`` gives the
trajectories a recorded routing (random experts, some positions unrouted) that every forward replays
(``rl.rollout_routing_replay``): it must reach each rank's rows and sequence shard like the tokens.

Every rank builds the single-process trainer and the parallel one from the same weights and feeds
both the same packed batches (what every rank's rollouts give): one supervised step, then two RL
steps. The batches carry information: responses of 1 to 20 tokens with advantages that are not
zero-mean, so the loss is far from 0 (checked); the optimizer's eps is 1, which makes AdamW's first steps
proportional to the gradient (with the default eps Adam's step hardly depends on its scale, so
gradients summed over the wrong number of ranks would move the weights the same). After each step
the returned loss, gradient norm and entropy, and every full parameter, must match rel ``TOL``.
Exits non-zero with the mismatches.
"""

from __future__ import annotations

import dataclasses
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from tests.conftest import randomize_biases, rel_err, tiny_model
from tests.distributed.worker_checks import check, finish
from titan_rl.config import load_config
from titan_rl.rl.packing import PackedBatch, pack_trajectories
from titan_rl.rl.types import Trajectory
from titan_rl.train import parallel_dims_for
from titan_rl.trainer import Trainer

SEQ_LEN, GROUPS, GROUP_SIZE = 32, 3, 4
TOL = 1e-5  # fp32: the ranks sum the same terms in another order (round-off ~1e-7 relative)
COMMON = [
    f"--training.seq_len={SEQ_LEN}",
    "--training.micro_batch_rows=2",  # several micro-batches: gradient accumulation too
    "--training.grad_clip=0",  # the gradient itself reaches the optimizer
    "--optimizer.lr=0.2",
    "--optimizer.eps=1.0",  # see the module docstring
    "--optimizer.weight_decay=0",
]
references: dict[tuple[str, ...], list] = {}
# metrics of sequence-level terms, compared like the loss where a layout has them (ratio/seq_mean is
# exactly 1 on-policy; the correction's fraction must be strictly between 0 and 1 in some step)
SEQUENCE_LEVEL = ("correction/masked_frac", "correction/truncated_frac", "ratio/seq_mean")


def make_model():
    """The tiny test model with random attention biases (every parameter O(0.1), none zero)."""
    return randomize_biases(tiny_model(seed=0), seed=3)


def random_routing(length: int, gen: torch.Generator) -> torch.Tensor:
    """Distinct random experts per position and layer, the last position unrouted (-1)."""
    args = tiny_model(seed=0).args
    scores = torch.rand(length, args.num_hidden_layers, args.num_local_experts, generator=gen)
    routing = scores.argsort(-1)[..., : args.num_experts_per_tok].to(torch.int16)
    routing[-1] = -1
    return routing


def make_batch(seed: int, vocab: int, routing: bool = False):
    """GROUPS x GROUP_SIZE trajectories: 2-5 prompt and 1-20 response tokens; advantages reward - 0.3
    (a fixed baseline: zero-mean GRPO advantages make a sequence-mean loss ~0 on-policy)."""
    gen = torch.Generator().manual_seed(seed)
    trajectories = []
    for i in range(GROUPS * GROUP_SIZE):
        prompt, response = (int(torch.randint(lo, hi, (), generator=gen)) for lo, hi in ((2, 6), (1, 21)))
        tokens = torch.randint(0, vocab, (prompt + response,), generator=gen).tolist()
        logprobs = (-2 * torch.rand(response, generator=gen)).tolist()
        reward = float(torch.rand((), generator=gen))
        trajectories.append(
            Trajectory(
                tokens, [0] * prompt + [1] * response, [0.0] * prompt + logprobs, reward, i // GROUP_SIZE
            )
        )
    if routing:
        route_gen = torch.Generator().manual_seed(seed + 100)
        for t in trajectories:
            t.routing = random_routing(len(t.tokens), route_gen)
    advantages = [t.reward - 0.3 for t in trajectories]
    return pack_trajectories(trajectories, advantages, SEQ_LEN), len(trajectories)


def near_the_model(batch: PackedBatch, seed: int) -> PackedBatch:
    """The batch with engine log-probs near the test model's (about -5.2 +- 1.1 per token): -5.2 +-
    0.3, so a trajectory's summed log-weight is a few units either side of 0 and a sequence-level
    correction with threshold 20 keeps (or leaves untruncated) some trajectories and not others."""
    gen = torch.Generator().manual_seed(seed)
    near = -5.2 + 0.3 * torch.randn(batch.rollout_logprobs.shape, generator=gen)
    return dataclasses.replace(batch, rollout_logprobs=torch.where(batch.target_mask, near, 0.0))


def full_state(model) -> dict[str, torch.Tensor]:
    return {
        name: (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()
        for name, t in model.state_dict().items()
    }


def run(trainer: Trainer, batches) -> list[tuple[dict[str, float], dict[str, torch.Tensor]]]:
    """One supervised step, then RL steps; per step the metrics and the full parameters after it."""
    history = []
    sft_batch, _ = batches[0]
    sft_optimizer = torch.optim.AdamW(trainer.model.parameters(), lr=0.2, eps=1.0, weight_decay=0.0)
    history.append(({"loss": trainer.sft_step(sft_batch, sft_optimizer)}, full_state(trainer.model)))
    for batch, num_seqs in batches[1:]:
        history.append((trainer.train_step(batch, num_seqs), full_state(trainer.model)))
    return history


def check_reference(layout: str, trainer: Trainer, single: Trainer, batches) -> None:
    """Each trajectory's KL to the reference (``rl.kl_penalty = "reward"``) on the ranks equals one
    process's: every rank's rows and sequence shards summed once. Then both references become their
    trained policy (``reset_reference``, shard by shard on the ranks) and must agree again."""
    single.model.load_state_dict(full_state(trainer.model))  # the trained policy, in one process
    batch, num_seqs = batches[-1]
    for when in ("initial", "reset"):
        got, got_mean = trainer.trajectory_kl(batch, num_seqs)
        want, want_mean = single.trajectory_kl(batch, num_seqs)
        err = (got - want).abs().max().item() / want.abs().max().item()
        check(err < TOL, f"{layout} {when} reference: trajectory KL rel err {err:.1e}")
        check(
            abs(got_mean - want_mean) <= TOL * abs(want_mean), f"{layout} {when}: {got_mean} vs {want_mean}"
        )
        check(want.abs().min().item() > 1e-3, f"{layout} {when}: a trajectory KL ~ 0 ({want.tolist()})")
        if when == "initial":
            initial = want
            trainer.reset_reference()
            single.reset_reference()
    moved = (want - initial).abs().max().item() / initial.abs().max().item()
    check(moved > 1e-2, f"{layout}: reset_reference did not change the KL ({moved:.1e})")


def run_layout(layout: str, batches: dict[bool, list]) -> None:
    spec = dict(item.split("=") for item in layout.split(","))
    extra = [f"--rl.aggregation={spec.pop('aggregation')}"] if "aggregation" in spec else []
    extra += [f"--rl.policy_loss={spec.pop('policy')}"] if "policy" in spec else []
    if "correction" in spec:  # e.g. mis-sequence: MIS on each trajectory's summed log-weight
        mode, level = spec.pop("correction").split("-")
        extra += [f"--rl.correction={mode}", f"--rl.correction_level={level}", "--rl.correction_threshold=20"]
    routing = spec.pop("routing", "0") == "1"
    batches = batches[routing]
    if any(arg.startswith("--rl.correction=") for arg in extra):
        batches = [(near_the_model(batch, seed), n) for seed, (batch, n) in enumerate(batches)]
    extra += ["--rl.rollout_routing_replay=true"] if routing else []
    if "kl" in spec:  # a frozen reference: the KL in the reward (trajectory_kl), then reset_reference
        extra += ["--rl.kl_coef=0.1", f"--rl.kl_penalty={spec.pop('kl')}"]
    parallel = [f"--parallelism.{key}={value}" for key, value in spec.items()]
    if tuple(extra) not in references:  # the one-process run, once per loss configuration
        references[tuple(extra)] = run(Trainer(make_model(), load_config(None, COMMON + extra)), batches)
    reference = references[tuple(extra)]
    cfg = load_config(None, COMMON + extra + parallel)
    trainer = Trainer(make_model(), cfg, parallel_dims_for(cfg, dist.get_world_size()))
    got = run(trainer, batches)
    if trainer.reference is not None:
        check_reference(layout, trainer, Trainer(make_model(), load_config(None, COMMON + extra)), batches)
    before = [full_state(make_model())] + [state for _, state in got]
    for step, ((metrics, params), (ref_metrics, ref_params)) in enumerate(zip(got, reference)):
        check(abs(ref_metrics["loss"]) > 1e-3, f"{layout} step {step}: loss {ref_metrics['loss']} ~ 0")
        for key, value in ref_metrics.items():
            if key in ("loss", "grad_norm", "entropy/mean", *SEQUENCE_LEVEL):
                err = abs(metrics[key] - value) / max(abs(value), 1e-12)
                check(err < TOL, f"{layout} step {step}: {key} {metrics[key]} vs {value} (rel {err:.1e})")
        for name, param in params.items():
            err = rel_err(param, ref_params[name])
            check(err < TOL, f"{layout} step {step}: {name} rel err {err:.1e} after the step")
            moved = rel_err(param, before[step][name])  # the step changes more than the tolerance
            check(moved > 3 * TOL, f"{layout} step {step}: {name} did not move ({moved:.1e})")
    acting = {
        "--rl.correction=mis": "correction/masked_frac",
        "--rl.correction=tis": "correction/truncated_frac",
    }
    for arg, key in acting.items():  # the layout's correction acted on some trajectories, not all
        if arg in extra:
            seen = [metrics[key] for metrics, _ in reference[1:]]
            check(any(0 < v < 1 for v in seen), f"{layout}: {key} {seen}: all or nothing")
    if dist.get_rank() == 0:
        print(f"layout {layout}: compared {len(got)} steps", flush=True)


def main(layouts: list[str]) -> None:
    dist.init_process_group("gloo")
    torch.set_default_dtype(torch.float32)
    vocab = tiny_model(seed=0).args.vocab_size
    batches = {r: [make_batch(seed, vocab, r) for seed in (11, 12, 13)] for r in (False, True)}
    for layout in layouts:
        run_layout(layout, batches)
    finish(30)


if __name__ == "__main__":
    main(sys.argv[1:])

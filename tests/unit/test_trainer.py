"""titan_rl.trainer: unified forward, minibatches with routing replay, LR schedule."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from tests.conftest import HostSyncs
from titan_rl.config import load_config
from titan_rl.model import GptOss, GptOssModelArgs
from titan_rl.rl.advantages import group_advantages
from titan_rl.rl.collect import build_env, collect_rollouts
from titan_rl.rl.losses import LossConfig, rl_loss, router_balance_loss
from titan_rl.rl.packing import pack_trajectories
from titan_rl.rl.rollout import NativeEngine
from titan_rl.step_stats import StepStats
from titan_rl.trainer import Trainer, replayed_fraction


def setup(*overrides: str, dtype: torch.dtype = torch.float32):
    cfg = load_config(None, ["--training.seq_len=64", "--rollout.prompts_per_step=4", *overrides])
    torch.manual_seed(0)
    args = GptOssModelArgs.from_preset(
        "debug", num_local_experts=8, num_experts_per_tok=2, initializer_range=0.1
    )
    model = GptOss(args).to(dtype)
    trainer = Trainer(model, cfg)
    env = build_env(cfg, args.vocab_size)
    engine = NativeEngine(model, seed=1, record_routing=cfg.rl.rollout_routing_replay)
    trajectories, _ = collect_rollouts(engine, env, None, 1, cfg)
    rewards = torch.tensor([t.reward for t in trajectories]).view(-1, cfg.rollout.group_size)
    advantages = group_advantages(rewards, cfg.rl.advantage).flatten().tolist()
    batch = pack_trajectories(trajectories, advantages, cfg.training.seq_len)
    return trainer, batch, len(trajectories)


# Engine vs trainer log-probs of the same tokens in fp32: ~1e-6 apart (decode path vs training
# forward, round-off); a token scored at the wrong position or against the wrong target is ~0.1-1 off.
ROUND_OFF = 1e-4


def assert_engine_agrees(metrics: dict[str, float]) -> None:
    assert metrics["mismatch/logp_abs_max"] <= ROUND_OFF
    assert metrics["mismatch/k3"] <= ROUND_OFF**2  # k3 ~ delta^2 / 2


class ExpertRecorder:
    """Observes the experts each MoE layer picks, split into no-grad and grad passes."""

    def __init__(self, model: GptOss) -> None:
        self.no_grad: list[torch.Tensor] = []
        self.grad: list[torch.Tensor] = []
        for block in model.layers:
            block.mlp.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        (self.grad if torch.is_grad_enabled() else self.no_grad).append(output[1].clone())


def test_on_policy_step_has_ratio_exactly_one_and_one_forward():
    trainer, batch, n = setup()
    recorder = ExpertRecorder(trainer.model)
    metrics = trainer.train_step(batch, n)
    assert metrics["ratio/min"] == 1.0 and metrics["ratio/max"] == 1.0  # by construction (documents it)
    assert_engine_agrees(metrics)  # the part that can fail: the packed batch scores the sampled tokens
    assert recorder.no_grad == []  # no second (no-grad) forward on-policy
    assert len(recorder.grad) == trainer.model.args.num_hidden_layers * len(trainer._micro_batches(batch))


def test_on_policy_gradient_is_the_policy_gradient():
    """Ratio 1 by construction must still carry -A grad log pi / tokens (token-mean): an old
    log-prob that is not detached would give the same loss value and a zero gradient."""
    import copy

    trainer, batch, n = setup("--training.grad_clip=0")
    twin = copy.deepcopy(trainer.model)
    micro = trainer._micro_batches(batch)
    tokens = sum(len(mb.advantages) for mb in micro)  # trained positions
    for mb in micro:
        logprobs, _, _ = trainer._logprobs(twin, mb)
        (-(mb.advantages * logprobs).sum() / tokens).backward()
    expected = torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in twin.parameters() if p.grad is not None])
    )
    metrics = trainer.train_step(batch, n)
    assert expected > 0 and metrics["grad_norm"] == pytest.approx(float(expected), rel=1e-4)


@pytest.mark.parametrize("replay", [True, False])
def test_minibatches_replay_recorded_experts(replay):
    trainer, batch, n = setup(
        "--training.minibatches=2", f"--rl.routing_replay={str(replay).lower()}", "--optimizer.lr=0.05"
    )
    recorder = ExpertRecorder(trainer.model)
    metrics = trainer.train_step(batch, n)
    layers = trainer.model.args.num_hidden_layers
    # second minibatch: its grad pass runs after one optimizer step changed the router
    recorded = torch.cat([e.flatten() for e in recorder.no_grad[-layers:]])
    used = torch.cat([e.flatten() for e in recorder.grad[-layers:]])
    if replay:
        assert torch.equal(recorded, used)
    else:
        assert not torch.equal(recorded, used)  # routing drifted between the two passes
    assert metrics["ratio/max"] > 1.0 or metrics["ratio/min"] < 1.0  # off-policy after the first update
    assert_engine_agrees(metrics)  # old log-probs (no-grad pass before any update) vs the engine's


def expected_routing(
    trainer: Trainer, batch, minibatches: int, documents: bool = False
) -> list[torch.Tensor]:
    """The batch's routing as the policy forwards see it, in their order: per minibatch, per
    micro-batch (or per document of it: recompute mode's no-grad passes), per layer ``[rows, seq,
    top_k]``."""
    parts = torch.arange(batch.num_rows).tensor_split(min(minibatches, batch.num_rows))
    micro = [mb for rows in parts for mb in trainer._host_micro_batches(batch.rows(rows))]
    if documents:
        micro = [doc for mb in micro for doc in mb.documents()]
    return [
        mb.routing[:, :, layer].long()
        for mb in micro
        for layer in range(trainer.model.args.num_hidden_layers)
    ]


@pytest.mark.parametrize(
    "overrides",
    [(), ("--training.minibatches=2",), ("--training.minibatches=2", "--rl.routing_replay=false"),
     ("--rl.old_logprob_mode=recompute",)],
    ids=["unified", "minibatches", "minibatches-no-replay", "recompute"],
)  # fmt: skip
def test_every_policy_forward_runs_the_rollout_routing(overrides):
    """``rl.rollout_routing_replay``: the engine's experts reach every policy forward, the no-grad
    pass included. The engine's own routing gives its log-probs (fp32); the same batch with every
    recorded token moved to other experts is scored through those (large mismatch), and the
    forwards ran exactly them where the engine recorded some. Planted, each fails: the grad pass
    without the batch's routing; recompute mode's per-document pass without it."""
    trainer, batch, n = setup("--rl.rollout_routing_replay=true", *overrides)
    minibatches = trainer.cfg.training.minibatches
    assert batch.routing is not None and (batch.routing >= 0).float().mean() > 0.5
    first = trainer.train_step(batch, n)
    assert_engine_agrees(first)
    assert first["routing/replayed_frac"] == 1.0  # every sampled token's predecessor was recorded
    experts = trainer.model.args.num_local_experts
    batch.routing = torch.where(batch.routing >= 0, (batch.routing + 1) % experts, batch.routing)
    recorder = ExpertRecorder(trainer.model)
    metrics = trainer.train_step(batch, n)
    assert metrics["mismatch/logp_abs_max"] > 100 * ROUND_OFF
    recompute = trainer.cfg.rl.old_logprob_mode == "recompute"
    expected = expected_routing(trainer, batch, minibatches)
    passes = [(recorder.grad, expected)]
    if minibatches > 1:
        passes.append((recorder.no_grad, expected))
    if recompute:  # the second, per-document forward of the old log-probs
        passes.append((recorder.no_grad, expected_routing(trainer, batch, minibatches, documents=True)))
    for seen, expected in passes:
        assert len(seen) == len(expected)
        for used, want in zip(seen, expected):
            recorded = want >= 0
            assert torch.equal(used[recorded], want[recorded])


def test_replayed_fraction_counts_trained_tokens_whose_predictor_has_recorded_experts():
    _, batch, _ = setup("--rl.rollout_routing_replay=true")
    assert replayed_fraction(batch) == 1.0
    r, p = batch.target_mask.nonzero()[0].tolist()  # a trained position: its experts unrecorded
    batch.routing[r, p] = -1
    assert replayed_fraction(batch) == pytest.approx(1 - 1 / int(batch.target_mask.sum()))
    batch.routing[batch.target_mask.logical_not()] = -1  # untrained positions do not count
    assert replayed_fraction(batch) == pytest.approx(1 - 1 / int(batch.target_mask.sum()))
    batch.routing = None
    assert replayed_fraction(batch) is None


def test_recompute_mode_runs_a_second_forward():
    trainer, batch, n = setup("--rl.old_logprob_mode=recompute")
    recorder = ExpertRecorder(trainer.model)
    assert_engine_agrees(trainer.train_step(batch, n))  # per-document old log-probs vs the engine's
    layers = trainer.model.args.num_hidden_layers
    assert len(recorder.grad) == layers * len(trainer._micro_batches(batch))
    assert len(recorder.no_grad) == layers * len(batch.documents()) == layers * n  # one per trajectory


def test_tempered_top_k_top_p_rollouts_agree_with_the_trainer():
    """The native engine reports the tempered log-prob before top-k / top-p masking (its documented
    contract), which is what the trainer computes with rollout.temperature."""
    trainer, batch, n = setup("--rollout.temperature=0.7", "--rollout.top_k=20", "--rollout.top_p=0.9")
    assert_engine_agrees(trainer.train_step(batch, n))


def test_entropy_bonus_and_kl_term_reach_the_gradient():
    """A term that keeps its value but loses its gradient on the way to the loss (a stray detach)
    leaves grad_norm bitwise equal to the run without it. The policy equals the reference at the
    first step, where k1's gradient (kl_coef * grad logp) is not 0 but k2's and k3's are."""
    trainer, batch, n = setup()
    plain = trainer.train_step(batch, n)["grad_norm"]
    for overrides in (["--rl.entropy_coef=1.0"], ["--rl.kl_coef=0.5", "--rl.kl_estimator=k1"]):
        trainer, batch, n = setup(*overrides)
        grad_norm = trainer.train_step(batch, n)["grad_norm"]
        assert abs(grad_norm / plain - 1) > 1e-3, overrides  # measured: +0.7% and +12%


def test_warmup_then_cosine_schedule():
    trainer, _, _ = setup(
        "--lr_scheduler.warmup_steps=2",
        "--training.steps=10",
        "--optimizer.lr=1.0",
        "--lr_scheduler.min_lr_ratio=0.1",
    )
    lrs = []
    for _ in range(10):
        lrs.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[1:]))
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(7 / 8 * torch.pi)).item()))


def test_bf16_recompute_drifts_but_unified_does_not():
    """The failure this project exists to prevent: a second forward of the same bf16 weights with
    other batch shapes / kernels gives other log-probs, so the "on-policy" ratio is not 1."""
    ratios = {}
    for mode in ("unified", "recompute"):
        trainer, batch, n = setup(f"--rl.old_logprob_mode={mode}")
        trainer.model.to(torch.bfloat16)
        with torch.no_grad():  # near-ties in every router: tiny logit changes flip experts
            for block in trainer.model.layers:
                block.mlp.router.weight.mul_(0.01)
                block.mlp.router.bias.zero_()
        metrics = trainer.train_step(batch, n)
        ratios[mode] = (metrics["ratio/min"], metrics["ratio/max"])
    assert ratios["unified"] == (1.0, 1.0)
    assert ratios["recompute"] != (1.0, 1.0)


def test_non_finite_gradients_skip_the_step_and_are_counted():
    trainer, batch, n = setup("--training.max_skipped_steps=2")
    with torch.no_grad():
        trainer.model.lm_head.weight[0, 0] = float("inf")  # every logit row -> NaN log-probs
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    metrics = trainer.train_step(batch, n)
    assert metrics["train/skipped_steps"] == 1 and trainer.consecutive_skips == 1
    after = trainer.model.state_dict()
    for key, value in before.items():  # the optimizer did not touch anything
        assert torch.equal(value, after[key]), key
    trainer.train_step(batch, n)
    assert trainer.consecutive_skips == 2  # the run loop stops at training.max_skipped_steps


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_from_the_config_changes_memory_not_results(mode):
    """parallelism.activation_checkpoint reaches the model: blocks recompute in backward (the MoE
    runs twice under grad), and metrics and updated weights equal the plain run's."""
    plain, batch, n = setup()
    checkpointed, _, _ = setup(f"--parallelism.activation_checkpoint={mode}")
    calls = []  # a pre-hook: recomputation may stop early, once the MoE's saved tensors are back
    for block in checkpointed.model.layers:
        block.mlp.register_forward_pre_hook(lambda module, args: calls.append(torch.is_grad_enabled()))
    expected, got = plain.train_step(batch, n), checkpointed.train_step(batch, n)
    layers, micro = plain.model.args.num_hidden_layers, len(plain._micro_batches(batch))
    recomputed = layers if mode == "full" else (layers + 1) // 2
    assert len(calls) == (layers + recomputed) * micro and all(calls)
    assert {k: got[k] for k in ("loss", "grad_norm", "entropy/mean")} == pytest.approx(
        {k: expected[k] for k in ("loss", "grad_norm", "entropy/mean")}, rel=1e-6
    )
    for a, b in zip(plain.model.parameters(), checkpointed.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_a_micro_batch_never_waits_on_the_device():
    """Forward, log-probs, loss, backward and the metrics of a micro-batch run without one host
    synchronization (on CPU the same code that runs on CUDA, less the attention kernel): indices of
    trained positions and document boundaries come from the host, metrics are read once per step."""
    trainer, batch, n = setup("--training.micro_batch_rows=2")
    mb = trainer._micro_batches(batch)[0]
    assert mb.num_tokens > 0
    stats = StepStats()
    with HostSyncs() as syncs:
        logprobs, entropy, _ = trainer._logprobs(trainer.model, mb)
        loss, metrics = rl_loss(
            logprobs, logprobs.detach(), mb.rollout_logprobs, mb.advantages, torch.ones_like(logprobs),
            mb.seq_ids, n, trainer.loss_cfg, entropy=entropy, global_tokens=100.0, global_seqs=float(n),
        )  # fmt: skip
        loss.backward()
        stats.add_loss(loss)
        stats.add(metrics, mb.num_tokens)
    assert syncs.calls == []
    assert stats.result()["loss"] == pytest.approx(loss.item())


def test_compiled_blocks_give_the_uncompiled_step():
    """parallelism.compile = true compiles every block; one RL step equals the eager model's (CPU,
    bf16 as compile needs; the aot_eager backend traces the same graphs without generating kernels,
    so only the traced decompositions may round differently)."""
    eager, batch, n = setup(dtype=torch.bfloat16)
    compiled, _, _ = setup(
        "--parallelism.compile=true", "--parallelism.compile_backend=aot_eager", dtype=torch.bfloat16
    )
    assert all(block._compiled_call_impl is not None for block in compiled.model.layers)
    expected, got = eager.train_step(batch, n), compiled.train_step(batch, n)
    assert {k: got[k] for k in ("loss", "grad_norm", "entropy/mean")} == pytest.approx(
        {k: expected[k] for k in ("loss", "grad_norm", "entropy/mean")}, rel=1e-2
    )
    for a, b in zip(eager.model.parameters(), compiled.model.parameters()):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=1e-3)


def test_compile_in_fp32_is_a_clear_error():
    with pytest.raises(ValueError, match=r"parallelism\.mixed_precision"):
        setup("--parallelism.compile=true")


def test_gemm_reductions_set_the_split_k_sums_of_the_whole_process():
    """parallelism.gemm_reductions sets PyTorch's process-wide split-K flags, which the native
    engine's decode GEMMs read too: full, the default, sums the parts in fp32; reduced leaves
    PyTorch's default (bf16 / fp16 sums where faster). (conftest restores the flags.)"""
    from titan_rl.parallel.parallelize import set_gemm_reductions

    matmul = torch.backends.cuda.matmul
    flags = (
        "allow_bf16_reduced_precision_reduction",
        "allow_fp16_reduced_precision_reduction",
    )  # spelled out, not SPLIT_K_FLAGS: a wrong name there must fail here
    model = GptOss(GptOssModelArgs.from_preset("debug", num_hidden_layers=1))
    for value, reduced in (("reduced", True), ("full", False), ("reduced", True), (None, False)):
        overrides = [] if value is None else [f"--parallelism.gemm_reductions={value}"]
        Trainer(model, load_config(None, overrides))
        assert [getattr(matmul, flag) for flag in flags] == [reduced, reduced], value
    with pytest.raises(ValueError, match="gemm_reductions"):
        set_gemm_reductions("bf16")


def test_an_empty_micro_batch_changes_no_ratio_extreme():
    """Under FSDP every rank runs every micro-batch, empty ones (all padding) included: they must not
    pull ratio/min to 0 (or ratio/max up to 0), on one rank or after the ranks' MIN / MAX reduce."""
    gen = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(6, generator=gen) - 0.1
    old = logprobs + torch.randn(6, generator=gen) * 0.3  # off-policy: ratios on both sides of 1
    seq_ids = torch.tensor([0, 0, 0, 1, 1, 1])
    advantages = torch.randn(6, generator=gen)
    cfg = LossConfig()
    stats = StepStats()
    for mask in (torch.tensor([1, 1, 1, 1, 0, 1.0]), torch.zeros(6)):  # the second trains nothing
        loss, metrics = rl_loss(
            logprobs, old, old, advantages, mask, seq_ids, 2, cfg, global_tokens=5.0, global_seqs=2.0
        )
        stats.add_loss(loss)
        stats.add(metrics, int(mask.sum()))
    ratios = torch.exp(logprobs - old)[torch.tensor([0, 1, 2, 3, 5])]
    result = stats.result()
    assert result["ratio/min"] == pytest.approx(ratios.min().item())
    assert result["ratio/max"] == pytest.approx(ratios.max().item())
    assert ratios.min() < 1.0 < ratios.max()

    # no token trained: none in the batch, or all rejected by the correction (tokens counted, none kept)
    for tokens in (0, 6):
        nothing = StepStats()
        loss, metrics = rl_loss(logprobs, old, old, advantages, torch.zeros(6), seq_ids, 2, cfg)
        nothing.add_loss(loss)
        nothing.add(metrics, tokens)
        assert math.isnan(nothing.result()["ratio/min"]) and math.isnan(nothing.result()["ratio/max"])


def test_a_steps_mismatch_max_is_the_largest_of_its_micro_batches():
    """mismatch/logp_abs_max is the step's largest |old - rollout| log-prob difference, not a
    token-weighted mean of the micro-batches' maxima (a large mismatch in a small micro-batch)."""
    gen = torch.Generator().manual_seed(1)
    stats, differences = StepStats(), []
    for n, spread in ((3, 0.5), (40, 0.01)):
        logprobs = -torch.rand(n, generator=gen) - 0.1
        rollout = logprobs + torch.randn(n, generator=gen) * spread
        differences.append((logprobs - rollout).abs())
        _, metrics = rl_loss(
            logprobs, logprobs, rollout, torch.randn(n, generator=gen), torch.ones(n),
            torch.zeros(n, dtype=torch.long), 1, LossConfig(), global_tokens=43.0, global_seqs=2.0,
        )  # fmt: skip
        stats.add(metrics, n)
    result = stats.result()
    everything = torch.cat(differences)
    assert result["mismatch/logp_abs_max"] == pytest.approx(everything.max().item())
    assert result["mismatch/logp_abs_mean"] == pytest.approx(everything.mean().item())


def test_dr_grpo_constant_bounds_a_whole_episode():
    """seq-mean-token-sum-norm divides each sequence's token sum by a constant that no trajectory's
    trained tokens may exceed: one turn single-turn, the episode budget for multi-turn episodes (an
    episode samples several turns of up to rollout.max_new_tokens each)."""
    from titan_rl.trainer import loss_config

    cfg = load_config(None, ["--rl.aggregation=seq-mean-token-sum-norm", "--rollout.max_new_tokens=40"])
    cfg.env.name, cfg.env.max_episode_tokens = "token_preference", 256
    assert loss_config(cfg).norm_constant == 40.0
    cfg.env.name = "tool_lookup"
    assert loss_config(cfg).norm_constant == 256.0


def test_dropping_uninformative_groups_takes_their_trajectories_out_of_the_batch():
    """rl.drop_uninformative_groups: a group with equal rewards leaves the batch (its zero advantages
    alone would still count its tokens in the normalizer); with no informative group all stay."""
    from titan_rl.rl.types import Trajectory
    from titan_rl.train import kept_for_training

    rewards = torch.tensor([[1.0, 0.0, 1.0], [0.5, 0.5, 0.5], [0.0, 0.0, 2.0]])
    trajectories = [
        Trajectory([i, i + 1], [0, 1], [0.0, -1.0], r, i // 3)
        for i, r in enumerate(rewards.flatten().tolist())
    ]
    advantages = group_advantages(rewards, "grpo")
    informative = torch.tensor([True, False, True])
    kept, kept_advantages = kept_for_training(trajectories, advantages, informative, drop=True)
    assert [t.tokens[0] for t in kept] == [0, 1, 2, 6, 7, 8]
    assert kept_advantages == advantages[[0, 2]].flatten().tolist()
    assert kept_for_training(trajectories, advantages, informative, drop=False)[0] == trajectories
    nothing = torch.zeros(3, dtype=torch.bool)
    assert kept_for_training(trajectories, advantages, nothing, drop=True)[0] == trajectories


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_tokens_mis_rejects_leave_the_step_as_if_they_were_not_in_the_batch(aggregation):
    """correction = "mis" drops tokens whose engine / trainer weight is outside [1/C, C]; the step must
    equal one on the same batch without them: the same loss, gradient and metrics (rejected tokens
    out of the normalizer and of the means over the kept tokens, such as ratio/mean)."""
    import dataclasses

    agg = f"--rl.aggregation={aggregation}"
    mis, batch, n = setup("--rl.correction=mis", "--rl.correction_threshold=2.0", agg)
    plain, _, _ = setup("--rl.correction=none", agg)
    trained = batch.target_mask.nonzero()
    rejected = trained[::3]  # the engine's log-prob 5 nats above the trainer's: w = e^-5 < 1/2
    shifted = batch.rollout_logprobs.clone()
    shifted[rejected[:, 0], rejected[:, 1]] += 5.0
    without = batch.target_mask.clone()
    without[rejected[:, 0], rejected[:, 1]] = False
    got = mis.train_step(dataclasses.replace(batch, rollout_logprobs=shifted), n)
    expected = plain.train_step(dataclasses.replace(batch, target_mask=without), n)
    assert got["correction/masked_frac"] == pytest.approx(len(rejected) / len(trained), rel=1e-6)
    for key in ("loss", "grad_norm", "ratio/mean", "clip_frac", "entropy/mean"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), key
    # AdamW's first update is about lr * sign(gradient) (lr 1e-4): an element whose gradient is
    # round-off small moves by anything in between (4e-6 apart on an AMD EPYC's MKL); a token kept or
    # rejected wrongly flips signs, 2e-4 apart
    for a, b in zip(mis.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


def test_epochs_are_minibatches_over_copies_of_the_batch():
    """Two PPO epochs over a batch take the optimizer steps that two minibatches over two copies of
    it take: old log-probs and routing from one no-grad pass before any update, each pass normalized
    by its own counts. The second pass is off-policy (its ratios leave 1)."""
    import dataclasses

    lr = ["--optimizer.lr=0.05", "--training.steps=1"]
    epochs, batch, n = setup("--training.epochs=2", *lr)
    copies, _, _ = setup("--training.minibatches=2", *lr)

    def twice(t):
        return None if t is None else torch.cat([t, t])

    doubled = dataclasses.replace(
        batch, **{f.name: twice(getattr(batch, f.name)) for f in dataclasses.fields(batch)}
    )
    got, want = epochs.train_step(batch, n), copies.train_step(doubled, n)
    for key in ("loss", "grad_norm", "ratio/mean", "ratio/min", "ratio/max", "clip_frac", "entropy/mean"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
    assert got["ratio/max"] > 1 + 1e-3 or got["ratio/min"] < 1 - 1e-3  # the second epoch is off-policy
    for a, b in zip(epochs.model.parameters(), copies.model.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert epochs.lr_scheduler.last_epoch == 2  # two optimizer steps


def test_the_schedule_counts_the_configured_updates_when_a_batch_has_fewer_rows():
    """training.steps x minibatches x epochs is the schedule's length: a batch packed into fewer rows
    than training.minibatches (few trajectories, or many dropped groups) takes fewer optimizer steps
    but still moves the schedule a whole RL step, so the last step ends at the floor."""
    steps, minibatches = 2, 32
    trainer, batch, n = setup(
        "--training.steps=2",
        f"--training.minibatches={minibatches}",
        "--optimizer.lr=1e-3",
        "--lr_scheduler.warmup_steps=0",
        "--lr_scheduler.min_lr_ratio=0.1",
    )
    assert batch.num_rows < minibatches  # the case under test
    logged = []
    for _ in range(steps):
        metrics = trainer.train_step(batch, n)
        logged.append(metrics["lr"])
        assert metrics["train/updates"] == batch.num_rows  # one per row, not 32
    assert logged[0] == pytest.approx(1e-3)
    half = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * minibatches / (steps * minibatches)))
    assert logged[1] == pytest.approx(1e-3 * half)  # step 2 starts halfway through the schedule
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(1e-4)  # the floor after the last


def test_a_step_with_non_finite_gradients_counts_once_whatever_its_minibatches():
    """training.max_skipped_steps counts RL steps: three minibatches with a NaN gradient are one
    skipped step (counting optimizer steps stopped a run at its first bad batch)."""
    trainer, batch, n = setup("--training.minibatches=3")
    with torch.no_grad():
        trainer.model.lm_head.weight[0, 0] = float("inf")
    metrics = trainer.train_step(batch, n)
    assert metrics["train/skipped_steps"] == 1 and trainer.consecutive_skips == 1
    assert trainer.lr_scheduler.last_epoch == 3  # the schedule still moved one RL step
    with torch.no_grad():
        trainer.model.lm_head.weight[0, 0] = 0.0
    trainer.train_step(batch, n)
    assert trainer.consecutive_skips == 0 and trainer.skipped_steps == 1


def _balance(model: GptOss, batch, num_seqs: int) -> float:
    """The batch's load-balancing loss in one forward over all its rows (no micro-batches)."""
    with torch.no_grad():
        _, used, logits = model(
            batch.tokens, positions=batch.positions, document_ids=batch.document_ids,
            return_expert_indices=True, return_router_logits=True,
        )  # fmt: skip
        return router_balance_loss(logits, used, batch.token_seqs, num_seqs, float(num_seqs)).item()


@pytest.mark.parametrize("coef", [1.0, 0.0])
def test_the_load_balancing_loss_is_the_minibatchs_and_evens_out_collapsed_routers(coef):
    """rl.router_aux_loss_coef: routers collapsed onto 2 of 8 experts (bias +3) spread out under the
    balance loss within 3 steps, and not without it; the reported router/balance_loss, summed over
    micro-batches of one row, is the whole batch's."""
    trainer, batch, n = setup(
        f"--rl.router_aux_loss_coef={coef}", "--training.micro_batch_rows=1", "--optimizer.lr=0.02"
    )
    assert len(trainer._micro_batches(batch)) > 1
    with torch.no_grad():
        for block in trainer.model.layers:
            block.mlp.router.bias[:2] += 3.0
    collapsed = _balance(trainer.model, batch, n)
    assert collapsed > 3.0  # (1 when balanced; E / k = 4 when all on two experts)
    first = trainer.train_step(batch, n)
    if coef > 0:
        assert first["router/balance_loss"] == pytest.approx(collapsed, rel=1e-5)
    else:
        assert "router/balance_loss" not in first
    for _ in range(2):
        trainer.train_step(batch, n)
    after = _balance(trainer.model, batch, n)
    assert after < 0.7 * collapsed if coef > 0 else after > 0.9 * collapsed


def test_the_load_balancing_loss_never_waits_on_the_device():
    trainer, batch, n = setup("--training.micro_batch_rows=2")
    mb = trainer._micro_batches(batch)[0]
    with HostSyncs() as syncs:
        logprobs, _, used, logits = trainer._logprobs(trainer.model, mb, router=True)
        balance = router_balance_loss(logits, used, mb.token_seqs, n, float(n))
        (logprobs.sum() + balance).backward()
    assert syncs.calls == []


def test_mis_rejecting_every_token_leaves_the_balance_gradient_as_it_is():
    """MIS renormalizes the policy term by the tokens it kept, after the backward; with none kept that
    term is zero, and the balance term in the same gradient must keep its own weight (the factor was
    the batch's token count): the step equals one whose policy term is zero by zero advantages."""
    common = ["--rl.router_aux_loss_coef=0.5", "--training.micro_batch_rows=2", "--training.grad_clip=0"]
    rejected, batch, n = setup(*common, "--rl.correction=mis")
    batch.rollout_logprobs = batch.rollout_logprobs - 5.0 * batch.target_mask  # w = e^5: every token out
    zero, same, _ = setup(*common)
    same.advantages = torch.zeros_like(same.advantages)
    a, b = rejected.train_step(batch, n), zero.train_step(same, n)
    assert a["correction/masked_frac"] == 1.0
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4) and b["grad_norm"] > 0

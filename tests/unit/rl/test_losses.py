"""Losses against hand-computed values (literals or a simple independent formula)."""

from __future__ import annotations

import math
import threading

import pytest
import torch

from titan_rl.rl.losses import (
    WHOLE,
    LossConfig,
    SequenceShards,
    aggregate,
    gspo_token_loss,
    kl_estimate,
    ppo_clip_token_loss,
    rl_loss,
    rollout_correction,
    router_balance_loss,
    sequence_mean,
)

close = torch.testing.assert_close


def leaf(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, requires_grad=True)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"policy_loss": "grpo"}, "ppo, gspo"),
        ({"aggregation": "mean"}, "token-mean, seq-mean-token-mean, seq-mean-token-sum-norm"),
        ({"kl_estimator": "k4"}, "k1, k2, k3"),
        ({"correction": "is"}, "none, tis, mis"),
        ({"correction_level": "batch"}, "token, sequence"),
        ({"dual_clip": 1.0}, "must be > 1"),
        ({"correction_threshold": 0.5}, "must be > 1"),
        ({"clip_eps_low": 1.0}, r"in \[0, 1\)"),
        ({"clip_eps_high": -0.1}, ">= 0"),
        ({"kl_coef": -1.0}, ">= 0"),
        ({"aggregation": "seq-mean-token-sum-norm"}, "norm_constant"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        LossConfig(**overrides)


def test_config_valid():
    LossConfig(aggregation="seq-mean-token-sum-norm", norm_constant=512, dual_clip=3.0, correction="mis")


# ---------------------------------------------------------------- building blocks


def test_kl_estimators_values_and_k3_gradient():
    logprobs, ref = leaf([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])  # logp - ref = 0.5, -1, 0
    close(kl_estimate(logprobs, ref, "k1"), torch.tensor([0.5, -1.0, 0.0]))
    close(kl_estimate(logprobs, ref, "k2"), torch.tensor([0.125, 0.5, 0.0]))
    k3 = kl_estimate(logprobs, ref, "k3")
    close(k3, torch.tensor([math.exp(-0.5) - 0.5, math.exp(1.0) - 2.0, 0.0]))
    k3.sum().backward()  # d/dlogp [exp(ref - logp) - (ref - logp) - 1] = 1 - exp(ref - logp)
    close(logprobs.grad, torch.tensor([1 - math.exp(-0.5), 1 - math.exp(1.0), 0.0]))
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_estimate(logprobs, ref, "k5")


def test_sequence_mean_excludes_masked_tokens():
    values = torch.tensor([1.0, 2.0, math.nan, 4.0, math.inf])
    mask = torch.tensor([1, 1, 0, 1, 0])
    seq_ids = torch.tensor([0, 0, 0, 1, 1])
    close(sequence_mean(values, mask, seq_ids, 3), torch.tensor([1.5, 4.0, 0.0]))  # seq 2 has no tokens


def test_ppo_clip_values_and_gradients():
    # ratios 1.5 / 0.5 (beyond the upper / lower bound) with A = +1 and A = -1
    ratios = [1.5, 0.5, 1.5, 0.5, 1.1]
    advantages = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0])
    old = torch.full((5,), -1.0)
    logprobs = leaf([-1.0 + math.log(r) for r in ratios])
    loss, clipped = ppo_clip_token_loss(logprobs, old, advantages, 0.2, 0.28)
    close(loss, torch.tensor([-1.28, -0.5, 1.5, 0.8, -2.2]))
    assert clipped.tolist() == [True, False, False, True, False]
    loss.sum().backward()  # d/dlogp of -rho A is -rho A where unclipped, 0 where clipped
    close(logprobs.grad, torch.tensor([0.0, -0.5, 1.5, 0.0, -2.2]))


def test_ppo_ratio_exactly_at_the_bound_keeps_gradient():
    logprobs = leaf([-0.3, -0.7])
    loss, clipped = ppo_clip_token_loss(logprobs, logprobs.detach(), torch.tensor([1.0, -2.0]), 0.0, 0.0)
    close(loss, torch.tensor([-1.0, 2.0]))
    assert not clipped.any()
    loss.sum().backward()
    close(logprobs.grad, torch.tensor([-1.0, 2.0]))


def test_dual_clip_caps_negative_advantage_loss():
    ratios = [4.0, 2.0, 4.0, 0.5]
    advantages = torch.tensor([-1.0, -1.0, 1.0, -1.0])
    logprobs = leaf([math.log(r) for r in ratios])
    loss, clipped = ppo_clip_token_loss(logprobs, torch.zeros(4), advantages, 0.2, 0.28, dual_clip=3.0)
    # A < 0: min(-rho A, 3 |A|) -> 3, 2; A > 0 unaffected -> -1.28; low clip still applies -> 0.8
    close(loss, torch.tensor([3.0, 2.0, -1.28, 0.8]))
    assert clipped.tolist() == [True, False, True, True]
    loss.sum().backward()
    close(logprobs.grad, torch.tensor([0.0, 2.0, 0.0, 0.0]))


# Two trajectories: seq 0 = tokens 0..2 (token 2 masked), seq 1 = tokens 3..4.
GSPO_MASK = torch.tensor([1, 1, 0, 1, 1])
GSPO_IDS = torch.tensor([0, 0, 0, 1, 1])
GSPO_DELTA = [0.1, 0.3, 5.0, -0.1, -0.3]  # logp - old; mean 0.2 and -0.2 over masked tokens


def test_gspo_sequence_ratio_and_per_token_gradient():
    old = torch.tensor([-1.0, -2.0, -3.0, -1.5, -0.5])
    logprobs = leaf([o + d for o, d in zip(old.tolist(), GSPO_DELTA)])
    advantages = torch.tensor([1.0, 1.0, 1.0, -2.0, -2.0])
    loss, clipped = gspo_token_loss(logprobs, old, advantages, GSPO_MASK, GSPO_IDS, 2, 10.0, 10.0)
    s0, s1 = math.exp(0.2), math.exp(-0.2)
    close(loss, torch.tensor([-s0, -s0, -s0, 2 * s1, 2 * s1]))
    assert not clipped.any()
    (loss * GSPO_MASK).sum().backward()  # per token: -A_i s_i, no cross-token terms
    close(logprobs.grad, torch.tensor([-s0, -s0, 0.0, 2 * s1, 2 * s1]))


def test_gspo_seq_mean_gradient_equals_sequence_objective():
    old = torch.tensor([-1.0, -2.0, -3.0, -1.5, -0.5])
    advantages = torch.tensor([1.0, 1.0, 1.0, -2.0, -2.0])
    logprobs = leaf([o + d for o, d in zip(old.tolist(), GSPO_DELTA)])
    loss, _ = gspo_token_loss(logprobs, old, advantages, GSPO_MASK, GSPO_IDS, 2, 10.0, 10.0)
    aggregate(loss, GSPO_MASK, GSPO_IDS, 2, "seq-mean-token-mean").backward()
    # independent: J = -(1/2) sum_i A_i exp(mean_t (logp_t - old_t)) over each sequence's masked tokens
    x = logprobs.detach().clone().requires_grad_(True)
    d = x - old
    objective = -(1.0 * torch.exp((d[0] + d[1]) / 2) - 2.0 * torch.exp((d[3] + d[4]) / 2)) / 2
    objective.backward()
    close(logprobs.grad, x.grad)


def test_gspo_clips_at_sequence_level():
    old = torch.zeros(6)
    delta = [0.1, 0.3, 5.0, -0.1, -0.3, 1e-4]  # seq ratios e^0.2, e^-0.2, e^1e-4 (inside the bounds)
    logprobs = leaf(delta)
    advantages = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, 1.0])
    mask, ids = torch.tensor([1, 1, 0, 1, 1, 1]), torch.tensor([0, 0, 0, 1, 1, 2])
    loss, clipped = gspo_token_loss(logprobs, old, advantages, mask, ids, 3, 3e-4, 4e-4)
    close(loss, torch.tensor([-1.0004, -1.0004, -1.0004, 0.9997, 0.9997, -math.exp(1e-4)]))
    assert clipped.tolist() == [True, True, True, True, True, False]
    loss.sum().backward()
    close(logprobs.grad, torch.tensor([0, 0, 0, 0, 0, -math.exp(1e-4)]))


# ---------------------------------------------------------------- rollout correction

# token level: w = 1, 3, 1/3, 1.5 on the masked tokens; the last token is masked out (w would be 10)
TOKEN_DELTA = [0.0, math.log(3.0), -math.log(3.0), math.log(1.5), math.log(10.0)]
TOKEN_MASK = torch.tensor([1, 1, 1, 1, 0])
TOKEN_IDS = torch.tensor([0, 0, 1, 1, 1])


def _token_level(mode, threshold=2.0):
    rollout = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0])
    old = (rollout + torch.tensor(TOKEN_DELTA)).requires_grad_(True)
    return rollout_correction(old, rollout, TOKEN_MASK, TOKEN_IDS, 2, mode, "token", threshold)


def test_mismatch_stats():
    *_, stats = _token_level("none")
    deltas = TOKEN_DELTA[:4]
    close(stats["mismatch/logp_abs_mean"], torch.tensor(sum(abs(d) for d in deltas) / 4))
    close(stats["mismatch/logp_abs_max"], torch.tensor(math.log(3.0)))
    k3 = sum(math.exp(-d) + d - 1 for d in deltas) / 4  # exp(r - old) - (r - old) - 1
    close(stats["mismatch/k3"], torch.tensor(k3))
    assert stats["correction/truncated_frac"] == 0 and stats["correction/masked_frac"] == 0


def test_no_correction():
    weights, keep, _ = _token_level("none")
    assert torch.equal(weights, torch.ones(5)) and keep.all()


def test_tis_token_truncates_at_threshold():
    weights, keep, stats = _token_level("tis")
    assert weights.dtype == torch.float32 and not weights.requires_grad
    close(weights[:4], torch.tensor([1.0, 2.0, 1 / 3, 1.5]))
    assert keep.all()
    close(stats["correction/truncated_frac"], torch.tensor(0.25))  # one of four masked tokens


def test_mis_token_masks_outside_interval():
    weights, keep, stats = _token_level("mis")
    assert torch.equal(weights, torch.ones(5))
    assert keep[:4].tolist() == [True, False, False, True]
    close(stats["correction/masked_frac"], torch.tensor(0.5))


def test_mis_threshold_edges():
    delta = torch.tensor([1.99, 2.01, 0.51, 0.49]).log()
    _, keep, _ = rollout_correction(
        delta, torch.zeros(4), torch.ones(4), torch.arange(4), 4, "mis", "token", 2.0
    )
    assert keep.tolist() == [True, False, True, False]
    # the interval [1/C, C] is closed: weights of exactly 1/2 and 2 (exp(log(w)) is exact here) stay
    _, keep, _ = rollout_correction(
        torch.tensor([0.5, 2.0]).log(), torch.zeros(2), torch.ones(2), torch.arange(2), 2, "mis", "token", 2.0
    )
    assert keep.tolist() == [True, True]


# sequence level: seq 0 sums 0.5 + 0.5 (token 2 masked out) -> e; seq 1 -> e^0.1; seq 2 -> e^-1
SEQ_DELTA = torch.tensor([0.5, 0.5, 3.0, 0.2, -0.1, -1.0])
SEQ_MASK = torch.tensor([1, 1, 0, 1, 1, 1])
SEQ_IDS = torch.tensor([0, 0, 0, 1, 1, 2])


def test_tis_sequence_level():
    weights, keep, stats = rollout_correction(
        SEQ_DELTA, torch.zeros(6), SEQ_MASK, SEQ_IDS, 3, "tis", "sequence", 2
    )
    w1, w2 = math.exp(0.1), math.exp(-1.0)
    close(weights, torch.tensor([2.0, 2.0, 2.0, w1, w1, w2]))
    assert keep.all()
    close(stats["correction/truncated_frac"], torch.tensor(0.4))  # 2 of 5 masked tokens


def test_mis_sequence_level():
    weights, keep, stats = rollout_correction(
        SEQ_DELTA, torch.zeros(6), SEQ_MASK, SEQ_IDS, 3, "mis", "sequence", 2
    )
    assert torch.equal(weights, torch.ones(6))
    assert keep.tolist() == [False, False, False, True, True, False]
    close(stats["correction/masked_frac"], torch.tensor(0.6))  # 3 of 5 masked tokens


def test_correction_errors():
    args = (torch.zeros(2), torch.zeros(2), torch.ones(2), torch.zeros(2, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="none, tis, mis"):
        rollout_correction(*args, "is", "token", 2.0)
    with pytest.raises(ValueError, match="token, sequence"):
        rollout_correction(*args, "tis", "batch", 2.0)


# ---------------------------------------------------------------- aggregation

AGG_LOSS = torch.tensor([1.0, 2.0, math.nan, 4.0, 5.0, 6.0])  # the masked-out token holds garbage
AGG_MASK = torch.tensor([True, True, False, True, True, True])
AGG_IDS = torch.tensor([0, 0, 0, 1, 1, 2])


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("token-mean", 18 / 5),
        ("seq-mean-token-mean", (1.5 + 4.5 + 6.0) / 3),
        ("seq-mean-token-sum-norm", (3 / 4 + 9 / 4 + 6 / 4) / 3),
    ],
)
def test_aggregation_modes(mode, expected):
    close(aggregate(AGG_LOSS, AGG_MASK, AGG_IDS, 3, mode, norm_constant=4.0), torch.tensor(expected))


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_split_batch_equals_whole_batch(mode):
    gen = torch.Generator().manual_seed(0)
    lengths = [3, 5, 2, 4, 6]
    seq_ids = torch.repeat_interleave(torch.arange(5), torch.tensor(lengths))
    loss = torch.randn(seq_ids.numel(), generator=gen)
    mask = torch.rand(seq_ids.numel(), generator=gen) > 0.3
    whole = aggregate(loss, mask, seq_ids, 5, mode, norm_constant=8.0)
    split = 3 + 5  # tokens of seqs 0, 1 | seqs 2, 3, 4
    counts = {"global_tokens": mask.sum(), "global_seqs": 5, "norm_constant": 8.0}
    first = aggregate(loss[:split], mask[:split], seq_ids[:split], 2, mode, **counts)
    second = aggregate(loss[split:], mask[split:], seq_ids[split:] - 2, 3, mode, **counts)
    close(first + second, whole)


def test_aggregation_errors():
    with pytest.raises(ValueError, match="token-mean, seq-mean-token-mean"):
        aggregate(AGG_LOSS, AGG_MASK, AGG_IDS, 3, "sum")
    with pytest.raises(ValueError, match="norm_constant"):
        aggregate(AGG_LOSS, AGG_MASK, AGG_IDS, 3, "seq-mean-token-sum-norm")


# ---------------------------------------------------------------- rl_loss


def _policy(seed: int = 0):
    """Log-probs of sampled tokens from leaf logits ``[N, vocab]``, 3 trajectories of 3 tokens."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(9, 7, generator=gen).requires_grad_(True)
    targets = torch.randint(0, 7, (9,), generator=gen)
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
    seq_ids = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    mask = torch.tensor([0, 1, 1, 0, 1, 1, 0, 0, 1], dtype=torch.float32)
    advantages = torch.tensor([0.7, -1.2, 0.4])[seq_ids] * mask
    return logits, logprobs, seq_ids, mask, advantages


@pytest.mark.parametrize("policy_loss", ["ppo", "gspo"])
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_on_policy_is_exactly_the_policy_gradient(policy_loss, aggregation):
    logits, logprobs, seq_ids, mask, advantages = _policy()
    cfg = LossConfig(policy_loss=policy_loss, aggregation=aggregation, correction="tis")
    rollout = logprobs.detach()  # engine agrees: TIS weights are exactly 1
    loss, metrics = rl_loss(logprobs, logprobs.detach(), rollout, advantages, mask, seq_ids, 3, cfg)
    # ratio 1 and no clipping hold by construction (old = logprobs.detach()); the gradient below can fail
    assert metrics["ratio/min"].item() == 1.0 and metrics["ratio/max"].item() == 1.0
    assert metrics["clip_frac"].item() == 0.0
    (grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
    # plain policy gradient of -A logp, aggregated the same way

    def aggregated(per_token):
        per_token = per_token * mask
        if aggregation == "token-mean":
            return per_token.sum() / mask.sum()
        return sum(per_token[seq_ids == i].sum() / mask[seq_ids == i].sum() for i in range(3)) / 3

    (expected,) = torch.autograd.grad(aggregated(-advantages * logprobs), logits)
    assert torch.equal(grad, expected)
    close(loss, aggregated(-advantages))  # the value: ratio 1


def test_kl_and_entropy_terms_and_metrics():
    _, logprobs, seq_ids, mask, advantages = _policy()
    ref = logprobs.detach() - 0.3 * mask  # ref - logp = -0.3 on trained tokens
    entropy = torch.linspace(0.5, 1.3, 9)
    cfg = LossConfig(kl_coef=0.1, entropy_coef=0.01)
    loss, metrics = rl_loss(
        logprobs,
        logprobs.detach(),
        None,
        advantages,
        mask,
        seq_ids,
        3,
        cfg,
        entropy=entropy,
        ref_logprobs=ref,
    )
    k3 = math.exp(-0.3) + 0.3 - 1
    m = mask.bool()
    expected = (-advantages[m]).mean() + 0.1 * k3 - 0.01 * entropy[m].mean()
    close(loss, expected)
    close(metrics["kl/mean"], torch.tensor(k3))
    close(metrics["entropy/mean"], entropy[m].mean())
    assert all(not v.requires_grad and v.dim() == 0 for v in metrics.values())
    assert "mismatch/k3" not in metrics  # no rollout log-probs given


def test_mis_drops_tokens_and_tis_weights_loss():
    _, logprobs, seq_ids, mask, advantages = _policy()
    old = logprobs.detach()
    rollout = old.clone()
    rollout[4] -= 5.0  # w = e^5: beyond C = 2
    rollout[8] += 0.5  # w = e^-0.5 = 0.61: inside [0.5, 2]
    rollout[0] += 100.0  # masked out: ignored
    keep = mask.bool().clone()
    keep[4] = False
    mis = LossConfig(correction="mis")
    loss, metrics = rl_loss(logprobs, old, rollout, advantages, mask, seq_ids, 3, mis)
    close(loss, (-advantages[keep]).mean())
    close(metrics["correction/masked_frac"], torch.tensor(1 / 5))
    tis = LossConfig(correction="tis")
    loss, metrics = rl_loss(logprobs, old, rollout, advantages, mask, seq_ids, 3, tis)
    weights = torch.ones(9)
    weights[4], weights[8] = 2.0, math.exp(-0.5)
    close(loss, (-advantages * weights)[mask.bool()].mean())
    close(metrics["correction/truncated_frac"], torch.tensor(1 / 5))


def test_garbage_advantages_on_masked_tokens_do_not_reach_the_gradient():
    logits, logprobs, seq_ids, mask, advantages = _policy()
    advantages = torch.where(mask.bool(), advantages, math.inf)
    loss, _ = rl_loss(logprobs, logprobs.detach(), None, advantages, mask, seq_ids, 3, LossConfig())
    loss.backward()
    assert loss.isfinite() and logits.grad.isfinite().all()


def test_gspo_metrics_report_sequence_ratio():
    _, logprobs, seq_ids, mask, advantages = _policy()
    old = logprobs.detach() - 0.1 * mask  # every trained token: log ratio 0.1
    _, metrics = rl_loss(logprobs, old, None, advantages, mask, seq_ids, 3, LossConfig(policy_loss="gspo"))
    close(metrics["ratio/seq_mean"], torch.tensor(math.exp(0.1)))
    close(metrics["ratio/max"], torch.tensor(math.exp(0.1)))
    # e^0.1 is far above 1 + 4e-4: clipped where A > 0 (seqs 0, 2: 3 of 5 tokens), not where A < 0
    close(metrics["clip_frac"], torch.tensor(3 / 5))


def test_rl_loss_errors():
    _, logprobs, seq_ids, mask, advantages = _policy()
    args = (logprobs, logprobs.detach(), None, advantages, mask, seq_ids, 3)
    with pytest.raises(ValueError, match="ref_logprobs"):
        rl_loss(*args, LossConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="entropy"):
        rl_loss(*args, LossConfig(entropy_coef=0.1))
    with pytest.raises(ValueError, match="rollout_logprobs"):
        rl_loss(*args, LossConfig(correction="tis"))


# ---------------------------------------------------------------- every term's gradient, off-policy
#
# The reference below is RL.md's formulas written token by token in float64 Python, independent of
# losses.py; each case checks the loss value and its gradient with respect to log-probs, entropy and
# reference log-probs. A term that keeps its value but loses its gradient (a stray ``.detach()``)
# fails here, and so does a clip bound, weight or denominator on the wrong side.

SEQ_LENGTHS = [4, 6, 3, 5, 7]
CLIP_LOW, CLIP_HIGH, DUAL_CLIP = 0.2, 0.28, 2.0  # asymmetric (clip-higher): swapped bounds fail
GSPO_LOW, GSPO_HIGH = 0.1, 0.15  # wider than the defaults so that some sequences stay inside
KL_COEF, ENTROPY_COEF, NORM, C = 0.3, 0.05, 8.0, 2.0
GLOBAL_EXTRA_TOKENS, GLOBAL_EXTRA_SEQS = 9, 2  # tokens / trajectories on other ranks or micro-batches


def off_policy_inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs with ratios in about [0.27, 3.7] (both PPO bounds, and the dual clip, are hit),
    mixed-sign advantages, and engine log-probs giving weights in about [0.37, 2.7] (TIS truncates
    some, MIS drops some). Sequence ratios: 0 - 2 inside the GSPO bounds, 3 below (A < 0: clipped),
    4 above (A > 0: clipped); ``test_off_policy_inputs_reach_every_branch`` checks all of this."""
    g = torch.Generator().manual_seed(seed)
    seq_ids = torch.repeat_interleave(torch.arange(len(SEQ_LENGTHS)), torch.tensor(SEQ_LENGTHS))
    n = seq_ids.numel()
    mask = torch.rand(n, generator=g) > 0.25
    mask[torch.tensor(SEQ_LENGTHS).cumsum(0) - 1] = True  # every trajectory has a trained token
    logprobs = -2.0 * torch.rand(n, generator=g) - 0.05
    delta = 2.6 * torch.rand(n, generator=g) - 1.3  # logp - old
    for i, log_seq_ratio in ((0, 0.02), (1, -0.03), (3, -0.2)):
        tokens = (seq_ids == i) & mask
        delta[tokens] += log_seq_ratio - delta[tokens].mean()
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0])
    advantages = (signs * (0.3 + torch.rand(len(SEQ_LENGTHS), generator=g)))[seq_ids]
    old = logprobs - delta
    return {
        "logprobs": logprobs,
        "old": old,
        "rollout": old - (2.0 * torch.rand(n, generator=g) - 1.0),  # log w = old - rollout in [-1, 1]
        "advantages": advantages,
        "mask": mask,
        "seq_ids": seq_ids,
        "entropy": 2.0 * torch.rand(n, generator=g) + 0.1,
        "ref": logprobs + 0.5 * torch.randn(n, generator=g),
    }


def formula_loss_and_gradients(x: dict[str, torch.Tensor], cfg: LossConfig, global_counts: bool):
    """``(loss, d/dlogprobs, d/dentropy, d/dref)`` from RL.md, token by token, in float64."""
    names = ("logprobs", "old", "rollout", "advantages", "entropy", "ref")
    lp, old, r, adv, H, ref = (x[k].double().tolist() for k in names)
    mask, ids = x["mask"].tolist(), x["seq_ids"].tolist()
    n, num_seqs = len(lp), len(SEQ_LENGTHS)
    sampled = {i: [t for t in range(n) if ids[t] == i and mask[t]] for i in range(num_seqs)}

    # rollout correction: w = exp(old - r) per token, or exp(sum over the trajectory) per sequence
    if cfg.correction_level == "token":
        w = [math.exp(old[t] - r[t]) for t in range(n)]
    else:
        w_seq = [math.exp(sum(old[t] - r[t] for t in sampled[i])) for i in range(num_seqs)]
        w = [w_seq[ids[t]] for t in range(n)]
    kept = [bool(mask[t]) and (cfg.correction != "mis" or 1 / C <= w[t] <= C) for t in range(n)]
    weight = [min(w[t], C) if cfg.correction == "tis" else 1.0 for t in range(n)]

    # policy term per token: value and d/dlogp_t
    if cfg.policy_loss == "gspo":
        s = [math.exp(sum(lp[t] - old[t] for t in sampled[i]) / len(sampled[i])) for i in range(num_seqs)]
        ratio, low, high = [s[ids[t]] for t in range(n)], 1 - cfg.gspo_eps_low, 1 + cfg.gspo_eps_high
    else:
        ratio, low, high = (
            [math.exp(lp[t] - old[t]) for t in range(n)],
            1 - cfg.clip_eps_low,
            1 + cfg.clip_eps_high,
        )
    policy, policy_grad = [], []
    for t in range(n):
        unclipped, clipped = -ratio[t] * adv[t], -min(max(ratio[t], low), high) * adv[t]
        value, grad = (clipped, 0.0) if clipped > unclipped else (unclipped, -ratio[t] * adv[t])
        if cfg.dual_clip is not None and adv[t] < 0 and value > -cfg.dual_clip * adv[t]:
            value, grad = -cfg.dual_clip * adv[t], 0.0
        policy.append(value)
        policy_grad.append(grad)  # gspo: s_i * d logp_t, no cross-token terms

    # KL to the reference, a function of d = logp - ref: value and d/dlogp (d/dref is its negative)
    kl, kl_lp = [], []
    for t in range(n):
        d = lp[t] - ref[t]
        if cfg.kl_estimator == "k1":
            value, grad = d, 1.0
        elif cfg.kl_estimator == "k2":
            value, grad = 0.5 * d * d, d
        else:  # exp(ref - logp) - (ref - logp) - 1
            value, grad = math.exp(-d) + d - 1, 1 - math.exp(-d)
        kl.append(value)
        kl_lp.append(grad)

    # aggregation: the weight of each kept token in the scalar loss
    seqs = num_seqs + (GLOBAL_EXTRA_SEQS if global_counts else 0)
    if cfg.aggregation == "token-mean":  # given global counts: the sampled tokens (MIS-dropped ones too)
        scale = [1 / (sum(mask) + GLOBAL_EXTRA_TOKENS if global_counts else sum(kept))] * n
    elif cfg.aggregation == "seq-mean-token-mean":
        per_seq = [sum(kept[t] for t in range(n) if ids[t] == i) for i in range(num_seqs)]
        scale = [1 / (per_seq[ids[t]] * seqs) if per_seq[ids[t]] else 0.0 for t in range(n)]
    else:
        scale = [1 / (cfg.norm_constant * seqs)] * n
    scale = [scale[t] if kept[t] else 0.0 for t in range(n)]

    loss = sum(
        scale[t] * (weight[t] * policy[t] + cfg.kl_coef * kl[t] - cfg.entropy_coef * H[t]) for t in range(n)
    )
    d_lp = [scale[t] * (weight[t] * policy_grad[t] + cfg.kl_coef * kl_lp[t]) for t in range(n)]
    d_entropy = [-scale[t] * cfg.entropy_coef for t in range(n)]
    d_ref = [-scale[t] * cfg.kl_coef * kl_lp[t] for t in range(n)]
    return loss, *(torch.tensor(v, dtype=torch.float64) for v in (d_lp, d_entropy, d_ref))


POLICIES = {
    "ppo": {"policy_loss": "ppo"},
    "ppo-dual-clip": {"policy_loss": "ppo", "dual_clip": DUAL_CLIP},
    "gspo": {"policy_loss": "gspo"},
}
CORRECTION_CASES = ["none", "tis-token", "tis-sequence", "mis-token", "mis-sequence"]


def off_policy_config(policy: str, aggregation: str, kl_estimator: str, correction: str) -> LossConfig:
    mode, _, level = correction.partition("-")
    return LossConfig(
        **POLICIES[policy],
        clip_eps_low=CLIP_LOW,
        clip_eps_high=CLIP_HIGH,
        gspo_eps_low=GSPO_LOW,
        gspo_eps_high=GSPO_HIGH,
        aggregation=aggregation,
        norm_constant=NORM,
        kl_coef=KL_COEF,
        kl_estimator=kl_estimator,
        entropy_coef=ENTROPY_COEF,
        correction=mode,
        correction_level=level or "token",
        correction_threshold=C,
    )


@pytest.mark.parametrize("counts", ["local", "global"])
@pytest.mark.parametrize("correction", CORRECTION_CASES)
@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("policy", list(POLICIES))
def test_loss_and_gradients_match_the_formulas(policy, aggregation, kl_estimator, correction, counts):
    cfg = off_policy_config(policy, aggregation, kl_estimator, correction)
    x = off_policy_inputs()
    leaves = ("logprobs", "entropy", "ref", "rollout")
    logprobs, entropy, ref, rollout = (x[k].clone().requires_grad_(True) for k in leaves)
    global_counts = counts == "global"
    extra = {}
    if global_counts:  # what the trainer passes: counts over the whole global batch
        extra = {
            "global_tokens": int(x["mask"].sum()) + GLOBAL_EXTRA_TOKENS,
            "global_seqs": len(SEQ_LENGTHS) + GLOBAL_EXTRA_SEQS,
        }
    loss, _ = rl_loss(
        logprobs,
        x["old"],
        rollout,
        x["advantages"],
        x["mask"],
        x["seq_ids"],
        len(SEQ_LENGTHS),
        cfg,
        entropy=entropy,
        ref_logprobs=ref,
        **extra,
    )
    grads = torch.autograd.grad(loss, (logprobs, entropy, ref, rollout), allow_unused=True)
    expected_loss, *expected = formula_loss_and_gradients(x, cfg, global_counts)
    # fp32 against float64: a few ops on O(1) values
    close(loss.double(), torch.tensor(expected_loss, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    for name, grad, want in zip(("logprobs", "entropy", "ref_logprobs"), grads, expected):
        got = torch.zeros_like(want) if grad is None else grad.double()
        close(got, want, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"d loss / d {name}: {m}")
    assert grads[3] is None  # correction weights are constants (detached): no gradient to the engine


def test_off_policy_inputs_reach_every_branch():
    """The cases above are only as strong as their inputs: every clip side and correction outcome occurs."""
    x = off_policy_inputs()
    mask, seq_ids, num_seqs = x["mask"], x["seq_ids"], len(SEQ_LENGTHS)
    rho, adv = (x["logprobs"] - x["old"]).exp()[mask], x["advantages"][mask]
    assert ((rho > 1 + CLIP_HIGH) & (adv > 0)).any()  # clipped above
    assert ((rho < 1 - CLIP_LOW) & (adv < 0)).any()  # clipped below
    assert ((rho > 1 + CLIP_HIGH) & (rho < DUAL_CLIP) & (adv < 0)).any()  # outside, but A against: unclipped
    assert ((rho > DUAL_CLIP) & (adv < 0)).any()  # dual clip
    assert ((rho > 1 - CLIP_LOW) & (rho < 1 + CLIP_HIGH)).any()  # inside
    s = sequence_mean(x["logprobs"] - x["old"], mask, seq_ids, num_seqs).exp()
    seq_adv = x["advantages"][torch.tensor(SEQ_LENGTHS).cumsum(0) - 1]
    assert ((s > 1 - GSPO_LOW) & (s < 1 + GSPO_HIGH)).any()
    assert ((s > 1 + GSPO_HIGH) & (seq_adv > 0)).any() and ((s < 1 - GSPO_LOW) & (seq_adv < 0)).any()
    log_w = x["old"] - x["rollout"]
    w = log_w[mask].exp()
    assert (w > C).any() and (w < 1 / C).any() and ((w >= 1 / C) & (w <= C)).any()
    w_seq = torch.zeros(num_seqs).index_add(0, seq_ids[mask], log_w[mask]).exp()
    assert (w_seq > C).any() and ((w_seq >= 1 / C) & (w_seq <= C)).any()


# ---------------------------------------------------------------- context-parallel shards


class TwoShardSum:
    """An in-process all-reduce of two threads: each calls ``sum`` with its per-sequence tensor at
    the same point of the same computation and gets both added (what the cp group's sum does)."""

    def __init__(self) -> None:
        self.barrier, self.slots = threading.Barrier(2, timeout=30), [None, None]

    def for_shard(self, k: int):
        def total(per_seq: torch.Tensor) -> torch.Tensor:
            self.slots[k] = per_seq.detach().clone()
            self.barrier.wait()
            both = self.slots[0] + self.slots[1]
            self.barrier.wait()  # both read before either writes its next value
            return both

        return total


@pytest.mark.parametrize(
    "overrides",
    [
        dict(aggregation="token-mean"),
        dict(aggregation="seq-mean-token-mean"),
        dict(aggregation="seq-mean-token-sum-norm", norm_constant=8.0),
        dict(policy_loss="gspo", aggregation="seq-mean-token-mean"),
        dict(correction="mis", correction_level="sequence", correction_threshold=1.3),
        dict(
            correction="tis",
            correction_level="sequence",
            correction_threshold=1.1,
            aggregation="seq-mean-token-mean",
        ),
        dict(kl_coef=0.1, entropy_coef=0.01, aggregation="seq-mean-token-mean"),
    ],
    ids=lambda o: "-".join(f"{v}" for v in o.values()),
)
def test_two_sequence_shards_add_up_to_the_whole_sequences(overrides):
    """Context parallelism without processes: each sequence's tokens split between two shards (every
    other token, so both hold a part of every sequence), each shard's loss computed with a
    SequenceShards(2) whose sum adds the other's per-sequence values. The two losses and their
    gradients must add up to one call on whole sequences (a sequence-level term computed per shard,
    or divided by the shard count twice, breaks it)."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 1000, ())))
    lengths = torch.tensor([5, 8, 3, 6])
    seq_ids = torch.repeat_interleave(torch.arange(4), lengths)
    n = seq_ids.numel()
    logprobs = (-torch.rand(n, generator=gen) * 2).requires_grad_(True)
    old = (logprobs.detach() + 0.1 * torch.randn(n, generator=gen)).detach()
    rollout = old + 0.2 * torch.randn(n, generator=gen)
    rollout[seq_ids == 0] = old[seq_ids == 0]  # kept whatever the draw (sequence-level MIS / TIS) ...
    rollout[seq_ids == 1] = old[seq_ids == 1] - 1.0  # ... and rejected / truncated: both cases, always
    advantages = torch.randn(4, generator=gen)[seq_ids]
    mask = (torch.rand(n, generator=gen) > 0.2).float()
    entropy = torch.rand(n, generator=gen).requires_grad_(True)
    ref = old - 0.3 * torch.rand(n, generator=gen)
    cfg = LossConfig(**overrides)
    counts = dict(global_tokens=float(mask.sum()), global_seqs=4.0)

    def loss_of(i, shards=WHOLE):
        return rl_loss(
            logprobs[i], old[i], rollout[i], advantages[i], mask[i], seq_ids[i], 4, cfg,
            entropy=entropy[i], ref_logprobs=ref[i], shards=shards, **counts,
        )[0]  # fmt: skip

    def grads_of(loss):  # (the entropy's is None without an entropy bonus)
        found = torch.autograd.grad(loss, (logprobs, entropy), allow_unused=True)
        return [torch.zeros(n) if g is None else g for g in found]

    whole = loss_of(torch.arange(n))
    grads = grads_of(whole)
    exchange, parts = TwoShardSum(), [None, None]
    halves = [torch.arange(k, n, 2) for k in (0, 1)]

    def shard(k):
        parts[k] = loss_of(halves[k], SequenceShards(2, exchange.for_shard(k)))

    threads = [threading.Thread(target=shard, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    torch.testing.assert_close(parts[0] + parts[1], whole, rtol=1e-5, atol=1e-6)
    assert grads[0].abs().sum() > 0
    for got, want in zip(grads_of(parts[0] + parts[1]), grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- MoE load-balancing loss


def balance_reference(logits, chosen, token_seqs, global_seqs):
    """The balance loss written as math: per trajectory and layer, (E / k) sum_e f_e P_e with f_e
    the share of the trajectory's tokens that chose e and P_e its mean softmax probability."""
    layers, experts, top_k = logits.shape[0], logits.shape[-1], chosen.shape[-1]
    logits, chosen, seqs = (
        logits.reshape(layers, -1, experts),
        chosen.reshape(layers, -1, top_k),
        token_seqs.reshape(-1),
    )
    total = logits.new_zeros(())
    for i in seqs.unique().tolist():
        if i == 0:
            continue  # padding
        mine = torch.nonzero(seqs == i).flatten()
        for layer in range(layers):
            probs = torch.softmax(logits[layer, mine].float(), dim=-1)  # [n, E]
            f = torch.stack([(chosen[layer, mine] == e).any(-1).float().mean() for e in range(experts)])
            total = total + experts / top_k * (f * probs.mean(0)).sum() / layers
    return total / global_seqs


def random_routing(gen, layers=3, rows=2, seq=10, experts=6, top_k=2):
    logits = torch.randn(layers, rows, seq, experts, generator=gen).requires_grad_(True)
    chosen = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(layers * rows * seq)])
    chosen = chosen.view(layers, rows, seq, top_k)
    token_seqs = torch.tensor([[1, 1, 1, 2, 2, 2, 2, 0, 0, 0], [3, 3, 3, 3, 3, 4, 4, 4, 4, 0]])
    return logits, chosen, token_seqs


def test_router_balance_loss_matches_its_formula_with_gradients():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 1000, ())))
    logits, chosen, token_seqs = random_routing(gen)
    got = router_balance_loss(logits, chosen, token_seqs, num_seqs=4, global_seqs=7.0)
    want = balance_reference(logits, chosen, token_seqs, 7.0)
    torch.testing.assert_close(got, want)
    (g_got,) = torch.autograd.grad(got, logits)
    (g_want,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(g_got, g_want)
    assert g_got[:, 0, 7:].abs().sum() == 0 and g_got[:, 0, :7].abs().sum() > 0  # padding left out


def test_router_balance_loss_is_one_when_balanced_and_more_when_collapsed():
    experts, top_k, n = 4, 2, 8
    balanced = torch.tensor([[0, 1], [2, 3]] * (n // 2)).view(1, 1, n, top_k)  # each expert n/2 times
    flat = torch.zeros(1, 1, n, experts)
    seqs = torch.ones(1, n, dtype=torch.long)
    assert router_balance_loss(flat, balanced, seqs, 1, 1.0).item() == pytest.approx(1.0)
    collapsed = torch.tensor([0, 1]).expand(1, 1, n, top_k)
    peaked = torch.tensor([5.0, 5.0, 0.0, 0.0]).expand(1, 1, n, experts)
    assert router_balance_loss(peaked, collapsed, seqs, 1, 1.0).item() > 1.9  # E / k x P(0 or 1) ~ 2


def test_router_balance_loss_over_two_sequence_shards_adds_up_to_the_whole():
    """Context parallelism: every other token of each trajectory on each of two shards; the shards'
    losses and gradients add up to the whole trajectories' (f and the token counts per trajectory
    must be the whole trajectory's on each shard)."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 1000, ())))
    logits, chosen, token_seqs = random_routing(gen)
    whole = router_balance_loss(logits, chosen, token_seqs, 4, 5.0)
    (g_whole,) = torch.autograd.grad(whole, logits)
    exchange, parts = TwoShardSum(), [None, None]

    def shard(k):
        cols = torch.arange(k, token_seqs.shape[1], 2)
        parts[k] = router_balance_loss(
            logits[:, :, cols], chosen[:, :, cols], token_seqs[:, cols], 4, 5.0,
            SequenceShards(2, exchange.for_shard(k)),
        )  # fmt: skip

    threads = [threading.Thread(target=shard, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    torch.testing.assert_close(parts[0] + parts[1], whole)
    (g_parts,) = torch.autograd.grad(parts[0] + parts[1], logits)
    torch.testing.assert_close(g_parts, g_whole)

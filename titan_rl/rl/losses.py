"""Policy losses, KL / entropy terms, rollout correction and aggregation (RL.md, "Policy loss").

Every per-token tensor is 1-D ``[N]``: the tokens of several trajectories packed and flattened.
``loss_mask`` (bool or float, nonzero = included) marks the tokens the policy sampled; ``seq_ids``
(long, in ``[0, num_seqs)``) names each token's trajectory. Masked-out tokens are excluded with
``torch.where``, so whatever values they hold (padding, tool output) never reach a sum.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

POLICY_LOSSES = ("ppo", "gspo")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
CORRECTIONS = ("none", "tis", "mis")
CORRECTION_LEVELS = ("token", "sequence")

Count = int | float | Tensor


def _whole(per_seq: Tensor) -> Tensor:
    return per_seq


@dataclass(frozen=True)
class SequenceShards:
    """Where the tokens of each trajectory are. ``count`` ranks each hold a part of every sequence of
    a micro-batch (context parallelism; 1: every sequence whole here) and ``sum`` adds a
    per-trajectory tensor ``[num_seqs]`` over them (no gradient: it only feeds detached quantities
    and counts). Sequence-level terms (GSPO's ratio, sequence-level correction, per-sequence means
    and token counts) are then the whole sequence's on every rank; each rank's loss stays the sum
    over its own tokens, so the ranks' losses (and gradients) add up to one process's."""

    count: int = 1
    sum: Callable[[Tensor], Tensor] = _whole


WHOLE = SequenceShards()


def _per_seq(values: Tensor, seq_ids: Tensor, num_seqs: int, shards: SequenceShards) -> Tensor:
    """``sum`` of ``values [N]`` per trajectory over every shard of it -> ``[num_seqs]`` (no grad)."""
    with torch.no_grad():
        return shards.sum(values.new_zeros(num_seqs).index_add(0, seq_ids, values.detach()))


@dataclass
class LossConfig:
    """How ``rl_loss`` turns log-probs and advantages into one scalar."""

    policy_loss: str = "ppo"  # "ppo" (token ratio) | "gspo" (sequence ratio, per-token gradient)
    clip_eps_low: float = 0.2  # PPO ratio lower bound 1 - clip_eps_low
    clip_eps_high: float = 0.28  # PPO ratio upper bound 1 + clip_eps_high (DAPO clip-higher)
    dual_clip: float | None = None  # c > 1: for A < 0 the token loss is capped at -c * A
    gspo_eps_low: float = 3e-4  # GSPO sequence-ratio lower bound 1 - gspo_eps_low
    gspo_eps_high: float = 4e-4  # GSPO sequence-ratio upper bound 1 + gspo_eps_high
    aggregation: str = "token-mean"  # "token-mean" | "seq-mean-token-mean" | "seq-mean-token-sum-norm"
    norm_constant: float | None = None  # seq-mean-token-sum-norm divisor, e.g. max response tokens
    kl_coef: float = 0.0  # weight of the KL-to-reference loss term (0 = off)
    kl_estimator: str = "k3"  # "k1" | "k2" | "k3"
    entropy_coef: float = 0.0  # weight of the entropy bonus (subtracted from the loss; 0 = off)
    correction: str = "none"  # rollout correction: "none" | "tis" (truncate weights) | "mis" (mask tokens)
    correction_level: str = "token"  # "token" | "sequence": importance weight per token or per trajectory
    correction_threshold: float = 2.0  # C: TIS truncates w at C, MIS keeps w in [1/C, C]

    def __post_init__(self) -> None:
        for name, valid in (
            ("policy_loss", POLICY_LOSSES),
            ("aggregation", AGGREGATIONS),
            ("kl_estimator", KL_ESTIMATORS),
            ("correction", CORRECTIONS),
            ("correction_level", CORRECTION_LEVELS),
        ):
            if getattr(self, name) not in valid:
                raise ValueError(f"loss.{name} = {getattr(self, name)!r}; valid: {', '.join(valid)}")
        for name in ("clip_eps_low", "gspo_eps_low"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"loss.{name} = {getattr(self, name)} must be in [0, 1)")
        for name in ("clip_eps_high", "gspo_eps_high", "kl_coef"):
            if getattr(self, name) < 0.0:
                raise ValueError(f"loss.{name} = {getattr(self, name)} must be >= 0")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"loss.dual_clip = {self.dual_clip} must be > 1 (e.g. 3.0), or unset to disable")
        if self.correction_threshold <= 1.0:
            raise ValueError(
                f"loss.correction_threshold = {self.correction_threshold} must be > 1 (e.g. 2.0)"
            )
        if self.aggregation == "seq-mean-token-sum-norm" and (self.norm_constant or 0.0) <= 0.0:
            raise ValueError(
                "loss.aggregation = 'seq-mean-token-sum-norm' needs loss.norm_constant > 0 "
                f"(got {self.norm_constant}); set it to the max response tokens"
            )


def loss_config_from(rl: Any, norm_constant: float, kl_in_loss: bool = True) -> LossConfig:
    """``LossConfig`` from a config's ``[rl]`` section (``titan_rl.config.job_config.RL``): what the
    trainer uses, and what ``--check-config`` validates (its errors say ``loss.``; the config's keys
    are ``rl.``). ``norm_constant``: Dr.GRPO's; ``kl_in_loss`` False leaves the KL to the reward."""
    return LossConfig(
        policy_loss=rl.policy_loss,
        clip_eps_low=rl.clip_eps_low,
        clip_eps_high=rl.clip_eps_high,
        dual_clip=rl.dual_clip or None,
        gspo_eps_low=rl.gspo_eps_low,
        gspo_eps_high=rl.gspo_eps_high,
        aggregation=rl.aggregation,
        norm_constant=norm_constant,
        kl_coef=rl.kl_coef if kl_in_loss else 0.0,
        kl_estimator=rl.kl_estimator,
        entropy_coef=rl.entropy_coef,
        correction=rl.correction,
        correction_level=rl.correction_level,
        correction_threshold=rl.correction_threshold,
    )


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token estimate ``[N]`` of KL(policy || reference) from tokens sampled by the policy."""
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k2":
        return 0.5 * (logprobs - ref_logprobs).square()
    if estimator == "k3":
        log_ratio = ref_logprobs - logprobs
        return torch.expm1(log_ratio) - log_ratio  # exp(x) - x - 1, accurate for small x
    raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")


def sequence_mean(
    values: Tensor, loss_mask: Tensor, seq_ids: Tensor, num_seqs: int, shards: SequenceShards = WHOLE
) -> Tensor:
    """Masked mean of ``values [N]`` per trajectory -> ``[num_seqs]``; 0 for a trajectory without tokens.
    Differentiable for whole sequences; over ``shards`` of them the mean of every shard's tokens,
    detached."""
    mask = loss_mask.bool()
    masked = torch.where(mask, values, 0.0)
    if shards.count > 1:
        sums = _per_seq(masked, seq_ids, num_seqs, shards)
        return sums / _per_seq(mask.to(values.dtype), seq_ids, num_seqs, shards).clamp_min(1.0)
    sums = values.new_zeros(num_seqs).index_add(0, seq_ids, masked)
    counts = values.new_zeros(num_seqs).index_add(0, seq_ids, mask.to(values.dtype))
    return sums / counts.clamp_min(1.0)


def ppo_clip_token_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    eps_low: float,
    eps_high: float,
    dual_clip: float | None = None,
) -> tuple[Tensor, Tensor]:
    """PPO clipped loss per token ``[N]`` and ``clipped [N]`` (bool: clipped branch active, no gradient).

    ``L = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A)`` with ``rho = exp(logp - old_logp)``;
    with dual clip c, tokens with A < 0 have ``L = min(L, -c A)``.
    """
    return _clipped_surrogate(torch.exp(logprobs - old_logprobs), advantages, eps_low, eps_high, dual_clip)


def gspo_token_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    seq_ids: Tensor,
    num_seqs: int,
    eps_low: float,
    eps_high: float,
    shards: SequenceShards = WHOLE,
) -> tuple[Tensor, Tensor]:
    """GSPO-token loss ``[N]`` and ``clipped [N]``: the PPO clip applied to the sequence ratio.

    ``s_i = exp(mean_{t in i, masked}(logp_t - old_logp_t))`` (over every shard of i); token t of
    trajectory i uses ``sg(s_i) * exp(logp_t - sg(logp_t))``: its value is s_i and its gradient is
    ``s_i * grad logp_t``.
    """
    log_seq_ratio = sequence_mean(logprobs - old_logprobs, loss_mask, seq_ids, num_seqs, shards)
    token_seq_ratio = torch.exp(log_seq_ratio.detach()[seq_ids] + logprobs - logprobs.detach())
    return _clipped_surrogate(token_seq_ratio, advantages, eps_low, eps_high, None)


def _clipped_surrogate(
    ratio: Tensor, advantages: Tensor, eps_low: float, eps_high: float, dual_clip: float | None
) -> tuple[Tensor, Tensor]:
    unclipped = -ratio * advantages
    clipped_loss = -ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * advantages
    clipped = clipped_loss > unclipped  # only when rho left the bounds on the side A favours
    loss = torch.where(clipped, clipped_loss, unclipped)
    if dual_clip is not None:
        cap = -dual_clip * advantages
        dual = (advantages < 0) & (loss > cap)
        loss = torch.where(dual, cap, loss)
        clipped = clipped | dual
    return loss, clipped


@torch.no_grad()
def rollout_correction(
    old_logprobs: Tensor,
    rollout_logprobs: Tensor,
    loss_mask: Tensor,
    seq_ids: Tensor,
    num_seqs: int,
    mode: str,
    level: str,
    threshold: float,
    shards: SequenceShards = WHOLE,
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Importance weights for the trainer/engine mismatch: ``(weights [N] fp32, keep [N] bool, stats)``.

    ``w_t = exp(old_logp_t - r_t)`` (level "token") or ``exp(sum_{t in i, masked}(old_logp_t - r_t))``
    broadcast to the tokens of trajectory i (level "sequence"). ``tis``: weights ``min(w, C)``, keep all;
    ``mis``: weights 1, keep tokens with ``1/C <= w <= C``; ``none``: weights 1, keep all.

    Stats over masked tokens: ``mismatch/logp_abs_mean`` and ``mismatch/logp_abs_max`` of
    ``|old_logp - r|``; ``mismatch/k3`` = mean of ``exp(r - old) - (r - old) - 1``, i.e.
    ``kl_estimate(old_logp, r, "k3")``: the k3 form of KL(trainer || engine), the same form as the
    reference KL with the trainer as the policy (the tokens come from the engine, so it is an
    estimate; both directions agree to second order in the mismatch); ``correction/truncated_frac``
    (fraction with w > C, nonzero only for ``tis``) and ``correction/masked_frac`` (fraction dropped,
    nonzero only for ``mis``).
    """
    if mode not in CORRECTIONS:
        raise ValueError(f"unknown rollout correction {mode!r}; valid: {', '.join(CORRECTIONS)}")
    if level not in CORRECTION_LEVELS:
        raise ValueError(f"unknown correction level {level!r}; valid: {', '.join(CORRECTION_LEVELS)}")
    mask = loss_mask.bool()
    log_w = torch.where(mask, old_logprobs.float() - rollout_logprobs.float(), 0.0)  # [N]
    zero = log_w.new_zeros(())
    stats = {
        "mismatch/logp_abs_mean": _masked_mean(log_w.abs(), mask),
        "mismatch/logp_abs_max": log_w.abs().max() if log_w.numel() else zero,
        "mismatch/k3": _masked_mean(kl_estimate(log_w, zero, "k3"), mask),  # log_w = old - r
        "correction/truncated_frac": zero,
        "correction/masked_frac": zero,
    }
    if level == "sequence":
        log_w = _per_seq(log_w, seq_ids, num_seqs, shards)[seq_ids]  # over every shard of it
    w = torch.exp(log_w)
    weights, keep = torch.ones_like(w), torch.ones_like(mask)
    if mode == "tis":
        weights = w.clamp(max=threshold)
        stats["correction/truncated_frac"] = _masked_mean((w > threshold).float(), mask)
    elif mode == "mis":
        keep = (w >= 1.0 / threshold) & (w <= threshold)
        stats["correction/masked_frac"] = _masked_mean((~keep).float(), mask)
    return weights, keep, stats


def aggregate(
    per_token_loss: Tensor,
    loss_mask: Tensor,
    seq_ids: Tensor,
    num_seqs: int,
    mode: str,
    global_tokens: Count | None = None,
    global_seqs: Count | None = None,
    norm_constant: float | None = None,
    shards: SequenceShards = WHOLE,
) -> Tensor:
    """Reduce ``per_token_loss [N]`` over masked tokens to a scalar.

    - ``token-mean``: ``sum(masked loss) / global_tokens`` (default: the local masked count).
    - ``seq-mean-token-mean``: ``sum_i mean_{t in i}(loss) / global_seqs`` (default ``num_seqs``).
    - ``seq-mean-token-sum-norm``: ``sum_i (sum_{t in i}(loss) / norm_constant) / global_seqs``.

    Pass the counts of the whole global batch (all data-parallel ranks and accumulation steps); the
    sum of the per-micro-batch losses then equals the loss of the whole batch in one piece. Over
    ``shards`` of each sequence a trajectory's token count is its whole count, so the shards'
    losses add up to the sequence's.
    """
    mask = loss_mask.bool()
    masked_loss = torch.where(mask, per_token_loss, 0.0)
    if mode == "token-mean":
        denominator = mask.sum().clamp_min(1) if global_tokens is None else global_tokens
        return masked_loss.sum() / denominator
    seqs = num_seqs if global_seqs is None else global_seqs
    if mode == "seq-mean-token-mean":
        if shards.count > 1:  # this shard's token sums over the whole sequences' counts
            counts = _per_seq(mask.to(per_token_loss.dtype), seq_ids, num_seqs, shards).clamp_min(1.0)
            sums = per_token_loss.new_zeros(num_seqs).index_add(0, seq_ids, masked_loss)
            return (sums / counts).sum() / seqs
        return sequence_mean(per_token_loss, mask, seq_ids, num_seqs).sum() / seqs
    if mode == "seq-mean-token-sum-norm":
        if norm_constant is None or norm_constant <= 0:
            raise ValueError(f"seq-mean-token-sum-norm needs norm_constant > 0 (got {norm_constant})")
        return masked_loss.sum() / norm_constant / seqs  # sum_i sum_{t in i} == sum over all masked tokens
    raise ValueError(f"unknown aggregation {mode!r}; valid: {', '.join(AGGREGATIONS)}")


def rl_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    rollout_logprobs: Tensor | None,
    advantages: Tensor,
    loss_mask: Tensor,
    seq_ids: Tensor,
    num_seqs: int,
    cfg: LossConfig,
    entropy: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    global_tokens: Count | None = None,
    global_seqs: Count | None = None,
    shards: SequenceShards = WHOLE,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The training loss (scalar, differentiable in ``logprobs`` / ``entropy``) and detached metrics.
    ``shards``: with context parallelism, the ranks that hold the other parts of these sequences.

    Rollout-correction weights and keep mask -> policy loss (ppo or gspo) times the weights -> plus
    ``kl_coef * KL`` -> minus ``entropy_coef * H`` -> aggregated over ``loss_mask & keep``. Metrics
    (0-dim, over those tokens; with none, 0 for means and the identity, +inf / -inf, for
    ratio/min / ratio/max, which ``StepStats`` reports as NaN): loss, ratio/mean|min|max (token ratio),
    ratio/seq_mean (gspo), clip_frac, entropy/mean, kl/mean, and the ``rollout_correction`` stats
    over ``loss_mask`` (absent when ``rollout_logprobs`` is None, allowed only with correction "none").
    """
    mask = loss_mask.bool()
    advantages = torch.where(mask, advantages, 0.0)  # garbage there would become 0 * inf in the backward
    if rollout_logprobs is not None:
        weights, keep, stats = rollout_correction(
            old_logprobs,
            rollout_logprobs,
            mask,
            seq_ids,
            num_seqs,
            cfg.correction,
            cfg.correction_level,
            cfg.correction_threshold,
            shards,
        )
        mask = mask & keep
    elif cfg.correction != "none":
        raise ValueError(f"loss.correction = {cfg.correction!r} needs rollout_logprobs from the engine")
    else:
        weights, stats = torch.ones_like(logprobs), {}
    if cfg.kl_coef > 0 and ref_logprobs is None:
        raise ValueError("loss.kl_coef > 0 needs ref_logprobs; run a reference model or set kl_coef = 0")
    if cfg.entropy_coef != 0 and entropy is None:
        raise ValueError("loss.entropy_coef != 0 needs the per-token entropy; pass entropy=")

    metrics: dict[str, Tensor] = {}
    if cfg.policy_loss == "ppo":
        per_token, clipped = ppo_clip_token_loss(
            logprobs, old_logprobs, advantages, cfg.clip_eps_low, cfg.clip_eps_high, cfg.dual_clip
        )
    else:  # the sequence ratio is over all sampled tokens; dropped tokens only leave the aggregation
        per_token, clipped = gspo_token_loss(
            logprobs,
            old_logprobs,
            advantages,
            loss_mask,
            seq_ids,
            num_seqs,
            cfg.gspo_eps_low,
            cfg.gspo_eps_high,
            shards,
        )
        with torch.no_grad():
            has_tokens = _per_seq(mask.float(), seq_ids, num_seqs, shards) > 0  # [num_seqs]
            log_ratio = sequence_mean(logprobs - old_logprobs, loss_mask, seq_ids, num_seqs, shards)
            seq_ratio = torch.exp(log_ratio)
            metrics["ratio/seq_mean"] = _masked_mean(seq_ratio, has_tokens)
    per_token = per_token * weights
    if cfg.kl_coef > 0:
        per_token = per_token + cfg.kl_coef * kl_estimate(logprobs, ref_logprobs, cfg.kl_estimator)
    if cfg.entropy_coef != 0:
        per_token = per_token - cfg.entropy_coef * entropy
    loss = aggregate(
        per_token,
        mask,
        seq_ids,
        num_seqs,
        cfg.aggregation,
        global_tokens,
        global_seqs,
        cfg.norm_constant,
        shards,
    )

    with torch.no_grad():
        ratio = torch.exp(logprobs - old_logprobs)
        # what the aggregation kept (MIS drops tokens or whole sequences): the trainer renormalizes
        # the step by these once it has them from every micro-batch and rank (KEPT_COUNTS)
        metrics["kept/tokens"] = mask.sum().float()
        # (each of the shards of a sequence counts its share of it: they add up to one over the ranks)
        kept_seqs = (_per_seq(mask.float(), seq_ids, num_seqs, shards) > 0).sum().float()
        metrics["kept/seqs"] = kept_seqs / shards.count
        metrics["loss"] = loss.detach()
        metrics["ratio/mean"] = _masked_mean(ratio, mask)
        metrics["ratio/min"] = _masked_extreme(ratio, mask, torch.amin)
        metrics["ratio/max"] = _masked_extreme(ratio, mask, torch.amax)
        metrics["clip_frac"] = _masked_mean(clipped.float(), mask)
        if entropy is not None:
            metrics["entropy/mean"] = _masked_mean(entropy, mask)
        if ref_logprobs is not None:
            metrics["kl/mean"] = _masked_mean(kl_estimate(logprobs, ref_logprobs, cfg.kl_estimator), mask)
    return loss, metrics | stats


def router_balance_loss(
    router_logits: Tensor,
    expert_indices: Tensor,
    token_seqs: Tensor,
    num_seqs: int,
    global_seqs: Count,
    shards: SequenceShards = WHOLE,
) -> Tensor:
    """MoE load-balancing loss per trajectory: ``sum_i b_i / global_seqs`` over the trajectories here,
    ``b_i = mean over layers of (E / k) sum_e f_ie P_ie`` (Switch Transformer's term, Fedus et al.
    2021, over one sequence as DeepSeek-V3's sequence-wise balance loss): ``f_ie`` the share of
    trajectory i's tokens routed to expert e (k experts each, so ``sum_e f_ie = k``), ``P_ie`` the
    mean router probability of e (softmax over all E logits) over its tokens. 1 when balanced.

    ``router_logits [layers, ..., E]`` and ``expert_indices [layers, ..., k]`` over the tokens of
    ``token_seqs [...]`` (1 + the trajectory index, 0 for padding: left out). Differentiable through
    ``P`` (``f`` counts choices). Over ``shards`` of each trajectory, ``f`` and the token counts are
    the whole trajectory's and each rank's ``P`` sums its own tokens, so the ranks' losses (and
    gradients) add up to one process's, as ``rl_loss``'s do.
    """
    layers, experts = router_logits.shape[0], router_logits.shape[-1]
    top_k = expert_indices.shape[-1]
    slots = num_seqs + 1  # slot 0: the padding
    seq = token_seqs.reshape(-1)  # [T]
    probs = torch.softmax(router_logits.reshape(layers, -1, experts).float(), dim=-1)  # [L, T, E]
    prob_sums = probs.new_zeros(layers, slots, experts).index_add(1, seq, probs)
    with torch.no_grad():
        chosen = seq[:, None] * experts + expert_indices.reshape(layers, -1, top_k).long()  # [L, T, k]
        chosen = chosen.reshape(layers, -1)
        counts = probs.new_zeros(layers, slots * experts).scatter_add_(
            1, chosen, torch.ones_like(chosen, dtype=probs.dtype)
        )
        tokens = probs.new_zeros(slots).index_add_(0, seq, torch.ones_like(seq, dtype=probs.dtype))
        whole = shards.sum(torch.cat([counts.reshape(-1), tokens]))  # over every shard of a trajectory
        counts, tokens = whole[:-slots].view(layers, slots, experts), whole[-slots:]
        # f_ie P_ie = counts / n x prob_sums / n; E / k and the layer mean in one factor per slot
        scale = experts / (top_k * layers * tokens.clamp_min(1.0).square())
        scale[0] = 0.0
    per_seq = (counts * prob_sums).sum(dim=(0, 2)) * scale  # [slots]
    return per_seq.sum() / global_seqs


KEPT_COUNTS = ("kept/tokens", "kept/seqs")
"""Counts ``rl_loss`` returns among its metrics: the trained tokens and trajectories the aggregation
kept (fewer than given only with ``correction = "mis"``), to be summed, not averaged."""
OVER_KEPT_TOKENS = ("ratio/mean", "clip_frac", "entropy/mean", "kl/mean")
"""``rl_loss`` metrics that are means over the kept tokens (the others: over all trained tokens)."""


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, values, 0.0).sum().float() / mask.sum().clamp_min(1)


def _masked_extreme(values: Tensor, mask: Tensor, reduce) -> Tensor:
    """amin / amax over masked entries without a host sync; with none masked, the reduction's
    identity (+inf for amin, -inf for amax), so an empty micro-batch or rank changes no extreme."""
    fill = math.inf if reduce is torch.amin else -math.inf
    return reduce(values.masked_fill(~mask, fill)) if values.numel() else values.new_full((), fill)

"""The trainer: one RL step over a packed rollout batch (the unified forward lives here).

On-policy (one optimizer step per rollout batch) the grad forward's own log-probs, detached, are
the old log-probs: the importance ratio is exactly 1 and MoE routing cannot drift between passes.
With several minibatches (or PPO epochs, ``training.epochs``), one no-grad pass over the whole batch
records old log-probs and each token's experts first, and the grad passes replay those experts
(``rl.routing_replay``).

A batch that carries the rollout engine's routing (``rl.rollout_routing_replay``) is run through
those experts by every policy forward, the no-grad pass included (``titan_rl.rl.routing_replay``);
the frozen reference of the KL term routes on its own (it is another policy than the one sampled).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable

import torch
from torch.distributed.tensor import DTensor

from titan_rl.config import JobConfig
from titan_rl.model import GptOss
from titan_rl.parallel import ParallelConfig, ParallelDims, clip_grad_norm_, parallelize_gpt_oss
from titan_rl.parallel.fsdp import reshard
from titan_rl.parallel.parallelize import precision_summary, set_gemm_reductions
from titan_rl.rl.collect import is_agentic
from titan_rl.rl.losses import (
    KEPT_COUNTS,
    WHOLE,
    LossConfig,
    SequenceShards,
    kl_estimate,
    loss_config_from,
    rl_loss,
    router_balance_loss,
)
from titan_rl.rl.packing import DeviceBatch, PackedBatch
from titan_rl.step_stats import BALANCE_METRIC, SUMMED, StepStats


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: JobConfig, total_steps: int):
    sched = cfg.lr_scheduler

    def factor(step: int) -> float:  # step = optimizer steps taken so far
        if step < sched.warmup_steps:
            return (step + 1) / sched.warmup_steps
        if sched.decay == "constant":
            return 1.0
        progress = (step - sched.warmup_steps) / max(1, total_steps - sched.warmup_steps)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return sched.min_lr_ratio + (1 - sched.min_lr_ratio) * cosine

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def most_trained_tokens(cfg: JobConfig) -> int:
    """The most sampled (trained) tokens one trajectory can have: Dr.GRPO's constant. One turn of
    ``rollout.max_new_tokens`` in single-turn runs; a multi-turn episode samples several turns, all
    within ``env.max_episode_tokens``."""
    return cfg.env.max_episode_tokens if is_agentic(cfg) else cfg.rollout.max_new_tokens


def loss_config(cfg: JobConfig) -> LossConfig:
    """The loss of ``cfg``: a KL in the reward (``rl.kl_penalty``) is not a loss term."""
    return loss_config_from(cfg.rl, float(most_trained_tokens(cfg)), cfg.rl.kl_penalty == "loss")


def replayed_fraction(batch: PackedBatch) -> float | None:
    """With the engine's routing in the batch: the share of trained tokens whose predicting position
    replays recorded experts (1.0 unless the engine left positions unrecorded); else None."""
    if batch.routing is None:
        return None
    recorded = batch.routing[..., 0, 0] >= 0  # [R, S]: a position's experts are all -1 or none
    return float(recorded[batch.target_mask].float().mean()) if batch.target_mask.any() else 1.0


class Trainer:
    """Owns the policy, the optional frozen reference and the optimizer; runs one RL step."""

    def __init__(
        self,
        model: GptOss,
        cfg: JobConfig,
        dims: ParallelDims | None = None,
        materialize: Callable[[GptOss], None] | None = None,
    ) -> None:
        """``materialize`` fills a model built on the meta device, after it is sharded (so each rank
        allocates only its shards) and before the optimizer sees its parameters."""
        self.model, self.cfg = model, cfg
        self.dims = dims or ParallelDims.from_config(cfg.parallelism, 1)
        self.loss_cfg = loss_config(cfg)
        self.reference = None
        if cfg.rl.kl_coef > 0:
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        par = cfg.parallelism
        config = ParallelConfig(
            activation_checkpoint=par.activation_checkpoint,
            compile=par.compile,
            compile_backend=par.compile_backend,
            mixed_precision=par.mixed_precision,
        )
        self.precision = precision_summary(model, config, self.dims.device_type)
        set_gemm_reductions(par.gemm_reductions)  # process-wide: the engine's decode GEMMs too
        if self.dims.device_type == "cuda":  # (vLLM computes in bf16 whatever the trainer does)
            self.precision += f", {'fp32' if par.gemm_reductions == 'full' else 'reduced'} split-K sums"
        # every rank runs the same rollouts and trains on its share of the rows (see train_step)
        parallelize_gpt_oss(model, self.dims, config)
        if self.reference is not None:  # no grad: nothing to recompute, same precision as the policy
            parallelize_gpt_oss(
                self.reference, self.dims, ParallelConfig(mixed_precision=par.mixed_precision)
            )
        if materialize is not None:
            for module in (model, self.reference):
                if module is not None:
                    materialize(module)
        self.device = next(model.parameters()).device  # batches and collectives go there
        opt = cfg.optimizer
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay
        )
        total_optimizer_steps = cfg.training.steps * cfg.training.minibatches * cfg.training.epochs
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg, total_optimizer_steps)
        self.consecutive_skips = 0
        self.skipped_steps = 0

    def _logprobs(
        self, model: GptOss, mb: DeviceBatch, expert_indices=None, record: bool = False, router: bool = False
    ):
        """Log-probs and entropy of the trained positions of ``mb`` (+ routing when recording; with
        ``router`` the routing and the router logits, for the load-balancing loss)."""
        out = model(
            mb.tokens,
            positions=mb.positions,
            document_ids=mb.document_ids,
            documents=mb.documents,
            expert_indices=expert_indices,
            return_expert_indices=record or router,
            return_router_logits=router,
            targets=mb.targets,
            target_index=mb.target_index,
            temperature=self.cfg.rollout.temperature,
        )
        return out if record or router else (*out, None)

    def _local_rows(self, batch: PackedBatch) -> PackedBatch:
        """This data-parallel rank's rows (r, r + dp, ...), padded so every rank has as many (on the
        host: micro-batches go to the device one at a time, as ``DeviceBatch``)."""
        if self.dims.distributed:
            dp, rank = self.dims.dp, self.dims.get_mesh("dp").get_local_rank()
            batch = batch.padded_rows(-(-batch.num_rows // dp) * dp).rows(slice(rank, None, dp))
        return batch

    def _global_counts(self, minibatch: PackedBatch) -> tuple[float, float]:
        """Trained tokens and trajectories of this minibatch summed over data-parallel ranks (counted
        on the host; with several ranks one all-reduce)."""
        mask = minibatch.target_mask
        tokens, seqs = float(mask.sum()), float(minibatch.seq_ids[mask].unique().numel())
        if not self.dims.distributed:
            return tokens, seqs
        counts = torch.tensor([tokens, seqs], device=self.device)
        torch.distributed.all_reduce(counts, group=self.dims.get_mesh("dp").get_group())
        return float(counts[0]), float(counts[1])

    def _sequence_shards(self) -> SequenceShards:
        """With context parallelism each cp rank holds a part of every sequence: the loss's
        sequence-level terms add their per-sequence sums over the cp group (one all-reduce each)."""
        if not self.dims.cp_enabled:
            return WHOLE
        group = self.dims.get_mesh("cp").get_group()

        def total(per_seq: torch.Tensor) -> torch.Tensor:
            per_seq = per_seq.clone()
            torch.distributed.all_reduce(per_seq, group=group)
            return per_seq

        return SequenceShards(self.dims.cp, total)

    def _host_micro_batches(self, batch: PackedBatch) -> list[PackedBatch]:
        """Micro-batches of rows; with context parallelism each is this rank's sequence shard."""
        size = self.cfg.training.micro_batch_rows
        micro = [batch.rows(slice(i, i + size)) for i in range(0, batch.num_rows, size)]
        if self.dims.cp_enabled:
            from titan_rl.parallel.context_parallel import shard_sequence

            cp_mesh, mode = self.dims.get_mesh("cp"), self.dims.cp_mode
            micro = [mb.map(lambda t: shard_sequence(t, cp_mesh, mode, dim=1)) for mb in micro]
        return micro

    def _micro_batches(self, batch: PackedBatch) -> list[DeviceBatch]:
        """``_host_micro_batches`` on the model's device, with their host-built indices."""
        return [DeviceBatch.of(mb, self.device) for mb in self._host_micro_batches(batch)]

    def apply_optimizer_config(self) -> list[str]:
        """After loading a checkpoint: the config's AdamW hyperparameters replace the saved ones.

        A checkpoint stores the learning rate (and betas, eps, weight decay) in its optimizer and
        scheduler state; without this, ``--optimizer.lr`` on a resumed run would be silently
        ignored. The schedule's shape (warmup, decay) always comes from the config, its position
        from the checkpoint (a changed ``training.steps``, warmup or floor re-times it from there).
        Returns one ``key: saved -> config`` line per changed value.
        """
        opt, changes = self.cfg.optimizer, []
        wanted = {"betas": tuple(opt.betas), "eps": opt.eps, "weight_decay": opt.weight_decay}
        for key, value in wanted.items():
            saved = self.optimizer.param_groups[0][key]
            if (tuple(saved) if key == "betas" else saved) != value:
                changes.append(f"optimizer.{key}: {saved} -> {value}")
                for group in self.optimizer.param_groups:
                    group[key] = value
        scheduler = self.lr_scheduler
        new_peak = any(base != opt.lr for base in scheduler.base_lrs)
        if new_peak:
            changes.append(f"optimizer.lr: {scheduler.base_lrs[0]} -> {opt.lr}")
            scheduler.base_lrs = [opt.lr] * len(scheduler.base_lrs)
        # always: the saved rate is the saved schedule's (another training.steps, warmup or floor
        # gives another one at the same position)
        saved_lr = self.optimizer.param_groups[0]["lr"]
        for group, factor in zip(self.optimizer.param_groups, scheduler.lr_lambdas):
            group["initial_lr"] = opt.lr
            group["lr"] = opt.lr * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        now = self.optimizer.param_groups[0]["lr"]
        if not new_peak and not math.isclose(now, saved_lr, rel_tol=1e-9, abs_tol=0.0):
            changes.append(f"learning rate at this step: {saved_lr:.3g} -> {now:.3g} (the config's schedule)")
        return changes

    def train_step(self, batch: PackedBatch, num_seqs: int) -> dict[str, float]:
        """All optimizer steps for one rollout batch; returns the merged metrics."""
        cfg = self.cfg
        replayed = replayed_fraction(batch)  # of the whole batch, the same on every rank
        batch = self._local_rows(batch)
        rows = torch.arange(batch.num_rows)
        minibatches = [
            batch.rows(r) for r in rows.tensor_split(min(cfg.training.minibatches, batch.num_rows))
        ]
        unified = cfg.rl.old_logprob_mode == "unified"
        updates = len(minibatches) * cfg.training.epochs  # optimizer steps on this batch
        needs_old_pass = not unified or updates > 1
        replay = unified and cfg.rl.routing_replay and updates > 1
        stats = StepStats()
        shards = self._sequence_shards()
        balance_coef = cfg.rl.router_aux_loss_coef
        grad_norms, skipped = [], False
        lr = self.lr_scheduler.get_last_lr()[0]  # the rate this step's updates use
        schedule_end = self.lr_scheduler.last_epoch + cfg.training.minibatches * cfg.training.epochs
        # Old (and reference) log-probs of every minibatch come from the policy that sampled the
        # batch, i.e. before any update; the experts they used are recorded for replay.
        old, routing, ref = {}, {}, {}
        host_micro = [self._host_micro_batches(minibatch) for minibatch in minibatches]
        micro = [[DeviceBatch.of(mb, self.device) for mb in row] for row in host_micro]
        with torch.no_grad():
            for m in range(len(minibatches)):
                for i, mb in enumerate(micro[m]):
                    if not unified:  # the two-forward failure: an inference-style pass per trajectory
                        docs = [DeviceBatch.of(doc, self.device) for doc in host_micro[m][i].documents()]
                        old[m, i] = torch.cat(
                            [self._logprobs(self.model, doc, doc.expert_indices)[0] for doc in docs]
                        )
                    elif needs_old_pass:
                        old[m, i], _, routing[m, i] = self._logprobs(
                            self.model, mb, mb.expert_indices, record=replay
                        )
                    if self.loss_cfg.kl_coef > 0:
                        ref[m, i] = self._logprobs(self.reference, mb)[0]
        if self.loss_cfg.kl_coef > 0:
            reshard(self.reference)  # its root's gathered weights would outlive the step
        counts = [self._global_counts(minibatch) for minibatch in minibatches]
        for m in [m for _ in range(cfg.training.epochs) for m in range(len(minibatches))]:
            global_tokens, global_seqs = counts[m]
            self.optimizer.zero_grad(set_to_none=True)
            kept = torch.zeros(2, dtype=torch.float64, device=self.device)  # tokens, trajectories
            minibatch_loss = torch.zeros((), dtype=torch.float64, device=self.device)
            for i, mb in enumerate(micro[m]):
                if mb.num_tokens == 0 and not self.dims.distributed:
                    continue  # (with FSDP every rank must run the same forwards, even empty ones)
                logprobs, entropy, used, *router_logits = self._logprobs(
                    self.model,
                    mb,
                    expert_indices=routing[m, i] if replay else mb.expert_indices,
                    router=balance_coef > 0,
                )
                old_logprobs = old[m, i] if needs_old_pass else logprobs.detach()
                loss, metrics = rl_loss(
                    logprobs,
                    old_logprobs,
                    mb.rollout_logprobs,
                    mb.advantages,
                    torch.ones_like(logprobs),
                    mb.seq_ids,
                    num_seqs,
                    self.loss_cfg,
                    entropy=entropy,
                    ref_logprobs=ref.get((m, i)),
                    global_tokens=global_tokens,
                    global_seqs=global_seqs,
                    shards=shards,
                )
                if balance_coef > 0:
                    balance = router_balance_loss(
                        router_logits[0], used, mb.token_seqs, num_seqs, global_seqs, shards
                    )
                    loss = loss + balance_coef * balance
                    metrics[BALANCE_METRIC] = balance.detach()
                loss.backward()
                kept += torch.stack([metrics[k] for k in KEPT_COUNTS]).double()
                minibatch_loss += loss.detach().double()
                stats.add(metrics, mb.num_tokens)
            scale = self._kept_scale(kept, global_tokens, global_seqs)
            if scale is not None:
                self._scale_gradients(scale)
                minibatch_loss = minibatch_loss * scale
            stats.add_loss(minibatch_loss)
            grad_norm, stepped = self._optimizer_step()
            grad_norms.append(grad_norm)
            skipped |= not stepped
        # training.max_skipped_steps counts RL steps, the schedule training.minibatches x epochs
        # updates per RL step, whether a batch with fewer rows took fewer or an update was skipped
        self.skipped_steps += skipped
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
        self._advance_schedule(schedule_end)
        if self.dims.distributed:
            stats.all_reduce(self.dims.get_mesh("dp_cp").get_group(), self.device)
        result = stats.result()
        for key in ("loss", *SUMMED):  # the mean over the optimizer steps (each normalized on its own)
            if key in result:
                result[key] /= updates
        result["grad_norm"] = max(grad_norms)
        result["lr"] = lr
        result["train/skipped_steps"] = self.skipped_steps
        result["train/updates"] = updates
        if replayed is not None:
            result["routing/replayed_frac"] = replayed
        return result

    def reset_reference(self) -> None:
        """The reference becomes a copy of the policy's current weights (after the supervised warmup:
        the KL then holds RL near the warmed-up policy, not the weights before it). Both modules are
        sharded alike, so each rank copies its own shards."""
        if self.reference is None:
            return
        for module in (self.model, self.reference):  # sharded parameters, not gathered copies a
            reshard(module)  # no-grad forward left (FSDP; a no-op without it)
        policy = dict(self.model.named_parameters())  # by name: the two may list them in other orders
        with torch.no_grad():
            for name, ref in self.reference.named_parameters():
                local = ref.to_local() if isinstance(ref, DTensor) else ref
                source = policy[name]
                local.copy_(source.to_local() if isinstance(source, DTensor) else source)

    def trajectory_kl(self, batch: PackedBatch, num_seqs: int) -> tuple[torch.Tensor, float]:
        """``rl.kl_penalty = "reward"``: each trajectory's KL to the frozen reference, the sum of the
        estimator over its sampled tokens, with the rollout engine's log-probs as the policy's (the
        policy that sampled them); ``[num_seqs]`` fp64 on the host, plus the mean per token. One
        no-grad reference forward per micro-batch (every rank runs as many), one all-reduce."""
        if self.reference is None:
            raise ValueError("trajectory_kl needs a reference model (rl.kl_coef > 0)")
        sums = torch.zeros(num_seqs + 1, dtype=torch.float64, device=self.device)  # last: tokens
        with torch.no_grad():
            for mb in self._micro_batches(self._local_rows(batch)):
                if mb.num_tokens == 0 and not self.dims.distributed:
                    continue
                ref = self._logprobs(self.reference, mb)[0]
                kl = kl_estimate(mb.rollout_logprobs.to(ref.dtype), ref, self.cfg.rl.kl_estimator)
                sums.index_add_(0, mb.seq_ids, kl.double())
                sums[num_seqs] += mb.num_tokens
        reshard(self.reference)  # FSDP's root keeps its no-grad gathers (embeddings, LM head)
        if self.dims.distributed:  # rows over dp ranks, sequence shards over cp ranks
            torch.distributed.all_reduce(sums, group=self.dims.get_mesh("dp_cp").get_group())
        sums = sums.cpu()
        return sums[:num_seqs], float(sums[:num_seqs].sum() / sums[num_seqs].clamp_min(1.0))

    def sft_step(self, batch: PackedBatch, optimizer: torch.optim.Optimizer) -> float:
        """One supervised step: mean negative log-likelihood of the demonstrations' trained tokens."""
        optimizer.zero_grad(set_to_none=True)
        batch = self._local_rows(batch)
        tokens, _ = self._global_counts(batch)
        total = torch.zeros((), device=self.device)
        for mb in self._micro_batches(batch):
            logprobs, _, _ = self._logprobs(self.model, mb)
            loss = -logprobs.sum() / tokens  # this rank's share of the global mean
            loss.backward()
            total += loss.detach()
        if self.dims.distributed:  # the global loss, not rank 0's share
            torch.distributed.all_reduce(total, group=self.dims.get_mesh("dp_cp").get_group())
        clip = self.cfg.training.grad_clip
        clip_grad_norm_(self.model.parameters(), clip if clip > 0 else float("inf"))
        optimizer.step()
        return float(total)

    def _kept_scale(
        self, kept: torch.Tensor, global_tokens: float, global_seqs: float
    ) -> torch.Tensor | None:
        """With ``correction = "mis"``: the factor that turns the minibatch's loss, normalized by all
        its trained tokens (or trajectories), into one normalized by those MIS kept, known only after
        the forward (``kept``: this rank's kept tokens and trajectories; summed over the ranks here).
        Rejected tokens leave the loss as if they were not in the batch. None without MIS.

        With none kept the policy term is zero and the factor 1: a load-balancing term in the same
        gradient (``rl.router_aux_loss_coef``) must not be multiplied by the batch's size then."""
        if self.loss_cfg.correction != "mis":
            return None
        if self.dims.distributed:  # (cp ranks each count their shard's tokens, a share of each sequence)
            torch.distributed.all_reduce(kept, group=self.dims.get_mesh("dp_cp").get_group())
        count, total = (
            (kept[0], global_tokens) if self.loss_cfg.aggregation == "token-mean" else (kept[1], global_seqs)
        )
        return torch.where(count > 0, total / count.clamp_min(1.0), torch.ones_like(count))

    def _scale_gradients(self, scale: torch.Tensor) -> None:
        """Multiply every gradient by the device scalar ``scale`` (FSDP's DTensor gradients: their
        local shards), with no host read."""
        for p in self.model.parameters():
            if p.grad is not None:
                grad = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                grad.mul_(scale.to(grad.dtype))

    def _advance_schedule(self, position: int) -> None:
        """Move the LR schedule to ``position`` (optimizer steps) without stepping the optimizer."""
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended
            warnings.filterwarnings(
                "ignore", message="Detected call of `lr_scheduler.step", category=UserWarning
            )
            while self.lr_scheduler.last_epoch < position:
                self.lr_scheduler.step()

    def _optimizer_step(self) -> tuple[float, bool]:
        """Clip and step (and the schedule with it); a non-finite gradient norm skips the update.
        Returns the norm and whether the optimizer stepped."""
        clip = self.cfg.training.grad_clip
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            return float(grad_norm), False
        self.optimizer.step()
        self.lr_scheduler.step()
        return float(grad_norm), True

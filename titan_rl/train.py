"""The RL training entry point: ``torchrun -m titan_rl.train --config FILE [--section.key=value ...]``.

Per step: prompts from the environment -> rollouts from the engine -> rewards and group
advantages -> trajectories packed into rows -> ONE forward with grad giving log-probs and entropy
(on-policy: ``old_logprobs = logprobs.detach()``, so the ratio is exactly 1 and MoE routing cannot
drift) -> loss -> backward -> clip -> AdamW -> metrics -> checkpoint. With several minibatches or
epochs per rollout batch, old log-probs come from a no-grad pass that records each token's experts,
and the grad passes replay them (``rl.routing_replay``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import signal
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from titan_rl.config import ConfigError, JobConfig, config_to_dict, load_config, to_toml
from titan_rl.config.loader import config_changes, config_warnings
from titan_rl.metrics import MetricsLogger, NoSignalWatch, peak_memory_gb, reset_peak_memory
from titan_rl.model import GptOss, GptOssModelArgs
from titan_rl.parallel import ParallelDims
from titan_rl.parallel.health import Heartbeat, describe_collective_failure, is_collective_failure
from titan_rl.preflight import check_inputs
from titan_rl.report import write_report
from titan_rl.rl.advantages import group_advantages, informative_groups
from titan_rl.rl.collect import build_env, build_tokenizer, collect_rollouts, demonstrations, system_style
from titan_rl.rl.packing import pack_trajectories
from titan_rl.rl.rollout import NativeEngine, RolloutEngine
from titan_rl.rl.types import Trajectory
from titan_rl.run_folder import claim_run_folder
from titan_rl.stop import STOPPED_ENV, StopRequest
from titan_rl.trainer import Trainer

DEFAULT_CONFIG = "train_configs/debug_cpu.toml"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

NO_SIGNAL_PATIENCE = 10  # steps without any informative group before the run warns


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def init_device(dims: ParallelDims) -> torch.device:
    """``cuda:LOCAL_RANK`` (made current) on GPUs, else the CPU."""
    if dims.device_type != "cuda":
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


def build_model(
    cfg: JobConfig, device: torch.device, policy_weights: bool = True
) -> tuple[GptOss, Callable[[GptOss], None] | None]:
    """The policy, and how the trainer fills it once it is sharded.

    From a HF folder the model is built on the meta device: after FSDP / EP sharding each rank
    allocates only its shards on ``device`` and keeps its part of every tensor it reads, so no rank
    ever holds the whole model (gpt-oss-120b included). A preset is initialized randomly on the CPU
    from ``job.seed`` (the same on every rank) and moved to ``device`` before sharding.
    ``policy_weights`` False (a run that resumes a checkpoint): the policy's shards are allocated but
    not read from the HF folder, which the checkpoint would overwrite (gpt-oss-120b: each rank reads
    every expert tensor whole); a KL reference model is still read.
    """
    dtype = DTYPES[cfg.model.dtype]
    if not cfg.model.hf_path:
        args = GptOssModelArgs.from_preset(
            cfg.model.preset, attn_backend=cfg.model.attn_backend, activation_dtype=cfg.model.activation_dtype
        )
        model = GptOss(args)
        return model.to(dtype=dtype, device=device), None
    from titan_rl.checkpoint.hf import args_from_hf_folder, load_hf_state_dict_into

    args = args_from_hf_folder(cfg.model.hf_path)
    args.activation_dtype = cfg.model.activation_dtype
    with torch.device("meta"):
        model = GptOss(args).to(dtype)
    model.set_attention_backend(cfg.model.attn_backend)

    def load(module: GptOss) -> None:
        module.to_empty(device=device)
        if module is model and not policy_weights:  # a checkpoint's weights replace them next
            return
        load_hf_state_dict_into(module, cfg.model.hf_path, progress=int(os.environ.get("RANK", "0")) == 0)

    return model, load


def build_engine(cfg: JobConfig, model: GptOss) -> RolloutEngine:
    """The rollout engine: the native one (the trainer's own module) or vLLM (CUDA only, lazy import)."""
    if cfg.rollout.engine == "vllm":
        from titan_rl.rl.rollout.vllm_engine import VllmEngine, VllmUnavailable

        try:
            return VllmEngine.from_config(cfg, model)
        except VllmUnavailable as e:  # a setup problem: one line, like a bad config
            raise ConfigError(str(e)) from None
    r = cfg.rollout
    return NativeEngine(
        model,
        seed=cfg.job.seed,
        max_batch_rows=r.max_batch_rows or None,
        check_every=r.check_every or None,
        decode=r.decode,
        record_routing=cfg.rl.rollout_routing_replay,
    )


def kept_for_training(
    trajectories: list[Trajectory], advantages: torch.Tensor, informative: torch.Tensor, drop: bool
) -> tuple[list[Trajectory], list[float]]:
    """The trajectories a step trains on and their advantages (``advantages [groups, group_size]``).

    With ``drop`` (``rl.drop_uninformative_groups``, DAPO's dynamic sampling) a group whose rewards
    are all equal leaves the batch: its advantages are zero anyway, but its tokens would still count
    in the loss's normalizer (diluting the others' gradient) and carry KL / entropy terms. If no
    group is informative, all stay: there is nothing to learn from either way."""
    flat = advantages.flatten().tolist()
    if not drop or not informative.any():
        return trajectories, flat
    keep = [i for i in range(len(trajectories)) if informative[i // advantages.shape[1]]]
    return [trajectories[i] for i in keep], [flat[i] for i in keep]


def pass_rate(env: object, rewards: torch.Tensor) -> dict[str, float]:
    """``reward/pass_rate``: the share of episodes whose reward reaches the environment's
    ``pass_reward`` (an optional attribute: the reward of a solved task, where partial credit makes
    the mean reward something else); nothing for an environment without one."""
    threshold = getattr(env, "pass_reward", None)
    if threshold is None:
        return {}
    return {"reward/pass_rate": (rewards >= threshold).float().mean().item()}


def rl_advantages(
    trainer: Trainer, trajectories: list[Trajectory], rewards: torch.Tensor, cfg: JobConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """Advantages ``[groups, group_size]`` of the task's ``rewards`` and their metrics.

    With ``rl.kl_penalty = "reward"`` each trajectory's reward is ``R - kl_coef * KL`` (KL: the
    estimator summed over its sampled tokens, ``Trainer.trajectory_kl``). The penalty enters the
    advantage through the estimator's baseline but never through GRPO's std, which stays the task
    rewards': ``A(R) - kl_coef * (KL - baseline(KL))``, exactly ``A(R - kl_coef * KL)`` for dr_grpo
    and rloo. Dividing KL differences by the std of rewards that hardly differ (a group that all
    failed) would turn round-off between engine and trainer into advantages of +-1."""
    advantages = group_advantages(rewards, cfg.rl.advantage)
    if cfg.rl.kl_penalty != "reward":
        return advantages, {}
    zeros = [0.0] * len(trajectories)  # advantages do not exist yet; the reference needs none
    kl, kl_per_token = trainer.trajectory_kl(
        pack_trajectories(trajectories, zeros, cfg.training.seq_len), len(trajectories)
    )
    kl = kl.view_as(rewards).to(advantages.dtype)
    centered = group_advantages(kl, "rloo" if cfg.rl.advantage == "rloo" else "dr_grpo")
    return advantages - cfg.rl.kl_coef * centered, {
        "kl/mean": kl_per_token,
        "kl/trajectory_mean": kl.mean().item(),
        "reward/penalized_mean": (rewards - cfg.rl.kl_coef * kl).mean().item(),
    }


def parallel_dims_for(cfg: JobConfig, world_size: int) -> ParallelDims:
    """The layout for ``world_size`` processes; layout mistakes become one-line config errors."""
    try:
        dims = ParallelDims.from_config(cfg.parallelism, world_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if dims.cp_enabled:
        shard = dims.cp * (2 if dims.cp_mode == "ring" else 1)
        if cfg.rl.old_logprob_mode != "unified":
            raise ConfigError(
                "parallelism.cp > 1 needs rl.old_logprob_mode = 'unified' (recompute runs each "
                "trajectory alone, unsharded, which context parallelism exists to avoid)"
            )
        if cfg.training.seq_len % shard:
            raise ConfigError(
                f"training.seq_len = {cfg.training.seq_len} must be a multiple of {shard} for "
                f"cp = {dims.cp} ({dims.cp_mode}); round it up"
            )
    return dims


def run(cfg: JobConfig, dims: ParallelDims, console: Console, stop: StopRequest) -> int:
    """The whole run on this rank (the process group, if any, is already up), holding its dump
    folder: one run at a time, and with checkpoints the same folder on every rank (``run_folder``);
    ``stop`` notes a SIGUSR1 (end the step, checkpoint, exit)."""
    dump = Path(cfg.job.dump_folder)
    lock = claim_run_folder(dump, shared=cfg.checkpoint.enable)
    try:
        return _run(cfg, dims, console, stop)
    finally:
        # the curves so far, however the run ends (done, stopped, interrupted, failed); rank 0's
        if int(os.environ.get("RANK", "0")) == 0 and (dump / "metrics.jsonl").is_file():
            try:
                write_report(
                    dump / "metrics.jsonl", dump / "report.html", cfg.job.description or "titan_rl run"
                )
            except (OSError, ValueError) as e:
                print(f"warning: report.html not written: {e}", file=sys.stderr)
        if lock is not None:
            lock.close()


def _run(cfg: JobConfig, dims: ParallelDims, console: Console, stop: StopRequest) -> int:
    rank = int(os.environ.get("RANK", "0"))
    dump = Path(cfg.job.dump_folder)
    if cfg.checkpoint.load_path:  # saved with the checkpoints: a restart from elsewhere finds its own
        cfg.checkpoint.load_path = str(Path(cfg.checkpoint.load_path).resolve())
    if rank == 0:
        (dump / "config.toml").write_text(to_toml(cfg))
    seed_everything(cfg.job.seed)  # every rank builds the same initial weights
    from titan_rl.checkpoint.manager import (
        CheckpointManager,
        CheckpointSaveError,
        has_reference,
        saved_config,
        step_of,
    )

    # saves only with checkpoint.enable; resumes from checkpoint.load_path whenever it is set
    if rank == 0:
        for warning in config_warnings(cfg):
            console.print(f"warning: {warning}", style="yellow", highlight=False)
    manager = CheckpointManager.from_config(cfg.checkpoint, dump)
    resume = manager.resume_target(cfg.checkpoint.load_path or None)  # every rank agrees
    reached = None if resume is None else step_of(resume)
    if reached is not None and reached >= cfg.training.steps:  # before building anything
        console.print(
            f"nothing to do: the checkpoint is at step {reached} and training.steps = {cfg.training.steps} "
            f"({resume}); raise training.steps to train on",
            style="yellow",
            highlight=False,
        )
        return 0
    model, materialize = build_model(cfg, init_device(dims), policy_weights=resume is None)
    trainer = Trainer(model, cfg, dims, materialize)
    engine = build_engine(cfg, model)
    env = build_env(cfg, model.args.vocab_size)
    tokenizer = build_tokenizer(cfg, model.args.vocab_size)
    logger = MetricsLogger(
        dump,
        cfg.metrics.log_freq,
        rank=rank,
        wandb_run=start_wandb(cfg) if rank == 0 else None,
    )

    start_step = 0
    # the KL reference is the initial weights unless the supervised warmup moved the policy first:
    # then checkpoints carry it (a resumed run does not repeat the warmup, whatever sft.steps says now)
    warmed_reference = trainer.reference if cfg.sft.steps > 0 and resume is None else None
    resumed = None
    if resume is not None:
        resumed = manager.load(
            model, trainer.optimizer, trainer.lr_scheduler, resume, reference=trainer.reference
        )
        if trainer.reference is not None and has_reference(resume):
            warmed_reference = trainer.reference  # loaded: keep saving it
        elif trainer.reference is not None and cfg.sft.steps > 0:
            console.print(
                f"warning: {resume} holds no KL reference (saved with rl.kl_coef = 0, without sft, or "
                "by an older version): the reference is the initial weights, not the warmed-up policy",
                style="yellow",
            )
    if resumed is not None:
        start_step, extra = resumed
        if "engine_rng" in extra:  # absent when the saving engine had no state to give
            engine.set_rng_state(extra["engine_rng"])
        changes = trainer.apply_optimizer_config()  # the config's lr etc., not the saved ones
        console.print(f"resumed from step {start_step}" + "".join(f"; {c}" for c in changes))
        changed = config_changes(saved_config(resume), cfg)
        if changed:
            console.print("config changed since that checkpoint: " + "; ".join(changed), highlight=False)

    logger.start(start_step)
    counts = model.args.num_params()
    console.print(
        (f"{cfg.job.description}\n" if cfg.job.description else "")
        + f"titan_rl: {counts['total'] / 1e6:.2f}M params, {cfg.training.steps} steps, "
        f"{cfg.rollout.prompts_per_step}x{cfg.rollout.group_size} episodes/step, {trainer.precision}, "
        f"dump {dump}",
        highlight=False,
    )
    if start_step == 0 and cfg.sft.steps > 0:
        supervised_warmup(trainer, env, tokenizer, cfg, console)
    regularizers = (("the KL penalty",) if cfg.rl.kl_coef > 0 else ()) + (
        ("the entropy bonus",) if cfg.rl.entropy_coef > 0 else ()
    )
    no_signal = NoSignalWatch(
        NO_SIGNAL_PATIENCE,
        first_step=1 if start_step == 0 else -1,
        regularizers=regularizers,
        pass_reward=getattr(env, "pass_reward", None),
        warmup_hint=cfg.sft.steps == 0,
    )
    for step in range(start_step + 1, cfg.training.steps + 1):
        reset_peak_memory()  # mem/peak_gb: this step's peak (on GPUs)
        t0 = time.perf_counter()
        model.eval()
        engine.wake_up()
        trajectories, env_metrics = collect_rollouts(engine, env, tokenizer, step, cfg)
        engine.sleep()  # a colocated engine (vLLM) gives its GPU memory to the trainer's step
        model.train()
        t1 = time.perf_counter()
        rewards = torch.tensor([t.reward for t in trajectories]).view(-1, cfg.rollout.group_size)
        informative = informative_groups(rewards)  # of the task's rewards: is there a signal to learn
        advantages, kl_metrics = rl_advantages(trainer, trajectories, rewards, cfg)
        trained, trained_advantages = kept_for_training(
            trajectories, advantages, informative, cfg.rl.drop_uninformative_groups
        )
        batch = pack_trajectories(trained, trained_advantages, cfg.training.seq_len)
        metrics = trainer.train_step(batch, len(trained))
        t2 = time.perf_counter()
        engine.update_weights(model)
        t3 = time.perf_counter()
        response = torch.tensor([float(t.response_len) for t in trajectories])
        metrics.update(
            {
                "reward/mean": rewards.mean().item(),
                "reward/std": rewards.std().item() if rewards.numel() > 1 else 0.0,
                "reward/min": rewards.min().item(),
                "reward/max": rewards.max().item(),
                "reward/informative_groups": informative.float().mean().item(),
                "response_len/mean": response.mean().item(),
                "tokens_per_s/rollout": response.sum().item() / (t1 - t0),
                "tokens_per_s/train": sum(len(t.tokens) for t in trained)
                / (t2 - t1),  # no padding, no dropped group
                "time/rollout_s": t1 - t0,
                "time/train_s": t2 - t1,
                "time/weight_sync_s": t3 - t2,
                "mem/peak_gb": peak_memory_gb(),
                **pass_rate(env, rewards),
                **kl_metrics,
                **env_metrics,
            }
        )
        logger.log(step, metrics, console)
        warning = no_signal.update(step, metrics["reward/informative_groups"], metrics["reward/mean"])
        if warning is not None:
            console.print(warning, style="yellow", highlight=False)
        if trainer.consecutive_skips >= cfg.training.max_skipped_steps:
            last = manager.latest() if manager.enable else None
            limit = cfg.training.max_skipped_steps
            print(
                f"error: stopping at step {step}: {trainer.consecutive_skips} consecutive steps with a "
                f"non-finite loss or gradient (training.max_skipped_steps = {limit}); "
                + (f"last checkpoint {last}" if last else "no checkpoint written"),
                file=sys.stderr,
            )
            return 1
        stop_on = stop.agreed(trainer.device)  # a scheduler's SIGUSR1 on any rank
        if manager.enable and (manager.should_save(step) or step == cfg.training.steps or stop_on):
            # environments pick their tasks from (seed, step): the sampler's RNG is the only cursor
            engine_rng = engine.rng_state()
            extra = {} if engine_rng is None else {"engine_rng": engine_rng}
            try:
                manager.save(
                    step,
                    model,
                    trainer.optimizer,
                    trainer.lr_scheduler,
                    extra,
                    config_to_dict(cfg),
                    warmed_reference,
                )
            except CheckpointSaveError as e:  # every rank: a full disk need not end a run that can go on
                if step == cfg.training.steps or stop_on:
                    print(f"error: the final {e}", file=sys.stderr)
                    return 1
                latest = manager.latest()
                console.print(
                    f"warning: {e}; training goes on, the next checkpoint is due at step "
                    f"{min(step + cfg.checkpoint.interval, cfg.training.steps)} (newest kept: "
                    f"{latest.name if latest else 'none'})",
                    style="yellow",
                    highlight=False,
                )
        if stop_on:
            saved = f"checkpoint {manager.latest()} saved" if manager.enable else "checkpoint.enable is off"
            console.print(
                f"stopped after step {step} on {stop_on.name}: {saved}; the same command resumes",
                highlight=False,
            )
            return 128 + int(stop_on)
    if rank == 0:  # (the other ranks write neither file; run() writes the report)
        metrics_file, report = dump / "metrics.jsonl", dump / "report.html"
        console.print(f"done: {cfg.training.steps} steps; metrics {metrics_file}, report {report}")
    return 0


def supervised_warmup(trainer: Trainer, env, tokenizer, cfg: JobConfig, console: Console) -> None:
    """``sft.steps`` steps of next-token training on scripted correct episodes, before RL."""
    optimizer = torch.optim.AdamW(trainer.model.parameters(), lr=cfg.sft.lr)
    trainer.model.train()
    for step in range(cfg.sft.steps):
        demos = demonstrations(env, tokenizer, step, cfg.sft.batch_size, system_style(cfg, tokenizer))
        batch = pack_trajectories(demos, [0.0] * len(demos), cfg.training.seq_len)
        loss = trainer.sft_step(batch, optimizer)
        if step == 0 or (step + 1) % 10 == 0 or step + 1 == cfg.sft.steps:
            console.print(f"sft {step + 1:4d}/{cfg.sft.steps}  loss {loss:.4f}", highlight=False)
    trainer.reset_reference()  # the KL reference is the policy RL starts from


def start_wandb(cfg: JobConfig):
    if not cfg.metrics.enable_wandb:
        return None
    try:
        import wandb
    except ImportError:
        raise ConfigError("metrics.enable_wandb = true needs wandb: pip install -e '.[wandb]'") from None
    return wandb.init(
        project=cfg.metrics.wandb_project, mode=cfg.metrics.wandb_mode, config=config_to_dict(cfg)
    )


_PACKAGE = str(Path(__file__).resolve().parent)


def _one_line_warnings(previous: Callable[..., None]) -> Callable[..., None]:
    """``warnings.showwarning`` that shows titan_rl's own warnings as one ``warning: ...`` line (they
    say what happened and what to do; the file, line and source of the call in titan_rl that raised
    them are noise to a user) and hands the others to ``previous``."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if str(Path(filename).resolve()).startswith(_PACKAGE):
            print(f"warning: {message}", file=file or sys.stderr, flush=True)
        else:
            previous(message, category, filename, lineno, file, line)

    return show


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="titan_rl.train",
        description="On-policy RL for GPT-OSS.",
        epilog="Overrides: --section.key=value",
    )
    parser.add_argument("--config", default=os.environ.get("CONFIG_FILE", DEFAULT_CONFIG), help="TOML file")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    parser.add_argument(
        "--check-config", action="store_true", help="validate the config for $WORLD_SIZE processes and exit"
    )
    parser.add_argument(
        "--check-machine",
        action="store_true",
        help="with --check-config: also that this machine can run it (CUDA, vLLM, wandb); run_train.sh "
        "passes it (without it a GPU layout can be checked from any machine)",
    )
    known, overrides = parser.parse_known_args(argv)
    console = Console(stderr=False, soft_wrap=True)  # a log file gets whole lines, not 80 columns
    finished, heartbeat, cfg = False, None, None  # finished: run() returned on this rank
    stop = StopRequest().install()  # from the start: a SIGUSR1 during start-up must not kill the rank
    if os.environ.get(STOPPED_ENV) and not known.check_config:
        print(
            "stopped: the launcher got SIGUSR1 before this (re)start; the same command resumes",
            file=sys.stderr,
        )
        stop.restore()
        return 128 + signal.SIGUSR1
    shown = warnings.showwarning
    if not known.debug:
        warnings.showwarning = _one_line_warnings(shown)
    try:
        cfg = load_config(known.config, overrides)
        dims = parallel_dims_for(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        # shapes vs layout; files: HF folder, tokenizer, dataset, checkpoint. run_train.sh runs this
        # in --check-config before launching; each rank repeats it (cheap) for direct torchrun users
        check_inputs(cfg, dims, machine=known.check_machine or not known.check_config)
        if known.check_config:
            print(
                f"config OK: {known.config}, {dims.world_size} process(es) = dp_replicate "
                f"{dims.dp_replicate} x dp_shard {dims.dp_shard} x cp {dims.cp} (ep {dims.ep}), "
                f"{cfg.training.steps} steps"
            )
            from titan_rl.config.reference import memory_check

            memory_check(cfg, dims.world_size)
            return 0
        if dims.distributed and not torch.distributed.is_initialized():
            # on GPUs the process group is bound to this rank's device, made current first (object
            # collectives use the current device; a bound group splits the mesh's sub-groups
            # from it and its barrier knows the device)
            device = init_device(dims)
            torch.distributed.init_process_group(
                "nccl" if dims.device_type == "cuda" else "gloo",
                timeout=datetime.timedelta(seconds=cfg.parallelism.collective_timeout_s),
                device_id=device if device.type == "cuda" else None,
            )
            heartbeat = Heartbeat().start()  # names the rank that died if a collective fails
        code = run(cfg, dims, console, stop)
        finished = True
        return code
    except KeyboardInterrupt:
        if known.debug:
            raise
        saving = cfg is not None and cfg.checkpoint.enable
        print(
            "interrupted (Ctrl-C); "
            + (
                "the same command resumes from the last checkpoint (or starts over if none was saved yet)"
                if saving
                else "checkpoint.enable is off: the same command starts over"
            ),
            file=sys.stderr,
        )
        return 130
    except (ConfigError, FileNotFoundError, ValueError) as e:
        if known.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if not (torch.distributed.is_initialized() and is_collective_failure(e)):
            raise
        if known.debug:
            raise
        print(
            f"error: {describe_collective_failure(e, heartbeat, cfg.parallelism.collective_timeout_s)}",
            file=sys.stderr,
        )
        return 3
    finally:
        warnings.showwarning = shown
        stop.restore()
        if heartbeat is not None:
            heartbeat.stop(10.0 if finished else 1.0)  # a failed run has already waited on suspects()
        # Leave together after a finished run, or gloo may abort a slower rank. Not after an error:
        # one that only this rank raised (an out-of-memory, a bug) leaves the others inside a
        # collective of the step, which a barrier here would not match; it would hold every rank until
        # the collective timeout. Exiting at once lets their collective fail and the launcher stop them.
        # (An error on one rank after the last collective, e.g. rank 0 writing the report, leaves the
        # others in this barrier until the launcher stops them, as before.)
        if torch.distributed.is_initialized() and finished:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())

"""Load a JobConfig from TOML plus ``--section.key=value`` overrides, with errors that help."""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
import typing
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):  # noqa: UP036 (tomli keeps 3.10 working)
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from titan_rl.config.job_config import JobConfig


class ConfigError(ValueError):
    """A configuration problem, worded for the user."""


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(JobConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(JobConfig)}


def _field_types(section_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_value(where: str, value: Any, tp: Any) -> Any:
    """Return ``value`` as type ``tp`` or raise a ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list of {_type_name(item)}, got {value!r}")
        return [_check_value(f"{where}[{i}]", v, item) for i, v in enumerate(value)]
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is bool and isinstance(value, bool):
        return value
    if tp is float and is_number:
        return float(value)
    if tp is int and is_number and isinstance(value, int):
        return value
    if tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{where} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _parse_cli_value(where: str, text: str, tp: Any) -> Any:
    """Command-line strings -> typed values (true/false, numbers, JSON lists, plain strings)."""
    if tp is str:
        return text
    if tp is bool:
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigError(f"{where} must be true or false, got {text!r}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise ConfigError(f"{where} must be {_type_name(tp)}, got {text!r}") from None
    return _check_value(where, value, tp)


def _did_you_mean(name: str, choices: list[str]) -> str:
    """`` (did you mean kl_coef?)`` for a near miss (``kl-coef``, ``kl_coeff``), else nothing."""
    close = difflib.get_close_matches(name.replace("-", "_"), choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _lookup(section: str, key: str | None = None) -> Any:
    sections = _sections()
    if section not in sections:
        hint = _did_you_mean(section, list(sections))
        raise ConfigError(f"unknown config section [{section}]{hint}; valid sections: {', '.join(sections)}")
    if key is None:
        return sections[section]
    fields = _field_types(sections[section])
    if key not in fields:
        hint = _did_you_mean(key, list(fields))
        raise ConfigError(
            f"unknown key {section}.{key}{hint}; valid keys of [{section}]: {', '.join(fields)}"
        )
    return fields[key]


def parse_overrides(args: list[str]) -> dict[str, dict[str, Any]]:
    """``["--training.steps=5", "--rl.kl_coef", "0.1"]`` -> ``{"training": {"steps": 5}, ...}``."""
    out: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --section.key=value")
        name, has_value, text = arg[2:].partition("=")
        if not has_value:
            if i + 1 >= len(args):
                raise ConfigError(f"--{name} needs a value: --{name}=VALUE")
            i += 1
            text = args[i]
        section, _, key = name.partition(".")
        tp = _lookup(section, key)
        out.setdefault(section, {})[key] = _parse_cli_value(f"--{name}", text, tp)
        i += 1
    return out


CHOICES: dict[str, tuple[str, ...]] = {
    "model.preset": ("debug", "20b", "120b"),
    "model.attn_backend": ("auto", "eager", "chunked", "flash"),
    "model.dtype": ("float32", "bfloat16"),
    "model.activation_dtype": ("auto", "float32"),
    "parallelism.cp_mode": ("ulysses", "ring"),
    "parallelism.mixed_precision": ("auto", "bf16", "fp32"),
    "parallelism.gemm_reductions": ("full", "reduced"),
    "parallelism.activation_checkpoint": ("none", "full", "selective"),
    "lr_scheduler.decay": ("cosine", "constant"),
    "rl.old_logprob_mode": ("unified", "recompute"),
    "rl.advantage": ("grpo", "dr_grpo", "rloo"),
    "rl.policy_loss": ("ppo", "gspo"),
    "rl.aggregation": ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"),
    "rl.kl_estimator": ("k1", "k2", "k3"),
    "rl.kl_penalty": ("loss", "reward"),
    "rl.correction": ("none", "tis", "mis"),
    "rl.correction_level": ("token", "sequence"),
    "env.system_prompt": ("auto", "gpt-oss", "minimal"),
    "rollout.engine": ("native", "vllm"),
    "rollout.decode": ("auto", "eager", "static", "cuda_graph"),
    "env.name": ("token_preference", "tool_lookup", "math"),
    "metrics.wandb_mode": ("offline", "online", "disabled"),
}
NON_NEGATIVE = ("rollout.max_batch_rows", "rollout.check_every", "env.reward_timeout_s")
POSITIVE = ("training.steps", "training.minibatches", "training.epochs", "training.micro_batch_rows",
            "training.seq_len",
            "rollout.max_new_tokens", "rollout.group_size", "rollout.prompts_per_step",
            "parallelism.dp_replicate", "parallelism.dp_shard", "parallelism.cp", "parallelism.ep",
            "checkpoint.interval", "checkpoint.keep_last", "metrics.log_freq", "env.num_tasks",
            "env.max_turns", "env.max_episode_tokens", "env.reward_concurrency", "sft.batch_size",
            "rollout.vllm_tensor_parallel_size", "training.max_skipped_steps", "env.prompt_len",
            "env.target_modulus", "env.keys_per_task")  # fmt: skip


def validate(config: JobConfig) -> None:
    """Values outside their allowed set are ConfigErrors naming the key and the choices."""
    for name, choices in CHOICES.items():
        section, key = name.split(".")
        value = getattr(getattr(config, section), key)
        if name == "env.name" and ":" in value:
            continue  # a user environment, "package.module:Factory" (checked when it is imported)
        if value not in choices:
            extra = " or package.module:Factory (your own environment)" if name == "env.name" else ""
            raise ConfigError(f"{name} = {value!r} is not one of {', '.join(choices)}{extra}")
    for names, least in ((POSITIVE, 1), (NON_NEGATIVE, 0)):
        for name in names:
            section, key = name.split(".")
            value = getattr(getattr(config, section), key)
            if value < least:
                default = getattr(JobConfig(), section).__dict__[key]
                zero = " (0: the default)" if least == 0 and default == 0 else ""
                raise ConfigError(f"{name} must be >= {least}{zero}, got {value}")
    single_turn = config.env.prompt_len + config.rollout.max_new_tokens
    if config.env.name == "token_preference" and config.training.seq_len < single_turn:
        raise ConfigError(
            f"training.seq_len = {config.training.seq_len} < env.prompt_len + rollout.max_new_tokens = "
            f"{single_turn}: an episode must fit in one packed row; raise training.seq_len"
        )
    if config.env.name != "token_preference" and config.training.seq_len < config.env.max_episode_tokens:
        raise ConfigError(
            f"training.seq_len = {config.training.seq_len} < env.max_episode_tokens = "
            f"{config.env.max_episode_tokens}: an episode must fit in one packed row; raise training.seq_len"
        )
    _check_ranges(config)
    if config.rl.dual_clip and config.rl.policy_loss == "gspo":
        raise ConfigError(
            "rl.dual_clip applies to the PPO token ratio; rl.policy_loss = 'gspo' clips the sequence "
            "ratio without it: set rl.dual_clip = 0 or rl.policy_loss = 'ppo'"
        )
    if config.rl.kl_penalty == "reward" and config.rl.kl_coef <= 0:
        raise ConfigError(
            "rl.kl_penalty = 'reward' needs rl.kl_coef > 0 (the weight of the penalty; 0 runs no reference)"
        )
    if config.rollout.temperature <= 0:
        raise ConfigError(f"rollout.temperature must be > 0, got {config.rollout.temperature}")
    if config.model.activation_dtype == "float32":
        if config.model.attn_backend == "flash":
            raise ConfigError(
                "model.activation_dtype = 'float32' attends in fp32, which the flash kernel cannot; "
                "set model.attn_backend = 'auto' (the chunked kernel for fp32)"
            )
        if config.rollout.engine == "vllm":
            raise ConfigError(
                "model.activation_dtype = 'float32' is for the native engine, which runs the trainer's "
                "own module: vLLM's rollouts stay bf16, and a near-fp32 trainer is further from them "
                "than a bf16 one; set model.activation_dtype = 'auto' or rollout.engine = 'native'"
            )


def _check_ranges(config: JobConfig) -> None:
    """Values inside their type but outside what they can mean, checked before any process starts."""
    from titan_rl.rl.losses import loss_config_from

    try:  # the loss's own checks (clip ranges, dual clip, thresholds), named as config keys
        loss_config_from(config.rl, norm_constant=1.0)  # (the trainer's comes from the token limits)
    except ValueError as e:
        raise ConfigError(str(e).replace("loss.", "rl.")) from None
    r = config.rollout
    checks = [
        (config.optimizer.lr > 0, f"optimizer.lr must be > 0, got {config.optimizer.lr}"),
        (
            config.optimizer.weight_decay >= 0,
            f"optimizer.weight_decay must be >= 0, got {config.optimizer.weight_decay}",
        ),
        (config.optimizer.eps > 0, f"optimizer.eps must be > 0, got {config.optimizer.eps}"),
        (
            config.rl.router_aux_loss_coef >= 0,
            f"rl.router_aux_loss_coef must be >= 0 (0: off), got {config.rl.router_aux_loss_coef}",
        ),
        (
            len(config.optimizer.betas) == 2 and all(0 <= b < 1 for b in config.optimizer.betas),
            f"optimizer.betas must be two values in [0, 1), e.g. [0.9, 0.999]; got {config.optimizer.betas}",
        ),
        (
            0 < r.vllm_gpu_memory_utilization <= 1,
            f"rollout.vllm_gpu_memory_utilization is a fraction of GPU memory in (0, 1]; got "
            f"{r.vllm_gpu_memory_utilization}",
        ),
        (
            config.env.tool_timeout_s > 0,
            f"env.tool_timeout_s must be > 0 (seconds per tool call), got {config.env.tool_timeout_s}",
        ),
        (
            config.parallelism.collective_timeout_s > 0,
            f"parallelism.collective_timeout_s must be > 0 (seconds), got "
            f"{config.parallelism.collective_timeout_s}",
        ),
        (0 < r.top_p <= 1, f"rollout.top_p must be in (0, 1] (1 disables), got {r.top_p}"),
        (r.top_k >= 0, f"rollout.top_k must be >= 0 (0 disables), got {r.top_k}"),
        (
            0 <= config.lr_scheduler.min_lr_ratio <= 1,
            f"lr_scheduler.min_lr_ratio is the floor's share of optimizer.lr, in [0, 1]; got "
            f"{config.lr_scheduler.min_lr_ratio}",
        ),
        (
            r.group_size >= 2,
            "rollout.group_size = 1: each group's baseline is its only reward, so every advantage is 0 "
            "and nothing trains; use >= 2",
        ),
    ]
    env = config.env
    for key, value in (("python_tool", env.python_tool), ("data_path", env.data_path)):
        checks.append(
            (
                not value or env.name == "math",
                f"env.{key} is for env.name = 'math'; {env.name!r} does not use it (remove it from the "
                f"config, or --env.{key}={'false' if key == 'python_tool' else ''})",
            )
        )
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def config_warnings(config: JobConfig) -> list[str]:
    """Settings that run but probably do not do what was meant (printed at the start of a run)."""
    out = []
    if config.rl.advantage == "dr_grpo" and config.rl.aggregation != "seq-mean-token-sum-norm":
        out.append(
            f"rl.advantage = 'dr_grpo' with rl.aggregation = {config.rl.aggregation!r}: Dr.GRPO also "
            "sums each trajectory's token losses over a constant (rl.aggregation = "
            "'seq-mean-token-sum-norm'); without it only the std normalization is gone"
        )
    r = config.rollout
    if r.engine == "vllm" and (r.top_p < 1.0 or r.top_k > 1):
        out.append(
            "rollout.engine = 'vllm' with top_p < 1 or top_k > 1: vLLM reports the log-probs of the "
            "truncated distribution it sampled from, the trainer those of the whole tempered one, so "
            "mismatch/*, rl.correction's weights and a KL reward penalty include each token's "
            "log(1 / kept mass)"
        )
    if r.engine == "vllm" and r.top_k == 1 and r.temperature != 1.0:
        out.append(
            "rollout.engine = 'vllm' with top_k = 1 runs as vLLM temperature 0, whose log-probs are "
            f"untempered; the trainer's use rollout.temperature = {r.temperature}"
        )
    t = config.training
    updates = t.steps * t.minibatches * t.epochs
    if config.lr_scheduler.warmup_steps > updates:
        out.append(
            f"lr_scheduler.warmup_steps = {config.lr_scheduler.warmup_steps} > the run's {updates} optimizer "
            f"steps (training.steps x minibatches x epochs): optimizer.lr = {config.optimizer.lr:g} is never "
            "reached"
        )
    timeout, collective = config.env.reward_timeout_s, config.parallelism.collective_timeout_s
    if timeout >= collective:
        out.append(
            f"env.reward_timeout_s = {timeout:g} s >= parallelism.collective_timeout_s = {collective:g} s: "
            "with several processes a reward that hangs on one rank makes the others' wait for its share "
            "fail the run; keep the reward limit well below the collective one"
        )
    return out


def build_config(data: dict[str, Any], source: str = "config") -> JobConfig:
    """A JobConfig from nested dicts; unknown sections/keys and wrong types are ConfigErrors."""
    config = JobConfig()
    for section, values in data.items():
        section_cls = _lookup(section)
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: [{section}] must be a table of keys, got {values!r}")
        current = getattr(config, section)
        for key, value in values.items():
            tp = _lookup(section, key)
            setattr(current, key, _check_value(f"{section}.{key}", value, tp))
        setattr(config, section, section_cls(**dataclasses.asdict(current)))
    validate(config)
    return config


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> JobConfig:
    """Read the TOML file (if any), then apply the command-line overrides on top."""
    data: dict[str, dict[str, Any]] = {}
    source = "defaults"
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; pass an existing .toml (see train_configs/)")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: invalid TOML: {e}") from None
        source = str(path)
    for section, values in parse_overrides(overrides or []).items():
        data.setdefault(section, {}).update(values)
    return build_config(data, source)


def config_to_dict(config: JobConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


# keys whose change a resumed run reports elsewhere (the optimizer's) or that say where it resumes from
NOT_COMPARED_ON_RESUME = ("optimizer.", "checkpoint.load_path")
# the task a step samples is (step, prompts_per_step): another value repeats or skips tasks
TASK_ORDER = ("rollout.prompts_per_step",)


def config_changes(saved: dict[str, Any], config: JobConfig) -> list[str]:
    """``key: saved -> now`` for each config key that differs from ``saved`` (a checkpoint's
    config.json) and that a resumed run takes from its config, said at startup; keys an older
    version did not save are not compared."""
    now = json.loads(json.dumps(config_to_dict(config), default=str))  # the saved file's types
    changes = []
    for section, values in now.items():
        old_values = saved.get(section)
        if not isinstance(old_values, dict):
            continue
        for key, value in values.items():
            name = f"{section}.{key}"
            if name.startswith(NOT_COMPARED_ON_RESUME) or key not in old_values:
                continue
            if old_values[key] != value:
                note = (
                    " (the tasks a step samples follow it: some repeat or are skipped)"
                    if name in TASK_ORDER
                    else ""
                )
                changes.append(f"{name}: {json.dumps(old_values[key])} -> {json.dumps(value)}{note}")
    return changes


def to_toml(config: JobConfig) -> str:
    """The resolved config as TOML text (written into the run's dump folder)."""
    lines = []
    for section, values in config_to_dict(config).items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)

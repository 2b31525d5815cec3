"""Check every file a run will read before any process starts.

``run_train.sh`` calls this in one plain process (``--check-config``) before torchrun, so a missing
tokenizer, a bad dataset line or a checkpoint that lost a shard is one line naming the file, not a
traceback from every rank after minutes of setup. Only headers and metadata are read: checking
gpt-oss-120b takes about a second.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from titan_rl.config import ConfigError, JobConfig
from titan_rl.model import GptOss, GptOssModelArgs
from titan_rl.parallel import ParallelDims


def model_args(cfg: JobConfig) -> GptOssModelArgs:
    """The shapes the run will build: the HF folder's config.json (verified) or the preset."""
    if cfg.model.hf_path:
        from titan_rl.checkpoint.verify import verify_hf_folder

        if not Path(cfg.model.hf_path).is_dir():
            raise ConfigError(f"model.hf_path = {cfg.model.hf_path!r} does not exist (a HF GPT-OSS folder)")
        return verify_hf_folder(cfg.model.hf_path)
    return GptOssModelArgs.from_preset(cfg.model.preset)


def default_device_type() -> str:
    """What ``ParallelDims`` picks by default."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_machine(cfg: JobConfig, device_type: str) -> None:
    """What the config asks of this machine (CUDA, packages), before any process starts."""
    cpu = device_type != "cuda"
    if cpu and cfg.model.attn_backend == "flash":
        raise ConfigError("model.attn_backend = 'flash' needs CUDA, and this machine has none; use 'auto'")
    if cpu and cfg.rollout.decode == "cuda_graph":
        raise ConfigError("rollout.decode = 'cuda_graph' needs CUDA, and this machine has none; use 'auto'")
    if cfg.rollout.engine == "vllm" and "LOCAL_RANK" not in os.environ:
        # (not on a launched rank: each imports vLLM itself, after selecting its GPU)
        from titan_rl.rl.rollout.vllm_engine import VllmUnavailable, import_vllm

        try:
            import_vllm()
        except VllmUnavailable as e:
            raise ConfigError(str(e)) from None
    if cfg.env.name == "math" and cfg.env.python_tool and not cfg.env.allow_unisolated_python_tool:
        from titan_rl.rl.envs.python_tool import IsolationUnavailable, PythonSandbox

        try:
            PythonSandbox(isolate=True)
        except IsolationUnavailable as e:
            raise ConfigError(
                f"env.python_tool = true, but the Python sandbox cannot isolate the model's code here "
                f"({e.reason}), so that code could read the task data with its answers; run as root on "
                "Linux with namespaces, or set --env.allow_unisolated_python_tool=true to train anyway"
            ) from None
    if cfg.metrics.enable_wandb:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError("metrics.enable_wandb = true needs wandb: pip install -e '.[wandb]'")


def check_inputs(cfg: JobConfig, dims: ParallelDims | None = None, machine: bool = True) -> None:
    """Raise a one-line error (ConfigError, CheckpointError, ValueError, FileNotFoundError) for bad
    inputs; with ``dims``, also a layout the model's shapes cannot split (e.g. ep not dividing experts)
    and, with ``machine``, what this machine lacks for the config (``check_machine``)."""
    args = model_args(cfg)
    if dims is not None:
        dims.validate_model(args)
    if machine:
        check_machine(cfg, dims.device_type if dims is not None else default_device_type())
        # (not in a layout-only check, which blanks model.hf_path where the weights are absent)
        from titan_rl.rl.collect import check_opening_prompts, check_tiny_tokenizer_fits

        check_tiny_tokenizer_fits(cfg, args.vocab_size)
        check_opening_prompts(cfg, args.vocab_size)  # (needs the tokenizer: model.hf_path's)
    if ":" in cfg.env.name:
        from titan_rl.rl.collect import load_user_env

        factory = load_user_env(cfg.env.name)  # importable (a class: has the AgentEnvironment methods)
        if cfg.sft.steps > 0 and isinstance(factory, type) and not hasattr(factory, "demonstration"):
            raise ConfigError(
                f"sft.steps = {cfg.sft.steps} needs demonstrations, but {cfg.env.name} has no "
                "demonstration(index) method; set --sft.steps=0 or add one"
            )
    elif cfg.sft.steps > 0 and cfg.env.name != "tool_lookup":
        raise ConfigError(
            f"sft.steps = {cfg.sft.steps}: env.name = {cfg.env.name!r} has no scripted demonstrations "
            "(tool_lookup has); set --sft.steps=0"
        )
    if cfg.env.name != "token_preference" and cfg.model.hf_path:
        from titan_rl.rl.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_folder(cfg.model.hf_path)
        if tokenizer.vocab_size > args.vocab_size:
            raise ConfigError(
                f"{cfg.model.hf_path}/tokenizer.json has {tokenizer.vocab_size} tokens but the model's "
                f"vocab_size is {args.vocab_size}; is the tokenizer from this checkpoint?"
            )
    if cfg.env.name == "math" and cfg.env.data_path:
        from titan_rl.rl.envs.math_task import load_math_jsonl

        load_math_jsonl(cfg.env.data_path)
    resume = resume_folder(cfg)
    if resume is not None:
        from titan_rl.checkpoint.verify import verify_dcp_folder

        with torch.device("meta"):
            shapes = {name: tuple(t.shape) for name, t in GptOss(args).state_dict().items()}
        source = (
            cfg.model.hf_path + "/config.json"
            if cfg.model.hf_path
            else f"model.preset = {cfg.model.preset!r}"
        )
        verify_dcp_folder(resume, shapes, source)


def resume_folder(cfg: JobConfig) -> Path | None:
    """The checkpoint the run will resume from: ``checkpoint.load_path`` or the newest complete one."""
    from titan_rl.checkpoint.manager import TRAINER_STATE, CheckpointManager, is_complete
    from titan_rl.checkpoint.verify import DCP_METADATA

    if cfg.checkpoint.load_path:
        folder = Path(cfg.checkpoint.load_path)
        manager = CheckpointManager.from_config(cfg.checkpoint, cfg.job.dump_folder)
        own = manager.branch_checkpoints(folder)[0] if manager.enable else []
        if own:  # a restart of the branch: its newest (keep_last may have pruned load_path itself)
            return own[-1]
        if not folder.is_dir():
            raise FileNotFoundError(f"checkpoint.load_path {folder} does not exist")
        if not is_complete(folder):
            model_only = (folder / DCP_METADATA).is_file() and (folder / "config.json").is_file()
            raise ConfigError(
                f"checkpoint.load_path {folder} is not a complete checkpoint (needs {DCP_METADATA} and "
                f"{TRAINER_STATE}); point it at a step-NNNNNN folder"
                + (
                    "; it is a model-only DCP folder (convert_hf_to_dcp.py): train from its HF folder "
                    "with --model.hf_path, or make one with scripts/convert_dcp_to_hf.py"
                    if model_only
                    else ""
                )
            )
        return folder
    manager = CheckpointManager.from_config(cfg.checkpoint, cfg.job.dump_folder)
    return manager.latest() if manager.enable else None


__all__ = ["check_inputs", "model_args", "resume_folder"]

"""Training-state checkpoints with torch.distributed.checkpoint (DCP), and model-only DCP folders.

A training checkpoint ``folder/step-000004/`` holds the DCP shards of ``{"model", "optimizer"}``
(any FSDP2 sharding; DCP reshards on load; plus ``"reference"``, the KL reference, when it is not the
run's initial weights), ``trainer_state.pt`` (step, LR scheduler),
``rank-00000.pt`` per rank (RNG states and that rank's ``extra`` dict) and ``config.json``.
It is written as ``step-000004.tmp`` and renamed by rank 0 once every rank finished, so a folder
without ``.tmp`` is always complete. A model-only DCP folder (``save_model_dcp``, the convert
scripts) holds ``{"model": state_dict}`` plus the model's HF config.json.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from titan_rl.checkpoint.hf import (
    CONFIG_FILE,
    DEFAULT_MAX_SHARD_BYTES,
    CheckpointError,
    load_hf_model,
    save_hf_model,
    this_rank,
)
from titan_rl.checkpoint.verify import DCP_METADATA, verify_dcp_folder
from titan_rl.files import sync_folder as _sync_folder
from titan_rl.files import write_synced as _write_synced
from titan_rl.model import GptOss, GptOssModelArgs

TRAINER_STATE = "trainer_state.pt"
MODEL_CONFIG_FILE = "model_config.json"  # the model's HF config.json, in training checkpoints
REFERENCE = "reference"  # the KL reference's entry, when saved
_STEP_RE = re.compile(r"step-(\d+)")


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _dist():
        dist.barrier()


def _dcp(action: str, state: dict[str, Any], folder: Path) -> None:
    """``dcp.save`` / ``dcp.load``; in a single process without the warning that says so (nor the
    one about replacing an existing model-only DCP folder: the conversion script says so)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        warnings.filterwarnings("ignore", message="Detected an existing checkpoint")
        getattr(dcp, action)(state, checkpoint_id=folder, no_dist=not _dist())


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written on some rank (a full disk, a lost mount); raised on every
    rank, after the partial folder is removed. The training state in memory is intact."""


def _gather_failures(error: str | None) -> list[str]:
    """Every rank's error of a save (None: it succeeded), on every rank; one gather."""
    if not _dist():
        return [error] if error else []
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return [e for e in errors if e]


def _rank_file(folder: Path, rank: int) -> Path:
    return folder / f"rank-{rank:05d}.pt"


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device only (see cuda_rng_to_restore)
    return state


def cuda_rng_to_restore(saved: Any, device_index: int) -> torch.Tensor | None:
    """The CUDA generator state a rank on device ``device_index`` restores from its saved ``saved``:
    the state of the device it ran on (older checkpoints saved every visible device's, a list: the
    entry of this device, if the saving node had that many). A run may resume on nodes with another
    number of GPUs; restoring every saved device's state would index devices this node lacks."""
    if isinstance(saved, (list, tuple)):
        return saved[device_index] if device_index < len(saved) else None
    return saved


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = cuda_rng_to_restore(state["cuda"], torch.cuda.current_device())
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def is_complete(folder: Path) -> bool:
    """A finished training checkpoint: DCP metadata and trainer state are both there."""
    return (folder / DCP_METADATA).is_file() and (folder / TRAINER_STATE).is_file()


def damage(folder: Path) -> str | None:
    """What keeps a complete-looking checkpoint from loading, reading its small files only (the DCP
    metadata and trainer state; the shards are checked as they load), or None."""
    try:
        dcp.FileSystemReader(folder).read_metadata()
    except Exception as e:
        return f"{DCP_METADATA} does not read ({type(e).__name__}: {e})"
    try:
        torch.load(folder / TRAINER_STATE, weights_only=False)
    except Exception as e:
        return f"{TRAINER_STATE} does not read ({type(e).__name__}: {e})"
    return None


class CheckpointManager:
    """Save every ``interval`` steps into ``folder``, keep the newest ``keep_last``, resume the newest."""

    def __init__(self, folder: str | Path, interval: int, keep_last: int = 2, enable: bool = True) -> None:
        if enable and interval < 1:
            raise ValueError(f"checkpoint interval={interval} must be >= 1 (or disable checkpointing)")
        self.folder = Path(folder)
        self.interval = interval
        self.keep_last = keep_last  # <= 0 keeps all
        self.enable = enable

    @classmethod
    def from_config(cls, checkpoint: Any, dump_folder: str | Path) -> CheckpointManager:
        """From a ``[checkpoint]`` config section; ``folder`` is relative to ``dump_folder``."""
        folder = Path(checkpoint.folder)
        folder = folder if folder.is_absolute() else Path(dump_folder) / folder
        return cls(folder, checkpoint.interval, checkpoint.keep_last, enable=checkpoint.enable)

    def should_save(self, step: int) -> bool:
        return self.enable and step % self.interval == 0

    def checkpoints(self) -> list[Path]:
        """Complete checkpoint folders, oldest first."""
        if not self.folder.is_dir():
            return []
        found = [p for p in self.folder.iterdir() if _STEP_RE.fullmatch(p.name) and is_complete(p)]
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def latest(self) -> Path | None:
        """The newest complete checkpoint whose small files read back; a damaged newer one (an
        empty trainer_state.pt after a node crash) is skipped with a warning, not a crash loop."""
        for folder in reversed(self.checkpoints()):
            problem = damage(folder)
            if problem is None:
                return folder
            warnings.warn(
                f"skipping {folder}: {problem}; resuming an older checkpoint (move it out of the folder)",
                stacklevel=2,
            )
        return None

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any = None,
        extra: dict | None = None,
        config: dict | None = None,
        reference: nn.Module | None = None,
    ) -> Path | None:
        """Write the whole training state for ``step``; every rank must call it. Returns the folder.

        ``extra`` is this rank's own (data / environment cursor), saved per rank with its RNG state;
        ``config`` (rank 0's) is written as config.json for the record. ``reference``: a frozen KL
        reference that a resumed run could not rebuild from the initial weights (the supervised
        warmup's result).
        """
        if not self.enable:
            return None
        rng = _rng_state()  # before anything below could draw random numbers
        rank = this_rank()
        final = self.folder / f"step-{step:06d}"
        tmp = self.folder / f"step-{step:06d}.tmp"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # leftover of a crashed save
            tmp.mkdir(parents=True)
        _barrier()
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        if reference is not None:
            state[REFERENCE] = get_model_state_dict(reference)
        error = None
        try:
            _dcp("save", state, tmp)
            _write_synced(_rank_file(tmp, rank), {"rng": rng, "extra": dict(extra or {})})
            if rank == 0:
                scheduler_state = lr_scheduler.state_dict() if lr_scheduler is not None else None
                world = dist.get_world_size() if _dist() else 1
                trainer_state = {"step": step, "lr_scheduler": scheduler_state, "world_size": world}
                _write_synced(tmp / TRAINER_STATE, trainer_state)
                _write_synced(tmp / CONFIG_FILE, json.dumps(config or {}, indent=2, default=str) + "\n")
                args = getattr(model, "args", None)  # the model's HF config: conversion needs no --config
                if args is not None:
                    _write_synced(tmp / MODEL_CONFIG_FILE, json.dumps(args.to_hf_config(), indent=2) + "\n")
        except (Exception, CheckpointException) as e:  # (DCP's is a BaseException)
            error = f"rank {rank}: {type(e).__name__}: {e}"
        failures = _gather_failures(error)  # every rank learns whether any failed
        if failures:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)  # what was written: the disk is likely full
            _barrier()
            raise CheckpointSaveError(f"checkpoint of step {step} not written ({'; '.join(failures)[:2000]})")
        _barrier()  # every rank's files are in tmp
        if rank == 0:
            _sync_folder(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _sync_folder(self.folder)  # the rename itself survives a crash of the node
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        for stale in self.folder.glob("step-*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        # the newest keep_last that read back are kept, and everything older goes, damaged or not: a
        # damaged one (latest() skips it) counted among the kept would, with keep_last = 1, delete every
        # new checkpoint below it (a damaged one above them stays: its own step's save replaces it)
        if self.keep_last > 0:
            found = self.checkpoints()
            kept = [folder for folder in reversed(found) if damage(folder) is None][: self.keep_last]
            if kept:
                oldest = step_of(kept[-1])
                for old in found:
                    if step_of(old) < oldest:
                        shutil.rmtree(old, ignore_errors=True)

    def resume_target(self, path: str | Path | None = None) -> Path | None:
        """What ``load(path=...)`` will restore, the same on every rank (a collective when
        checkpointing is on): with checkpointing on, the newest complete checkpoint as rank 0 sees
        it, or with ``path`` (``checkpoint.load_path``: a run branching from an earlier checkpoint)
        ``branch_start(path)``; None: nothing to resume. Known before the model is filled, so a
        resumed run need not read the weights the checkpoint replaces."""
        if not self.enable:
            return None if path is None else Path(path)
        if path is None:
            return self._agreed(self.latest)
        return self._agreed(lambda: self.branch_start(Path(path)))

    def branch_start(self, path: Path) -> Path:
        """Where a run started from ``path`` resumes, on rank 0. Its own later checkpoints (those
        saved with this ``load_path``: a restart of the branch after a crash or preemption) take
        over from ``path``; checkpoints of any other timeline (later than ``path`` when it is in this
        folder: the run it branched from, typically past a collapse; all of them when it is not)
        are moved to ``superseded/`` in the folder, so that neither a restart without ``load_path``
        nor ``keep_last`` mistakes them for this run's newest."""
        own, other = self.branch_checkpoints(path)
        if other:
            aside = self.folder / "superseded"
            aside.mkdir(exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for found in other:
                os.replace(found, aside / f"{found.name}-{stamp}")
            print(
                f"warning: resuming from {path}: set aside {len(other)} later checkpoint(s) of another "
                f"run ({', '.join(p.name for p in other)}) in {aside} (not pruned: delete them when "
                "you no longer need them)",
                flush=True,
            )
        if own:
            print(
                f"resuming {own[-1].name}, the newest checkpoint of the run started from {path} (a "
                f"restart of it); to start over from {path}, move {', '.join(p.name for p in own)} "
                "out of the folder",
                flush=True,
            )
        return own[-1] if own else path

    def branch_checkpoints(self, path: Path) -> tuple[list[Path], list[Path]]:
        """The folder's checkpoints saved by runs started from ``path`` (own, oldest first) and those
        of other timelines: later than ``path`` when it is in this folder (its earlier ones are the
        branch's past), all of them when it is not. Reads only."""
        start = step_of(path) if _same(path.parent, self.folder) else None
        own, other = [], []
        for found in self.checkpoints():
            if _same(found, path) or (start is not None and step_of(found) <= start):
                continue
            saved = _saved_load_path(found)
            (own if saved is not None and _same(saved, path) else other).append(found)
        return own, other

    def _agreed(self, choose: Callable[[], Path | None]) -> Path | None:
        """``choose()`` as rank 0 sees it, on every rank. Each rank listing the shared folder itself
        could see another set (NFS caches directory listings for seconds after a restart) and load
        another step's shards than its peers."""
        latest = choose() if this_rank() == 0 else None
        if _dist() and dist.get_world_size() > 1:
            box = [None if latest is None else str(latest)]
            dist.broadcast_object_list(box, src=0)
            latest = None if box[0] is None else Path(box[0])
            if latest is not None and not is_complete(latest):
                raise CheckpointError(
                    f"rank {this_rank()} does not see {latest}, rank 0's newest checkpoint, as complete: is "
                    "the checkpoint folder on a filesystem every node shares?"
                )
        return latest

    def load(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any = None,
        path: str | Path | None = None,
        reference: nn.Module | None = None,
    ) -> tuple[int, dict] | None:
        """Restore model, optimizer, scheduler and RNG from ``path`` (``resume_target``'s answer) or the
        newest complete checkpoint,
        and ``reference`` if the checkpoint holds one (``has_reference``; else it is left as it is).

        Returns ``(step, extra)``, or None when there is nothing to resume (or checkpointing is off
        and no ``path`` is given).
        """
        folder = Path(path) if path is not None else self.resume_target()
        if folder is None:
            return None
        if not is_complete(folder):
            raise CheckpointError(
                f"{folder} is not a complete checkpoint (no {DCP_METADATA} or {TRAINER_STATE}); "
                f"pick one of {[str(p) for p in self.checkpoints()]}"
            )
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        if reference is not None and has_reference(folder):
            state[REFERENCE] = get_model_state_dict(reference)
        _dcp("load", state, folder)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        if REFERENCE in state:
            set_model_state_dict(reference, state[REFERENCE])
        # our own files (RNG tuples, user extras): not loadable with weights_only
        trainer = torch.load(folder / TRAINER_STATE, weights_only=False)
        if lr_scheduler is not None:
            if trainer["lr_scheduler"] is None:
                raise CheckpointError(f"{folder} was saved without an LR scheduler; pass lr_scheduler=None")
            lr_scheduler.load_state_dict(trainer["lr_scheduler"])
        rank = this_rank()
        own = _rank_file(folder, rank)
        if own.is_file():
            per_rank = torch.load(own, weights_only=False)
            _set_rng_state(per_rank["rng"])
        else:
            warnings.warn(
                f"{folder} was saved by {trainer['world_size']} ranks and has no state for rank {rank}; "
                "this rank keeps its RNG state and gets rank 0's extra dict",
                stacklevel=2,
            )
            per_rank = torch.load(_rank_file(folder, 0), weights_only=False)
        return trainer["step"], per_rank["extra"]


def saved_config(folder: str | Path) -> dict:
    """The run config a training checkpoint was saved with (its config.json; {} when it has none or
    it cannot be read: the comparison is a courtesy, the checkpoint still loads)."""
    try:
        data = json.loads((Path(folder) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def has_reference(folder: str | Path) -> bool:
    """Whether the training checkpoint ``folder`` holds a KL reference model (``save(reference=...)``)."""
    stored = dcp.FileSystemReader(Path(folder)).read_metadata().state_dict_metadata
    return any(key.startswith(REFERENCE + ".") for key in stored)


def step_of(folder: Path) -> int | None:
    """The step of a ``step-NNNNNN`` checkpoint folder (None for another name)."""
    match = _STEP_RE.fullmatch(folder.name)
    return int(match[1]) if match else None


def _same(a: Path, b: Path) -> bool:
    """The same file system object (bind mounts, automount aliases), else the same resolved path."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them is gone (e.g. a pruned load_path)
        return a.resolve() == b.resolve()


def _saved_load_path(folder: Path) -> Path | None:
    """``checkpoint.load_path`` of the run that saved the training checkpoint ``folder``, resolved."""
    try:
        saved = json.loads((folder / CONFIG_FILE).read_text()).get("checkpoint", {}).get("load_path")
    except (OSError, ValueError, AttributeError):
        return None
    return Path(saved).resolve() if saved else None


def save_model_dcp(model: GptOss, folder: str | Path) -> None:
    """A model-only DCP folder (``{"model": state_dict}``) plus the HF config.json of its shapes."""
    folder = Path(folder)
    _dcp("save", {"model": model.state_dict()}, folder)
    if this_rank() == 0:
        (folder / CONFIG_FILE).write_text(json.dumps(model.args.to_hf_config(), indent=2) + "\n")


def load_model_dcp(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    hf_config: str | Path | None = None,
) -> GptOss:
    """Inverse of ``save_model_dcp``; checks every name and shape against the config first.

    ``hf_config`` (a HF config.json or its folder) replaces ``folder/config.json``, e.g. to read the
    model out of a training checkpoint, whose config.json is the training config.
    """
    folder = Path(folder)
    if hf_config is not None:
        config_file = Path(hf_config)
    elif (folder / MODEL_CONFIG_FILE).is_file():  # a training checkpoint: config.json is the run's
        config_file = folder / MODEL_CONFIG_FILE
    else:
        config_file = folder / CONFIG_FILE
    config_file = config_file / CONFIG_FILE if config_file.is_dir() else config_file
    if not folder.exists():
        raise CheckpointError(f"{folder} does not exist")
    for needed in (config_file, folder / DCP_METADATA):
        if not needed.is_file():
            steps = sorted(p.name for p in folder.glob("step-*") if p.is_dir()) if folder.is_dir() else []
            hint = f"; pick a checkpoint in it: {', '.join(steps)}" if steps else ""
            if not hint and (folder / "checkpoint").is_dir():  # a run's dump folder
                found = sorted(p.name for p in (folder / "checkpoint").glob("step-*") if p.is_dir())
                hint = f"; its checkpoints are in {folder / 'checkpoint'}: {', '.join(found) or 'none'}"
            if not hint and any(folder.glob("*.safetensors")):
                hint = "; it holds safetensors: a HF folder (scripts/convert_hf_to_dcp.py goes that way)"
            raise CheckpointError(f"{needed} not found; is {folder} a model DCP folder?{hint}")
    try:
        args = GptOssModelArgs.from_hf_config(json.loads(config_file.read_text()))
    except (KeyError, TypeError, ValueError) as e:
        hint = ""
        if hf_config is None and (folder / TRAINER_STATE).is_file():
            hint = (
                "; this is a training checkpoint without a model config: pass the model's HF "
                "config.json (or folder) as hf_config / --config"
            )
        raise CheckpointError(f"{config_file} is not a GPT-OSS HF config: {e!r}{hint}") from e
    with torch.device("meta"):
        model = GptOss(args).to(dtype)
    model.to_empty(device=device)
    state = model.state_dict()
    verify_dcp_folder(folder, {name: tuple(t.shape) for name, t in state.items()}, str(config_file))
    _dcp("load", {"model": state}, folder)
    return model


def convert_hf_to_dcp(
    hf_dir: str | Path, dcp_dir: str | Path, dtype: torch.dtype = torch.float32, progress: bool = False
) -> None:
    """HF folder (bf16 or MXFP4 experts) -> model-only DCP folder in ``dtype``."""
    save_model_dcp(load_hf_model(hf_dir, dtype=dtype, progress=progress), dcp_dir)


def convert_dcp_to_hf(
    dcp_dir: str | Path,
    hf_dir: str | Path,
    mxfp4: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    source: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = False,
    hf_config: str | Path | None = None,
) -> None:
    """Model-only DCP folder (or a training checkpoint with ``hf_config``) -> HF folder.

    See ``save_hf_model`` for the other arguments.
    """
    model = load_model_dcp(dcp_dir, hf_config=hf_config)
    save_hf_model(model, hf_dir, mxfp4, dtype, source, max_shard_bytes, progress)

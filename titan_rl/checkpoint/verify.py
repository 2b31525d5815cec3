"""Checkpoint folders checked without reading tensor data: HF folders (safetensors headers) and DCP
folders (metadata). Cheap for gpt-oss-120b too, so ``titan_rl.preflight`` runs them before any
process starts; each raises ``CheckpointError`` naming the first problem.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open

from titan_rl.checkpoint.hf import (
    INDEX_FILE,
    CheckpointError,
    args_from_hf_folder,
    expected_hf_shape,
    native_name,
    shard_names,
)
from titan_rl.checkpoint.names import to_hf_name
from titan_rl.model import GptOss, GptOssModelArgs

DCP_METADATA = ".metadata"  # written last by dcp.save


def verify_hf_folder(path: str | Path) -> GptOssModelArgs:
    """Check a HF folder without reading its tensors: config.json, shards, every name and shape.

    Reads only the safetensors headers, so it is cheap for gpt-oss-120b too; raises CheckpointError
    naming the first problem. Returns the model args of its config.json.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"HF folder {folder} does not exist (model.hf_path, or the script's input)")
    args = args_from_hf_folder(folder)
    with torch.device("meta"):
        shapes = {name: tuple(p.shape) for name, p in GptOss(args).state_dict().items()}
    found: set[str] = set()
    for file, names in shard_names(folder).items():
        try:
            handle = safe_open(folder / file, framework="pt")
        except Exception as e:
            raise CheckpointError(f"cannot read {folder / file}: {e}") from e
        stored = set(handle.keys())
        for name in names:
            if name not in stored:
                raise CheckpointError(f"{folder / file} lacks tensor {name!r} listed in {INDEX_FILE}")
            native = native_name(folder / file, name, shapes)
            shape, expected = (
                tuple(handle.get_slice(name).get_shape()),
                expected_hf_shape(name, shapes[native]),
            )
            if shape != expected:
                raise CheckpointError(
                    f"{folder / file}: tensor {name!r} has shape {shape} but config.json implies {expected}"
                )
            found.add(native)
    missing = sorted(set(shapes) - found)
    if missing:
        raise CheckpointError(f"{folder} lacks {len(missing)} tensors, e.g. {to_hf_name(missing[0])!r}")
    return args


def verify_dcp_folder(folder: str | Path, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Check a DCP folder against the model's parameter ``shapes`` without reading tensor data.

    Every ``model.*`` tensor must be a parameter of the config (``source`` names it in errors) with
    the same shape, none may be missing, and every shard file the metadata points to must be there
    and long enough (a copy that lost a file fails here, not halfway through loading).
    """
    folder = Path(folder)
    if not (folder / DCP_METADATA).is_file():
        raise CheckpointError(f"{folder / DCP_METADATA} not found; is {folder} a DCP checkpoint folder?")
    try:
        metadata = dcp.FileSystemReader(folder).read_metadata()
    except Exception as e:
        raise CheckpointError(f"cannot read {folder / DCP_METADATA}: {e}") from e
    ends: dict[str, int] = {}
    for info in metadata.storage_data.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for file, end in sorted(ends.items()):
        path = folder / file
        if not path.is_file():
            raise CheckpointError(f"{path} is missing; the checkpoint {folder} is incomplete")
        if path.stat().st_size < end:
            raise CheckpointError(f"{path} is truncated ({path.stat().st_size} of {end} bytes)")
    stored = metadata.state_dict_metadata
    for key, meta in stored.items():
        if not key.startswith("model."):
            continue  # optimizer state is checked by DCP itself when it loads
        name = key.removeprefix("model.")
        if name not in shapes:
            raise CheckpointError(f"{folder}: tensor {key!r} is not a GPT-OSS parameter of {source}")
        shape = tuple(getattr(meta, "size", ()))
        if shape != shapes[name]:
            raise CheckpointError(
                f"{folder}: tensor {key!r} has shape {shape} but {source} implies {shapes[name]}"
            )
    missing = sorted(f"model.{name}" for name in shapes if f"model.{name}" not in stored)
    if missing:
        raise CheckpointError(f"{folder} lacks {len(missing)} tensors, e.g. {missing[0]!r}")

"""Hugging Face GPT-OSS folders <-> ``GptOss``: streaming load (bf16 or MXFP4 experts), sharded save.

A folder holds ``config.json``, ``model.safetensors.index.json`` + shards (or one ``model.safetensors``)
and tokenizer files. Tensors are read one at a time with ``safe_open``; MXFP4 experts are dequantized
on load into the model's ``[E, in, out]`` layout. Sharded models (DTensor parameters: FSDP2, and
expert parallelism's experts over the ep and expert-FSDP dims) work too: every rank reads the full
tensor and keeps its part on load (MXFP4 experts: only its own experts' bytes); on save every rank
gathers each tensor in turn and rank 0 writes (tests/distributed/test_checkpoint_fsdp.py, FSDP and
dp_shard=2 x ep=2).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from titan_rl.checkpoint.mxfp4 import BLOCK_SIZE, dequantize_mxfp4, quantize_mxfp4
from titan_rl.checkpoint.names import from_hf_name, to_hf_name
from titan_rl.files import remove_stale_partials, swap_in, swappable, write_replacing
from titan_rl.model import GptOss, GptOssModelArgs

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
# What the released gpt-oss config.json keeps unquantized.
MXFP4_NOT_CONVERTED = [
    "model.layers.*.self_attn",
    "model.layers.*.mlp.router",
    "model.embed_tokens",
    "lm_head",
]
MXFP4_WEIGHTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # HF's "5GB"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message names the file or tensor."""


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor"


def this_rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a HF folder as a dict."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{file} not found; a HF checkpoint folder needs its config.json")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from e


def args_from_hf_folder(path: str | Path) -> GptOssModelArgs:
    """Model args from a folder's ``config.json``."""
    if (Path(path) / ".metadata").is_file():  # DCP's, and a training checkpoint's config.json is the run's
        resume = (
            f"resume it with --checkpoint.load_path={path}, or "
            if (Path(path) / "trainer_state.pt").is_file()  # a training checkpoint, not model-only
            else ""
        )
        raise CheckpointError(
            f"{path} is a DCP checkpoint, not a HF folder: {resume}make a HF folder of it with "
            "scripts/convert_dcp_to_hf.py"
        )
    config = read_hf_config(path)
    try:
        return GptOssModelArgs.from_hf_config(config)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(path) / CONFIG_FILE} is not a GPT-OSS config: {e!r}") from e


def shard_names(path: str | Path) -> dict[str, list[str]]:
    """``{shard file: [tensor names]}`` from the index, or from a single ``model.safetensors``."""
    folder = Path(path)
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{index} is not valid JSON ({e}); re-download the checkpoint") from e
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map'; re-save the checkpoint")
        shards: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            shards.setdefault(file, []).append(name)
    elif (folder / SINGLE_FILE).is_file():
        with _open_shard(folder / SINGLE_FILE) as f:
            shards = {SINGLE_FILE: list(f.keys())}
    else:
        raise CheckpointError(
            f"no {INDEX_FILE} or {SINGLE_FILE} in {folder}; is this a HF checkpoint folder?"
        )
    for file in shards:
        if not (folder / file).is_file():
            raise CheckpointError(f"shard {folder / file} listed in {INDEX_FILE} is missing")
    return shards


def _assign(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into a plain or FSDP-sharded (DTensor) parameter."""
    if _is_dtensor(param):
        from torch.distributed.tensor import distribute_tensor

        local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(local.to_local())
    else:
        param.copy_(full)


def _open_shard(path: Path):
    """``safe_open(path)``; a file that is not a readable safetensors file (a download cut short)
    is a CheckpointError that names it."""
    try:
        return safe_open(path, framework="pt")
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); re-download it") from e


class _ShardReader:
    """Reads named tensors of one shard, fetching an MXFP4 partner from another shard if needed."""

    def __init__(self, folder: Path, file: str, where: dict[str, str]) -> None:
        self.folder, self.file, self.where = folder, file, where
        self.handle = _open_shard(folder / file)
        self.others: dict[str, Any] = {}  # partner shards, opened once

    def _handle(self, name: str):
        file = self.where.get(name, self.file)
        if file == self.file:
            return self.handle
        if file not in self.others:
            self.others[file] = _open_shard(self.folder / file)
        return self.others[file]

    def get(self, name: str) -> torch.Tensor:
        return self._read(name, "get_tensor")

    def slice(self, name: str):
        """A lazy view of tensor ``name``: indexing it reads only those rows from the file (each
        rank reads its own experts of an MXFP4 tensor, not all of them)."""
        return self._read(name, "get_slice")

    def _read(self, name: str, how: str):
        try:
            return getattr(self._handle(name), how)(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name!r} from {self._file(name)}: {e}") from e

    def _file(self, name: str) -> Path:
        return self.folder / self.where.get(name, self.file)


@torch.no_grad()
def load_hf_state_dict_into(model: nn.Module, path: str | Path, progress: bool = False) -> None:
    """Fill every parameter of ``model`` from a HF folder, one tensor at a time."""
    folder = Path(path)
    shards = shard_names(folder)
    where = {name: file for file, names in shards.items() for name in names}
    params = dict(model.state_dict(keep_vars=True))
    loaded: set[str] = set()
    with tqdm(total=len(where), desc="loading", unit="tensor", disable=not progress) as bar:
        for file, names in shards.items():
            reader = _ShardReader(folder, file, where)
            for name in names:
                bar.update()
                if not (name.endswith("_scales") and name.removesuffix("_scales") + "_blocks" in where):
                    loaded.add(_load_tensor(reader, name, params))  # scales come with their blocks
    missing = sorted(set(params) - loaded)
    if missing:
        raise CheckpointError(f"{folder} lacks {len(missing)} tensors, e.g. {to_hf_name(missing[0])!r}")


def native_name(file: Path, name: str, known: dict[str, Any]) -> str:
    """The native parameter a stored HF tensor (or MXFP4 blocks / scales) belongs to."""
    try:
        native = from_hf_name(name.removesuffix("_blocks").removesuffix("_scales"))
    except KeyError as e:
        raise CheckpointError(f"{file}: {e.args[0]}") from e
    if native not in known:
        raise CheckpointError(
            f"{file}: tensor {name!r} is not a GPT-OSS parameter of this config; "
            "is config.json from the same checkpoint?"
        )
    return native


def _load_tensor(reader: _ShardReader, name: str, params: dict[str, torch.Tensor]) -> str:
    """Load HF tensor ``name`` (or an MXFP4 ``*_blocks`` pair) into its parameter; returns its name."""
    file = reader.folder / reader.file
    stem = name.removesuffix("_blocks")
    native = native_name(file, name, params)
    param = params[native]
    if name.endswith("_blocks"):
        full = _read_mxfp4(reader, stem, param, file)
    else:
        full = reader.get(name)
        if tuple(full.shape) != tuple(param.shape):
            raise CheckpointError(
                f"{file}: tensor {name!r} has shape {tuple(full.shape)} but config.json "
                f"implies {tuple(param.shape)}"
            )
    if full is not None:
        _assign(param, full.to(param.dtype))
    return native


def _local_experts(param: torch.Tensor) -> list[int] | None:
    """The experts (rows of dim 0) whose values this rank's shard of DTensor ``param`` holds, in
    order; None if its placements split another dim. No communication: the expert ids are laid out
    as ``param`` is (FSDP's Shard(0), EP's and their strided combination alike)."""
    from torch.distributed.tensor import distribute_tensor

    if any(p.is_partial() or (p.is_shard() and p.dim != 0) for p in param.placements):
        return None
    ids = torch.arange(param.shape[0]).view(-1, 1, 1)
    local = distribute_tensor(ids, param.device_mesh, param.placements, src_data_rank=None)
    return local.to_local().flatten().tolist()


def _read_mxfp4(reader: _ShardReader, stem: str, param: torch.Tensor, file: Path) -> torch.Tensor | None:
    """Dequantize ``stem_blocks`` / ``stem_scales`` into the layout ``[E, cols, rows]``.

    A plain parameter is filled in place, and so is a DTensor's local shard, reading and dequantizing
    only its own experts (returns None: 2 of 128 per rank in the 120b recipe, where every rank used
    to read all 128 from disk); a DTensor split along another dim gets the full tensor returned.
    """
    if f"{stem}_scales" not in reader.where:
        raise CheckpointError(f"{file}: {stem}_blocks has no matching {stem}_scales tensor")
    blocks, scales = reader.slice(f"{stem}_blocks"), reader.slice(f"{stem}_scales")  # read per expert
    experts = param.shape[0]
    expected = expected_hf_shape(f"{stem}_blocks", tuple(param.shape))
    if tuple(blocks.get_shape()) != expected or tuple(scales.get_shape()) != expected[:-1]:
        raise CheckpointError(
            f"{file}: {stem}_blocks {tuple(blocks.get_shape())} / _scales {tuple(scales.get_shape())} "
            f"do not match config.json, which implies {expected} / {expected[:-1]}"
        )
    full = None  # returned for the caller to shard: only a DTensor split along another dim
    if not _is_dtensor(param):
        out, mine = param.data, list(range(experts))
    elif (mine := _local_experts(param)) is not None:
        out = param.to_local()
    else:
        out = full = torch.empty(param.shape, dtype=param.dtype)
        mine = list(range(experts))
    for row, e in enumerate(mine):  # one expert at a time bounds the dequantization scratch memory
        # (a range, not an int: safetensors < 0.4.3 slices take no integer index)
        out[row].copy_(dequantize_mxfp4(blocks[e : e + 1][0], scales[e : e + 1][0], param.dtype).T)
    return full


def load_hf_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> GptOss:
    """Build a ``GptOss`` from a HF folder's config.json (on meta, then ``device``) and load its weights."""
    args = args_from_hf_folder(path)
    with torch.device("meta"):
        model = GptOss(args).to(dtype)
    model.to_empty(device=device)
    load_hf_state_dict_into(model, path, progress=progress)
    return model


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on CPU (gathers FSDP shards: a collective every rank must join)."""
    return (tensor.full_tensor() if _is_dtensor(tensor) else tensor).detach().cpu()


def hf_tensors(
    model: nn.Module, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(HF name, whole tensor)`` per parameter: what a non-MXFP4 ``save_hf_model`` writes, without a file.

    Same order, names, layout (interleaved ``gate_up_proj``, experts ``[E, in, out]``) and ``dtype``
    rounding, for in-place weight sync to an inference engine. FSDP / EP shards are cast to
    ``dtype`` where they are, then gathered one tensor at a time (fp32 master weights synced in
    bf16: half the bytes through the collective; rounding commutes with gathering, so the result is
    the same): every rank must run the iterator to the end. Each tensor is a fresh copy on
    ``device``, never a view of a parameter (a consumer may modify it in place).
    """
    for native, tensor in model.state_dict().items():
        sharded = _is_dtensor(tensor)
        local = tensor.detach().to(dtype)  # a DTensor casts its own shard: no communication
        out = (local.full_tensor() if sharded else local).to(device)
        # no cast and no move, and no gather either on a one-rank mesh (one GPU, or a shard dim of
        # size 1): still the parameter's own storage, which the consumer may write to
        own = tensor.to_local() if sharded else tensor
        if out.untyped_storage().data_ptr() == own.untyped_storage().data_ptr():
            out = out.clone()
        del local
        yield to_hf_name(native), out.contiguous()
        del out


def write_hf_config(
    model: nn.Module, path: str | Path, dtype: torch.dtype = torch.bfloat16, source: str | Path | None = None
) -> Path:
    """Write only ``config.json`` for ``model`` (non-MXFP4, ``dtype``) into ``path``; returns the folder.

    The same config ``save_hf_model`` writes (extra keys of ``source``'s config.json kept), for a
    reader that gets its weights elsewhere. Written to a temp file and renamed, so a concurrent
    reader never sees half a file.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = _hf_config(model, False, dtype, Path(source) if source else None)
    write_replacing(folder / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    return folder


def _quantized(tensor: torch.Tensor, stem: str) -> dict[str, torch.Tensor]:
    """Parameter ``[E, cols, rows]`` -> HF ``stem_blocks [E, rows, cols/32, 16]`` and ``stem_scales``."""
    pairs = [quantize_mxfp4(w.T) for w in _full(tensor)]
    return {
        f"{stem}_blocks": torch.stack([b for b, _ in pairs]),
        f"{stem}_scales": torch.stack([s for _, s in pairs]),
    }


def _tensor_groups(
    model: nn.Module, mxfp4: bool, dtype: torch.dtype
) -> Iterator[tuple[dict[str, int], Callable[[], dict[str, torch.Tensor]]]]:
    """(``{hf name: bytes}``, producer) per parameter; MXFP4 blocks and scales stay together."""
    for native, tensor in model.state_dict().items():
        name = to_hf_name(native)
        if mxfp4 and native.endswith(MXFP4_WEIGHTS):
            experts, cols, rows = tensor.shape
            if cols % BLOCK_SIZE:
                raise CheckpointError(f"{name}: MXFP4 needs its input dim {cols} to be a multiple of 32")
            size = {
                f"{name}_blocks": experts * rows * cols // 2,
                f"{name}_scales": experts * rows * cols // 32,
            }
            yield size, lambda t=tensor, n=name: _quantized(t, n)
        else:
            size = {name: tensor.numel() * dtype.itemsize}
            yield size, lambda t=tensor, n=name: {n: _full(t).to(dtype).contiguous()}


def _plan_shards(groups: list[tuple[dict[str, int], Any]], max_shard_bytes: int) -> list[list[int]]:
    shards: list[list[int]] = [[]]
    used = 0
    for i, (sizes, _) in enumerate(groups):
        size = sum(sizes.values())
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += size
    return shards


def _hf_config(model: nn.Module, mxfp4: bool, dtype: torch.dtype, source: Path | None) -> dict[str, Any]:
    config = read_hf_config(source) if source and (source / CONFIG_FILE).is_file() else {}
    for stale in ("quantization_config", "torch_dtype"):
        config.pop(stale, None)
    config.update(model.args.to_hf_config())
    config["dtype"] = str(dtype).removeprefix("torch.")  # transformers 5 spelling of torch_dtype
    if mxfp4:
        config["quantization_config"] = {
            "quant_method": "mxfp4",
            "modules_to_not_convert": list(MXFP4_NOT_CONVERTED),
        }
    return config


def _readable(file: Path) -> None:
    """The permissions the umask gives a new file (safetensors writes 0600: another account, a vLLM
    server's, could not read the shards next to a 0644 config.json)."""
    mask = os.umask(0)
    os.umask(mask)
    with contextlib.suppress(OSError):  # (some FUSE / object-store mounts refuse chmod)
        file.chmod(0o666 & ~mask)


def save_hf_model(
    model: nn.Module,
    path: str | Path,
    mxfp4: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    source: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = False,
) -> None:
    """Write ``model`` as a HF folder: shards + index + config.json (+ tokenizer files from ``source``).

    ``mxfp4`` stores the expert weights as MXFP4 blocks/scales (as released); everything else is
    ``dtype``. With FSDP every rank must call this (tensors are gathered one at a time).
    """
    folder = Path(path).resolve()  # "." or a symlink: the real folder, whose parent gets the partial one
    source_dir = Path(source) if source is not None else None
    if source_dir is not None and not source_dir.is_dir():
        raise CheckpointError(f"--source folder {source_dir} does not exist")
    groups = list(_tensor_groups(model, mxfp4, dtype))
    plan = _plan_shards(groups, max_shard_bytes)
    writer = this_rank() == 0
    # written beside the folder and swapped in when complete: a failure part-way (memory, disk)
    # leaves an existing folder as it was, never half old shards and half new. Where a swap cannot
    # work (see titan_rl.files.swappable) the folder is written in place, its old shards removed first.
    swap = swappable(folder)
    target = folder.parent / f".{folder.name}.partial-{os.getpid()}" if swap else folder
    if writer:
        remove_stale_partials(folder)
        if swap:
            shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True, exist_ok=not swap)
        if not swap:
            for old in [*folder.glob("model-*-of-*.safetensors"), folder / SINGLE_FILE, folder / INDEX_FILE]:
                old.unlink(missing_ok=True)  # shards of an earlier save would confuse loaders
    try:
        weight_map, total = _write_shards(groups, plan, target if writer else None, progress)
        if writer:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (target / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
            config = _hf_config(model, mxfp4, dtype, source_dir)
            (target / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
            if source_dir is not None:
                for name in TOKENIZER_FILES:
                    if (source_dir / name).is_file() and (source_dir / name).resolve() != (
                        target / name
                    ).resolve():
                        shutil.copy2(source_dir / name, target / name)
            if swap:
                swap_in(target, folder, _is_model_file)
    except BaseException:
        if writer and swap:
            shutil.rmtree(target, ignore_errors=True)
        raise


def _write_shards(
    groups: list, plan: list[list[int]], folder: Path | None, progress: bool
) -> tuple[dict[str, str], int]:
    """Gather each shard's tensors (every rank) and write them into ``folder`` (the writer's; None
    on the others). Returns the weight map and the total bytes."""
    weight_map: dict[str, str] = {}
    total = 0
    with tqdm(total=len(groups), desc="saving", unit="tensor", disable=not (progress and folder)) as bar:
        for n, members in enumerate(plan, start=1):
            file = f"model-{n:05d}-of-{len(plan):05d}.safetensors"
            tensors: dict[str, torch.Tensor] = {}
            for i in members:
                tensors.update(groups[i][1]())
                bar.update()
            if folder is not None:
                save_file(tensors, folder / file, metadata={"format": "pt"})
                _readable(folder / file)
            weight_map.update(dict.fromkeys(tensors, file))
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors
    return weight_map, total


def _is_model_file(name: str) -> bool:
    """A file of an HF model folder that a save replaces: shards, index, config."""
    return name in (SINGLE_FILE, INDEX_FILE, CONFIG_FILE) or (
        name.startswith("model-") and name.endswith(".safetensors")
    )


def expected_hf_shape(name: str, param_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The stored shape of HF tensor ``name`` for a parameter of ``param_shape`` (MXFP4 pairs too)."""
    if name.endswith(("_blocks", "_scales")):
        experts, cols, rows = param_shape
        blocks = (experts, rows, cols // BLOCK_SIZE, BLOCK_SIZE // 2)
        return blocks if name.endswith("_blocks") else blocks[:-1]
    return tuple(param_shape)

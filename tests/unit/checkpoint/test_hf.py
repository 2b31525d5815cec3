"""HF folders: bitwise bf16 round trip, transformers parity, MXFP4 experts both ways."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import read_hf_folder, rel_err, tiny_model
from titan_rl.checkpoint.hf import (
    INDEX_FILE,
    MXFP4_NOT_CONVERTED,
    TOKENIZER_FILES,
    args_from_hf_folder,
    load_hf_model,
    save_hf_model,
)
from titan_rl.checkpoint.mxfp4 import dequantize_mxfp4, quantize_mxfp4
from titan_rl.checkpoint.names import to_hf_state_dict

transformers = pytest.importorskip("transformers")
MXFP4_DIMS = dict(hidden_size=64, intermediate_size=64)  # MXFP4 blocks need multiples of 32


def write_tokenizer_files(folder: Path) -> None:
    for name in TOKENIZER_FILES:
        (folder / name).write_text(json.dumps({"file": name, "random": torch.rand(1).item()}))


def hf_source_folder(folder: Path, seed: int) -> Path:
    """A bf16 checkpoint written by transformers' own save_pretrained, in several shards."""
    from tests.unit.model.test_hf_parity import hf_twin

    hf_twin(tiny_model(seed)).to(torch.bfloat16).save_pretrained(folder, max_shard_size="20KB")
    write_tokenizer_files(folder)
    return folder


def from_pretrained(folder: Path, **kwargs):
    from transformers import GptOssForCausalLM

    kwargs.update(dtype=torch.float32, attn_implementation="eager")
    # .float(): transformers 5.17 leaves MXFP4-dequantized experts in bf16 despite dtype=float32
    return GptOssForCausalLM.from_pretrained(folder, **kwargs).float().eval()


def test_bf16_folder_round_trip_is_bitwise(tmp_path):
    source = hf_source_folder(tmp_path / "source", seed=int(torch.randint(0, 1000, ())))
    model = load_hf_model(source)
    assert model.lm_head.weight.dtype == torch.float32
    out = tmp_path / "out"
    save_hf_model(model, out, source=source, max_shard_bytes=30_000)
    theirs, ours = read_hf_folder(source), read_hf_folder(out)
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == torch.bfloat16 and torch.equal(ours[name], tensor), name
    index = json.loads((out / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ours.values())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    assert all(p.stat().st_size < 30_000 + 10_000 for p in shards)  # limit plus the safetensors header
    for name in TOKENIZER_FILES:
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    assert args_from_hf_folder(out) == args_from_hf_folder(source)


def test_transformers_loads_our_fp32_folder(tmp_path):
    model = tiny_model(seed=int(torch.randint(0, 1000, ()))).eval()
    save_hf_model(model, tmp_path, dtype=torch.float32)
    hf = from_pretrained(tmp_path)
    tokens = torch.randint(0, model.args.vocab_size, (2, 13))
    with torch.no_grad():
        assert rel_err(model(tokens), hf(input_ids=tokens).logits) <= 1e-5


def quantized_folder(folder: Path, model) -> None:
    """An MXFP4 checkpoint built by hand: random codes, scales around 2**-6 (weights of ~0.02-0.1).

    The blocks go to a second shard, away from their scales, as a loader must not assume pairs share one.
    """
    tensors = {k: v.to(torch.bfloat16) for k, v in to_hf_state_dict(model.state_dict()).items()}
    for name in [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        experts, cols, rows = tensors.pop(name).shape
        tensors[f"{name}_blocks"] = torch.randint(0, 256, (experts, rows, cols // 32, 16), dtype=torch.uint8)
        tensors[f"{name}_scales"] = torch.randint(118, 125, (experts, rows, cols // 32), dtype=torch.uint8)
    folder.mkdir()
    shards = {"a.safetensors": {}, "b.safetensors": {}}
    for name, tensor in tensors.items():
        shards["b.safetensors" if name.endswith("_blocks") else "a.safetensors"][name] = tensor
    for file, members in shards.items():
        save_file(members, folder / file, metadata={"format": "pt"})
    weight_map = {name: file for file, members in shards.items() for name in members}
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = model.args.to_hf_config()
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": MXFP4_NOT_CONVERTED}
    (folder / "config.json").write_text(json.dumps(config))


def assert_same_as_transformers(folder: Path, model) -> None:
    from transformers import Mxfp4Config

    hf = from_pretrained(folder, quantization_config=Mxfp4Config(dequantize=True))
    hf_state = hf.state_dict()
    for name, tensor in to_hf_state_dict(model.state_dict()).items():
        assert torch.equal(hf_state[name], tensor), name
    tokens = torch.randint(0, model.args.vocab_size, (2, 11))
    with torch.no_grad():
        assert rel_err(model(tokens), hf(input_ids=tokens).logits) <= 1e-5


def test_mxfp4_checkpoint_loads_like_transformers(tmp_path):
    quantized_folder(tmp_path / "mxfp4", tiny_model(seed=int(torch.randint(0, 1000, ())), **MXFP4_DIMS))
    model = load_hf_model(tmp_path / "mxfp4").eval()
    assert_same_as_transformers(tmp_path / "mxfp4", model)


def test_save_mxfp4_is_read_back_by_transformers(tmp_path):
    original = tiny_model(seed=int(torch.randint(0, 1000, ())), **MXFP4_DIMS)
    save_hf_model(original, tmp_path, mxfp4=True)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "mxfp4",
        "modules_to_not_convert": MXFP4_NOT_CONVERTED,
    }
    stored = read_hf_folder(tmp_path)
    assert stored["model.layers.0.mlp.experts.gate_up_proj_blocks"].shape == (4, 128, 2, 16)
    assert stored["model.layers.0.mlp.experts.down_proj_scales"].shape == (4, 64, 2)
    assert "model.layers.0.mlp.experts.down_proj" not in stored
    model = load_hf_model(tmp_path).eval()
    for name, param in original.named_parameters():
        loaded = dict(model.named_parameters())[name]
        if name.endswith("proj") and ".experts." in name:  # MXFP4 of the transposed [E, out, in] matrix
            rounded = dequantize_mxfp4(*quantize_mxfp4(param.detach().transpose(1, 2))).transpose(1, 2)
            assert torch.equal(loaded, rounded) and not torch.equal(loaded, param), name
        else:
            assert torch.equal(loaded, param.bfloat16().float()), name
    assert_same_as_transformers(tmp_path, model)


@pytest.mark.parametrize("mxfp4", [False, True])
def test_verify_hf_folder_reads_headers_only_and_catches_mismatches(tmp_path, mxfp4):
    """verify_hf_folder passes every folder load_hf_model loads, and names what load would trip on."""
    from titan_rl.checkpoint.hf import CheckpointError
    from titan_rl.checkpoint.verify import verify_hf_folder

    model = tiny_model(seed=int(torch.randint(0, 1000, ())), **MXFP4_DIMS)
    save_hf_model(model, tmp_path / "ok", mxfp4=mxfp4, max_shard_bytes=30_000)
    assert verify_hf_folder(tmp_path / "ok") == model.args
    load_hf_model(tmp_path / "ok")

    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(CheckpointError, match=r"mlp.experts.*has shape .* but config.json implies"):
        verify_hf_folder(tmp_path / "ok")
    (tmp_path / "ok" / "config.json").write_text(
        json.dumps({**config, "num_hidden_layers": 2, "layer_types": config["layer_types"][:2]})
    )
    with pytest.raises(CheckpointError, match=r"layers.2.* is not a GPT-OSS parameter of this config"):
        verify_hf_folder(tmp_path / "ok")
    (tmp_path / "ok" / "config.json").write_text(
        json.dumps({**config, "num_hidden_layers": 4, "layer_types": (config["layer_types"] * 2)[:4]})
    )
    with pytest.raises(CheckpointError, match=r"lacks .* tensors, e.g. 'model.layers.3."):
        verify_hf_folder(tmp_path / "ok")


def test_writing_over_a_folder_is_all_or_nothing(tmp_path, monkeypatch):
    """A save that fails part-way (out of memory, a full disk) leaves the existing folder as it was:
    the old code deleted its shards first. A save that completes replaces shards, index and config,
    keeps the folder's other files, and leaves nothing beside it."""
    import titan_rl.checkpoint.hf as hf

    out = tmp_path / "export"
    first, second = tiny_model(seed=1), tiny_model(seed=2)
    save_hf_model(first, out, max_shard_bytes=20_000)  # several shards
    (out / "README.md").write_text("my notes")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_save_file, calls = hf.save_file, []

    def failing_save_file(tensors, file, metadata=None):
        calls.append(file)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_save_file(tensors, file, metadata=metadata)

    monkeypatch.setattr(hf, "save_file", failing_save_file)
    with pytest.raises(OSError, match="No space left"):
        save_hf_model(second, out, max_shard_bytes=20_000)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no partial folder left
    monkeypatch.setattr(hf, "save_file", real_save_file)

    save_hf_model(second, out, max_shard_bytes=1_000_000)  # one shard now
    assert (out / "README.md").read_text() == "my notes"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model-00001-of-00001.safetensors"]
    reloaded = load_hf_model(out)
    for (name, a), b in zip(second.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a.to(torch.bfloat16), b.to(torch.bfloat16)), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_saving_into_the_working_directory_writes_in_place_and_stale_partials_go(tmp_path, monkeypatch):
    """ "." cannot be renamed over (the swap moved the directory's files into a partial folder and then
    failed); it is written in place, as a folder on another file system or a mount point is. A
    partial folder left by a killed save (its pid gone) is removed by the next save."""
    model = tiny_model(seed=3)
    here = tmp_path / "work"
    here.mkdir()
    (here / "notes.txt").write_text("mine")
    dead = subprocess_pid_that_exited()
    stale = tmp_path / f".work.partial-{dead}"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"half")
    monkeypatch.chdir(here)
    save_hf_model(model, ".", max_shard_bytes=1_000_000)
    assert Path.cwd() == here  # still there (a swap would leave the process in the removed old folder)
    assert sorted(p.name for p in here.iterdir()) == sorted(
        ["notes.txt", "config.json", "model-00001-of-00001.safetensors", INDEX_FILE]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]  # the stale partial folder went
    reloaded = load_hf_model(here)
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a.to(torch.bfloat16), b.to(torch.bfloat16)), name


def subprocess_pid_that_exited() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_swap_that_fails_keeps_the_folders_other_files(tmp_path, monkeypatch):
    """The old swap moved the folder's other files (tokenizer, original/) into the new folder first
    and deleted them with it when the rename then failed; now they move only after the swap."""
    import titan_rl.checkpoint.hf as hf

    out = tmp_path / "export"
    save_hf_model(tiny_model(seed=1), out, max_shard_bytes=1_000_000)
    (out / "tokenizer.json").write_text("{}")
    (out / "original").mkdir()
    (out / "original" / "weights.bin").write_bytes(b"w")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    real_replace = os.replace

    def failing_swap(src, dst):
        if Path(src).name.startswith(".export.partial-"):
            raise OSError(16, "Device or resource busy")
        real_replace(src, dst)

    monkeypatch.setattr(hf.os, "replace", failing_swap)
    with pytest.raises(OSError, match="busy"):
        save_hf_model(tiny_model(seed=2), out, max_shard_bytes=1_000_000)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    monkeypatch.setattr(hf.os, "replace", real_replace)
    save_hf_model(tiny_model(seed=2), out, max_shard_bytes=1_000_000)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before  # the same names
    assert (out / "original" / "weights.bin").read_bytes() == b"w"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]

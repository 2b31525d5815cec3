"""scripts/convert_*.py: HF -> DCP -> HF gives the same folder; bad inputs exit 1 naming the culprit."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import read_hf_folder, tiny_model
from tests.unit.checkpoint.test_hf import write_tokenizer_files
from titan_rl.checkpoint.hf import TOKENIZER_FILES, CheckpointError, save_hf_model
from titan_rl.checkpoint.manager import save_model_dcp

REPO = Path(__file__).resolve().parents[3]
SCRIPTS = REPO / "scripts"


def script_main(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}  # this checkout's titan_rl
    cmd = [sys.executable, str(SCRIPTS / f"{name}.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=REPO)


@pytest.fixture
def hf_folder(tmp_path) -> Path:
    folder = tmp_path / "hf"
    save_hf_model(tiny_model(seed=int(torch.randint(0, 1000, ()))), folder, max_shard_bytes=40_000)
    write_tokenizer_files(folder)
    return folder


def test_hf_to_dcp_to_hf_round_trip(tmp_path, hf_folder):
    done = run_script("convert_hf_to_dcp", str(hf_folder), str(tmp_path / "dcp"))
    assert done.returncode == 0, done.stderr
    back = ("convert_dcp_to_hf", str(tmp_path / "dcp"), str(tmp_path / "back"), "--max-shard-bytes", "40000")
    done = run_script(*back, "--source", str(hf_folder))
    assert done.returncode == 0, done.stderr
    before, after = read_hf_folder(hf_folder), read_hf_folder(tmp_path / "back")
    assert sorted(before) == sorted(after)
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    for name in [*TOKENIZER_FILES, "config.json", "model.safetensors.index.json"]:
        assert (tmp_path / "back" / name).read_bytes() == (hf_folder / name).read_bytes(), name
    again = run_script("convert_hf_to_dcp", str(hf_folder), str(tmp_path / "dcp"))  # into the same folder
    assert again.returncode == 0 and "replacing the DCP checkpoint that was there" in again.stdout
    assert "Warning" not in again.stderr, again.stderr  # (torch's own "existing checkpoint" warning)


def test_help_describes_the_scripts(capsys):
    for name in ("convert_hf_to_dcp", "convert_dcp_to_hf"):
        with pytest.raises(SystemExit) as exit_info:
            script_main(name)(["--help"])
        assert exit_info.value.code == 0
    assert "--mxfp4" in capsys.readouterr().out


def first_shard(folder: Path) -> Path:
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    return folder / index["weight_map"]["model.embed_tokens.weight"]


def add_unknown_tensor(folder: Path) -> str:
    shard = first_shard(folder)
    tensors = load_file(shard)
    tensors["model.layers.0.mlp.shared_expert.weight"] = torch.zeros(2)
    save_file(tensors, shard)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.shared_expert.weight"] = shard.name
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return "model.layers.0.mlp.shared_expert.weight"


def reshape_embedding(folder: Path) -> str:
    shard = first_shard(folder)
    tensors = load_file(shard)
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"][:-1].contiguous()
    save_file(tensors, shard)
    return "model.embed_tokens.weight"


def truncate_shard(folder: Path) -> str:
    shard = first_shard(folder)  # a download cut short
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return shard.name


def corrupt_index(folder: Path) -> str:
    index = folder / "model.safetensors.index.json"
    index.write_text(index.read_text()[:-20])
    return index.name


HF_BREAKAGES = {
    "missing config": lambda folder: (folder / "config.json").unlink() or "config.json",
    "missing shard": lambda folder: first_shard(folder).unlink() or first_shard(folder).name,
    "truncated shard": truncate_shard,
    "corrupt index": corrupt_index,
    "unknown tensor": add_unknown_tensor,
    "wrong shape": reshape_embedding,
}


@pytest.mark.parametrize("breakage", sorted(HF_BREAKAGES))
def test_hf_to_dcp_bad_input_exits_with_a_message(tmp_path, hf_folder, capsys, breakage):
    culprit = HF_BREAKAGES[breakage](hf_folder)
    assert script_main("convert_hf_to_dcp")([str(hf_folder), str(tmp_path / "dcp")]) == 1
    error = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert error.startswith("error: ") and culprit in error, error


def dcp_folder(tmp_path: Path, breakage: str) -> tuple[Path, str]:
    model = tiny_model(seed=1)
    folder = tmp_path / "dcp"
    if breakage != "unknown tensor":
        save_model_dcp(model, folder)
    if breakage == "missing metadata":
        (folder / ".metadata").unlink()
        return folder, ".metadata"
    if breakage == "wrong shape":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 95}))
        return folder, "model.embed_tokens.weight"
    model.layers[0].mlp.shared_expert = torch.nn.Linear(2, 2)  # an unknown tensor in the folder
    save_model_dcp(model, folder)
    return folder, "model.layers.0.mlp.shared_expert.weight"


@pytest.mark.parametrize("breakage", ["missing metadata", "unknown tensor", "wrong shape"])
def test_dcp_to_hf_bad_input_exits_with_a_message(tmp_path, capsys, breakage):
    folder, culprit = dcp_folder(tmp_path, breakage)
    main = script_main("convert_dcp_to_hf")
    assert main([str(folder), str(tmp_path / "hf")]) == 1
    error = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert error.startswith("error: ") and culprit in error, error
    with pytest.raises(CheckpointError, match=culprit):
        main([str(folder), str(tmp_path / "hf"), "--debug"])


def test_a_training_checkpoint_converts_without_a_config(tmp_path):
    """A training checkpoint's config.json is the run's; the model's HF config is saved beside it,
    so the conversion needs no --config (a run from a preset has no HF folder to point at)."""
    from titan_rl.checkpoint.hf import load_hf_model
    from titan_rl.checkpoint.manager import CheckpointManager

    model = tiny_model(seed=2)
    step = CheckpointManager(tmp_path / "ckpt", interval=1).save(
        1, model, torch.optim.AdamW(model.parameters()), config={"job": {"seed": 0}}
    )
    assert script_main("convert_dcp_to_hf")([str(step), str(tmp_path / "hf"), "--dtype", "float32"]) == 0
    for name, tensor in load_hf_model(tmp_path / "hf").state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name


def test_a_debug_model_is_written_with_its_tokenizer_and_the_output_says_what_it_holds(tmp_path, capsys):
    """The debug preset's tokenizer is built in: written beside the weights, the folder trains with
    --model.hf_path as it is; any other model's output says where its tokenizer comes from."""
    from titan_rl.checkpoint.manager import CheckpointManager
    from titan_rl.rl.tokenizer import Tokenizer, build_tiny_tokenizer

    to_hf = script_main("convert_dcp_to_hf")
    for vocab in (512, 256):
        model = tiny_model(seed=2, vocab_size=vocab)
        step = CheckpointManager(tmp_path / f"ckpt{vocab}", interval=1).save(
            1, model, torch.optim.AdamW(model.parameters()), config={"job": {"seed": 0}}
        )
        assert to_hf([str(step), str(tmp_path / f"hf{vocab}"), "--source", str(tmp_path)]) == 0
        out = capsys.readouterr().out
        assert "bfloat16 (the default; --dtype float32 keeps fp32)" in out
        assert f"--source {tmp_path} holds none of tokenizer.json" in out
        if vocab == 512:
            assert "built-in 512-token tokenizer.json" in out
            tokens = Tokenizer.from_folder(tmp_path / "hf512").encode("<|start|>assistant hello")
            assert tokens == build_tiny_tokenizer().encode("<|start|>assistant hello")
        else:
            assert "no tokenizer.json: copy the base model's" in out
            assert not (tmp_path / "hf256" / "tokenizer.json").exists()


def test_inputs_given_to_the_wrong_tool_say_which_one_to_use(tmp_path, hf_folder, capsys):
    """A training checkpoint where a HF folder is wanted, the checkpoint folder instead of one of its
    step folders, and a HF folder given to the DCP -> HF script: each error names the way out."""
    from titan_rl.checkpoint.hf import args_from_hf_folder
    from titan_rl.checkpoint.manager import CheckpointManager

    model = tiny_model(seed=2)
    manager = CheckpointManager(tmp_path / "ckpt", interval=1)
    step = manager.save(1, model, torch.optim.AdamW(model.parameters()), config={"job": {"seed": 0}})
    with pytest.raises(CheckpointError, match=r"--checkpoint\.load_path"):
        args_from_hf_folder(step)
    to_hf = script_main("convert_dcp_to_hf")
    assert to_hf([str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 1
    assert "pick a checkpoint in it: step-000001" in capsys.readouterr().err
    assert to_hf([str(hf_folder), str(tmp_path / "hf2")]) == 1
    assert "convert_hf_to_dcp.py" in capsys.readouterr().err
    assert to_hf([str(tmp_path), str(tmp_path / "hf3")]) == 1  # the run's dump folder
    assert f"its checkpoints are in {tmp_path / 'ckpt'}" not in capsys.readouterr().err  # (named ckpt here)
    (tmp_path / "run").mkdir()
    (tmp_path / "ckpt").rename(tmp_path / "run" / "checkpoint")
    assert to_hf([str(tmp_path / "run"), str(tmp_path / "hf3")]) == 1
    assert f"its checkpoints are in {tmp_path / 'run' / 'checkpoint'}: step-000001" in capsys.readouterr().err
    assert to_hf([str(tmp_path / "nowhere"), str(tmp_path / "hf3")]) == 1
    assert f"{tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err


def test_plot_metrics_takes_the_run_folder_and_says_what_is_missing(tmp_path, capsys):
    plot = script_main("plot_metrics")
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/mean": 0.5}) + "\n")
    assert plot([str(tmp_path)]) == 0 and (tmp_path / "report.html").is_file()
    assert plot([str(tmp_path / "sub")]) == 1 and "not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert plot([str(tmp_path / "empty")]) == 1
    assert "is a folder without metrics.jsonl" in capsys.readouterr().err


def test_saved_shards_are_as_readable_as_the_config(tmp_path):
    """safetensors writes 0600; another account (a vLLM server's) must read the shards too."""
    from titan_rl.checkpoint.hf import save_hf_model

    save_hf_model(tiny_model(seed=3), tmp_path / "hf")
    config_mode = (tmp_path / "hf" / "config.json").stat().st_mode & 0o777
    for shard in (tmp_path / "hf").glob("*.safetensors"):
        assert shard.stat().st_mode & 0o777 == config_mode, oct(shard.stat().st_mode)

"""README's generated blocks are current, and every config in train_configs/ is valid for its world size."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from titan_rl.config import ConfigError, JobConfig, load_config
from titan_rl.config.reference import (
    CONFIG_DIR,
    GPU_GB,
    MARKERS,
    estimate_memory,
    field_docs,
    main,
    read_block,
    render_config_reference,
    render_memory_table,
    replace_block,
    stated_world_size,
)
from titan_rl.model import GptOssModelArgs
from titan_rl.train import parallel_dims_for

REPO = Path(__file__).resolve().parents[3]
README = REPO / "README.md"
CONFIGS = sorted(CONFIG_DIR.glob("*.toml"))
GPU_CONFIGS = [path for path in CONFIGS if load_config(path).model.hf_path]
STALE = "README.md is stale: run python -m titan_rl.config.reference --write README.md"


def test_readme_config_reference_is_current():
    assert read_block(README.read_text(), "config-reference") == render_config_reference(), STALE


def test_readme_memory_table_is_current():
    assert read_block(README.read_text(), "memory-table") == render_memory_table(), STALE


def test_every_field_is_documented_and_listed():
    docs, reference = field_docs(), render_config_reference()
    sections = typing.get_type_hints(JobConfig)
    for section in dataclasses.fields(JobConfig):
        cls = sections[section.name]
        assert f"### `[{section.name}]`" in reference
        for f in dataclasses.fields(cls):
            assert docs[cls.__name__].get(f.name), f"{cls.__name__}.{f.name} has no doc string"
            assert f"| `{f.name}` |" in reference.split(f"### `[{section.name}]`")[1].split("###")[0]
    assert '| `hf_path` | str | `""` | HF checkpoint folder' in reference
    assert "| `betas` | list[float] | `[0.9, 0.999]` |" in reference


def test_check_and_write_detect_and_fix_a_stale_readme(tmp_path, capsys):
    start, end = MARKERS["config-reference"]
    mem_start, mem_end = MARKERS["memory-table"]
    stale = tmp_path / "README.md"
    stale.write_text(f"# title\n\n{start}\nold\n{end}\n\ntext\n{mem_start}\n{mem_end}\nfooter\n")
    assert main(["--check", str(stale)]) == 1
    assert main(["--write", str(stale)]) == 0
    assert main(["--check", str(stale)]) == 0
    text = stale.read_text()
    assert text.startswith("# title\n\n") and text.endswith("footer\n") and "\ntext\n" in text
    assert read_block(text, "config-reference") == render_config_reference()
    with pytest.raises(ValueError, match="expected one"):
        replace_block("no markers here", "config-reference", "x")
    capsys.readouterr()


def test_readme_states_the_exact_parameter_counts():
    text = README.read_text()
    for preset in ("20b", "120b"):
        assert f"{GptOssModelArgs.from_preset(preset).num_params()['total']:,}" in text


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_validates_for_its_stated_world_size(path):
    cfg = load_config(path)
    world = stated_world_size(path)
    dims = parallel_dims_for(cfg, world)
    dims.validate_model(GptOssModelArgs.from_preset(cfg.model.preset))  # ep | experts, cp | heads
    if world > 1:
        assert "# world_size = " in path.read_text().split("\n[", 1)[0], "state the world size at the top"
        with pytest.raises(ConfigError, match="world size"):
            parallel_dims_for(cfg, world * 2)


@pytest.mark.parametrize(
    "override",
    [
        {"aggregation": "seq-mean-token-mean", "policy_loss": "gspo"},
        {"aggregation": "seq-mean-token-sum-norm", "correction_level": "sequence", "correction": "mis"},
    ],
)
def test_context_parallelism_takes_sequence_level_terms_but_not_recompute(override):
    """Sequence-level terms add their per-sequence sums over the cp ranks
    (tests/distributed/test_trainer_parallel.py); recompute's per-trajectory pass is refused."""
    cfg = JobConfig()
    cfg.parallelism.cp = 2
    for key, value in override.items():
        setattr(cfg.rl, key, value)
    parallel_dims_for(cfg, 2)
    cfg.rl.old_logprob_mode = "recompute"
    with pytest.raises(ConfigError, match=r"cp > 1 needs rl\.old_logprob_mode = 'unified'"):
        parallel_dims_for(cfg, 2)


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=[p.name for p in GPU_CONFIGS])
def test_gpu_configs_are_consistent_and_fit_the_memory_estimate(path):
    cfg = load_config(path)
    assert cfg.model.preset in Path(cfg.model.hf_path).name, "preset must match the model in hf_path"
    assert cfg.rollout.engine == "vllm" and cfg.checkpoint.enable and cfg.model.dtype == "float32"
    assert cfg.env.max_episode_tokens <= cfg.training.seq_len
    est = estimate_memory(cfg, stated_world_size(path))
    assert est.peak <= GPU_GB, f"{path.name}: estimated {est.peak:.1f} GB per GPU"
    assert est.kv_cache > 0
    stated = re.search(r"Estimated peak (\d+) GB", path.read_text())  # the file's own comment
    assert stated and abs(int(stated.group(1)) - est.peak) <= 0.5, f"{path.name}: {est.peak:.1f} GB"


@pytest.mark.parametrize("path", GPU_CONFIGS, ids=[p.name for p in GPU_CONFIGS])
def test_check_config_command_line(path):
    """What run_train.sh runs first; ``--model.hf_path=`` checks the layout without the weights."""
    command = [
        sys.executable,
        "-m",
        "titan_rl.train",
        "--check-config",
        "--config",
        str(path),
        "--model.hf_path=",
    ]
    env = {**os.environ, "WORLD_SIZE": str(stated_world_size(path))}
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    peak = estimate_memory(load_config(path), stated_world_size(path)).peak
    assert (
        f"estimated peak {peak:.1f} GB per GPU of 80 GB" in result.stdout and "warning" not in result.stderr
    )


def test_check_config_warns_about_a_layout_over_the_gpus_memory(capsys, monkeypatch):
    """The README's own 120b-on-one-node example does not fit 80 GB GPUs: --check-config says so."""
    from titan_rl import train

    path = REPO / "train_configs" / "gpt_oss_120b_multinode.toml"
    layout = ["--model.dtype=bfloat16", "--parallelism.dp_shard=8", "--parallelism.cp=1"]
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert train.main(["--check-config", "--config", str(path), "--model.hf_path=", *layout]) == 0
    captured = capsys.readouterr()
    assert "estimated peak 172.0 GB per GPU of 80 GB" in captured.out
    assert "warning: that is more than the GPU holds" in captured.err


def test_activation_checkpointing_lowers_the_activation_estimate():
    from titan_rl.config import load_config
    from titan_rl.config.reference import estimate_memory

    config = "train_configs/gpt_oss_20b_8xh100.toml"
    none, selective, full = (
        estimate_memory(load_config(config, [f"--parallelism.activation_checkpoint={mode}"]), 8).activations
        for mode in ("none", "selective", "full")
    )
    assert full < selective < none and full < none / 5


def test_the_estimate_takes_the_models_shapes_from_hf_path_not_only_the_preset():
    """--check-config reads model.hf_path's config.json for the shapes (the preset may be the default
    debug one): the estimate from those shapes is the estimate of that preset."""
    path = REPO / "train_configs" / "gpt_oss_120b_multinode.toml"
    cfg = load_config(path)
    world = stated_world_size(path)
    shapes = GptOssModelArgs.from_preset("120b")
    cfg_debug = load_config(path, ["--model.preset=debug"])
    assert estimate_memory(cfg_debug, world, args=shapes) == estimate_memory(cfg, world)
    assert estimate_memory(cfg_debug, world).peak < estimate_memory(cfg, world).peak

"""README's main config on 4 processes tracks 1 process; a run from a HF folder loads it sharded."""

from __future__ import annotations

import pytest
import torch

from tests.e2e.test_run_train import assert_engine_agrees, read_metrics, run_train

MAIN_CONFIG = {"CONFIG_FILE": "train_configs/debug_cpu.toml"}
SHORT = ["--training.steps=2", "--sft.steps=60"]  # 60 warm-up steps: the first rewards are non-zero


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> list[dict]:
    dump = tmp_path_factory.mktemp("one")
    result = run_train(*SHORT, f"--job.dump_folder={dump}", env=MAIN_CONFIG)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = read_metrics(dump)
    assert all(r["loss"] != 0 and r["reward/mean"] > 0 for r in rows)  # something to compare
    return rows


@pytest.mark.parametrize(
    "layout",
    [
        ["--parallelism.dp_shard=4", "--parallelism.ep=4"],
        # and the engine's routing replayed: in fp32 the engine routes as the trainer, so replaying
        # it through the ranks' rows and sequence shards must change nothing
        ["--parallelism.dp_shard=2", "--parallelism.cp=2", "--rl.rollout_routing_replay=true"],
    ],
    ids=["fsdp4-ep4", "fsdp2-cp2-routing-replay"],
)
def test_four_processes_track_one(tmp_path, one_process, layout):
    """NPROC=4, same seed: warm-up and the first RL steps give the same losses (rel 1e-4)."""
    dump = tmp_path / "four"
    result = run_train(*SHORT, *layout, f"--job.dump_folder={dump}", env={**MAIN_CONFIG, "NPROC": "4"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    four = read_metrics(dump)
    assert [r["step"] for r in four] == [1, 2]
    for a, b in zip(one_process, four):
        assert b["ratio/min"] == 1.0 and b["ratio/max"] == 1.0  # by construction; next to:
        assert_engine_agrees(b)
        assert b["reward/mean"] == a["reward/mean"]
        for key in ("loss", "grad_norm", "entropy/mean"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
        replay = "--rl.rollout_routing_replay=true" in layout
        assert b.get("routing/replayed_frac") == (1.0 if replay else None)  # every trained token


def test_a_hf_folder_start_is_loaded_sharded_and_exact(tmp_path):
    """--model.hf_path builds the model on meta and each rank keeps its FSDP / EP shard of every
    tensor: the run equals the preset run whose weights the folder holds (1 process bitwise,
    2 processes with dp_shard=2 x ep=2 to rel 1e-5)."""
    from titan_rl.checkpoint.hf import save_hf_model
    from titan_rl.model import GptOss, GptOssModelArgs

    torch.manual_seed(0)  # what the run's job.seed = 0 builds
    save_hf_model(GptOss(GptOssModelArgs.from_preset("debug")), tmp_path / "hf", dtype=torch.float32)
    runs: dict[str, list[dict]] = {}
    hf = f"--model.hf_path={tmp_path / 'hf'}"
    for name, args, env in [
        ("preset", [], {}),
        ("hf", [hf], {}),
        ("hf-sharded", [hf, "--parallelism.dp_shard=2", "--parallelism.ep=2"], {"NPROC": "2"}),
    ]:
        result = run_train("--training.steps=2", *args, f"--job.dump_folder={tmp_path / name}", env=env)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        runs[name] = read_metrics(tmp_path / name)
    keys = ("loss", "grad_norm", "entropy/mean", "reward/mean")
    assert [{k: r[k] for k in keys} for r in runs["hf"]] == [{k: r[k] for k in keys} for r in runs["preset"]]
    for a, b in zip(runs["preset"], runs["hf-sharded"]):
        assert b["reward/mean"] == a["reward/mean"]
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        assert b["entropy/mean"] == pytest.approx(a["entropy/mean"], rel=1e-5)
        assert b["loss"] == pytest.approx(
            a["loss"], abs=1e-7
        )  # ~0: equal-length responses, zero-mean advantages

"""TOML + command-line configuration: types, unknown keys and values are clear errors."""

from __future__ import annotations

import tomllib

import pytest

from titan_rl.config import ConfigError, load_config, to_toml

REQUIRED_KEYS = [
    "job.dump_folder", "job.seed", "training.steps", "checkpoint.enable", "checkpoint.interval",
    "checkpoint.folder", "parallelism.dp_replicate", "parallelism.dp_shard", "parallelism.cp",
    "parallelism.cp_mode", "parallelism.ep", "rl.old_logprob_mode", "rl.routing_replay",
]  # fmt: skip


def test_documented_keys_exist_with_their_names():
    config = load_config(None)
    for name in REQUIRED_KEYS:
        section, key = name.split(".")
        assert hasattr(getattr(config, section), key), name
    assert config.rl.old_logprob_mode == "unified" and config.rl.routing_replay is True


def test_toml_then_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[training]\nsteps = 7\n[rl]\nkl_coef = 0.5\n[optimizer]\nbetas = [0.8, 0.9]\n")
    config = load_config(path, ["--training.steps=3", "--rl.routing_replay", "false", "--job.seed=4"])
    assert config.training.steps == 3 and config.rl.kl_coef == 0.5 and config.job.seed == 4
    assert config.rl.routing_replay is False and config.optimizer.betas == [0.8, 0.9]


def test_resolved_config_round_trips_through_toml():
    config = load_config(None, ["--rollout.temperature=0.7", "--model.preset=20b"])
    assert load_config(None) != config
    data = tomllib.loads(to_toml(config))
    assert data["rollout"]["temperature"] == 0.7 and data["model"]["preset"] == "20b"


def test_every_shipped_config_loads():
    from pathlib import Path

    configs = sorted(Path(__file__).parents[3].joinpath("train_configs").glob("*.toml"))
    assert configs
    for path in configs:
        load_config(path)


@pytest.mark.parametrize(
    "toml,overrides,message",
    [
        (
            "[training]\nstepz = 1\n",
            [],
            "unknown key training.stepz \\(did you mean steps\\?\\); valid keys of \\[training\\]: steps",
        ),
        (
            "[trainin]\nsteps = 1\n",
            [],
            "unknown config section \\[trainin\\] \\(did you mean training\\?\\); valid sections: job",
        ),
        ("", ["--rl.kl-coef=0.1"], "unknown key rl.kl-coef \\(did you mean kl_coef\\?\\)"),
        ("", ["--rl.zzz=1"], "unknown key rl.zzz; valid keys of \\[rl\\]"),
        ('[training]\nsteps = "many"\n', [], "training.steps must be int"),
        ("[training]\nsteps = 1.5\n", [], "training.steps must be int"),
        ("", ["--training.steps=abc"], "--training.steps must be int"),
        ("", ["--rl.routing_replay=maybe"], "must be true or false"),
        (
            "",
            ["--rl.old_logprob_mode=twice"],
            "rl.old_logprob_mode = 'twice' is not one of unified, recompute",
        ),
        ("", ["--rl.nope=1"], "unknown key rl.nope"),
        ("", ["training.steps=1"], "overrides look like --section.key=value"),
        ("", ["--training.steps=0"], "training.steps must be >= 1"),
        ("", ["--rollout.max_batch_rows=-1"], "rollout.max_batch_rows must be >= 0"),
        (
            "",
            ["--rollout.decode=graph"],
            "rollout.decode = 'graph' is not one of auto, eager, static, cuda_graph",
        ),
        ("[training\n", [], "invalid TOML"),
        (
            "",
            ["--model.activation_dtype=float32", "--model.attn_backend=flash"],
            "the flash kernel cannot; set model.attn_backend = 'auto'",
        ),
        (
            "",
            ["--model.activation_dtype=float32", "--rollout.engine=vllm"],
            "is for the native engine.*set model.activation_dtype = 'auto' or rollout.engine = 'native'",
        ),
    ],
)
def test_bad_configs_name_the_problem(tmp_path, toml, overrides, message):
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_config(path, overrides)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_dual_clip_with_gspo_is_refused():
    """GSPO clips the sequence ratio with no dual clip: the setting would be ignored silently."""
    load_config(None, ["--rl.dual_clip=3"])  # ppo: fine
    with pytest.raises(ConfigError, match="dual_clip"):
        load_config(None, ["--rl.dual_clip=3", "--rl.policy_loss=gspo"])


def test_dr_grpo_without_its_aggregation_is_warned_about():
    from titan_rl.config.loader import config_warnings

    assert config_warnings(load_config(None, [])) == []
    (slow,) = config_warnings(load_config(None, ["--env.reward_timeout_s=900"]))
    assert "env.reward_timeout_s = 900 s >= parallelism.collective_timeout_s = 600 s" in slow
    half = config_warnings(load_config(None, ["--rl.advantage=dr_grpo"]))
    assert len(half) == 1 and "seq-mean-token-sum-norm" in half[0]
    whole = ["--rl.advantage=dr_grpo", "--rl.aggregation=seq-mean-token-sum-norm"]
    assert config_warnings(load_config(None, whole)) == []


def test_vllm_with_truncated_sampling_is_warned_about():
    from titan_rl.config.loader import config_warnings

    vllm = ["--rollout.engine=vllm"]
    assert config_warnings(load_config(None, vllm)) == []
    assert config_warnings(load_config(None, ["--rollout.top_p=0.9"])) == []  # native: unmasked
    for sampling in ("--rollout.top_p=0.9", "--rollout.top_k=20"):
        (warning,) = config_warnings(load_config(None, [*vllm, sampling]))
        assert "kept mass" in warning


@pytest.mark.parametrize(
    "override,message",
    [
        ("--optimizer.lr=-1", "optimizer.lr must be > 0"),
        ("--rl.clip_eps_low=1.5", "rl.clip_eps_low = 1.5 must be in [0, 1)"),
        ("--rl.kl_coef=-1", "rl.kl_coef = -1.0 must be >= 0"),
        ("--rl.dual_clip=0.5", "rl.dual_clip = 0.5 must be > 1"),
        ("--rl.correction_threshold=0.5", "rl.correction_threshold = 0.5 must be > 1"),
        ("--rollout.top_p=2", "rollout.top_p must be in (0, 1]"),
        ("--rollout.top_k=-5", "rollout.top_k must be >= 0"),
        ("--lr_scheduler.min_lr_ratio=3", "lr_scheduler.min_lr_ratio is the floor's share"),
        ("--rollout.group_size=1", "every advantage is 0"),
        ("--env.python_tool=true", "env.python_tool is for env.name = 'math'"),
        ("--env.data_path=x.jsonl", "env.data_path is for env.name = 'math'"),
        ("--training.max_skipped_steps=0", "training.max_skipped_steps must be >= 1"),
        ("--optimizer.weight_decay=-1", "optimizer.weight_decay must be >= 0"),
        ("--optimizer.eps=0", "optimizer.eps must be > 0"),
        ("--env.target_modulus=0", "env.target_modulus must be >= 1"),
        ("--env.keys_per_task=0", "env.keys_per_task must be >= 1"),
        ("--optimizer.betas=[0.9]", "optimizer.betas must be two values in [0, 1)"),
        ("--optimizer.betas=[0.9, 1.5]", "optimizer.betas must be two values in [0, 1)"),
        ("--rollout.vllm_gpu_memory_utilization=5", "rollout.vllm_gpu_memory_utilization is a fraction"),
        ("--env.tool_timeout_s=0", "env.tool_timeout_s must be > 0"),
        ("--parallelism.collective_timeout_s=0", "parallelism.collective_timeout_s must be > 0"),
        ("--rollout.max_new_tokens=300", "training.seq_len = 256 < env.prompt_len + rollout.max_new_tokens"),
    ],
)
def test_values_that_cannot_be_meant_are_config_errors_naming_the_key(override, message):
    """Checked by --check-config before any process starts (they used to fail after the launch with
    the loss's own names, or train nothing)."""
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert message in str(error.value)


def test_a_warmup_longer_than_the_run_is_warned_about():
    from titan_rl.config.loader import config_warnings

    (warning,) = config_warnings(load_config(None, ["--training.steps=10", "--lr_scheduler.warmup_steps=50"]))
    assert "never reached" in warning and "10 optimizer steps" in warning
    assert config_warnings(load_config(None, ["--training.steps=10", "--lr_scheduler.warmup_steps=10"])) == []


def test_the_defaults_run_every_environment_together():
    """An agentic environment with every other key at its default passes the checks (the default
    episode budget was longer than the default packed row)."""
    for name in ("tool_lookup", "math", "token_preference"):
        load_config(None, [f"--env.name={name}"])

"""ParallelDims / ParallelConfig validation: bad layouts fail before any process group exists."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from tests.conftest import tiny_args, tiny_model
from titan_rl.config.job_config import Parallelism
from titan_rl.parallel import ParallelConfig, ParallelDims, parallelize_gpt_oss


def dims(dp_replicate: int = 1, dp_shard: int = 1, cp: int = 1, ep: int = 1, world_size: int = 1, **kw):
    return ParallelDims(dp_replicate, dp_shard, cp, ep, world_size, device_type="cpu", **kw)


def test_valid_layout_degrees_and_switches() -> None:
    d = dims(dp_replicate=2, dp_shard=2, cp=2, ep=4, world_size=8)
    assert (d.dp, d.efsdp) == (4, 1)
    assert d.dp_enabled and d.dp_replicate_enabled and d.cp_enabled and d.ep_enabled and d.fsdp_enabled
    one = dims()
    assert not (one.dp_enabled or one.cp_enabled or one.ep_enabled or one.fsdp_enabled or one.distributed)
    assert dims(dp_shard=4, ep=2, world_size=4).efsdp == 2


def test_from_job_config() -> None:
    d = ParallelDims.from_config(Parallelism(dp_shard=2, cp=2, cp_mode="ring", ep=4), world_size=4)
    assert (d.dp_replicate, d.dp_shard, d.cp, d.ep, d.cp_mode) == (1, 2, 2, 4, "ring")


def test_world_size_mismatch_names_the_setting() -> None:
    with pytest.raises(ValueError, match=r"dp_replicate=1 x dp_shard=2 x cp=1 = 2 != world size 4; "
                       r"set parallelism.dp_shard = 4"):  # fmt: skip
        dims(dp_shard=2, world_size=4)
    with pytest.raises(ValueError, match="= 3 != world size 4; launch 3 processes"):
        dims(dp_replicate=3, world_size=4)


def test_ep_must_divide_dp_shard_times_cp() -> None:
    with pytest.raises(
        ValueError, match=r"parallelism.ep = 3 must divide dp_shard x cp .* one of \[1, 2, 4\]"
    ):
        dims(dp_shard=2, cp=2, ep=3, world_size=4)
    with pytest.raises(ValueError, match=r"parallelism\.ep = 4 must divide"):  # ep cannot span replicas
        dims(dp_replicate=2, dp_shard=2, ep=4, world_size=4)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dp_shard": 0}, "parallelism.dp_shard = 0 must be an integer >= 1"),
        ({"ep": -1}, "parallelism.ep = -1 must be"),
        ({"cp_mode": "stripes"}, "parallelism.cp_mode = 'stripes' is not one of ulysses, ring"),
    ],
)
def test_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        dims(**kwargs)


def test_model_checks() -> None:
    args = tiny_args(num_local_experts=6, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(
        ValueError, match=r"parallelism.ep = 4 must divide .* num_local_experts = 6; .*\[1, 2\]"
    ):
        dims(dp_shard=4, ep=4, world_size=4).validate_model(args)
    with pytest.raises(ValueError, match=r"parallelism\.cp = 8 with cp_mode = 'ulysses' must divide"):
        dims(cp=8, world_size=8).validate_model(args)
    dims(cp=8, world_size=8, cp_mode="ring").validate_model(args)  # ring has no head constraint
    dims(dp_shard=2, ep=2, world_size=2).validate_model(args)


def test_invalid_layout_fails_before_any_collective() -> None:
    model = tiny_model(num_local_experts=3)
    with pytest.raises(
        ValueError, match=r"parallelism\.ep = 2 must divide the model's num_local_experts = 3"
    ):
        parallelize_gpt_oss(model, dims(dp_shard=2, ep=2, world_size=2))
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="build_mesh"):
        dims(dp_shard=2, world_size=2).get_mesh("dp")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"activation_checkpoint": "some"},
            "activation_checkpoint = 'some' is not one of none, full, selective",
        ),
        ({"selective_every": 0}, "selective_every = 0 must be >= 1"),
        ({"mixed_precision": "fp8"}, "mixed_precision = 'fp8' is not one of auto, bf16, fp32"),
    ],
)
def test_bad_parallel_config(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ParallelConfig(**kwargs)

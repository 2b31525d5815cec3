"""Context parallelism: index layouts here, exactness vs one process under torchrun (cp_worker.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_model
from tests.distributed.launcher import run_torchrun
from titan_rl.parallel.context_parallel import apply_context_parallel, kv_repeat_for_ulysses, shard_indices
from titan_rl.parallel.ring_attention import may_attend

WORKER = Path(__file__).with_name("cp_worker.py")


def test_shard_indices_cover_the_sequence_once():
    assert shard_indices(8, 2, 1, "ulysses").tolist() == [4, 5, 6, 7]
    assert shard_indices(8, 2, 0, "ring").tolist() == [0, 1, 6, 7]  # chunks 0 and 3
    assert shard_indices(8, 2, 1, "ring").tolist() == [2, 3, 4, 5]  # chunks 1 and 2
    for mode in ("ulysses", "ring"):
        everything = torch.cat([shard_indices(24, 4, r, mode) for r in range(4)])
        assert sorted(everything.tolist()) == list(range(24))


def test_bad_lengths_and_modes_are_clear_errors():
    with pytest.raises(ValueError, match="divisible by 4"):
        shard_indices(6, 2, 0, "ring")
    with pytest.raises(ValueError, match="divisible by cp = 4"):
        shard_indices(6, 4, 0, "ulysses")
    with pytest.raises(ValueError, match="ulysses"):
        apply_context_parallel(tiny_model(num_hidden_layers=1), None, "stripes")  # checked before the mesh


def test_kv_repeat_for_ulysses():
    assert kv_repeat_for_ulysses(64, 8, 8) == 1  # gpt-oss: one kv head per rank
    assert kv_repeat_for_ulysses(4, 1, 2) == 2  # kv heads < cp: each rank gets a copy
    assert kv_repeat_for_ulysses(64, 8, 16) == 2
    assert kv_repeat_for_ulysses(6, 3, 2) == 2
    with pytest.raises(ValueError, match="ring"):
        kv_repeat_for_ulysses(6, 3, 4)


def test_ring_skips_blocks_the_masks_rule_out():
    assert may_attend(8, 0, 4, None) and not may_attend(0, 8, 4, None)
    assert may_attend(8, 4, 4, 2)  # query 8 sees key 7
    assert not may_attend(8, 0, 4, 5)  # nearest pair 8 - 3 = 5 >= window


def test_context_parallel_matches_one_process():
    """cp=2 ulysses and ring: outputs, loss and every gradient (sinks too) within rel 1e-5."""
    output = run_torchrun(WORKER, nproc=2, timeout=120.0)
    for name in (
        "attention ulysses kv_heads=1",
        "attention ring sinks+8",
        "model ring docs",
        "model ulysses docs",
    ):
        assert f"case {name} ok" in output, output[-3000:]
    assert output.count("cases ok") == 2, output[-3000:]

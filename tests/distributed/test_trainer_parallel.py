"""``Trainer`` on 2 CPU ranks (gloo) equals ``Trainer`` in one process, step by step.

Unlike ``test_parallel_layouts`` (the model and a hand-written loss), this runs the trainer's own
data-parallel code: each rank's rows, the global token / trajectory counts its losses are
normalized by, the summed gradients, the metrics' all-reduce. See ``trainer_parallel_worker.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.launcher import run_torchrun

WORKER = Path(__file__).with_name("trainer_parallel_worker.py")
LAYOUTS = [
    "dp_shard=2",
    "dp_replicate=2,aggregation=seq-mean-token-mean",
    "dp_shard=2,ep=2",
    "cp=2",
    "cp=2,routing=1",  # the engine's routing replayed: sharded along the sequence like the tokens
    "dp_shard=2,ep=2,routing=1",
    "dp_shard=2,ep=2,kl=reward",  # the KL to the reference: rows over ranks, experts sharded
    "cp=2,kl=reward",  # ... sequence shards summed over cp ranks
    # sequence-level terms over cp shards of each sequence: per-sequence token counts, GSPO's
    # sequence ratio, a sequence-level MIS that drops whole trajectories (the kept-count rescale)
    "cp=2,aggregation=seq-mean-token-mean,policy=gspo",
    "cp=2,cp_mode=ring,aggregation=seq-mean-token-mean,policy=gspo",  # zig-zag shards
    "cp=2,aggregation=seq-mean-token-mean,correction=mis-sequence",
    "cp=2,aggregation=seq-mean-token-sum-norm,correction=tis-sequence",
]


@pytest.mark.timeout(200)
def test_trainer_on_two_ranks_matches_one_process() -> None:
    output = run_torchrun(WORKER, *LAYOUTS, nproc=2, timeout=180.0)
    assert output.count(": ok") == 2, output[-3000:]
    for layout in LAYOUTS:
        assert f"layout {layout}: compared 3 steps" in output, output[-3000:]

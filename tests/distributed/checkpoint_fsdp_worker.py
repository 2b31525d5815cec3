"""torchrun worker: FSDP2 resume and HF save/load on 2 CPU ranks (gloo). Exits non-zero on mismatch."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from tests.unit.checkpoint.training import make_training, train
from titan_rl.checkpoint.hf import load_hf_model, load_hf_state_dict_into, save_hf_model
from titan_rl.checkpoint.manager import CheckpointManager


def full_params(model) -> dict[str, torch.Tensor]:
    return {name: p.full_tensor() for name, p in model.named_parameters()}


def check(ok: bool, what: str) -> None:
    if not ok:
        raise SystemExit(f"rank {dist.get_rank()}: {what}")


def main(folder: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))

    def shard(model):
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)

    manager = CheckpointManager(folder / "ckpt", interval=2, keep_last=2)
    model, optimizer, scheduler = make_training(seed=0, shard=shard)
    torch.manual_seed(100 + rank)  # each rank draws its own batches
    reference = train(model, optimizer, scheduler, range(1, 5), manager)

    resumed, optimizer2, scheduler2 = make_training(seed=1, shard=shard)
    torch.manual_seed(999 + rank)  # overwritten by the restored RNG state
    step, extra = manager.load(resumed, optimizer2, scheduler2, path=folder / "ckpt" / "step-000002")
    check((step, extra) == (2, {"cursor": 20}), f"resumed at {(step, extra)}")
    losses = train(resumed, optimizer2, scheduler2, range(3, 5))
    check(all(torch.equal(a, b) for a, b in zip(reference[2:], losses)), f"losses {reference} vs {losses}")
    expected = full_params(model)
    for name, tensor in full_params(resumed).items():
        check(torch.equal(tensor, expected[name]), f"parameter {name} differs after resume")

    # resuming the newest checkpoint: every rank takes rank 0's, even one whose listing of the
    # shared folder is stale (as NFS can be after a restart) and shows an older one as newest
    if rank == 1:
        manager.latest = lambda: folder / "ckpt" / "step-000002"
    again, optimizer3, scheduler3 = make_training(seed=3, shard=shard)
    step, _ = manager.load(again, optimizer3, scheduler3)
    check(step == 4, f"rank {rank} resumed step {step}, not rank 0's newest (4)")
    for name, tensor in full_params(again).items():
        check(torch.equal(tensor, expected[name]), f"parameter {name} differs after resuming the newest")

    # a save that fails on one rank only (its disk full) raises on both, none waits in a barrier for
    # it; the partial folder goes and the newest complete checkpoint stays the newest
    import titan_rl.checkpoint.manager as checkpoint_manager

    real_write = checkpoint_manager._write_synced

    def full_disk_on_rank_1(file, content):
        if rank == 1:
            raise OSError(28, "No space left on device")
        real_write(file, content)

    checkpoint_manager._write_synced = full_disk_on_rank_1
    try:
        manager.save(6, model, optimizer, scheduler, {"cursor": 60})
    except checkpoint_manager.CheckpointSaveError as e:
        check("rank 1: OSError: [Errno 28]" in str(e) and "rank 0:" not in str(e), f"error: {e}")
    else:
        check(False, "a save that failed on rank 1 returned")
    finally:
        checkpoint_manager._write_synced = real_write
    dist.barrier()
    check(manager.checkpoints()[-1].name == "step-000004", f"newest {manager.checkpoints()}")
    check(not list((folder / "ckpt").glob("*.tmp")), "the partial folder stayed")

    # HF save gathers one tensor at a time on every rank; loading keeps each rank's shard.
    save_hf_model(model, folder / "hf", dtype=torch.float32, max_shard_bytes=100_000)
    dist.barrier()
    fresh, _, _ = make_training(seed=2, shard=shard)
    load_hf_state_dict_into(fresh, folder / "hf")
    for name, tensor in full_params(fresh).items():
        check(torch.equal(tensor, expected[name]), f"parameter {name} differs after HF save/load")
    if rank == 0:
        plain = load_hf_model(folder / "hf")
        for name, tensor in plain.named_parameters():
            check(torch.equal(tensor, expected[name]), f"plain load of {name} differs")
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank}: ok")


if __name__ == "__main__":
    main(Path(sys.argv[1]))

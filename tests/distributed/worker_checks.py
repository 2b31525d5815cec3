"""What torchrun workers share: collect failed checks on each rank, report them all at the end.

A worker calls ``check(ok, what)`` as it goes (a failure does not stop the rank, so the others are
not left waiting in a collective) and ``finish()`` last: after a barrier it ends the process group,
then exits non-zero with the failures, or prints ``rank R: ok``.
"""

from __future__ import annotations

import sys

import torch.distributed as dist

failures: list[str] = []


def check(ok: bool, what: str) -> None:
    if not ok:
        failures.append(f"rank {dist.get_rank()}: {what}")


def finish(shown: int = 30) -> None:
    """Barrier, end the process group, then raise the first ``shown`` failures or say ok."""
    rank = dist.get_rank()
    dist.barrier()
    dist.destroy_process_group()
    if failures:
        raise SystemExit("\n".join(failures[:shown]))
    sys.stdout.write(f"rank {rank}: ok\n")  # one write: the ranks' lines do not run into each other
    sys.stdout.flush()

"""torchrun worker (2 CPU ranks, gloo): ``claim_run_folder`` on every rank.

argv: <folder of rank 0> <folder of rank 1> <expect: ok | in use | cannot see>. With "ok" both
ranks claim the folder and rank 0's probe file is gone afterwards; otherwise both ranks must raise
the same RunFolderError (none left waiting in a collective), whose text contains the expectation.
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import torch.distributed as dist

from titan_rl.run_folder import RunFolderError, claim_run_folder


def main() -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    folder, expect = Path(sys.argv[1 + rank]), sys.argv[3]
    try:
        lock = claim_run_folder(folder, shared=True)
    except RunFolderError as e:
        assert expect != "ok" and expect in str(e), str(e)
        if expect == "cannot see":
            assert "rank 1 on " in str(e) and "rank 0" not in str(e).split("cannot see")[0], str(e)
    else:
        assert expect == "ok", f"rank {rank}: no error, expected {expect!r}"
        dist.barrier()
        assert not list(folder.glob(".shared-*")), list(folder.iterdir())
        assert (lock is not None) == (rank == 0)
    print(f"rank {rank}: ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

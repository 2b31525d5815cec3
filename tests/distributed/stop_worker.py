"""torchrun worker (2 CPU ranks, gloo): ``StopRequest.agreed``. Only rank 1 notes a signal (as when
the scheduler signals one node first); both ranks must stop on it, and with none neither stops."""

from __future__ import annotations

import datetime
import os
import signal

import torch
import torch.distributed as dist

from titan_rl.stop import StopRequest


def main() -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    with StopRequest() as stop:
        assert stop.agreed(torch.device("cpu")) is None
        if rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        dist.barrier()
        got = stop.agreed(torch.device("cpu"))
        assert got == signal.SIGUSR1, f"rank {rank}: {got}"
    print(f"rank {rank}: ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

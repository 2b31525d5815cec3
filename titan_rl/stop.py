"""Stopping a run cleanly on a scheduler's signal: finish the step, checkpoint, exit.

A cluster scheduler preempting a job, or reaching its time limit, sends SIGTERM (torchrun forwards
it to the ranks and kills them some 30 s later), and Slurm can send SIGUSR1 earlier
(``--signal=USR1@600``). Killing the ranks at once loses every step since the last checkpoint.
Instead each rank notes the signal; at the end of every step the ranks agree (one all-reduce of a
flag: a rank that got no signal stops with the others) and the run saves a checkpoint of that
step and exits with 128 + the signal's number. SIGINT (Ctrl-C) still stops at once.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Notes SIGTERM / SIGUSR1 while installed (``with StopRequest() as stop``); the first one wins."""

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # (only it can take signals)
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is None:
            self.signal = signal.Signals(signum)

    def agreed(self, device: torch.device) -> signal.Signals | None:
        """The signal to stop on if any rank got one (collective with several processes), else None."""
        mine = int(self.signal or 0)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([mine], dtype=torch.int64, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            mine = int(flag.item())
        return signal.Signals(mine) if mine else None

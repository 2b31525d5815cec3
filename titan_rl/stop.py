"""Stopping a run cleanly on a scheduler's notice: finish the step, checkpoint, exit.

Slurm can send SIGUSR1 ahead of a job's time limit or a preemption (``--signal=USR1@600``: ten
minutes' notice). Each rank notes it; at the end of every step the ranks agree (one all-reduce of
a flag: a rank that got no signal stops with the others), save a checkpoint of that step and exit
with 128 + SIGUSR1 (138). ``titan_rl.launch`` (run_train.sh) forwards a SIGUSR1 it receives to the
ranks. SIGTERM keeps its default: it is also how torchrun stops the surviving ranks when one dies,
and they must go at once; a scheduler's SIGTERM kills the run (torchrun gives the ranks 30 s, less
than an RL step and a GPT-OSS checkpoint take). SIGINT (Ctrl-C) stops at once too.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGUSR1,)
# set by titan_rl.launch once it got a SIGUSR1: a rank torchrun starts after that (--max-restarts
# restarting the stopped ones) stops at once, before building anything
STOPPED_ENV = "TITAN_RL_STOPPED"


class StopRequest:
    """Notes SIGUSR1 between ``install`` and ``restore`` (or ``with StopRequest() as stop``)."""

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # (only it can take signals)
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def restore(self) -> None:
        """The previous handlers back; after a stop, a second notice is ignored while the rank exits."""
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if self.signal is not None else handler)

    def __enter__(self) -> StopRequest:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()

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

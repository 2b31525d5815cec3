"""Which rank failed? A heartbeat in the rendezvous store, read when a collective fails.

A collective that fails (gloo: "Connection reset by peer"; NCCL / gloo: timed out after
``parallelism.collective_timeout_s``) does not say which rank stopped. Every rank writes a counter to
the process group's store once per ``interval`` from a daemon thread; a rank whose counter stops
moving is dead or hung. A rank that merely *saw* the failure marks itself as a witness before it
exits, so it is not blamed.
"""

from __future__ import annotations

import threading
import time

import torch.distributed as dist

_KEY = "titan_rl/heartbeat/{}"
_WITNESS = "titan_rl/witness/{}"
COLLECTIVE_ERRORS = ("gloo", "NCCL", "Connection reset", "Connection closed", "timed out", "Timed out")


def is_collective_failure(error: BaseException) -> bool:
    """A failed or timed-out collective (as opposed to a bug in this rank's own code)."""
    if isinstance(error, dist.DistError):
        return True
    return isinstance(error, RuntimeError) and any(s in str(error) for s in COLLECTIVE_ERRORS)


class Heartbeat:
    """``start()`` after ``init_process_group``; ``suspects()`` after a collective failed."""

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.store = dist.distributed_c10d._get_default_store()  # the rendezvous store every rank shares
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="titan_rl-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop beating and wait for the thread: a daemon thread still inside a store call when the
        interpreter exits is torn down mid C++ call, which can abort the process (SIGABRT) after a
        clean run."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _beat(self) -> None:
        count = 0
        while not self._stop.is_set():
            try:
                self.store.set(_KEY.format(self.rank), str(count))
            except Exception:  # the store's host (rank 0 or the agent) is gone; nothing left to do
                return
            count += 1
            self._stop.wait(self.interval)

    def _counts(self) -> list[str | None]:
        counts: list[str | None] = []
        for rank in range(self.world):
            key = _KEY.format(rank)
            counts.append(self.store.get(key).decode() if self.store.check([key]) else None)
        return counts

    def suspects(self) -> list[int] | None:
        """Ranks whose heartbeat stopped (and that did not report seeing the failure themselves).

        Takes about ``3 * interval`` seconds. None when the store cannot be reached: its host died.
        """
        try:
            self.store.set(_WITNESS.format(self.rank), "1")
            before = self._counts()
            time.sleep(3 * self.interval)
            after = self._counts()
            witnesses = {r for r in range(self.world) if self.store.check([_WITNESS.format(r)])}
        except Exception:
            return None
        return [r for r in range(self.world) if before[r] == after[r] and r not in witnesses]


def describe_collective_failure(error: BaseException, heartbeat: Heartbeat | None, timeout_s: float) -> str:
    """One line: what failed, where, and the ranks that stopped beating."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    suspects = heartbeat.suspects() if heartbeat is not None else None
    if suspects:
        culprit = f"rank {', '.join(map(str, suspects))} stopped responding (dead or hung)"
    elif suspects is None and heartbeat is not None:
        culprit = "the rendezvous store is unreachable: rank 0 (or the launcher) is gone"
    else:
        culprit = "no rank could be singled out"
    return (
        f"collective failed on rank {rank}: {culprit}; parallelism.collective_timeout_s = {timeout_s:g}. "
        f"Cause: {first[:300]}"
    )


__all__ = ["Heartbeat", "describe_collective_failure", "is_collective_failure"]

"""The heartbeat thread that names a dead rank (``titan_rl.parallel.health``)."""

from __future__ import annotations

import threading
import time

import torch.distributed as dist

from titan_rl.parallel.health import Heartbeat


class SlowStore:
    """A store whose ``set`` takes a while, as a remote TCP store can."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.inside = threading.Event()
        self.sets = 0

    def set(self, key: str, value: str) -> None:
        self.inside.set()
        time.sleep(self.delay)
        self.sets += 1


def test_stop_returns_only_after_the_heartbeat_thread_has_left_the_store(single_process_group):
    """A daemon thread still inside a store call at interpreter exit can abort a finished rank."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    heartbeat = Heartbeat(interval=0.01)
    store = heartbeat.store = SlowStore(delay=0.3)
    heartbeat.start()
    assert store.inside.wait(5.0)
    heartbeat.stop()
    assert not heartbeat._thread.is_alive()  # the store call it was in has returned
    assert store.sets >= 1

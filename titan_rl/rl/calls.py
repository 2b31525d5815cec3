"""Calls into user code that may raise, hang or never return: tool calls and reward functions.

Each runs on a worker thread under a wall-clock limit from its own start; one past it is
abandoned (Python cannot stop a thread) and counted as stranded until it returns, and past a cap
of stranded calls new ones fail at once instead of starting more threads. Worker threads use the
caller's CUDA device. ``safe_rewards`` turns a reward call's outcome into a score.
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch


class _ToolThread(threading.Thread):
    """Runs one tool call; ``slots`` caps concurrency and is released early if the call is abandoned."""

    def __init__(self, call: Callable[[], Any], slots: threading.Semaphore) -> None:
        super().__init__(daemon=True)
        self.call, self.slots, self.lock = call, slots, threading.Lock()
        self.started: float | None = None
        self.finished = self.abandoned = False
        self.value: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        self.slots.acquire()
        with self.lock:
            self.started = time.monotonic()
        try:
            self.value = self.call()
        except BaseException as error:  # a tool must never end the episode, whatever it raises
            self.error = error
        finally:
            with self.lock:
                self.finished = True
                if not self.abandoned:
                    self.slots.release()


_stranded: list[_ToolThread] = []  # calls abandoned at their time limit that have not returned yet
_stranded_lock = threading.Lock()


def _strand(thread: _ToolThread) -> None:
    with _stranded_lock:
        _stranded.append(thread)


def stranded_calls() -> int:
    """Tool and reward calls abandoned at their time limit and still running (a thread each: Python
    cannot stop a thread, so a tool that never returns keeps one for the process's life)."""
    with _stranded_lock:
        _stranded[:] = [t for t in _stranded if t.is_alive()]
        return len(_stranded)


def too_many_stranded(limit: int, what: str) -> str | None:
    """The error for calls not started because ``limit`` stranded calls are still running, or None."""
    stranded = stranded_calls()
    if stranded < limit:
        return None
    warnings.warn(
        f"{stranded} tool / reward calls are still running past their time limit (the most kept is "
        f"{limit}): {what} not run until some return; a tool or reward that never returns needs fixing",
        stacklevel=3,
    )
    return f"{stranded} earlier calls are still running past their time limit"


def _on_callers_device(call: Callable[[], Any]) -> Callable[[], Any]:
    """``call`` for another thread, on the caller's current CUDA device (it is per thread: a new
    thread starts on cuda:0, and a reward model or tool of rank k would run on GPU 0)."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return call
    device = torch.cuda.current_device()

    def on_device() -> Any:
        torch.cuda.set_device(device)
        return call()

    return on_device


def run_calls(calls: list[Callable[[], Any]], timeout_s: float, concurrency: int) -> list[_ToolThread]:
    """Run zero-argument ``calls`` concurrently (at most ``concurrency`` at once), each limited to
    ``timeout_s`` from the moment it starts; returns their finished or abandoned threads."""
    slots = threading.Semaphore(concurrency)
    threads = [_ToolThread(_on_callers_device(call), slots) for call in calls]
    for thread in threads:
        thread.start()
    pending = list(threads)
    while pending:
        time.sleep(0.002)
        now, still = time.monotonic(), []
        for thread in pending:
            with thread.lock:
                if thread.finished:
                    continue
                if thread.started is not None and now - thread.started > timeout_s:
                    thread.abandoned = True
                    slots.release()
                    _strand(thread)
                    continue
            still.append(thread)
        pending = still
    return threads


def safe_reward(
    reward: Callable[..., float], *args: Any, timeout_s: float = 0.0, max_stranded: int = 256
) -> tuple[float, bool]:
    """``safe_rewards`` of the one call ``reward(*args)``."""
    return safe_rewards([lambda: reward(*args)], timeout_s, max_stranded)[0]


_MAIN_THREAD_ONLY = "signal only works in main thread"  # Python's ValueError from signal.signal
_rewards_need_main_thread = False  # set once a reward raised it: later calls run there at once


def safe_rewards(
    calls: list[Callable[[], Any]], timeout_s: float = 0.0, max_stranded: int = 256, concurrency: int = 1
) -> list[tuple[float, bool]]:
    """Each zero-argument reward call's value, or 0 and ``True`` (counted as a reward error, with a
    warning) when it raises (``SystemExit`` too), returns a value that is not a finite number (a NaN
    would make its whole group's advantages NaN and the step be skipped as the model's fault), or
    runs longer than ``timeout_s``.

    ``timeout_s > 0``: the calls run on worker threads, ``concurrency`` at once (more than 1 for
    I/O-bound rewards such as a judge service: CPU-bound Python ones share the GIL and each would
    take ``concurrency`` times as long against its limit), each limited from its own start, none
    while ``max_stranded`` abandoned calls still run. Reward code that raises "signal only works in
    main thread" (a ``signal.alarm`` time limit in it) is rerun on this thread, unlimited, with a
    warning, and from then on every reward runs there (the first such call ran twice). ``0``: one
    after another on this thread, unlimited."""
    global _rewards_need_main_thread
    if timeout_s <= 0 or _rewards_need_main_thread:
        return [_reward_score(*_call_here(call)) for call in calls]
    if calls and too_many_stranded(max_stranded, "reward calls") is not None:
        return [(0.0, True)] * len(calls)
    scores = []
    for call, thread in zip(calls, run_calls(calls, timeout_s, concurrency)):
        if thread.abandoned:
            warnings.warn(
                f"reward function ran past {timeout_s:g} s (env.reward_timeout_s); reward 0", stacklevel=2
            )
            scores.append((0.0, True))
        elif isinstance(thread.error, ValueError) and str(thread.error).startswith(_MAIN_THREAD_ONLY):
            if not _rewards_need_main_thread:
                warnings.warn(
                    f"the reward function needs the main thread ({thread.error}): from now on rewards "
                    "run there, without env.reward_timeout_s (set it to 0 to say so)",
                    stacklevel=2,
                )
            _rewards_need_main_thread = True
            scores.append(_reward_score(*_call_here(call)))
        else:
            scores.append(_reward_score(thread.value, thread.error))
    return scores


def _call_here(call: Callable[[], Any]) -> tuple[Any, BaseException | None]:
    """``call()`` on this thread: its value, or the exception it raised (not KeyboardInterrupt)."""
    try:
        return call(), None
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # a buggy reward function must not end the run
        return None, e


def _reward_score(value: Any, error: BaseException | None) -> tuple[float, bool]:
    if isinstance(error, KeyboardInterrupt):
        raise error
    if error is not None:
        warnings.warn(f"reward function raised {type(error).__name__}: {error}; reward 0", stacklevel=3)
        return 0.0, True
    try:  # (text is not a score, though float() would read "1.0")
        number = math.nan if isinstance(value, (str, bytes)) else float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        warnings.warn(f"reward function returned {value!r}, not a finite number; reward 0", stacklevel=3)
        return 0.0, True
    return number, False

"""``torchrun`` with a one-line failure report: ``python -m titan_rl.launch [torchrun args]``.

torchrun ends a failed run with its own Python traceback and a framed report. The rank's own
message (``error: ...``) is already on stderr above it, so this wrapper replaces the launcher's
traceback with one line per failed rank and exits with the first failure's code. ``--debug`` among
the training arguments keeps torchrun's full report.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run

from titan_rl.stop import STOPPED_ENV


def describe_exit(exitcode: int) -> str:
    """``exited with code 2`` or ``was killed by SIGKILL``."""
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def children(pid: int | None = None) -> list[int]:
    """The child processes of ``pid`` (default: this process; torchrun's ranks), from /proc."""
    me, found = os.getpid() if pid is None else pid, []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()  # after "pid (name)": state, ppid, ...
            except OSError:
                continue
            if int(fields[1]) == me:
                found.append(int(entry))
    return found


def catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (its ``SigCgt`` mask in /proc)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            mask = next(line.split()[1] for line in f if line.startswith("SigCgt:"))
    except (OSError, StopIteration):
        return False
    return bool(int(mask, 16) >> (signum - 1) & 1)


class StopForwarder:
    """A scheduler's SIGUSR1 to the launcher reaches every rank (torchrun forwards only SIGTERM,
    SIGINT, SIGHUP and SIGQUIT, and SIGUSR1's default would kill the launcher and orphan the ranks).

    A rank gets it once it handles SIGUSR1 (``titan_rl.stop``, installed as its ``main`` starts): a
    rank still importing would be killed by it, and one torchrun has not started yet would miss it.
    So the request stays pending and a thread delivers it to each rank as it becomes ready, ranks
    torchrun restarts (``--max-restarts``) included: those stop after their first step too."""

    def __init__(self, poll_s: float = 0.1) -> None:
        self.poll_s = poll_s
        self.delivered: set[int] = set()
        self.thread: threading.Thread | None = None

    def __call__(self, signum: int, frame: object) -> None:
        os.environ[STOPPED_ENV] = "1"  # ranks torchrun starts from now on (restarts) inherit it
        if self.thread is None:
            self.thread = threading.Thread(target=self._deliver, name="titan_rl-stop", daemon=True)
            self.thread.start()

    def _deliver(self) -> None:
        while True:
            for pid in children():
                if pid not in self.delivered and catches(pid, signal.SIGUSR1):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGUSR1)
                    self.delivered.add(pid)
            time.sleep(self.poll_s)


STOPPED = 128 + signal.SIGUSR1  # a rank's exit code after a SIGUSR1 stop (titan_rl.stop): checkpointed


class _NoFailureLine(logging.Filter):
    """Drops torchrun's ``failed (exitcode: N) local_rank: ...`` error line: this launcher reports
    each failure in one line of its own (and a SIGUSR1 stop, exit 138, is no failure)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("failed (exitcode")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if os.path.isdir("/proc"):
        signal.signal(signal.SIGUSR1, StopForwarder())
    if "--debug" in argv:
        from torch.distributed.run import main as torchrun

        torchrun(argv)
        return 0
    args = parse_args(argv)
    if not getattr(args, "max_restarts", 0):  # (with restarts torchrun's line tells what it restarted)
        logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_NoFailureLine())
    try:
        run(args)
    except SignalException as e:  # Ctrl-C or a scheduler's SIGTERM: the ranks were stopped too
        name = signal.Signals(e.sigval).name
        print(f"interrupted ({name}); the ranks were stopped", file=sys.stderr)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        # the first rank to stop "fails" the group: torchrun stops the others (SIGTERM, SIGKILL)
        # while they leave; they had all passed the checkpoint's last barrier
        first_rank, first = e.get_first_failure()
        ends = (STOPPED, -signal.SIGTERM, -signal.SIGKILL)
        if first.exitcode == STOPPED and all(f.exitcode in ends for f in e.failures.values()):
            print("stopped on SIGUSR1 after a step (its checkpoint is named above)", file=sys.stderr)
            return STOPPED
        first_rank, first = e.get_first_failure()
        others = sorted(set(e.failures) - {first_rank})
        print(
            f"error: rank {first_rank} (pid {first.pid}) {describe_exit(first.exitcode)}"
            + (f", then ranks {others} stopped" if others else "")
            + "; any message of its own is above (--debug shows tracebacks)",
            file=sys.stderr,
        )
        return first.exitcode if first.exitcode > 0 else 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

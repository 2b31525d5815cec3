"""``torchrun`` with a one-line failure report: ``python -m titan_rl.launch [torchrun args]``.

torchrun ends a failed run with its own Python traceback and a framed report. The rank's own
message (``error: ...``) is already on stderr above it, so this wrapper replaces the launcher's
traceback with one line per failed rank and exits with the first failure's code. ``--debug`` among
the training arguments keeps torchrun's full report.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


def describe_exit(exitcode: int) -> str:
    """``exited with code 2`` or ``was killed by SIGKILL``."""
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


def _children() -> list[int]:
    """This process's child processes (torchrun's ranks: it runs them as subprocesses), from /proc."""
    me, found = os.getpid(), []
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


def _forward_stop(signum: int, frame: object) -> None:
    """A scheduler's SIGUSR1 to the launcher reaches the ranks (torchrun forwards only SIGTERM, SIGINT,
    SIGHUP and SIGQUIT, and SIGUSR1's default would kill the launcher and orphan the ranks)."""
    for pid in _children():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


STOPPED = 128 + signal.SIGUSR1  # a rank's exit code after a SIGUSR1 stop (titan_rl.stop): checkpointed


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if os.path.isdir("/proc"):
        signal.signal(signal.SIGUSR1, _forward_stop)
    if "--debug" in argv:
        from torch.distributed.run import main as torchrun

        torchrun(argv)
        return 0
    try:
        run(parse_args(argv))
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

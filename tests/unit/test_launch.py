"""titan_rl.launch: how the launcher reports the ranks' ends, and how it delivers a SIGUSR1 stop (a real
torchrun with stand-in ranks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from titan_rl import launch


@pytest.fixture(autouse=True)
def keep_sigusr1_handler():
    """launch.main installs its SIGUSR1 forwarder in this (pytest's) process: put the old one back."""
    previous = signal.getsignal(signal.SIGUSR1)
    yield
    signal.signal(signal.SIGUSR1, previous)


def ended(monkeypatch, codes: list[int]) -> None:
    """torchrun's run() ending with ranks 0.. exiting with ``codes`` (rank 0 first)."""
    failures = {rank: ProcessFailure(rank, 1000 + rank, code, "<N/A>") for rank, code in enumerate(codes)}
    for rank, failure in failures.items():
        failure.timestamp = rank  # get_first_failure: the earliest

    def run(args):
        raise ChildFailedError("titan_rl.train", failures)

    monkeypatch.setattr(launch, "run", run)
    monkeypatch.setattr(launch, "parse_args", lambda argv: argv)


@pytest.mark.parametrize(
    "codes", [[138, 138], [138, -signal.SIGTERM], [138, -signal.SIGKILL, 138]], ids=["both", "term", "kill"]
)
def test_ranks_that_stopped_on_sigusr1_are_a_stop_not_a_failure(monkeypatch, capsys, codes):
    """The first rank to exit 138 makes torchrun stop the others while they leave; all had saved."""
    ended(monkeypatch, codes)
    assert launch.main([]) == 138
    err = capsys.readouterr().err
    assert "stopped on SIGUSR1" in err and "error:" not in err


def test_a_failed_rank_among_stopped_ones_is_a_failure(monkeypatch, capsys):
    ended(monkeypatch, [2, 138])
    assert launch.main([]) == 2
    assert "error: rank 0 (pid 1000) exited with code 2" in capsys.readouterr().err


RANK = """
import os, pathlib, signal, sys, time
if os.environ.get("TITAN_RL_STOPPED"):  # a restart after the stop (what titan_rl.train does)
    pathlib.Path(sys.argv[2], os.environ["LOCAL_RANK"]).touch()
    sys.exit(128 + signal.SIGUSR1)
time.sleep(float(sys.argv[1]))  # still starting (importing torch): SIGUSR1's default would kill it
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
deadline = time.time() + 30
while not got and time.time() < deadline:
    time.sleep(0.05)
sys.exit(128 + signal.SIGUSR1 if got else 0)
"""


@pytest.mark.parametrize(
    ("when", "restarts"), [("ranks_starting", 0), ("ranks_starting", 1), ("no_ranks_yet", 0)]
)
def test_a_stop_before_the_ranks_handle_it_reaches_them_once_they_do(tmp_path, when, restarts):
    """SIGUSR1 to the launcher while its ranks are still starting (a rank installs its handler as
    train.main starts, after seconds of imports): it is delivered once they handle it, not the
    default action that killed them. Ranks torchrun starts after the stop (none had started yet, or
    --max-restarts restarting the stopped ones) find it in their environment and stop at once."""
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    command = [sys.executable, "-m", "titan_rl.launch", "--standalone", "--nproc-per-node=2", "--role=rank"]
    command += [f"--max-restarts={restarts}", str(script), "2", str(tmp_path)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while not launch.catches(proc.pid, signal.SIGUSR1):  # the launcher's own handler is in
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
            time.sleep(0.02)
        while when == "ranks_starting" and len(launch.children(proc.pid)) < 2:  # sleeping, no handler yet
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGUSR1)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 138, out
    assert "stopped on SIGUSR1" in out and "killed by" not in out, out
    started_stopped = sorted(p.name for p in tmp_path.iterdir() if p.name != "rank.py")
    assert started_stopped == ([] if when == "ranks_starting" and not restarts else ["0", "1"])
    if not restarts:  # torchrun's own failure line: a stop is no failure (with restarts it says what it did)
        assert "failed (exitcode" not in out, out

"""titan_rl.launch: how the launcher reports the ranks' ends (torchrun itself is not run here)."""

from __future__ import annotations

import signal

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
import signal, sys, time
time.sleep(float(sys.argv[1]))  # still starting (importing torch): SIGUSR1's default would kill it
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
deadline = time.time() + 30
while not got and time.time() < deadline:
    time.sleep(0.05)
sys.exit(128 + signal.SIGUSR1 if got else 0)
"""


def test_a_stop_before_the_ranks_handle_it_reaches_them_once_they_do(tmp_path):
    """SIGUSR1 to the launcher while its ranks are not started or not yet handling it (a rank installs
    its handler as train.main starts, after seconds of imports): it is delivered when they are ready,
    not lost and not the default action that killed them."""
    import os
    import subprocess
    import sys
    import time

    script = tmp_path / "rank.py"
    script.write_text(RANK)
    command = [sys.executable, "-m", "titan_rl.launch", "--standalone", "--nproc-per-node=2", "--role=rank"]
    proc = subprocess.Popen(
        [*command, str(script), "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.time() + 60
        while not launch.catches(proc.pid, signal.SIGUSR1):  # the launcher's own handler is in
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGUSR1)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 138, out
    assert "stopped on SIGUSR1" in out and "killed by" not in out, out
    assert "failed (exitcode" not in out, out  # torchrun's own failure line: a stop is no failure

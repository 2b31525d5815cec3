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

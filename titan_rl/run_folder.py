"""The dump folder a run writes into: one run at a time, and the same folder on every rank.

Two runs in one folder (a scheduler's requeue overlapping the job it replaces, a double launch)
would prune each other's checkpoints and interleave their metrics: rank 0 holds an exclusive
``flock`` on ``<folder>/.lock`` for the whole run, and a second run stops at startup, naming the
holder. Checkpoints are written by every rank into the folder and renamed by rank 0, so on several
nodes it must be one shared file system: a node-local folder would give checkpoints missing the
other nodes' shards, found out only when resuming. With checkpointing on, every rank reads a token
rank 0 wrote there before the first step.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import uuid
from pathlib import Path
from typing import IO

import torch.distributed as dist

from titan_rl.config import ConfigError

LOCK_FILE = ".lock"


class RunFolderError(ConfigError):
    """The dump folder cannot be used by this run (another run holds it, or a rank cannot see it)."""


def lock_run_folder(folder: Path) -> IO | None:
    """An exclusive lock on ``folder/.lock`` held as long as the returned file stays open (the
    process's life); RunFolderError when another process holds it. A file system without locks
    (some network mounts) gives None: the run goes on unlocked."""
    folder.mkdir(parents=True, exist_ok=True)
    handle = (folder / LOCK_FILE).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunFolderError(
            f"{folder} is in use by another run ({holder}, holding {folder / LOCK_FILE}): two runs in "
            "one folder prune each other's checkpoints; stop it, or give this run another "
            "job.dump_folder"
        ) from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        handle.close()
        return None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle


def claim_run_folder(folder: Path, shared: bool) -> IO | None:
    """Rank 0 locks ``folder`` (``lock_run_folder``); with ``shared`` (checkpointing on, several
    processes) every rank then checks that it sees rank 0's folder. Collective with several
    processes: every rank raises the same RunFolderError, none is left waiting. Returns rank 0's
    lock (None elsewhere): keep it for the run."""
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if distributed else 0
    handle, problem, token = None, None, uuid.uuid4().hex
    probe = folder / f".shared-{token}"
    if rank == 0:
        try:
            handle = lock_run_folder(folder)
            if handle is None:
                print(
                    f"warning: {folder} cannot be locked on this file system: nothing stops a second "
                    "run there",
                    flush=True,
                )
            if shared and distributed:
                probe.write_text(token)
        except RunFolderError as e:
            problem = str(e)
        except OSError as e:  # (not creatable, not writable, full): every rank stops with it
            problem = f"cannot use job.dump_folder {folder}: {e}"
    if not distributed:
        if problem:
            raise RunFolderError(problem)
        return handle
    message = [problem, token]
    dist.broadcast_object_list(message, src=0)
    if message[0]:
        raise RunFolderError(message[0])
    if not shared:
        return handle
    probe = folder / f".shared-{message[1]}"
    try:
        sees = probe.read_text() == message[1]
    except OSError:
        sees = False
    seen: list[tuple[str, bool] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (socket.gethostname(), sees))
    if rank == 0:
        probe.unlink(missing_ok=True)
    blind = [f"rank {r} on {host}" for r, (host, ok) in enumerate(seen) if not ok]
    if blind:
        raise RunFolderError(
            f"{', '.join(blind)} cannot see rank 0's {folder} (a file written there is not there): "
            "checkpoints need a job.dump_folder on a file system every node shares (each rank writes "
            "its shards into it)"
        )
    return handle

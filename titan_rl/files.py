"""File-system helpers for what must survive a crash: files replaced or flushed whole, and
folders written beside their destination and swapped in when complete."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def write_replacing(path: Path, text: str) -> None:
    """``text`` as the whole of ``path``, replaced at once (a temporary file beside it, with the
    umask's permissions, renamed over it): a reader or a crash never sees half a file."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(text)
    os.replace(partial, path)


def write_synced(file: Path, content: Any) -> None:
    """``content`` (text, or an object for ``torch.save``) into ``file``, flushed to the disk (before
    a rename makes it count: a node crash after the rename must not leave an empty file in a folder
    that looks complete)."""
    with open(file, "w" if isinstance(content, str) else "wb") as f:
        if isinstance(content, str):
            f.write(content)
        else:
            torch.save(content, f)
        f.flush()
        os.fsync(f.fileno())


def sync_folder(folder: Path) -> None:
    """Flush a folder's entries (a rename in it) to the disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def swappable(folder: Path) -> bool:
    """Whether a complete new folder can be written beside ``folder`` and renamed over it: its parent
    is writable, and an existing ``folder`` is on the parent's file system, not a mount point (a
    container volume) and does not hold the working directory."""
    parent = folder.parent
    if not os.access(parent, os.W_OK) or folder == parent:
        return False
    if folder.exists():
        cwd = Path.cwd().resolve()
        if os.path.ismount(folder) or folder.stat().st_dev != parent.stat().st_dev:
            return False
        if cwd == folder or folder in cwd.parents:
            return False
    return True


def remove_stale_partials(folder: Path) -> None:
    """``partial_folder``s of writes into ``folder`` whose process is gone (killed mid-write)."""
    for stale in folder.parent.glob(f".{folder.name}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def swap_in(partial: Path, folder: Path, replaced: Callable[[str], bool]) -> None:
    """``partial`` (complete) becomes ``folder``. Only after the swap do an existing folder's entries
    that ``replaced(name)`` does not claim and ``partial`` lacks move over from the old folder (an HF
    model's tokenizer files, a README, ``original/``), and the rest goes; a failure before the swap
    leaves the old folder whole, one after it leaves the rest in ``.<name>.replaced-*`` (said)."""
    if not folder.is_dir():
        os.replace(partial, folder)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.replaced-", dir=folder.parent))
    os.replace(folder, old)  # (onto the empty folder mkdtemp made: a rename may replace it)
    try:
        os.replace(partial, folder)
    except BaseException:
        os.replace(old, folder)  # put it back
        raise
    try:
        for entry in old.iterdir():
            if not replaced(entry.name) and not (folder / entry.name).exists():
                os.replace(entry, folder / entry.name)
    except OSError as e:
        print(f"warning: {folder} was written; some of its other files stay in {old} ({e})", flush=True)
        return
    shutil.rmtree(old, ignore_errors=True)

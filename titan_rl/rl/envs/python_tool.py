"""A Python tool: run model-written code in a subprocess under OS-enforced limits.

Isolated mode (Linux, running as root; probed once, see ``PythonSandbox``) enforces:
- a minimal file system: the code's root is an empty tmpfs holding read-only bind mounts of an
  allow-list (the interpreter, its standard library, the system library dirs, the allowed packages
  such as numpy and sympy, /dev/null, /dev/zero, /dev/urandom) and its own temp dir, the only
  writable place. The project, the task data, checkpoints, /home, /root, other site-packages: absent;
- a private /proc showing only the code's own processes; no /sys; its own SysV IPC namespace
  (no other process's shared memory);
- no network: a fresh network namespace (no interfaces up, not even the host's loopback);
- resources: RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NOFILE, no core files, and
  RLIMIT_NPROC under a throwaway uid (root ignores NPROC, so the code runs as a random unused uid
  with no groups), which stops fork bombs;
- cleanup: the code runs as pid 1 of a new pid namespace, so when it exits or is killed at the
  wall-clock timeout, the kernel kills every process it started.
Fallback mode (not root, or namespaces unavailable): only the rlimits above except NPROC, the
temp-dir cwd and the wall-clock timeout (process group kill); network, writes outside the temp dir
and reading any file this user can (the task data with its answers included) are NOT blocked. The
fallback is announced with a warning and shown in ``protections``; training with it needs the
explicit ``env.allow_unisolated_python_tool``.

The namespaces, mounts and limits are set up by ``sandbox_launcher.py``, a standard-library script.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

logger = logging.getLogger(__name__)

LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_launcher.py")
TIMED_OUT = 124  # the launcher's exit code when it killed the code (see sandbox_launcher.py)
THROWAWAY_UID_BASE = 0x70000000  # far above any real account; one random uid per run
ALLOWED_PACKAGES = ("numpy", "sympy", "mpmath")  # mpmath: sympy needs it
# shared libraries (libc, libm, libz, libffi, libssl, ...); no data lives here
SYSTEM_LIBRARY_DIRS = ("/lib", "/lib32", "/lib64", "/libx32", "/usr/lib", "/usr/lib32", "/usr/lib64")
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom")
LINKER_CACHE = "/etc/ld.so.cache"  # where libpython is when only ldconfig knows (python:3.x images)


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 5.0
    """Wall-clock limit; the CPU-time limit is the same number of seconds (rounded up)."""
    memory_mb: int = 512
    """Address-space limit (RLIMIT_AS)."""
    max_processes: int = 16
    """Processes and threads of the sandbox uid (isolated mode only)."""
    max_file_mb: int = 16
    """Largest file the code may write, its printed output included."""
    max_output_chars: int = 4000
    """Printed output returned to the model; the rest is cut."""


class IsolationUnavailable(RuntimeError):
    def __init__(self, reason: str) -> None:
        super().__init__(f"python sandbox: isolated mode unavailable ({reason}); pass isolate=False")
        self.reason = reason


@functools.cache
def runtime_paths(python: str, packages: tuple[str, ...]) -> dict:
    """Where ``python`` keeps its interpreter, stdlib, site dirs and the allowed ``packages``."""
    command = [python, "-I", "-S", LAUNCHER, "--runtime", json.dumps(list(packages))]
    found = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if found.returncode != 0:
        raise OSError(f"{python} could not list its paths: {found.stderr.strip()[-500:]}")
    return json.loads(found.stdout)


def root_mounts(runtime: dict) -> list[list[str]]:
    """The allow-list of the sandbox's root, parents first: ``["bind", path]`` (read-only, same
    path), ``["empty", path]`` (a site dir inside a bound tree, hidden under an empty tmpfs so only
    the allowed packages bound into it show) or ``["symlink", path, target]`` (/lib -> usr/lib)."""
    wanted = {}
    for path in SYSTEM_LIBRARY_DIRS:
        if os.path.islink(path):
            wanted[path] = ["symlink", path, os.readlink(path)]
        elif os.path.isdir(path):
            wanted[path] = ["bind", path]
    system_site_dirs = [
        os.path.realpath(site)
        for path in SYSTEM_LIBRARY_DIRS
        for site in glob.glob(f"{path}/python3*/*-packages")  # /usr/lib/python3/dist-packages
    ]
    for path in [*runtime["site"], *system_site_dirs]:
        if os.path.isdir(path):
            wanted[path] = ["empty", path]
    for path in [
        *runtime["stdlib"],
        *runtime["files"],
        runtime["executable"],
        *DEVICES,
        *runtime["packages"],
    ]:
        wanted[path] = ["bind", path]
    if os.path.isfile(LINKER_CACHE):
        wanted[LINKER_CACHE] = ["bind", LINKER_CACHE]
    kept: list[list[str]] = []
    for mount in sorted(wanted.values(), key=lambda mount: (mount[1].count("/"), mount[1])):
        parents = [m for m in kept if mount[1] == m[1] or mount[1].startswith(m[1].rstrip("/") + "/")]
        parent = max(parents, key=lambda m: len(m[1]), default=None)
        inside_bind = parent is not None and parent[0] == "bind"
        if mount[0] == "bind" and inside_bind:
            continue  # already visible through its parent
        if mount[0] == "empty" and not inside_bind:
            continue  # nothing to hide: the launcher creates it empty if a package goes there
        kept.append(mount)
    return kept


class PythonSandbox:
    """``run(code) -> text``: printed output plus a status line when the code failed or was stopped.

    ``isolate=None`` probes isolated mode once and falls back with a warning; ``True`` requires it
    (``IsolationUnavailable`` if unavailable); ``False`` uses the fallback mode. ``python`` runs the
    code (default: this interpreter); of its site-packages only ``packages`` are visible.
    """

    def __init__(
        self,
        limits: SandboxLimits | None = None,
        isolate: bool | None = None,
        python: str | None = None,
        packages: tuple[str, ...] = ALLOWED_PACKAGES,
    ) -> None:
        self.limits = limits or SandboxLimits()
        self.python = python or sys.executable
        self.mounts: list[list[str]] = []
        self.isolated = False
        if isolate is not False:
            reason = "not running as root" if os.geteuid() != 0 else self._try_isolation(packages)
            if reason and isolate:
                raise IsolationUnavailable(reason)
            if reason:
                logger.warning(
                    "python sandbox: isolated mode unavailable (%s); the tool runs with rlimits and a temp "
                    "cwd only: the model's code can reach the network, write outside its temp dir and "
                    "read every file this user can, the task data with its answers included",
                    reason,
                )

    @property
    def protections(self) -> tuple[str, ...]:
        base = ("timeout", "rlimit_as", "rlimit_cpu", "rlimit_fsize", "rlimit_nofile", "private_cwd")
        if self.isolated:
            isolated = (
                "minimal_root",
                "read_only_fs",
                "private_proc",
                "private_ipc",
                "no_network",
                "pid_namespace",
            )
            return (*base, "rlimit_nproc", "throwaway_uid", *isolated)
        return base

    def _try_isolation(self, packages: tuple[str, ...]) -> str | None:
        """Build the allow-list and run ``print('ok')`` in isolated mode: None if that worked, else why."""
        try:
            runtime = runtime_paths(self.python, packages)
        except (OSError, ValueError, subprocess.TimeoutExpired) as error:
            return str(error)
        self.isolated, self.python, self.mounts = True, runtime["executable"], root_mounts(runtime)
        out = self.run("print('ok')").strip()
        if out != "ok":
            self.isolated, self.mounts = False, []
            return out
        return None

    def run(self, code: str) -> str:
        folder = tempfile.mkdtemp(prefix="titan_rl_python_")
        workdir, root = os.path.join(folder, "work"), os.path.join(folder, "root")
        os.mkdir(workdir)
        os.mkdir(root)  # where the launcher mounts the sandbox's root
        uid = THROWAWAY_UID_BASE + secrets.randbelow(1 << 24) if self.isolated else None
        config = {
            "workdir": workdir,
            "root": root,
            "uid": uid,
            "isolate": self.isolated,
            "python": self.python,
        }
        config.update(limits=asdict(self.limits), mounts=self.mounts)
        try:
            with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as file:
                file.write(code)
            if uid is not None:
                os.chown(workdir, uid, uid)
            with tempfile.TemporaryFile() as output:
                command = [
                    sys.executable,
                    "-I",
                    "-S",
                    LAUNCHER,
                    json.dumps(config),
                ]  # -S: no .pth files, 50 ms
                process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
                begin = time.monotonic()
                try:  # the launcher enforces the timeout; this is the backstop
                    status = process.wait(timeout=self.limits.timeout_s + 5)
                except subprocess.TimeoutExpired:
                    status = TIMED_OUT
                with contextlib.suppress(ProcessLookupError):  # the launcher if still there, and in fallback
                    os.killpg(process.pid, signal.SIGKILL)  # mode any children the code left behind
                process.wait()
                timed_out = status == TIMED_OUT and time.monotonic() - begin >= self.limits.timeout_s
                output.seek(0)
                text = output.read(self.limits.max_output_chars * 4).decode("utf-8", errors="replace")
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        text = text[: self.limits.max_output_chars]
        if timed_out:
            return f"{text}\n[timed out after {self.limits.timeout_s:g} s]".lstrip("\n")
        if status > 128 and status - 128 in signal.valid_signals():
            return f"{text}\n[killed by {signal.Signals(status - 128).name}]".lstrip("\n")
        return text if status == 0 else f"{text}\n[exit code {status}]".lstrip("\n")

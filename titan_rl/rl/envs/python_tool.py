"""A Python tool: run model-written code in a subprocess under OS-enforced limits.

Isolated mode (Linux, running as root; probed once, see ``PythonSandbox``) enforces:
- no network: a fresh network namespace (no interfaces up, not even the host's loopback);
- no writes outside a private temp dir: a mount namespace whose whole tree is remounted read-only
  except a bind mount of the temp dir (the cwd); the rest of the file system stays readable;
- resources: RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_FSIZE, RLIMIT_NOFILE, no core files, and
  RLIMIT_NPROC under a throwaway uid (root ignores NPROC, so the code runs as a random unused uid
  with no groups), which stops fork bombs;
- cleanup: the code runs as pid 1 of a new pid namespace, so when it exits or is killed at the
  wall-clock timeout, the kernel kills every process it started.
Fallback mode (not root, or namespaces unavailable): only the rlimits above except NPROC, the
temp-dir cwd and the wall-clock timeout (process group kill); network and writes outside the temp
dir are NOT blocked. The fallback is announced with a warning and shown in ``protections``.

This file must import only the standard library: it is also the launcher script the sandbox runs
(``python -I python_tool.py CONFIG``), which sets up the namespaces, then forks and execs the code.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

logger = logging.getLogger(__name__)

CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWPID = 0x00020000, 0x40000000, 0x20000000
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 0x40000
SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY = 442, -100, 0x8000, 0x1  # x86_64 / arm64
PR_SET_PDEATHSIG = 1
THROWAWAY_UID_BASE = 0x70000000  # far above any real account; one random uid per run
TIMED_OUT = 124  # the launcher's exit code when it killed the code (counts only once timeout_s has passed)


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


class _MountAttr(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("attr_set", "attr_clr", "propagation", "userns_fd")]


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"sandbox setup: {what} failed: {os.strerror(errno)}")


def _isolate(workdir: str) -> None:
    """In the launcher: new mount / net / pid namespaces; everything read-only but ``workdir``."""
    libc = ctypes.CDLL(None, use_errno=True)
    _check(libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID), "unshare")
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")
    path = workdir.encode()
    _check(libc.mount(path, path, None, MS_BIND | MS_REC, None), "bind the work dir")
    for target, flags, attr in (
        (b"/", AT_RECURSIVE, _MountAttr(MOUNT_ATTR_RDONLY)),
        (path, 0, _MountAttr(0, 1)),
    ):
        size = ctypes.c_size_t(ctypes.sizeof(attr))
        _check(
            libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, target, flags, ctypes.byref(attr), size),
            "mount_setattr",
        )


def _limit_and_exec(config: dict) -> None:
    """In the forked child: rlimits, drop to the throwaway uid, exec the code. Never returns."""
    limits = SandboxLimits(**config["limits"])
    seconds = int(limits.timeout_s) + 1
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb << 20,) * 2)
    resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.max_file_mb << 20,) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if config["uid"] is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes,) * 2)
        os.setgroups([])
        os.setgid(config["uid"])
        os.setuid(config["uid"])
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the launcher died: so does the code
    os.chdir(config["workdir"])
    workdir = config["workdir"]
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
    env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    python = next((p for p in config["pythons"] if os.access(p, os.X_OK)), None)
    if python is None:
        raise OSError(f"none of {config['pythons']} is executable by the sandbox user; pass python=...")
    os.dup2(os.open("main.py", os.O_RDONLY), 0)  # read from stdin: tracebacks say "<stdin>", not a temp path
    os.execve(python, [python, "-I", "-X", "utf8", "-"], env)


def _launch(config: dict) -> int:
    """The launcher process: isolate, fork the code (pid 1 of the new pid namespace), wait for it."""
    if config["isolate"]:
        _isolate(config["workdir"])
    pid = os.fork()
    if pid == 0:
        try:
            _limit_and_exec(config)
        except BaseException as error:
            os.write(2, f"sandbox setup failed: {error}\n".encode())
        os._exit(126)
    deadline = time.monotonic() + config["limits"]["timeout_s"]
    while (status := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:  # kill and reap here: pid 1 takes its whole namespace along,
            os.kill(pid, signal.SIGKILL)  # and no zombie is left for the host's init to collect
            os.waitpid(pid, 0)
            return TIMED_OUT
        time.sleep(0.005)
    code = os.waitstatus_to_exitcode(status[1])
    return 128 - code if code < 0 else code  # killed by signal N -> 128 + N, like a shell


class PythonSandbox:
    """``run(code) -> text``: printed output plus a status line when the code failed or was stopped.

    ``isolate=None`` probes isolated mode once and falls back with a warning; ``True`` requires it
    (``RuntimeError`` if unavailable); ``False`` uses the fallback mode.
    """

    def __init__(
        self, limits: SandboxLimits | None = None, isolate: bool | None = None, python: str | None = None
    ) -> None:
        self.limits = limits or SandboxLimits()
        # the throwaway uid may not reach the trainer's interpreter (e.g. pyenv under /root): then the
        # first of these it can execute runs the code
        candidates = [python] if python else [sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"]
        self.pythons = list(dict.fromkeys(candidates))
        self.isolated = isolate is not False
        if self.isolated:
            reason = "not running as root" if os.geteuid() != 0 else self._probe()
            if reason and isolate:
                raise RuntimeError(
                    f"python sandbox: isolated mode unavailable ({reason}); pass isolate=False"
                )
            if reason:
                logger.warning(
                    "python sandbox: isolated mode unavailable (%s); the tool runs with rlimits and a temp "
                    "cwd only: network and writes outside the temp dir are NOT blocked",
                    reason,
                )
                self.isolated = False

    @property
    def protections(self) -> tuple[str, ...]:
        base = ("timeout", "rlimit_as", "rlimit_cpu", "rlimit_fsize", "rlimit_nofile", "private_cwd")
        if self.isolated:
            return (*base, "rlimit_nproc", "no_network", "read_only_fs", "pid_namespace", "throwaway_uid")
        return base

    def _probe(self) -> str | None:
        out = self.run("print('ok')")
        return None if out.strip() == "ok" else out.strip()

    def run(self, code: str) -> str:
        workdir = tempfile.mkdtemp(prefix="titan_rl_python_")
        uid = THROWAWAY_UID_BASE + secrets.randbelow(1 << 24) if self.isolated else None
        config = {"workdir": workdir, "uid": uid, "isolate": self.isolated, "pythons": self.pythons}
        config["limits"] = asdict(self.limits)
        try:
            with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8") as file:
                file.write(code)
            if uid is not None:
                os.chown(workdir, uid, uid)
            with tempfile.TemporaryFile() as output:
                command = [sys.executable, "-I", os.path.abspath(__file__), json.dumps(config)]
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
            shutil.rmtree(workdir, ignore_errors=True)
        text = text[: self.limits.max_output_chars]
        if timed_out:
            return f"{text}\n[timed out after {self.limits.timeout_s:g} s]".lstrip("\n")
        if status > 128 and status - 128 in signal.valid_signals():
            return f"{text}\n[killed by {signal.Signals(status - 128).name}]".lstrip("\n")
        return text if status == 0 else f"{text}\n[exit code {status}]".lstrip("\n")


if __name__ == "__main__":
    sys.exit(_launch(json.loads(sys.argv[1])))

"""The Python tool's launcher script (see ``python_tool.py`` for what the sandbox guarantees).

``python -I -S sandbox_launcher.py CONFIG`` runs the model's code: in isolated mode it unshares mount,
network, pid and SysV IPC namespaces, builds a minimal root (an empty tmpfs plus read-only bind mounts of the
allow-list in CONFIG, the work dir writable), pivots into it, then forks the code as pid 1 of the new
pid namespace with a private /proc, rlimits and a throwaway uid.

``python -I -S sandbox_launcher.py --runtime PACKAGES`` prints (JSON) where the interpreter running
it keeps what it needs: run by the interpreter the code will run with, so the allow-list fits it.

Standard library only: it runs as a script, outside the titan_rl package.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import sys
import time

CLONE_NEWNS, CLONE_NEWNET, CLONE_NEWPID, CLONE_NEWIPC = 0x00020000, 0x40000000, 0x20000000, 0x08000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x8, 0x1000, 0x4000, 0x40000
MNT_DETACH = 0x2
SYS_MOUNT_SETATTR, AT_FDCWD, AT_RECURSIVE = 442, -100, 0x8000  # the same number on x86_64 and arm64
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}  # glibc has no wrapper
PR_SET_PDEATHSIG = 1
TIMED_OUT = 124  # the launcher's exit code when it killed the code (counts only once timeout_s has passed)

libc = ctypes.CDLL(None, use_errno=True)


class _MountAttr(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("attr_set", "attr_clr", "propagation", "userns_fd")]


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"sandbox setup: {what} failed: {os.strerror(errno)}")


def _set_attr(path: str, attr_set: int, attr_clr: int = 0, recursive: bool = False) -> None:
    attr = _MountAttr(attr_set, attr_clr)
    flags = AT_RECURSIVE if recursive else 0
    size = ctypes.c_size_t(ctypes.sizeof(attr))
    result = libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), flags, ctypes.byref(attr), size)
    _check(result, f"mount_setattr {path}")


def _mountpoint(path: str, is_dir: bool) -> None:
    """Create ``path`` in the new root (parents are tmpfs dirs: bound trees are read-only already)."""
    if os.path.lexists(path):
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if is_dir:
        os.mkdir(path)
    else:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))


def _bind(source: str, root: str, read_only: bool = True) -> None:
    target = root + source  # every bind keeps its path: the interpreter finds its files where it expects
    _mountpoint(target, os.path.isdir(source))
    _check(libc.mount(source.encode(), target.encode(), None, MS_BIND, None), f"bind {source}")
    if read_only:  # at once, so no later step can write through it to the host
        _set_attr(target, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID)


def _tmpfs(target: str) -> None:
    _check(
        libc.mount(b"tmpfs", target.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"mode=755,size=1m"), "tmpfs"
    )


def _isolate(config: dict) -> None:
    """New mount / net / pid / ipc namespaces; the root becomes the allow-list (``config["mounts"]``)."""
    machine = os.uname().machine
    pivot_root = SYS_PIVOT_ROOT.get(machine)
    if pivot_root is None:
        raise OSError(f"sandbox setup: no pivot_root syscall number for {machine}")
    _check(libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC), "unshare")
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")
    root, workdir = config["root"], config["workdir"]
    _tmpfs(root)
    for kind, path, *target in config["mounts"]:  # parents first
        if kind == "bind":
            _bind(path, root)
        elif kind == "empty":  # hides a site-packages dir; allowed packages get bound into it
            _tmpfs(root + path)
        else:
            os.symlink(target[0], root + path)
    _bind(workdir, root, read_only=False)
    os.mkdir(root + "/proc")
    _set_attr(root, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, recursive=True)
    _set_attr(root + workdir, 0, MOUNT_ATTR_RDONLY)
    os.chdir(root)  # pivot_root(".", ".") stacks the old root on the new one; detaching it drops it
    _check(libc.syscall(pivot_root, b".", b"."), "pivot_root")
    _check(libc.umount2(b".", MNT_DETACH), "detach the old root")
    os.chdir("/")


def _limit_and_exec(config: dict) -> None:
    """In the forked child: private /proc, rlimits, drop to the throwaway uid, exec. Never returns."""
    if config["isolate"]:  # a proc mounted by pid 1 lists its own pid namespace only
        flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
        _check(libc.mount(b"proc", b"/proc", b"proc", flags, None), "mount /proc")
    limits = config["limits"]
    seconds = int(limits["timeout_s"]) + 1
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_mb"] << 20,) * 2)
    resource.setrlimit(resource.RLIMIT_CPU, (seconds, seconds + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["max_file_mb"] << 20,) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if config["uid"] is not None:
        resource.setrlimit(resource.RLIMIT_NPROC, (limits["max_processes"],) * 2)
        os.setgroups([])
        os.setgid(config["uid"])
        os.setuid(config["uid"])
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the launcher died: so does the code
    workdir, python = config["workdir"], config["python"]
    os.chdir(workdir)
    env = {"PATH": os.path.dirname(python), "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
    env.update(OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    os.dup2(os.open("main.py", os.O_RDONLY), 0)  # read from stdin: tracebacks say "<stdin>", not a temp path
    os.execve(python, [python, "-I", "-X", "utf8", "-"], env)


def _launch(config: dict) -> int:
    """The launcher process: isolate, fork the code (pid 1 of the new pid namespace), wait for it."""
    if config["isolate"]:
        try:
            _isolate(config)
        except OSError as error:
            os.write(2, f"{error}\n".encode())
            return 126
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


def _venv_config() -> str | None:
    """The pyvenv.cfg that makes this interpreter a venv's (where site.py looks for it), if any."""
    bin_dir = os.path.dirname(sys.executable)
    candidates = (os.path.join(bin_dir, "pyvenv.cfg"), os.path.join(os.path.dirname(bin_dir), "pyvenv.cfg"))
    return next((path for path in candidates if os.path.isfile(path)), None)


def runtime_paths(packages: list[str]) -> dict:
    """What this interpreter needs (real paths): run with ``-S`` so no .pth file adds to ``sys.path``."""
    import importlib.util
    import site
    import sysconfig

    real = os.path.realpath
    paths = sysconfig.get_paths()
    stdlib = [
        real(path) for path in [paths["stdlib"], paths["platstdlib"], *sys.path] if os.path.exists(path)
    ]
    files = []
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):  # libpython beside the stdlib (pyenv, /usr/local)
        files.append(os.path.join(sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME")))
    prefixes = [sys.prefix]
    venv_config = _venv_config()
    if venv_config is not None:  # site.py (skipped by -S) would make the venv sys.prefix, as in the sandbox
        files.append(venv_config)
        settings = {}
        with open(venv_config, encoding="utf-8") as file:
            for line in file:
                key, _, value = line.partition("=")
                settings[key.strip().lower()] = value.strip().lower()
        system_site = settings.get("include-system-site-packages") == "true"
        prefixes = [os.path.dirname(os.path.dirname(sys.executable)), *([sys.prefix] if system_site else [])]
    searched = list(dict.fromkeys(real(path) for path in site.getsitepackages(prefixes)))
    site_dirs = list(
        dict.fromkeys([*searched, *(real(path) for path in (paths["purelib"], paths["platlib"]))])
    )
    sys.path.extend(searched)
    found = []
    for name in packages:
        spec = importlib.util.find_spec(name)
        if spec is None:
            continue
        locations = list(spec.submodule_search_locations or [spec.origin])
        vendored = os.path.join(os.path.dirname(locations[0]), f"{name}.libs")  # wheels' own .so files
        found += [real(path) for path in [*locations, vendored] if os.path.exists(path)]
    return {
        "executable": os.path.join(real(os.path.dirname(sys.executable)), os.path.basename(sys.executable)),
        "stdlib": list(dict.fromkeys(path for path in stdlib if path not in site_dirs)),
        "site": site_dirs,
        "files": [real(path) for path in files if os.path.exists(path)],
        "packages": found,
    }


if __name__ == "__main__":
    if sys.argv[1] == "--runtime":
        print(json.dumps(runtime_paths(json.loads(sys.argv[2]))))
    else:
        sys.exit(_launch(json.loads(sys.argv[1])))

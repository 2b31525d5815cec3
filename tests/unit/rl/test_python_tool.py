"""The Python tool sandbox: what the OS enforces (what the code can see, network, writes outside the
temp dir, memory, forks, CPU), and that episodes work with it and go on after the code is stopped.

The isolation tests need Linux namespaces as root (the fallback mode enforces rlimits only); they are
skipped, with the reason, where there are none; as root with namespaces, a sandbox that fails to
start is an error.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path

import pytest

import titan_rl
from titan_rl.rl.agent_loop import AgentLoopConfig, start_episode, step_episodes
from titan_rl.rl.envs.agentic import tool_call
from titan_rl.rl.envs.math_task import SAMPLE_PATH, MathEnv
from titan_rl.rl.envs.python_tool import (
    THROWAWAY_UID_BASE,
    IsolationUnavailable,
    PythonSandbox,
    SandboxLimits,
)
from titan_rl.rl.harmony import generation_prompt, render_message
from titan_rl.rl.rollout import Completion
from titan_rl.rl.tokenizer import build_tiny_tokenizer

FORK_BOMB = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"


def sandbox_or_fallback(limits: SandboxLimits) -> PythonSandbox:
    """Isolated where the kernel lets root make namespaces; a later setup step failing is a bug."""
    try:
        return PythonSandbox(limits, isolate=True)
    except IsolationUnavailable as unavailable:
        not_here = ("unshare failed", "Function not implemented")  # a container without them, an old kernel
        if os.geteuid() == 0 and not any(reason in unavailable.reason for reason in not_here):
            raise
    return PythonSandbox(limits, isolate=False)


@pytest.fixture(scope="module")
def sandbox() -> PythonSandbox:
    return sandbox_or_fallback(SandboxLimits(timeout_s=1.0, max_output_chars=500))


@pytest.fixture(scope="module")
def patient() -> PythonSandbox:
    """For code that takes a while on a busy machine (numpy's import, filling 512 MB)."""
    return sandbox_or_fallback(SandboxLimits(timeout_s=10))


@pytest.fixture
def isolated(sandbox) -> PythonSandbox:
    if not sandbox.isolated:
        pytest.skip("isolated mode unavailable here (needs root and namespaces); only rlimits are enforced")
    return sandbox


def sandbox_processes() -> list[int]:
    """Pids of processes running as a throwaway sandbox uid."""
    pids = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            uid = int(
                next(line for line in status.read_text().splitlines() if line.startswith("Uid:")).split()[1]
            )
        except (OSError, StopIteration):
            continue
        if THROWAWAY_UID_BASE <= uid < THROWAWAY_UID_BASE + (1 << 24):
            pids.append(int(status.parent.name))
    return pids


def assert_no_process_left() -> None:
    deadline = time.monotonic() + 3
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_processes() == []


def test_runs_code_and_reports_failures(sandbox):
    assert sandbox.run("print(6 * 7)") == "42\n"
    failed = sandbox.run("x = 1\n1 / 0")
    assert (
        'File "<stdin>", line 2' in failed
        and "ZeroDivisionError" in failed
        and failed.endswith("[exit code 1]")
    )
    assert len(sandbox.run("print('y' * 10_000)")) == 500
    assert "timeout" in sandbox.protections and "rlimit_as" in sandbox.protections


def test_network_is_unreachable(isolated):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
    try:
        assert PythonSandbox(isolate=False).run(code) == "connected\n", "control: the host can reach the port"
        blocked = isolated.run(code)
        external = isolated.run("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)")
    finally:
        listener.close()
    assert "Network is unreachable" in blocked and "connected" not in blocked
    assert "Network is unreachable" in external
    assert "no_network" in isolated.protections


def test_writes_outside_the_temp_dir_are_blocked(isolated):
    shared = Path(tempfile.mkdtemp(prefix="titan_rl_shared_"))
    shared.chmod(0o777)  # in /tmp and writable by anyone: now absent from the sandbox's root
    stdlib = Path(os.__file__).parent  # bound into the root: only the read-only mount stops the write
    try:
        for target in (
            shared / "escape.txt",
            Path("/tmp") / f"escape_{uuid.uuid4().hex}.txt",
            stdlib / "x.py",
        ):
            out = isolated.run(f"open({str(target)!r}, 'w').write('x')")
            assert "Read-only file system" in out or "No such file" in out, out
            assert not target.exists()
    finally:
        shutil.rmtree(shared)
    assert "Read-only file system" in isolated.run(f"open({str(stdlib / 'x.py')!r}, 'w')")
    escape = Path.cwd() / f"escape_{uuid.uuid4().hex}.txt"
    assert "Error" in isolated.run(f"open({str(escape)!r}, 'w').write('x')") and not escape.exists()
    assert isolated.run("open('own.txt', 'w').write('ok')\nprint(open('own.txt').read())") == "ok\n"
    assert "read_only_fs" in isolated.protections and "minimal_root" in isolated.protections


def test_the_task_data_the_project_and_other_files_are_absent(isolated):
    outside = Path(tempfile.mkdtemp(prefix="titan_rl_public_"))
    outside.chmod(0o755)  # readable by anyone, so only its absence from the root hides it
    public = outside / "answers.txt"
    public.write_text("42")
    public.chmod(0o644)
    package = Path(titan_rl.__file__).parent
    try:
        for attempt in (
            f"open({str(SAMPLE_PATH)!r})",
            f"os.listdir({str(package)!r})",
            f"open({str(public)!r})",
        ):
            assert "FileNotFoundError" in isolated.run(f"import os\n{attempt}"), attempt
    finally:
        shutil.rmtree(outside)
    allowed_tops = {mount[1].split("/")[1] for mount in isolated.mounts} | {"proc", "tmp"}
    tops = isolated.run("import os\nprint(*sorted(os.listdir('/')))").split()
    assert set(tops) <= allowed_tops and not {"home", "mnt", "opt", "srv", "sys", "var"} & set(tops), tops
    assert isolated.run("import os\nprint(*sorted(os.listdir('/dev')))") == "null urandom zero\n"


def test_proc_shows_only_the_codes_own_processes(isolated):
    code = "import os\nprint(*sorted(int(pid) for pid in os.listdir('/proc') if pid.isdigit()))"
    assert isolated.run(code) == "1\n"  # the code itself, pid 1 of its namespace; no host process
    assert "private_proc" in isolated.protections


def test_the_hosts_shared_memory_is_out_of_reach(isolated):
    libc = ctypes.CDLL(None, use_errno=True)
    key = 0x7E570000 + os.getpid() % 0xFFFF
    segment = libc.shmget(key, 4096, 0o1644)  # IPC_CREAT, readable by anyone
    assert segment >= 0, os.strerror(ctypes.get_errno())
    look_up = f"import ctypes\nprint(ctypes.CDLL(None).shmget({key}, 0, 0) >= 0)"
    try:
        assert PythonSandbox(isolate=False).run(look_up) == "True\n", "control: the host's segment is there"
        assert isolated.run(look_up) == "False\n"
    finally:
        libc.shmctl(segment, 0, None)  # IPC_RMID
    assert "private_ipc" in isolated.protections


def test_numeric_python_and_only_the_allowed_packages_import(patient):
    if not patient.isolated:
        pytest.skip("isolated mode unavailable here: every package of the interpreter is importable")
    code = "import math, json, fractions, decimal, statistics\n"
    code += (
        "print(statistics.mean([fractions.Fraction(1, 2), 1]), math.isqrt(17), decimal.Decimal('0.1') * 3)"
    )
    assert patient.run(code) == "3/4 4 0.3\n"
    if importlib.util.find_spec("numpy"):
        assert patient.run("import numpy\nprint(numpy.linalg.solve([[2.0]], [4.0])[0])") == "2.0\n"
    names = ("sympy", "mpmath", "titan_rl", "torch", "pytest")
    visible = patient.run(
        f"import importlib.util as u\nprint(*[u.find_spec(n) is not None for n in {names}])"
    )
    expected = [importlib.util.find_spec(name) is not None for name in names[:2]] + [False] * 3
    assert visible.split() == [str(found) for found in expected]


def test_the_fallback_warns_that_the_task_data_is_readable(monkeypatch, caplog):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with caplog.at_level(logging.WARNING):
        assert not PythonSandbox().isolated
    assert "the task data with its answers" in caplog.text
    with pytest.raises(IsolationUnavailable, match="not running as root"):
        PythonSandbox(isolate=True)


def test_memory_bombs_hit_the_address_space_limit(patient):
    assert "MemoryError" in patient.run("x = bytearray(1 << 33)")
    assert "MemoryError" in patient.run("chunks = []\nwhile True:\n    chunks.append(bytearray(50 << 20))")


def test_big_files_hit_the_file_size_limit(sandbox):
    assert "File too large" in sandbox.run("open('big', 'wb').write(bytes(17 << 20))")


def test_fork_bombs_hit_the_process_limit_and_leave_nothing_behind(isolated):
    code = (
        "import os, time\nchildren = 0\ntry:\n    while True:\n        if os.fork() == 0:\n"
        "            time.sleep(60)\n            os._exit(0)\n        children += 1\n"
        "except OSError as error:\n    print('refused after', children, error)"
    )
    out = isolated.run(code)
    assert out.startswith("refused after") and "Resource temporarily unavailable" in out
    assert int(out.split()[2]) < isolated.limits.max_processes
    assert_no_process_left()  # the sleeping children died with the pid namespace
    begin = time.monotonic()
    assert "[timed out after 1 s]" in isolated.run(FORK_BOMB)
    assert time.monotonic() - begin < 3
    assert_no_process_left()


def test_cpu_spin_is_stopped(sandbox):
    begin = time.monotonic()
    assert sandbox.run("while True:\n    pass").endswith("[timed out after 1 s]")
    assert time.monotonic() - begin < 3


def run_tool_episode(env: MathEnv, code: str):
    """One math episode whose first assistant turn calls the python tool with ``code``."""
    tokenizer = build_tiny_tokenizer()
    episode = start_episode(env, 0, 0, tokenizer)
    call = render_message(tool_call("python", json.dumps({"code": code})), tokenizer)
    sampled = call[len(generation_prompt(tokenizer)) :]
    step_episodes(
        env, tokenizer, [episode], [Completion(sampled, [-1.0] * len(sampled), "stop")], AgentLoopConfig()
    )
    assert episode.end is None, "the episode continues with the tool's report"
    reply = tokenizer.decode(episode.tokens[len(episode.tokens) - episode.loss_mask[::-1].index(1) :])
    return episode.transcript.tool_calls[0].result, reply


def test_a_math_episode_uses_the_tool_but_cannot_read_its_answers(isolated):
    env = MathEnv.from_jsonl(SAMPLE_PATH, python=isolated)
    assert run_tool_episode(env, "print(2 ** 10)")[0] == "1024\n"
    result, _ = run_tool_episode(env, f"print(open({str(SAMPLE_PATH)!r}).read())")
    assert "FileNotFoundError" in result and env.problems[0].question not in result


def test_an_episode_goes_on_after_a_fork_bomb(isolated):
    result, reply = run_tool_episode(MathEnv(python=isolated), FORK_BOMB)
    assert result == "[timed out after 1 s]"
    assert reply == (
        "<|start|>functions.python to=assistant<|channel|>commentary<|message|>[timed out after 1 s]<|end|>"
        "<|start|>assistant"
    )
    assert_no_process_left()

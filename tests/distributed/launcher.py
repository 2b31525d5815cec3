"""Run a script under torchrun on CPU (gloo) with a free port and a hard timeout."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script: Path, *args: str, nproc: int = 2, timeout: float = 120.0) -> str:
    """Run ``script args`` on ``nproc`` local ranks; return the output, raise with it on failure."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and its workers: the session we started
        output, _ = proc.communicate()
        raise RuntimeError(f"{script.name} timed out after {timeout:.0f}s:\n{output[-5000:]}") from None
    if proc.returncode:
        raise RuntimeError(f"{script.name} exited with {proc.returncode}:\n{output[-5000:]}")
    return output

"""Helpers the benchmark-script tests share: run a script of ``benchmarks/``, read its tables."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO / "benchmarks"


def run_benchmark(script: str, *args: str, timeout: float = 220) -> subprocess.CompletedProcess:
    """``python benchmarks/<script> args`` from the repo root, output captured as text."""
    cmd = [sys.executable, str(BENCHMARKS / script), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def table_rows(text: str) -> list[list[str]]:
    """The stripped cells of every markdown table line (``| a | b |``) of ``text``, header included."""
    return [
        [c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| ")
    ]


def import_benchmark(name: str) -> ModuleType:
    """A script of ``benchmarks/`` as a module (they import each other by plain name)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))

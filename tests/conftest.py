"""Shared test helpers: running a script under `mpirun -n 2` with a timeout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "mpi_scripts"


def mpirun_path() -> str:
    """The mpirun of this environment (the mpich wheel puts it beside python)."""
    here = Path(sys.executable).parent / "mpirun"
    found = str(here) if here.exists() else shutil.which("mpirun")
    if not found:
        pytest.fail("mpirun not found: install the package with pip install -e .[dev]")
    return found


def run_ranks(args: list[str], n: int = 2, timeout: float = 240.0, cwd: Path | None = None,
              env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python ARGS` on n ranks (n=1: plain python, no mpirun), capturing output."""
    command = [sys.executable, *args]
    if n > 1:
        command = [mpirun_path(), "-n", str(n), *command]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          cwd=cwd or ROOT, env=full_env)


def script(name: str) -> str:
    return str(SCRIPTS / name)

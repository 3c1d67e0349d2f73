"""Test-side helpers for the jobs tests start (imported by tests, never run under mpirun).

    from mpi_scripts.jobs import job_tag, no_leftover_processes  # autouse fixtures
    job = start(["-m", "launch.train", ...], n=2, log_dir=tmp_path)

Every process a test module starts (mpirun, its proxies, the ranks) inherits the environment
variable `DUALGPU_TEST_JOB=<tag>`; after each test the /proc scan `tagged_pids` finds any that are
still alive, ends them by pid and fails the test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ROOT, mpirun_path

MARKER = "DUALGPU_TEST_JOB"


def tagged_pids(tag: str) -> list[int]:
    """Live processes (zombies excluded) whose initial environment holds MARKER=tag."""
    needle = f"{MARKER}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, or not ours
            continue
    return found


def _command_line(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "?"


@pytest.fixture(scope="module", autouse=True)
def job_tag():
    """Tag every process started while this module's tests (and module fixtures) run."""
    with pytest.MonkeyPatch.context() as mp:
        tag = uuid.uuid4().hex
        mp.setenv(MARKER, tag)
        yield tag


@pytest.fixture(autouse=True)
def no_leftover_processes(job_tag):
    """After each test: no process the module started is still alive (survivors are killed)."""
    yield
    deadline = time.monotonic() + 5.0  # ranks of an aborted job may take a moment to go
    left = tagged_pids(job_tag)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = tagged_pids(job_tag)
    described = [f"{pid}: {_command_line(pid)}" for pid in left]
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, "processes left behind:\n" + "\n".join(described)


class Job:
    """A background `python ARGS` (under mpirun when n > 1), its output going to files."""

    def __init__(self, args: list[str], n: int, log_dir: Path):
        command = [sys.executable, *args]
        if n > 1:
            command = [mpirun_path(), "-n", str(n), *command]
        log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = log_dir / "stdout.txt", log_dir / "stderr.txt"
        with open(self.stdout_path, "w") as out, open(self.stderr_path, "w") as err:
            self.proc = subprocess.Popen(command, stdout=out, stderr=err, cwd=ROOT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                         start_new_session=True)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait(self, timeout: float) -> int:
        """The exit code; on timeout the job's process group is killed and the test fails."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            pytest.fail(f"job still running after {timeout} s:\n{self.stdout}\n{self.stderr}")

    def wait_until(self, condition: Callable[[], bool], timeout: float) -> float:
        """Poll `condition` while the job runs; returns time.monotonic() when it first held."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return time.monotonic()
            if self.proc.poll() is not None:
                pytest.fail(f"job exited ({self.proc.returncode}) before the condition held:\n"
                            f"{self.stdout}\n{self.stderr}")
            time.sleep(0.05)
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        pytest.fail(f"condition not met within {timeout} s:\n{self.stdout}\n{self.stderr}")


def start(args: list[str], n: int, log_dir: Path) -> Job:
    """Start `python ARGS` on n ranks in the background (see Job)."""
    return Job(args, n, log_dir)


def metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(step records, eval records) of RUN_DIR/metrics.jsonl, in file order."""
    path = Path(run_dir) / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    steps = [r for r in records if "kind" not in r]
    return steps, [r for r in records if r.get("kind") == "eval"]


def line_count(path: Path) -> int:
    """Complete lines in a file another process appends to (0 while it does not exist)."""
    try:
        return Path(path).read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory`, relative path -> bytes (to show nothing was touched)."""
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}

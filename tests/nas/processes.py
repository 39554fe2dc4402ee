"""Child processes for the end-to-end tests: ``python -m nas.train`` / ``nas.search`` and torchrun."""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
_numbers = itertools.count()


def child_env() -> dict[str, str]:
    """The subprocess picks its own backend: tests/conftest.py's TRITON_INTERPRET=1 must not leak into it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # PYTHONFAULTHANDLER: a rank that aborts prints every thread's Python stack, which the assertion shows.
    # PYTHONUNBUFFERED: what it prints reaches its output file at once, where a test may watch for it.
    env.update(OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


class Child:
    """``command`` started in ``cwd``, its output going to files there (not pipes: a rank that outlives a
    killed torchrun would hold a pipe open and block the reader)."""

    def __init__(self, command: list[str], cwd: Path):
        self.command = command
        number = next(_numbers)
        self.stdout_path, self.stderr_path = cwd / f"child-{number}.stdout", cwd / f"child-{number}.stderr"
        with self.stdout_path.open("w") as stdout, self.stderr_path.open("w") as stderr:
            # A session of its own: kill() reaches it and what it starts in its process group.
            self.process = subprocess.Popen(command, cwd=cwd, env=child_env(), stdout=stdout, stderr=stderr,
                                            start_new_session=True)

    def wait(self, timeout: float) -> subprocess.CompletedProcess:
        """Wait for the end; past ``timeout`` seconds stop it (SIGTERM, which torchrun passes on to its ranks,
        which run in sessions of their own; SIGKILL after a grace period) and fail."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
            raise AssertionError(f"{' '.join(self.command)} still running after {timeout} s (stopped)\n"
                                 + self.output()) from None
        return subprocess.CompletedProcess(self.command, self.process.returncode, self.stdout_path.read_text(),
                                           self.stderr_path.read_text())

    def kill(self) -> None:
        """SIGKILL to the child and its process group, as ``kill -9`` of a job would."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def output(self) -> str:
        return f"stdout:\n{self.stdout_path.read_text()[-2000:]}\nstderr:\n{self.stderr_path.read_text()[-4000:]}"


def run(command: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run ``command`` to the end in ``cwd``; fail past ``timeout`` seconds."""
    return Child(command, cwd).wait(timeout)

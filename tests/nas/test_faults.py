"""Fault injection: ``kill -9`` of ``python -m nas.train`` and ``python -m nas.search`` at random moments, then
``--resume``, several times over; the run must end exactly as one that was never interrupted."""
from __future__ import annotations

import json
import random
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import processes
import pytest
import torch

from nas.atomic import TEMPORARY_NAME
from nas.checkpoint import load_checkpoint
from nas.report import read_log

TRAIN = [sys.executable, "-m", "nas.train", "--steps", "30", "--ckpt-every", "3", "--batch-size", "32", "--no-progress",
         "--set", "train_subset=192", "--set", "test_subset=64", "--set", "search_holdout=64", "--set", "plot=false"]
SEARCH = [sys.executable, "-m", "nas.search", "--algorithm", "tpe", "--tpe-startup-trials", "12", "--generations", "12",
          "--population", "6", "--budget", "macs=1M", "--test-images", "32", "--race"]


def killed_and_resumed(command: list[str], cwd: Path, kills: int, progress: Callable[[processes.Child], int],
                       total: int, resumable: int, rng: random.Random) -> list[int]:
    """Run ``command``; ``kills`` times, SIGKILL it once ``progress`` (steps done, as the run reports them) has
    reached a random step ahead (the first time at least ``resumable``, where there is something to resume
    from), a random fraction of a step later, and start it again with ``--resume``; let the last one finish.
    Returns the steps at which runs were killed."""
    killed_at, done, args = [], resumable - 1, command
    for _ in range(kills):
        if done >= total - 1:
            break
        target = rng.randint(done + 1, total - 1)
        child = processes.Child(args, cwd)
        deadline = time.monotonic() + 120
        while child.process.poll() is None and progress(child) < target:
            assert time.monotonic() < deadline, f"no progress to step {target}\n{child.output()}"
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.1))  # anywhere inside a step: training, logging, saving
        child.kill()
        assert child.process.returncode in (-9, 0), child.output()  # killed, or it had just finished
        done = progress(child)
        if child.process.returncode == -9:
            killed_at.append(done)
        args = command + ["--resume"]
    last = processes.Child(args, cwd)
    assert last.wait(timeout=300).returncode == 0, last.output()
    return killed_at


def stale_temporaries(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if TEMPORARY_NAME.fullmatch(p.name)]


@pytest.mark.slow
def test_training_and_search_killed_at_random_resume_exactly(tmp_path):
    rng = random.Random(12)

    # Training: the uninterrupted run, then one killed three times.
    straight = processes.run(TRAIN + ["--out-dir", "straight"], tmp_path, timeout=300)
    assert straight.returncode == 0, straight.stderr

    def steps_logged(_child) -> int:
        log = tmp_path / "killed" / "log.jsonl"
        return max((r["step"] for r in read_log(log) if r["event"] == "train"), default=0) if log.exists() else 0

    killed_at = killed_and_resumed(TRAIN + ["--out-dir", "killed"], tmp_path, 3, steps_logged, 30, 4, rng)
    assert len(killed_at) >= 2, killed_at
    runs = {name: read_log(tmp_path / name / "log.jsonl") for name in ("straight", "killed")}
    losses = {name: [(r["step"], r["losses"]) for r in log if r["event"] == "train"] for name, log in runs.items()}
    assert losses["killed"] == losses["straight"], killed_at
    finals = {name: [(r["smallest"], r["largest"]) for r in log if r["event"] == "final"] for name, log in runs.items()}
    assert finals["killed"] == finals["straight"] and len(finals["straight"]) == 1
    weights = {name: load_checkpoint(tmp_path / name / "checkpoints" / "step_00000030.pt")["model"] for name in runs}
    assert all(torch.equal(weights["killed"][k], weights["straight"][k]) for k in weights["straight"])
    assert stale_temporaries(tmp_path / "killed") == []

    # Search from the trained supernet: uninterrupted, then killed three times.
    checkpoint = ["--checkpoint", str(tmp_path / "straight" / "checkpoints" / "step_00000030.pt")]
    straight = processes.run(SEARCH + checkpoint + ["--out-dir", "straight-search"], tmp_path, timeout=300)
    assert straight.returncode == 0, straight.stderr

    def generations_done(child) -> int:
        return max(map(int, re.findall(r"\[search\] step (\d+)/", child.stdout_path.read_text())), default=0)

    # Step n is printed before its state is saved: once step 2 is, step 1's state is there to resume.
    killed_at = killed_and_resumed(SEARCH + checkpoint + ["--out-dir", "killed-search"], tmp_path, 3,
                                   generations_done, 12, 2, rng)
    assert len(killed_at) >= 2, killed_at
    results = {name: json.loads((tmp_path / name / "search.json").read_text())
               for name in ("straight-search", "killed-search")}
    for key in ("candidates", "pareto_front", "best", "test"):
        assert results["killed-search"][key] == results["straight-search"][key], (key, killed_at)
    assert stale_temporaries(tmp_path / "killed-search") == []

"""benchmarks/study.py: its statistics against hand computations, and every study at the smoke scale end to end,
continued after units are lost as if the study had been killed, the lost training run redone in a second process."""
from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys

import pytest
from processes import REPO as ROOT
from processes import child_env

spec = importlib.util.spec_from_file_location("study", ROOT / "benchmarks" / "study.py")
study = importlib.util.module_from_spec(spec)
sys.modules["study"] = study  # dataclasses look their module up there
spec.loader.exec_module(study)


def test_interval_is_the_t_interval_by_hand():
    # Mean 2, sample sd 1 over 3 values: half-width t(0.975, 2) * 1 / sqrt(3) = 4.302653 / 1.732051 = 2.484138.
    mean, low, high = study.interval([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert high - mean == pytest.approx(2.484138, abs=1e-6) and mean - low == pytest.approx(2.484138, abs=1e-6)
    assert math.isnan(study.interval([5.0])[1])


def test_paired_comparison_and_verdicts():
    baseline = {0: 50.0, 1: 60.0, 2: 70.0}
    # Seed effects as large as 20 points cancel in the pairing: the differences are 1, 1.2, 0.8.
    better = study.compare({0: 51.0, 1: 61.2, 2: 70.8}, baseline)
    assert better["difference"] == pytest.approx(1.0) and better["verdict"] == "better"
    assert study.compare({0: 49.0, 1: 58.8, 2: 69.2}, baseline)["verdict"] == "worse"
    assert study.compare({0: 53.0, 1: 58.0, 2: 70.5}, baseline)["verdict"] == "no difference at this power"
    assert study.compare({0: 1.0, 3: 2.0}, baseline)["seeds"] == 1  # only shared seeds are paired


@pytest.mark.slow
def test_the_studies_run_at_the_smoke_scale_and_continue(tmp_path):
    """searchers, supersam and vitas on the digits; the samplers study trains hybrid supernets on CIFAR-10, whose
    smoke run takes minutes on two cores, and is left to ``python benchmarks/study.py samplers --scale smoke``."""
    studies = ("searchers", "supersam", "vitas")
    command = [sys.executable, str(ROOT / "benchmarks" / "study.py"), *studies, "--scale", "smoke", "--out-dir",
               str(tmp_path)]
    subprocess.run(command, check=True, cwd=ROOT, env=child_env(), capture_output=True, text=True)
    for name in studies:
        report = (tmp_path / name / "report.md").read_text()
        assert any(v in report for v in study.VERDICTS), name
    first = {name: json.loads((tmp_path / name / "results.json").read_text()) for name in studies}
    assert list((tmp_path / "searchers").glob("anytime-*.png"))
    target = first["searchers"]["target"]
    assert all(t["seeds"] == 2 for t in target.values())

    # As if the study had been killed before these units ended: a searcher's run, and a vitas arm's training run
    # (its directory gone with it) and search, which the continued study redoes in worker processes (--jobs 2).
    units = sorted((tmp_path / "searchers" / "units").glob("predictor-*.json"))[:1]
    units[0].unlink()
    vitas = tmp_path / "vitas"
    shutil.rmtree(vitas / "runs" / "leading-s1")
    lost = [vitas / "units" / f"{step}-leading-s1.json" for step in ("train", "search")]
    for unit in lost:
        unit.unlink()
    stamps = {p: p.stat().st_mtime_ns for p in (vitas / "units").glob("*.json")}

    # Reported from the units that ended, running none: the comparisons with the lost arm stand on its other seed.
    partial = subprocess.run([*command, "--finished-only"], check=True, cwd=ROOT, env=child_env(),
                             capture_output=True, text=True).stdout
    assert ": done in" not in partial and not any(unit.exists() for unit in units + lost)
    seeds = {(c["arm"], c["baseline"]): c["seeds"]
             for c in json.loads((vitas / "results.json").read_text())["comparisons"]}
    assert seeds == {("two-sided", "leading"): 1, ("two-sided", "two-sided, shared tokens"): 2,
                     ("two-sided, probability searched", "two-sided"): 2}
    target = json.loads((tmp_path / "searchers" / "results.json").read_text())["target"]
    assert sorted(t["seeds"] for t in target.values()) == [1, 2], "the lost predictor run's seed is left out"

    out = subprocess.run([*command, "--jobs", "2"], check=True, cwd=ROOT, env=child_env(), capture_output=True,
                         text=True).stdout
    for unit in units + lost:
        assert unit.exists() and f"{unit.stem}: done" in out
    assert out.count(": done in") == 3, "only the lost units run again"
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    again = {name: json.loads((tmp_path / name / "results.json").read_text()) for name in studies}
    assert again == first, "the continued study reports what the first run did"

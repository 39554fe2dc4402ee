"""Studies that test each seed paper's claim here, with several seeds and 95% intervals.

    python benchmarks/study.py STUDY --scale smoke|cpu|gpu [--seeds N] [--out-dir DIR] [--jobs N] [--finished-only]

STUDY is ``searchers``, ``samplers``, ``supersam``, ``vitas`` or ``all``. Each ends in a table of means with 95%
t-intervals over seeds and, per comparison, the paired difference (arms that share a seed are paired by it) with its
interval and a verdict: ``better`` or ``worse`` where the interval excludes 0, else ``no difference at this power``.
Tables go to ``<out-dir>/<study>/report.md`` and ``results.json``; curves to PNG files beside them.

- ``searchers``: one supernet and one evaluation table (arch -> held-out and test top-1, each computed once and
  cached) shared by every run, so ten seeds of every searcher cost only the distinct archs. Every searcher of
  ``nas.searchers`` runs under each budget; anytime curves give the test top-1 of the best held-out arch against
  evaluations. Target: the predictor-assisted search reaches the held-out score of the best arch of an evolution
  given ``reference_evaluations`` (1,000 at the cpu and gpu scales, on 3 seeds) within a third of those
  evaluations.
- ``samplers``: one supernet per training sampler and seed at equal training compute (the same subnet-images: a
  sampler that trains k subnets a step gets 1/k of uniform's steps), each searched the same way (evolution at every
  budget); test top-1 of the best arch per budget, each sampler against uniform.
- ``supersam``: a pretrained model (the space's largest arch trained alone) turned into a supernet (``--init-from``,
  MLP units reordered, layer-drop profile with the sandwich rule, distillation from the pretrained model) against the
  same supernet from scratch at equal steps, and against the subnets it finds 30%, 50% and 70% below the pretrained
  model's MACs trained alone at equal steps.
- ``vitas``: ViTAS's two-sided width sharing against leading-only, private patch tokens per patch size on and off,
  and the identity probability searched during training against calibrated by bisection.

Scales: ``smoke`` runs every study in seconds on the built-in digits, the samplers study on a few CIFAR-10 images (it
checks the machinery, its figures mean nothing; CI runs all but samplers); ``cpu`` runs on CIFAR-10 at 32 px
(``--data-dir``, default ``../shared/data/cifar-10-batches-py``), where a small ViT lands far above chance (30-50%
against 10% after 1,500 steps) yet its subnets still differ by points, so a comparison can show: 2-4 hours of one
thread a study on a shared 2-core VM (RESULTS.md has the times), more than the hour aimed at even split over two
cores; ``gpu`` is the same task with more images a step and larger test sets, sized for ten minutes on one GPU by
estimate. Every unit (a training run, a search, a searcher's run) writes its result when it ends and is skipped when
the study runs again; a killed training run continues from its last checkpoint. So a killed study continues. With
``--jobs N`` the training studies run N units side by side in processes of their own (the same figures as one at a
time). With ``--finished-only`` a study reports from the units that have ended and runs none (each comparison says on
how many seeds it stands).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import yaml
from scipy import stats

from nas import costs
from nas.atomic import atomic_write_text
from nas.budget import Budget, Costs
from nas.checkpoint import load_supernet
from nas.evaluate import EvalCache, evaluate_sides
from nas.samplers import build_sampler
from nas.searchers import SEARCHERS, build_searcher
from nas.searching import SearchConfig, run_search, search_data
from nas.spaces import load_space
from nas.trainer import TrainConfig, train

STUDIES = ("searchers", "samplers", "supersam", "vitas")
VERDICTS = ("better", "worse", "no difference at this power")


@dataclasses.dataclass(frozen=True)
class Scale:
    """What one scale trains and searches on; the task is chosen so the baseline lands far above chance."""

    dataset: str
    space: str                  # a ViT preset of the task, which the vitas and supersam studies extend
    hybrid_space: str           # the CIFAR-10 hybrid preset the samplers study trains (ElasticViT's sampler is for
                                # hybrid spaces) on CIFAR-10 at every scale
    image_size: int
    in_chans: int
    train_steps: int            # steps of a one-subnet-a-step run: the searchers' supernet, the vitas arms, the model
                                # SuperSAM starts from
    hybrid_train_steps: int     # the same for the samplers study's hybrid nets; its samplers get equal subnet-images
    supersam_steps: int         # steps of SuperSAM's supernets (the sandwich rule: three subnets a step) and, as many,
                                # of the subnets trained alone
    batch_size: int
    lr: float
    holdout_images: int         # search data: training images every run holds out
    test_images: int
    seeds: int
    search_generations: int     # evolution per budget in the vitas study (two budgets)
    search_population: int
    short_search_generations: int   # evolution per budget in the samplers and supersam studies: three budgets each
    short_search_population: int    # (and the samplers' hybrid archs get their BatchNorm re-estimated)
    searcher_evaluations: int   # evaluations of each searcher's run in the searchers study
    searcher_population: int
    reference_evaluations: int  # the evolution the predictor-assisted search is measured against
    reference_seeds: int        # seeds of that evolution (its runs cost the most distinct archs of the study)
    table_images: int           # held-out images (the first of the split) scoring each arch of the searchers' table
    budget_quantiles: tuple[float, ...] = (0.3, 0.6)  # MAC budgets at these quantiles of uniform draws
    searcher_budget_quantiles: tuple[float, ...] = (0.3, 0.6)
    sampler_budget_quantiles: tuple[float, ...] = (0.2, 0.5, 0.8)  # a sampler may favour small or large subnets


SCALES = {
    "smoke": Scale("digits", "digits-tiny", "elasticvit-mobile-cifar", 8, 1, train_steps=6, hybrid_train_steps=6,
                   supersam_steps=6, batch_size=32, lr=3e-3,
                   holdout_images=120, test_images=120, seeds=2, search_generations=1, search_population=4,
                   short_search_generations=1, short_search_population=4,
                   searcher_evaluations=12, searcher_population=4, reference_evaluations=24, reference_seeds=2,
                   table_images=120),
    # The searchers study scores some 17,500 distinct archs, so each on only 250 held-out images (one budget, the
    # reference evolution on 3 seeds; the best archs on 2,000 test images): 116 minutes of one thread all the same.
    # The samplers study (18 runs) and the supersam study (15 runs after the pretrained model's; a sandwich step trains
    # three subnets) were cut to these sizes to come near two hours of one thread: supersam took 112 minutes, samplers
    # about 80 minutes a seed (its learned and performance samplers measure archs as they train).
    "cpu": Scale("cifar10", "cifar-tiny", "elasticvit-mobile-cifar", 32, 3, train_steps=1500, hybrid_train_steps=500,
                 supersam_steps=200, batch_size=128, lr=2e-3,
                 holdout_images=1000, test_images=2000, seeds=3, search_generations=6, search_population=25,
                 short_search_generations=4, short_search_population=15,
                 searcher_evaluations=400, searcher_population=20, reference_evaluations=1000, reference_seeds=3,
                 table_images=250, searcher_budget_quantiles=(0.5,)),
    # The four studies train 47 supernets and models (3 seeds): at most about 2,000 subnet-steps each (SuperSAM's
    # sandwich supernets 500 steps of three subnets) and an assumed 5 ms a subnet-step of this small ViT on an H100
    # (host-bound), about 8 minutes. Sized by that estimate: no GPU has run it yet. From the cpu runs: the searchers'
    # table scores on 1,000 held-out images (on 250 the held-out gains of every searcher did not carry to the test
    # set), and every run sees 2.7 to 8 times the cpu scale's images (its vitas subnets stayed at 29-31%).
    "gpu": Scale("cifar10", "cifar-tiny", "elasticvit-mobile-cifar", 32, 3, train_steps=2000, hybrid_train_steps=2000,
                 supersam_steps=500, batch_size=256, lr=2e-3,
                 holdout_images=1000, test_images=10000, seeds=3, search_generations=6, search_population=25,
                 short_search_generations=6, short_search_population=25,
                 searcher_evaluations=400, searcher_population=20, reference_evaluations=1000, reference_seeds=3,
                 table_images=1000),
}
SEARCHER_SEEDS = {"smoke": 2, "cpu": 10, "gpu": 10}


# --- statistics ------------------------------------------------------------------------------------------------

def interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and the two-sided t-interval of the mean (NaN bounds for fewer than two values)."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))
    return mean, mean - half, mean + half


def verdict(low: float, high: float) -> str:
    if low > 0:
        return VERDICTS[0]
    if high < 0:
        return VERDICTS[1]
    return VERDICTS[2]


def compare(arm: dict[int, float], baseline: dict[int, float]) -> dict:
    """``arm`` against ``baseline``, each ``{seed: value}``: paired differences over the seeds both have."""
    seeds = sorted(set(arm) & set(baseline))
    mean, low, high = interval([arm[s] - baseline[s] for s in seeds])
    return {"difference": mean, "low": low, "high": high, "seeds": len(seeds), "verdict": verdict(low, high)}


def fmt(mean: float, low: float, high: float) -> str:
    return f"{mean:.2f}" if math.isnan(low) else f"{mean:.2f} [{low:.2f}, {high:.2f}]"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


# --- units: each writes its result once, and a study run again skips it ---------------------------------------

class UnitMissing(Exception):
    """A unit that has not ended, in a study that reports only those that have (``--finished-only``)."""


class Study:
    """One study's output directory: cached units, the report, plots."""

    def __init__(self, name: str, scale_name: str, out_dir: Path, seeds: int | None, data_dir: str | None,
                 log: Callable[[str], None] = print, jobs: int = 1, finished_only: bool = False):
        self.name, self.scale_name, self.scale, self.jobs = name, scale_name, SCALES[scale_name], jobs
        self.finished_only = finished_only
        self.dir = out_dir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.seeds = seeds or (SEARCHER_SEEDS[scale_name] if name == "searchers" else self.scale.seeds)
        self.cifar_dir = data_dir
        self.data_dir = data_dir if self.scale.dataset != "digits" else None
        self.log = log

    def unit(self, key: str, compute: Callable[[], dict]) -> dict:
        path = self.dir / "units" / f"{key}.json"
        if path.exists():
            return json.loads(path.read_text())
        if self.finished_only:
            raise UnitMissing(key)
        start = time.perf_counter()
        result = compute()
        result["seconds"] = time.perf_counter() - start
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(result, indent=1))
        self.log(f"[study {self.name}] {key}: done in {result['seconds']:.1f} s")
        return result

    def map(self, function: Callable, calls: Sequence[tuple]) -> list:
        """``function(self, *call)`` for every call, in order; in ``jobs`` processes side by side when there are
        more (a unit writes only its own files, so units run side by side; on a CPU, small nets gain more from two
        processes than from two threads each). With ``finished_only``, None for a call whose units have not ended."""
        if self.finished_only:
            return [self.finished(function, *call) for call in calls]
        if self.jobs == 1 or len(calls) < 2:
            return [function(self, *call) for call in calls]
        threads = max(1, torch.get_num_threads() // self.jobs)
        with ProcessPoolExecutor(min(self.jobs, len(calls)), mp_context=multiprocessing.get_context("spawn"),
                                 initializer=torch.set_num_threads, initargs=(threads,)) as pool:
            return [future.result() for future in [pool.submit(function, self, *call) for call in calls]]

    def finished(self, function: Callable, *args):
        """``function(self, *args)``, or None where it needs a unit that has not ended (``finished_only``)."""
        try:
            return function(self, *args)
        except UnitMissing:
            return None

    def space_file(self, name: str, base: str | None = None, **changes) -> str:
        """The space ``base`` (default: the scale's ViT space) with ``changes``, written as a YAML file of this study
        (its name: ``name``)."""
        values = {**load_space(base or self.scale.space).to_dict(), **changes, "name": name}
        path = self.dir / "spaces" / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            atomic_write_text(path, yaml.safe_dump(values, sort_keys=False))
        return str(path)

    def budgets(self, space: str, quantiles: Sequence[float] | None = None) -> list[str]:
        """MAC budgets at ``quantiles`` (default: the scale's) of 2,000 uniform draws of ``space``."""
        space = load_space(space)
        draws = costs.macs_many(space.sample_many(np.random.default_rng(0), 2000), space)
        return [Budget("macs", float(np.quantile(draws, q))).label for q in quantiles or self.scale.budget_quantiles]

    def train_settings(self, space: str, seed: int, steps: int, **settings) -> dict:
        s = self.scale
        return {"space": space, "dataset": s.dataset, "data_dir": self.data_dir, "seed": seed, "max_steps": steps,
                "batch_size": s.batch_size, "lr": s.lr, "warmup_steps": max(1, steps // 10),
                "search_holdout": s.holdout_images, "test_subset": s.test_images, "ckpt_every": max(1, steps // 4),
                "keep_checkpoints": 1, "progress": False, "plot": False, **settings}

    def trained(self, key: str, settings: dict) -> dict:
        """A training run (``nas.trainer.train``): its checkpoint and final test figures; continued if killed."""
        def run() -> dict:
            out = self.dir / "runs" / key
            checkpoints = sorted((out / "checkpoints").glob("step_*.pt")) if out.exists() else []
            if out.exists() and not checkpoints:
                shutil.rmtree(out)  # this study's own run, killed before its first checkpoint
            result = train(TrainConfig.from_dict({**settings, "out_dir": str(out)}), bool(checkpoints))
            return {"checkpoint": result.checkpoint, "smallest": 100 * result.smallest,
                    "largest": 100 * result.largest, "eval_archs": [100 * a for a in result.eval_archs],
                    "steps": result.steps}
        return self.unit(f"train-{key}", run)

    def searched(self, key: str, checkpoint: str, budgets: list[str], seed: int, short: bool = False) -> dict:
        """Evolution at every budget on the held-out images (the scale's short one where ``short``); the best arch of
        each and its test score."""
        s = self.scale
        generations, population = ((s.short_search_generations, s.short_search_population) if short else
                                   (s.search_generations, s.search_population))
        def run() -> dict:
            out = self.dir / "runs" / key / "search"
            config = SearchConfig.from_dict({
                "checkpoint": checkpoint, "budgets": budgets, "generations": generations, "population": population,
                "seed": seed, "out_dir": str(out), "holdout_images": s.holdout_images, "test_images": s.test_images,
                "progress": False})
            summary = run_search(config, resume=(out / "state.pt").exists())
            score = summary["score"]
            return {"best": {label: {"test": summary["test"][label][score], "search": best[score],
                                     "arch": best["arch"], "macs": best["macs"]}
                             for label, best in summary["best"].items() if best is not None}}
        return self.unit(f"search-{key}", run)["best"]

    def write_report(self, text: str, results: dict) -> None:
        atomic_write_text(self.dir / "report.md", text + "\n")
        atomic_write_text(self.dir / "results.json", json.dumps(results, indent=1))
        self.log(text)


def train_and_search(study: Study, key: str, settings: dict, budgets: list[str], seed: int, short: bool = False
                     ) -> dict:
    """One arm on one seed: its supernet trained, then searched; the best arch of each budget (``Study.searched``)."""
    run = study.trained(key, settings)
    return study.searched(key, run["checkpoint"], budgets, seed, short)


def scores_on_test(found: dict[tuple[str, int], dict]) -> dict[str, dict[str, dict[int, float]]]:
    """``{arm: {budget: {seed: test top-1}}}`` of searches keyed by ``(arm, seed)`` (None: not ended)."""
    scores: dict[str, dict[str, dict[int, float]]] = {}
    for (arm, seed), best in found.items():
        for budget, result in (best or {}).items():
            scores.setdefault(arm, {}).setdefault(budget, {})[seed] = result["test"]
    return scores


# --- the training studies: arms trained per seed, then searched the same way -------------------------------------

def arm_table(study: Study, scores: dict[str, dict[str, dict[int, float]]], comparisons: Sequence[tuple[str, str]],
              title: str, metric: str = "test top-1 (%)") -> tuple[str, dict]:
    """``scores[arm][budget][seed]``: a table of means per arm and budget, and ``(arm, baseline)`` comparisons."""
    budgets = list(dict.fromkeys(b for per_budget in scores.values() for b in per_budget))
    rows = [[arm] + [fmt(*interval(list(per_budget[b].values()))) if per_budget.get(b) else "-" for b in budgets]
            for arm, per_budget in scores.items()]
    compared = []
    for arm, baseline in comparisons:
        for b in budgets:
            if scores.get(arm, {}).get(b) and scores.get(baseline, {}).get(b):
                c = compare(scores[arm][b], scores[baseline][b])
                compared.append({"arm": arm, "baseline": baseline, "budget": b, **c})
    seeds = f"{study.seeds} seeds" + (", the runs that had ended" if study.finished_only else "")
    text = (f"## {title} ({study.scale_name} scale, {seeds}, {metric}, mean [95% interval])\n\n"
            + markdown_table(["arm", *budgets], rows) + "\n\n"
            + markdown_table(["comparison", "budget", "difference", "seeds", "verdict"],
                             [[f"{c['arm']} - {c['baseline']}", c["budget"], fmt(c["difference"], c["low"], c["high"]),
                               c["seeds"], c["verdict"]] for c in compared]))
    return text, {"scores": {a: {b: {str(s): v for s, v in per.items()} for b, per in pb.items()}
                             for a, pb in scores.items()}, "comparisons": compared}


def subnets_per_step(sampler: str, space: str, options: dict) -> int:
    """How many subnets one training step of ``sampler`` trains (forward and backward each)."""
    return len(build_sampler(sampler, load_space(space), seed=0, total_steps=10, **options).sample())


def run_samplers(study: Study) -> str:
    """Every training sampler at the same subnet-images, searched alike, against uniform, on the scale's hybrid
    space on CIFAR-10 at every scale (ElasticViT's sampler walks FLOPs banks of hybrid spaces, and the hybrid presets
    are CIFAR's)."""
    s = study.scale
    space = s.hybrid_space
    samplers = {"uniform": {}, "sandwich": {}, "complexity": {}, "performance": {}, "elasticvit": {}, "learned": {}}
    budgets = study.budgets(space, s.sampler_budget_quantiles)
    steps = {name: max(1, round(s.hybrid_train_steps / subnets_per_step(name, space, options)))
             for name, options in samplers.items()}
    # Seed by seed, so that a study cut short has every sampler's first seeds.
    runs = [(name, seed) for seed in range(study.seeds) for name in samplers]
    calls = [(f"{name}-s{seed}", study.train_settings(
        space, seed, steps[name], sampler=name, sampler_options=samplers[name], dataset="cifar10",
        data_dir=study.cifar_dir), budgets, seed, True) for name, seed in runs]
    scores = scores_on_test(dict(zip(runs, study.map(train_and_search, calls))))
    text, results = arm_table(study, scores, [(n, "uniform") for n in samplers if n != "uniform"],
                              "Training samplers at equal subnet-images")
    study.write_report(text, results)
    return text


def run_vitas(study: Study) -> str:
    """ViTAS: two-sided sharing against leading-only, private tokens on and off, identity probability searched
    against calibrated; a ViTAS-like space of the scale's task (identity layers, two patch sizes, private q/k)."""
    s = study.scale
    base = load_space(s.space)
    patches = [p for p in (base.patch_sizes[0], 2 * base.patch_sizes[0]) if s.image_size % p == 0]
    vitas = dict(identity_layers=True, private_qk=True, patch_sizes=patches, depths=list(range(1, base.max_depth + 1)))
    spaces = {"private": study.space_file("vitas-private", **vitas, private_class_tokens=True),
              "shared": study.space_file("vitas-shared", **vitas, private_class_tokens=False)}
    budgets = study.budgets(spaces["private"])
    # The identity probability is calibrated (or searched) for subnets between the lower quartile and the median of
    # uniform draws' MACs: a range that some probability reaches in every space (the default middle third of the
    # MACs range lies above the mean of any probability where widths are drawn uniformly, as in the small spaces).
    draws = load_space(spaces["private"]).sample_many(np.random.default_rng(0), 2000)
    calibrated = {"macs_range": [float(q) for q in np.quantile(costs.macs_many(draws, load_space(spaces["private"])),
                                                                (0.25, 0.5))]}
    searched = {**calibrated, "search_probabilities": [0.1, 0.3, 0.5],
                "search_archs": 4 if study.scale_name == "smoke" else 16}
    arms = {"two-sided": (spaces["private"], {"width_sharing": "two_sided"}, calibrated),
            "leading": (spaces["private"], {"width_sharing": "leading"}, calibrated),
            "two-sided, shared tokens": (spaces["shared"], {"width_sharing": "two_sided"}, calibrated),
            "two-sided, probability searched": (spaces["private"], {"width_sharing": "two_sided"}, searched)}
    runs = [(arm, seed) for seed in range(study.seeds) for arm in arms]
    calls = []
    for arm, seed in runs:
        space, settings, options = arms[arm]
        calls.append((f"{arm.replace(', ', '-').replace(' ', '-')}-s{seed}", study.train_settings(
            space, seed, s.train_steps, sampler="identity", sampler_options=options, **settings), budgets, seed))
    scores = scores_on_test(dict(zip(runs, study.map(train_and_search, calls))))
    text, results = arm_table(study, scores, [("two-sided", "leading"), ("two-sided", "two-sided, shared tokens"),
                                              ("two-sided, probability searched", "two-sided")],
                              "ViTAS: width sharing, private tokens, identity probability")
    study.write_report(text, results)
    return text


def run_supersam(study: Study) -> str:
    """SuperSAM: a pretrained model made a supernet, against the supernet from scratch and the subnets alone."""
    s = study.scale
    space_path = study.space_file("supersam", identity_layers=True)
    space = load_space(space_path)
    pretrained = study.trained("pretrained", study.train_settings(space_path, 0, s.train_steps, sampler="fixed"))
    top = costs.macs(space.max_arch(), space)
    cuts = (0.3, 0.5, 0.7)
    budgets = [Budget("macs", (1 - cut) * top, (0.95 - cut) * top).label for cut in cuts]
    supernet = {"sampler": "sandwich", "sampler_options": {"drop_profile": "linear"}}
    arms = {"supersam": {**supernet, "init_from": pretrained["checkpoint"], "reorder_mlp": "activation",
                         "teacher": "pretrained"},
            "scratch supernet": supernet}
    runs = [(arm, seed) for seed in range(study.seeds) for arm in arms]
    found = dict(zip(runs, study.map(train_and_search, [
        (f"{arm.replace(' ', '-')}-s{seed}", study.train_settings(space_path, seed, s.supersam_steps, **arms[arm]),
         budgets, seed, True) for arm, seed in runs])))
    scores = scores_on_test(found)
    # The subnets SuperSAM found, each trained alone as long.
    alone = [(b, seed, best["arch"]) for (arm, seed), per_budget in found.items() if arm == "supersam"
             for b, best in (per_budget or {}).items()]
    trained_alone = study.map(Study.trained, [
        (f"alone-{b.replace('=', '-').replace(':', '-')}-s{seed}", study.train_settings(
            space_path, seed, s.supersam_steps, sampler="fixed", sampler_options={"arch": arch}, eval_archs=[arch]))
        for b, seed, arch in alone])
    for (b, seed, _), run in zip(alone, trained_alone):
        if run is not None:
            scores.setdefault("subnet alone", {}).setdefault(b, {})[seed] = run["eval_archs"][0]
    text, results = arm_table(study, scores, [("supersam", "scratch supernet"), ("supersam", "subnet alone")],
                              f"SuperSAM: budgets 30/50/70% below the pretrained model "
                              f"({pretrained['largest']:.2f}% test top-1, {top / 1e6:.2f}M MACs)")
    study.write_report(text, {**results, "pretrained": pretrained})
    return text


# --- the searchers study: one supernet, one evaluation table ---------------------------------------------------

class EvaluationTable:
    """Held-out and test top-1 of archs of one supernet, each computed once (cached on disk across runs)."""

    def __init__(self, study: Study, checkpoint: str):
        self.supernet, self.space, state = load_supernet(checkpoint, "cpu", None)
        self.state = state
        config = SearchConfig.from_dict({"checkpoint": checkpoint, "holdout_images": study.scale.table_images,
                                         "test_images": study.scale.test_images, "progress": False})
        self.holdout_data, self.test_data, self.calibration, _ = search_data(config, state, self.space, "cpu")
        self.cache = EvalCache(study.dir / "evaluation_table.json")

    def top1(self, archs: Sequence, split: str) -> list[float]:
        data = self.holdout_data if split == "holdout" else self.test_data
        results = evaluate_sides(self.supernet, list(archs), data, ("left",), cache=self.cache,
                                 data_key=f"{split}|{data.fingerprint}", progress=False, calibration=self.calibration)
        self.cache.save()
        return [r.top1 for r in results]


def searcher_run(table: EvaluationTable, name: str, budget: Budget, seed: int, evaluations: int,
                 population: int) -> dict:
    """One searcher under one budget until it has scored ``evaluations`` distinct archs: after each step, the
    evaluations so far and the held-out and test top-1 of its best held-out arch."""
    budgets = Costs(table.space)
    options = {}
    if name == "sampler":
        trained = table.state["config"]
        sampler = build_sampler("learned", table.space, seed=trained["seed"], **trained["sampler_options"])
        sampler.load_state_dict(table.state["sampler"])
        options = {"sampler": sampler, "budget": budget}
    searcher = build_searcher(name, table.space, budgets.feasible([budget]), seed=seed, cost=budgets.metric("macs"),
                              **options)
    curve = []
    for _ in range(4 * math.ceil(evaluations / population)):  # a searcher that repeats itself stops all the same
        archs = searcher.propose(min(population, evaluations - len(searcher.scores)))
        searcher.observe(archs, table.top1(archs, "holdout"))
        best, held_out = searcher.best()
        curve.append([len(searcher.scores), held_out, table.top1([best], "test")[0]])
        if len(searcher.scores) >= evaluations:
            break
    return {"curve": curve}


def best_at(curve: Sequence[Sequence[float]], evaluations: int, column: int) -> float:
    """The best-so-far figure (column 1: held-out, 2: test) once ``evaluations`` archs were scored."""
    reached = [row for row in curve if row[0] <= evaluations]
    return (reached or curve[:1])[-1][column]


def run_searchers(study: Study) -> str:
    s = study.scale
    run = study.trained("supernet", study.train_settings(s.space, 0, s.train_steps, sampler="learned"))
    table = EvaluationTable(study, run["checkpoint"])
    budgets = [Budget.parse(b) for b in study.budgets(s.space, s.searcher_budget_quantiles)]
    names = sorted(SEARCHERS)
    curves: dict[str, dict[str, dict[int, list]]] = {}
    for budget in budgets:
        for seed in range(study.seeds):
            for name in names:
                key = f"{name}-{budget.label}-s{seed}".replace("=", "-").replace(":", "-")
                result = study.finished(Study.unit, key, lambda: searcher_run(
                    table, name, budget, seed, s.searcher_evaluations, s.searcher_population))
                if result is not None:
                    curves.setdefault(budget.label, {}).setdefault(name, {})[seed] = result["curve"]
            if seed >= s.reference_seeds:
                continue
            key = f"reference-evolution-{budget.label}-s{seed}".replace("=", "-").replace(":", "-")
            reference = study.finished(Study.unit, key, lambda: searcher_run(table, "evolution", budget, seed,
                                                                             s.reference_evaluations, 50))
            if reference is not None:
                curves.setdefault(budget.label, {}).setdefault("reference evolution", {})[seed] = reference["curve"]

    marks = sorted({max(1, s.searcher_evaluations // 8), s.searcher_evaluations // 4, s.searcher_evaluations // 2,
                    s.searcher_evaluations})
    sections, results = [], {"curves": curves, "target": {}}
    for label, per_name in curves.items():
        rows = [[name] + [fmt(*interval([best_at(c, m, 2) for c in per_seed.values()])) for m in marks]
                for name, per_seed in per_name.items() if name != "reference evolution"]
        # Column 1: the held-out score the searchers climb; column 2: the test top-1 of their best arch.
        final = {column: {name: {seed: best_at(c, s.searcher_evaluations, column) for seed, c in per_seed.items()}
                          for name, per_seed in per_name.items() if name != "reference evolution"}
                 for column in (1, 2)}
        compared = []
        for name in final[2]:
            if name == "random" or "random" not in final[2]:
                continue
            row = [f"{name} - random"]
            for column in (1, 2):
                c = compare(final[column][name], final[column]["random"])
                row += [fmt(c["difference"], c["low"], c["high"]), c["verdict"]]
            compared.append(row)
        reach = {}
        for seed, reference in per_name.get("reference evolution", {}).items():
            if seed not in per_name.get("predictor", {}):
                continue
            goal = reference[-1][1]
            reached = [row[0] for row in per_name["predictor"][seed] if row[1] >= goal]
            reach[seed] = reached[0] if reached else None
        third = s.reference_evaluations / 3
        met = sum(1 for n in reach.values() if n is not None and n <= third)
        results["target"][label] = {"evaluations_to_reach": reach, "met_in_seeds": met, "seeds": len(reach)}
        sections.append(
            f"### Budget {label}: best test top-1 (%) of the best held-out arch after N evaluations, mean "
            "[95% interval]"
            "\n\n" + markdown_table(["searcher", *[f"N={m}" for m in marks]], rows) + "\n\n"
            + markdown_table([f"at N={s.searcher_evaluations}", "difference (held-out score)", "verdict",
                              "difference (test top-1)", "verdict"], compared)
            + f"\n\nPredictor-assisted search against a {s.reference_evaluations}-evaluation evolution (same seed): "
            f"evaluations to reach its best held-out score {json.dumps({str(k): v for k, v in reach.items()})}; "
            f"within a third ({third:.0f}) in {met} of {len(reach)} seeds: target "
            + ("met" if met == len(reach) else "NOT met") + ".")
        plot_curves(study.dir / f"anytime-{label.replace('=', '-').replace(':', '-')}.png", label, per_name)
    text = (f"## Searchers ({study.scale_name} scale, {study.seeds} seeds, {len(table.cache)} evaluations in the "
            f"shared table)\n\n" + "\n\n".join(sections))
    study.write_report(text, results)
    return text


def plot_curves(path: Path, label: str, per_name: dict[str, dict[int, list]]) -> None:
    """Anytime curves side by side: the held-out score a searcher climbs, and the test top-1 of its best arch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharex=True)
    for ax, column, split in ((axes[0], 1, "held-out score"), (axes[1], 2, "test top-1")):
        for name, per_seed in per_name.items():
            grid = np.unique(np.concatenate([[row[0] for row in c] for c in per_seed.values()]))
            values = np.array([[best_at(c, n, column) for n in grid] for c in per_seed.values()])
            bounds = np.array([interval(values[:, i]) for i in range(len(grid))])
            ax.plot(grid, bounds[:, 0], label=name)
            if len(values) > 1:
                ax.fill_between(grid, bounds[:, 1], bounds[:, 2], alpha=0.15)
        ax.set_xscale("log")
        ax.set_xlabel("evaluations (distinct archs scored)")
        ax.set_ylabel(f"{split} of the best held-out arch (%)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"Anytime search under {label}: mean and 95% interval over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


RUNNERS = {"searchers": run_searchers, "samplers": run_samplers, "supersam": run_supersam, "vitas": run_vitas}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", nargs="+", choices=(*STUDIES, "all"), help="one or more studies, or all")
    parser.add_argument("--scale", choices=tuple(SCALES), default="smoke")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per arm (default: the scale's)")
    parser.add_argument("--out-dir", default="runs/study")
    parser.add_argument("--data-dir", default="../shared/data/cifar-10-batches-py",
                        help="CIFAR-10 for the cpu and gpu scales")
    parser.add_argument("--finished-only", action="store_true",
                        help="report from the units that have ended and run none (a study cut short, or running "
                             "elsewhere): each comparison's seeds column says on how many seeds it stands")
    parser.add_argument("--jobs", type=int, default=1,
                        help="training studies: runs side by side in this many processes, the threads split among "
                             "them (2 on two cores; the searchers study shares one evaluation table and runs alone)")
    args = parser.parse_args(argv)
    if args.seeds is not None and args.seeds < 2:
        parser.error("--seeds must be at least 2 (an interval needs two values)")
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    for name in STUDIES if "all" in args.study else dict.fromkeys(args.study):
        study = Study(name, args.scale, Path(args.out_dir), args.seeds, args.data_dir, jobs=args.jobs,
                      finished_only=args.finished_only)
        try:
            RUNNERS[name](study)
        except UnitMissing as missing:
            parser.exit(2, f"study.py: {name}: nothing to report: {missing} has not ended\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

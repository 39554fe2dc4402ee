"""Architecture search under FLOPs, params and latency budgets: the config of a search (:class:`SearchConfig`), the
search loop (:class:`Search`), and a whole search from a supernet checkpoint (:func:`run_search`).

A search algorithm (``nas.searchers``: evolution, nsga2, random, sampler, rl, tpe, autotuner) proposes candidates
step by step; each step's new candidates of every budget are evaluated together, K subnets per pass over the data
(``nas.evaluate``). Several budgets in one run share every evaluated candidate. The state is saved atomically after
every step and a resumed search continues exactly; a candidate is never evaluated twice.

Outputs in ``out_dir``: ``search.json`` (every evaluated arch with its metrics, the Pareto front, the best arch per
budget and its test-split metrics), ``pareto.png``, ``state.pt`` and, with ``export``, one standalone subnet per
budget (``best-<budget>.pt``, ``nas.export`` format).

Search data is, by default, the training images the checkpoint's supernet never trained on (as AutoFormer searches
on its subImageNet): training holds out a split (``nas.data.SearchSplit``) and records it in the checkpoint;
``holdout_images`` takes its first N. The test split is reported separately for the best archs.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import data as data_lib
from .atomic import atomic_torch_save, atomic_write_text
from .budget import METRICS, Budget, Costs, format_count
from .checkpoint import file_digest, load_supernet
from .config import Config, changes_on_resume, setting
from .device import resolve_device
from .distributed import Distributed, init_distributed, sum_over_ranks
from .errors import CheckpointError, CheckpointMismatchError, ConfigError, OutputError, UserError, first_line
from .evaluate import (
    EvalCache,
    EvalResult,
    LoaderBatches,
    TensorBatches,
    available_memory,
    evaluate_sides,
    evaluation_batches,
)
from .export import extract_subnet, save_subnet
from .family import Arch, Space, family_of
from .hybrid.scaling import CompoundScaling, compound_family
from .latency import LatencyModel, environment
from .memory import check_memory
from .racing import Contenders, RaceConfig, race, slice_bounds
from .report import plot_front
from .rundir import OwnedDirectory
from .samplers import build_sampler
from .saved import saved_flag, saved_number
from .searchers import SEARCHERS, build_searcher
from .searchers.base import saved_arch

STATE_VERSION = 1
STATE_FILE = "state.pt"  # in the output directory

# Ceilings of the counts a search loops over and holds (``nas.config``'s ``at_most``): far past any search worth
# running, short of one that would run for ever or outgrow memory. Every evaluated candidate stays in the search
# state (its arch and metrics, about a kilobyte), which is saved after every step.
MAX_CANDIDATES = 100_000  # proposed, bred or drawn in one step
MAX_GENERATIONS = 100_000
MAX_EVALUATIONS = 10_000_000  # generations * population * budgets


@dataclass
class SearchConfig(Config):
    """Every setting of a search; YAML keys, ``--set`` keys and flags have these names."""

    NAME = "search"

    checkpoint: str | None = setting(None, "supernet checkpoint written by python -m nas.train", resumable=True)
    space: str | None = setting(None, "the space the checkpoint's supernet must be of (null: whichever it is)")
    algorithm: str = setting("evolution", "search algorithm (nas.searchers)", choices=tuple(SEARCHERS))
    budgets: list[str] = setting([], "METRIC=LIMIT or METRIC=LOW:HIGH (macs, flops, params, latency in ms); repeat "
                                     "for several", flag="--budget")
    generations: int = setting(20, "search steps", resumable=True, at_most=MAX_GENERATIONS)
    population: int = setting(50, "candidates per step and budget", at_most=MAX_CANDIDATES)
    parents: int = setting(10, "evolution: the best archs seen that breed", at_most=MAX_CANDIDATES)
    mutations: int = setting(25, "evolution: mutants per step", at_most=MAX_CANDIDATES)
    crossovers: int = setting(25, "evolution: crossover children per step", at_most=MAX_CANDIDATES)
    mutation_prob: float = setting(0.2, "evolution, nsga2: probability of redrawing a layer's choice")
    depth_embed_prob: float = setting(0.4, "evolution, nsga2: probability of redrawing the depth and embed dim")
    crossover_prob: float = setting(0.9, "nsga2: probability of a crossover")
    rl_lr: float = setting(0.5, "rl: learning rate of the controller")
    rl_constraint: str = setting("soft", "rl: the budget as UniNet's (MnasNet's) soft constraint, rewarding score * "
                                         "(cost / limit) ** w, or as rejection of draws outside it ('hard')",
                                 choices=("soft", "hard"))
    rl_alpha: float = setting(0.0, "rl, soft constraint: the exponent w inside the budget (MnasNet: 0, or -0.07 for a "
                                   "Pareto trade-off)")
    rl_beta: float = setting(-1.0, "rl, soft constraint: the exponent w over the budget (MnasNet: -1, or -0.07)")
    tpe_startup_trials: int = setting(20, "tpe: random trials before TPE models the scores", at_most=MAX_CANDIDATES)
    predictor_initial: int = setting(32, "predictor: uniform draws evaluated before the accuracy predictor screens "
                                         "the candidates", at_most=MAX_CANDIDATES)
    seed: int = setting(0, "seed of the search (budget i: seed + 1000 i)")
    dataset: str | None = setting(None, "data set (null: the checkpoint's)", choices=(None, *data_lib.DATASETS))
    data_dir: str | None = setting(None, "data directory (null: the checkpoint's)")
    search_on: str = setting("holdout", "rank archs on the held-out training images or on the test split",
                             choices=("holdout", "test"))
    holdout_images: int = setting(0, "search on the first this many held-out images (0: all the checkpoint held "
                                     "out)")
    test_images: int = setting(0, "test images to report the best archs on (0: all)")
    bn_calibration_images: int = setting(0, "hybrid supernets: training images on which BatchNorm statistics are "
                                            "re-estimated for each subnet before it is evaluated (0: as many as its "
                                            "training used)")
    batch_size: int = setting(256, "images per evaluation batch (at most as many as memory allows, nas.memory)",
                              resumable=True)
    num_workers: int = setting(0, "data loader worker processes that read an image folder", resumable=True,
                               at_most=data_lib.MAX_WORKERS)
    subnets_per_pass: int = setting(0, "subnets evaluated per pass over the data (0: as memory allows)",
                                    resumable=True, at_most=MAX_CANDIDATES)
    race: bool = setting(False, "race the candidates of each step over growing slices of the search data, stopping "
                                "those the search confidently will not keep (nas.racing; pays where candidates' "
                                "accuracies spread wider than their confidence intervals)")
    race_confidence: float = setting(0.999, "racing: confidence of each candidate's accuracy interval")
    race_first_fraction: float = setting(0.125, "racing: the first slice's share of the search data")
    device: str = setting("auto", "auto, cpu, cuda, cuda:1, ...", resumable=True)
    latency_model: str | None = setting(None, "latency model (JSON written by nas.latency) for latency budgets")
    latency_other_device: bool = setting(False, "use a latency model measured on another device than the search's",
                                         resumable=True)
    out_dir: str = setting("runs/search", "output directory of the search", resumable=True)
    export: bool = setting(False, "write the best subnet of every budget as a standalone model", resumable=True)
    compound_scale: int = setting(0, "hybrid spaces: grow the best arch of every budget into this many larger models "
                                     "by EfficientNet's compound rule and write each as a space of its own (UniNet's "
                                     "released B1-B6 are hand-set: --space uninet-b1 .. uninet-b6)", resumable=True)
    compound_coefficients: list[float] = setting([1.2, 1.1, 1.15], "compound scaling: per step the growth of depth, "
                                                                   "width and resolution", resumable=True)
    progress: bool = setting(True, "print progress", resumable=True)

    def problems(self) -> list[str]:
        problems = []
        for name in ("generations", "population", "parents", "batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("mutations", "crossovers", "holdout_images", "test_images", "subnets_per_pass", "num_workers",
                     "tpe_startup_trials", "bn_calibration_images"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be an int >= 0, got {getattr(self, name)!r}")
        for name in ("mutation_prob", "depth_embed_prob", "crossover_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        for name in ("race_confidence", "race_first_fraction"):
            if not 0.0 < getattr(self, name) < 1.0:
                problems.append(f"{name} must be in (0, 1), got {getattr(self, name)!r}")
        # Searcher i is seeded with seed + 1000 i; TPE's numpy RandomState takes seeds below 2**32.
        seed_limit = 2**32 - 1 - 1000 * max(0, len(self.budgets) - 1)
        if not 0 <= self.seed <= seed_limit:
            problems.append(f"seed must be in 0..{seed_limit}, got {self.seed!r}")
        evaluations = self.generations * self.population * max(1, len(self.budgets))
        if self.generations <= MAX_GENERATIONS and self.population <= MAX_CANDIDATES and evaluations > MAX_EVALUATIONS:
            problems.append(f"generations={self.generations} * population={self.population} * "
                            f"{max(1, len(self.budgets))} budget(s) = {evaluations:,} candidates, at most "
                            f"{MAX_EVALUATIONS:,} (the search state keeps every one)")
        if self.compound_scale < 0:
            problems.append(f"compound_scale must be an int >= 0, got {self.compound_scale!r}")
        if len(self.compound_coefficients) != 3 or min(self.compound_coefficients, default=0) < 1:
            problems.append(f"compound_coefficients must be three numbers >= 1 (depth, width, resolution), got "
                            f"{self.compound_coefficients!r}")
        for text in self.budgets:
            try:
                Budget.parse(text)
            except UserError as error:
                problems.append(str(error))
        return problems

    @property
    def parsed_budgets(self) -> list[Budget]:
        return [Budget.parse(text) for text in self.budgets]


# --- the search loop ----------------------------------------------------------------------------------

# archs, and which of them must be evaluated fully (None: all) -> metrics of each; a metrics dict with
# ``raced_out: True`` holds the metrics of a candidate stopped early (``nas.racing``), over its ``samples`` images.
Evaluate = Callable[[list[Arch], Contenders | None], list[dict[str, float]]]


@dataclass
class Candidate:
    arch: Arch
    metrics: dict[str, float]
    step: int
    complete: bool = True  # evaluated on all the search data (False: stopped early by racing)

    def to_dict(self) -> dict:
        return {"arch": self.arch.to_dict(), "step": self.step, "complete": self.complete, **self.metrics}


class Search:
    """The search loop, independent of where scores come from: ``evaluate(archs) -> [{"top1": ...}, ...]``.

    One searcher per budget (one for all budgets with ``nsga2``, which searches the whole front); every
    step, the new candidates of all of them are evaluated in one call. ``score`` (default top-1) is what
    the searchers maximise.
    """

    def __init__(self, config: SearchConfig, space: Space, evaluate: Evaluate, costs: Costs, *,
                 sampler=None, score: str = "top1", data_key: str = "", log: Callable[[str], None] = print):
        self.config, self.space, self.evaluate, self.costs = config, space, evaluate, costs
        self.data_key = data_key
        self.score, self.log = score, log
        self.budgets = config.parsed_budgets
        costs.check_reachable(self.budgets)
        self.evaluated: dict[Arch, Candidate] = {}
        self.step = 0
        self.searchers = self._build_searchers(sampler)

    def _build_searchers(self, sampler):
        c = self.config
        options = {
            "evolution": dict(parents=c.parents, mutations=c.mutations, crossovers=c.crossovers,
                              mutation_prob=c.mutation_prob, depth_embed_prob=c.depth_embed_prob),
            "nsga2": dict(crossover_prob=c.crossover_prob, mutation_prob=c.mutation_prob,
                          depth_embed_prob=c.depth_embed_prob),
            "rl": dict(lr=c.rl_lr),
            "tpe": dict(startup_trials=c.tpe_startup_trials),
            "random": {},
            "autotuner": {},
            "predictor": dict(initial=c.predictor_initial),
        }
        options["sampler"] = dict(options["evolution"], sampler=sampler)
        if c.algorithm == "nsga2" or not self.budgets:
            metric = self.budgets[0].metric if self.budgets else "macs"
            return [build_searcher(c.algorithm, self.space, self.costs.feasible(self.budgets), seed=c.seed,
                                   cost=self.costs.metric(metric), **options[c.algorithm])]
        searchers = []
        for i, budget in enumerate(self.budgets):
            extra = {"budget": budget} if c.algorithm == "sampler" else {}
            if c.algorithm == "rl" and c.rl_constraint == "soft":
                extra = {"target": budget.high, "alpha": c.rl_alpha, "beta": c.rl_beta}
            searchers.append(build_searcher(c.algorithm, self.space, self.costs.feasible([budget]),
                                            seed=c.seed + 1000 * i, cost=self.costs.metric(budget.metric),
                                            **options[c.algorithm], **extra))
        return searchers

    # -- running ---------------------------------------------------------------------------------------
    def run(self, state_path: str | os.PathLike | None = None) -> dict:
        while self.step < self.config.generations:
            self.run_step()
            if state_path is not None:
                self.save_state(state_path)
        return self.summary()

    def run_step(self) -> None:
        start = time.perf_counter()
        proposals = [searcher.propose(self.config.population) for searcher in self.searchers]
        new = [a for a in dict.fromkeys(a for archs in proposals for a in archs) if a not in self.evaluated]
        if new:
            results = self.evaluate(new, self._contenders(proposals))
            for arch, metrics in zip(new, results, strict=True):
                complete = not metrics.pop("raced_out", False)
                self.evaluated[arch] = Candidate(arch, {**metrics, **self.costs.of(arch)}, self.step, complete)
        for searcher, archs in zip(self.searchers, proposals):
            searcher.observe(archs, [self.evaluated[a].metrics[self.score] for a in archs])
        self.step += 1
        best = "; ".join(f"{label}: {c.metrics[self.score]:.2f}" if c else f"{label}: -"
                         for label, c in self.best_per_budget().items())
        self.log(f"[search] step {self.step}/{self.config.generations}: {len(new)} new, {len(self.evaluated)} "
                 f"evaluated, {time.perf_counter() - start:.1f}s; best {self.score} per budget: {best}")

    def _contenders(self, proposals: list[list[Arch]]) -> Contenders:
        """The racing rule of this step: a candidate goes on while a searcher that proposed it may still keep it."""
        def contenders(racing):
            keep = set()
            for searcher, archs in zip(self.searchers, proposals):
                mine = set(archs)
                keep |= searcher.contenders({arch: bounds for arch, bounds in racing.items() if arch in mine})
            return keep
        return contenders

    # -- results ---------------------------------------------------------------------------------------
    def complete_candidates(self) -> list[Candidate]:
        """Those evaluated on all the search data: the only ones results are chosen from."""
        return [c for c in self.evaluated.values() if c.complete]

    def best_per_budget(self) -> dict[str, Candidate | None]:
        groups = {b.label: [b] for b in self.budgets} or {"unconstrained": []}
        best = {}
        for label, budget in groups.items():
            inside = [c for c in self.complete_candidates()
                      if all(b.ok(np.array(c.metrics[b.metric])) for b in budget)]
            best[label] = max(inside, key=lambda c: (c.metrics[self.score], -c.metrics.get("loss", 0.0)), default=None)
        return best

    def pareto_front(self, metric: str) -> list[Candidate]:
        """Evaluated candidates that no other beats on both the score and ``metric``, cheapest first."""
        ranked = sorted(self.complete_candidates(), key=lambda c: (c.metrics[metric], -c.metrics[self.score]))
        front, best = [], -math.inf
        for candidate in ranked:
            if candidate.metrics[self.score] > best:
                front.append(candidate)
                best = candidate.metrics[self.score]
        return front

    def summary(self) -> dict:
        metrics = [m for m in METRICS if m in next(iter(self.evaluated.values())).metrics] if self.evaluated else []
        return {
            "space": self.space.name,
            "algorithm": self.config.algorithm,
            "budgets": [b.label for b in self.budgets],
            "score": self.score,
            "steps": self.step,
            "candidates": [c.to_dict() for c in self.evaluated.values()],
            "pareto_front": {m: [c.to_dict() for c in self.pareto_front(m)] for m in metrics},
            "best": {label: c.to_dict() if c else None for label, c in self.best_per_budget().items()},
        }

    # -- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "config": self.config.to_dict(),
            "data_key": self.data_key,
            "step": self.step,
            "evaluated": [(c.arch.to_dict(), c.metrics, c.step, c.complete) for c in self.evaluated.values()],
            "searchers": [s.state_dict() for s in self.searchers],
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise CheckpointError(f"search state version {state.get('version')!r}, expected {STATE_VERSION}")
        changed = changes_on_resume(state["config"], self.config)
        if changed:
            raise CheckpointMismatchError("cannot resume: the search state was written with a different config: "
                                          + ", ".join(changed))
        if state["data_key"] != self.data_key:
            raise CheckpointMismatchError(f"cannot resume: the saved search evaluated on other data or another "
                                          f"checkpoint (saved {state['data_key']!r}, now {self.data_key!r})")
        self.step = saved_number(state["step"], "search state: step", 0, 2**31, integer=True)
        self.evaluated = {}
        for i, (arch, metrics, step, *complete) in enumerate(state["evaluated"]):  # before racing: no flag
            arch = saved_arch(self.space, arch, f"search state: evaluated[{i}]")
            self.evaluated[arch] = Candidate(arch, self.saved_metrics(arch, metrics, f"search state: evaluated[{i}]"),
                                             saved_number(step, f"search state: evaluated[{i}]'s step", 0,
                                                          max(self.step - 1, 0), integer=True),
                                             saved_flag(complete[0], f"search state: evaluated[{i}]'s complete flag")
                                             if complete else True)
        if len(state["searchers"]) != len(self.searchers):
            raise CheckpointMismatchError(f"search state holds {len(state['searchers'])} searchers' states, this "
                                          f"search has {len(self.searchers)}")
        for searcher, saved in zip(self.searchers, state["searchers"], strict=True):
            searcher.load_state_dict(saved)
            told = {arch: score for arch, score in searcher.scores.items()
                    if arch not in self.evaluated or self.evaluated[arch].metrics[self.score] != score}
            if told:
                raise CheckpointError(f"search state: {searcher.name} holds scores the search never gave it "
                                      f"({next(iter(told.values()))!r} for {next(iter(told)).to_json()})")

    def saved_metrics(self, arch: Arch, metrics: Any, where: str) -> dict[str, float]:
        """A saved candidate's metrics, checked: the evaluation's (percentages in [0, 100], a loss >= 0, an image
        count), and the costs, which must be the arch's own (``Costs.of``)."""
        if not isinstance(metrics, dict):
            raise CheckpointError(f"{where}'s metrics are a {type(metrics).__name__}, not a mapping")
        costs = self.costs.of(arch)
        ranges = {"top1": (0, 100), "top5": (0, 100), "miou": (0, 100), "loss": (0, math.inf),
                  "samples": (0, math.inf)}
        unknown = sorted(set(metrics) - set(ranges) - set(costs))
        missing = sorted({self.score} - set(metrics))
        if unknown or missing:
            raise CheckpointError(f"{where}'s metrics {sorted(metrics)}: unknown {unknown}, missing {missing}")
        checked = {name: saved_number(value, f"{where}'s {name}", *ranges.get(name, (0, math.inf)),
                                      integer=name == "samples") for name, value in metrics.items()}
        wrong = [name for name, value in costs.items()
                 if name in checked and not math.isclose(checked[name], value, rel_tol=1e-9)]
        if wrong:
            raise CheckpointError(f"{where}'s {wrong[0]} is {checked[wrong[0]]!r}, but the arch's is "
                                  f"{costs[wrong[0]]!r}")
        return checked

    def save_state(self, path: str | os.PathLike) -> None:
        atomic_torch_save(self.state_dict(), path)

    def load_state(self, path: str | os.PathLike) -> None:
        state = read_state(path)
        try:
            self.load_state_dict(state)
        except UserError as error:
            raise type(error)(f"search state {os.fspath(path)!r}: {error}") from error
        except (KeyError, TypeError, AttributeError, IndexError, ValueError) as error:
            raise CheckpointError(f"search state {os.fspath(path)!r} is malformed: {error!r}") from error


def read_state(path: str | os.PathLike) -> dict:
    """A saved search state (``torch.load(..., weights_only=True)``), not yet checked beyond being a mapping."""
    try:
        state = torch.load(path, weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise CheckpointError(f"search state {os.fspath(path)!r} is corrupt or not a nas.search state: "
                              f"{first_line(error)}") from error
    if not isinstance(state, dict):
        raise CheckpointError(f"search state {os.fspath(path)!r} holds a {type(state).__name__}, "
                              "not a nas.search state")
    return state


def write_families(space: Space, best: dict[str, Candidate], config: SearchConfig) -> dict[str, list[dict]]:
    """UniNet's compound scaling of the best arch of every budget (``nas.hybrid.scaling``): per budget, the members'
    archs, MACs, params and their growth over the baseline beside the growth the coefficients state, each member's
    space written to ``<out_dir>/family-<budget>/b<phi>.yaml`` (``python -m nas.train --space`` trains it)."""
    scaling = CompoundScaling(*config.compound_coefficients)
    families = {}
    for label, candidate in best.items():
        folder = os.path.join(config.out_dir, "family-" + file_label(label))
        os.makedirs(folder, exist_ok=True)
        members = compound_family(space, candidate.arch, config.compound_scale, scaling, name=f"{space.name}-family")
        rows = []
        for member in members:
            path = os.path.join(folder, f"b{member.phi}.yaml")
            atomic_write_text(path, member.space.to_yaml())
            rows.append({"phi": member.phi, "arch": member.arch.to_dict(), "macs": member.macs,
                         "params": member.params, "macs_growth": member.macs / members[0].macs,
                         "stated_growth": scaling.flops_growth ** member.phi, "space": path})
        families[label] = rows
    return families


def file_label(label: str) -> str:
    """A budget's label as a file name."""
    return re.sub(r"[^\w.=-]+", "_", label)


def write_outputs(search: Search, out_dir: str, extra: dict | None = None) -> dict:
    summary = {**search.summary(), **(extra or {})}
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_text(os.path.join(out_dir, "search.json"), json.dumps(summary, indent=1))
    if search.evaluated:
        plot_front(summary, os.path.join(out_dir, "pareto.png"), search.budgets)
    return summary


# --- a whole search from a checkpoint ----------------------------------------------------------------------

def search_data(config: SearchConfig, checkpoint: dict, space: Space, device: torch.device | str):
    """``(search batches, test batches, calibration batches, description)``: the training images that the supernet's
    training held out (the split its ``checkpoint`` records; the first ``holdout_images`` of it), or the test split with
    ``search_on="test"``; the test split; for a hybrid space (BatchNorm) the training images its statistics are
    re-estimated on for each subnet, as training did (:meth:`nas.data.SearchSplit.calibration_indices`, in batches of
    the training's ``eval_batch_size``), else None."""
    trained = checkpoint["config"]
    dataset = config.dataset or trained.get("dataset")
    if dataset is None:  # a converted checkpoint (nas.convert) was trained elsewhere
        raise ConfigError(f"checkpoint {config.checkpoint!r} records no data set it was trained on; give --dataset")
    root = config.data_dir or trained.get("data_dir")
    kwargs = dict(image_size=space.img_size, in_chans=space.in_chans)
    test = data_lib.load_dataset(dataset, root, "test", **kwargs)
    data_lib.check_matches(test, space.img_size, space.in_chans, space.num_classes, f"{dataset} test")
    test = data_lib.fixed_subset(test, config.test_images or None)
    batch_norm = family_of(space).batch_norm
    source = f"checkpoint {config.checkpoint!r}"
    split = train = calibration = None
    if batch_norm or config.search_on != "test":
        recorded = checkpoint.get("search_split")
        split = data_lib.SearchSplit.from_dict(recorded, source) if recorded is not None else None
        train = data_lib.load_dataset(dataset, root, "train", **kwargs)
    if batch_norm:
        if split is None and "converted" in trained:  # trained elsewhere (nas.convert): it held out no image here
            split = data_lib.SearchSplit.hold_out(dataset, len(train), 0)
        if split is None:
            raise CheckpointError(f"{source} records no search split, so not which training images calibrate its "
                                  "BatchNorm statistics")
        count = config.bn_calibration_images or trained.get("bn_calibration_images", 512)
        calibration = data_lib.subset(train, split.calibration_indices(count))
    if config.search_on == "test":
        search = test
        described = f"{dataset} test split ({len(test)} images)"
    else:
        indices = data_lib.images_to_search(split, dataset, len(train), config.holdout_images, source)
        search = data_lib.subset(train, indices)
        never_trained_on = split is not None and split.images > 0
        described = f"{len(indices)} held-out {dataset} training images" + (
            "" if never_trained_on else " (which the supernet trained on)")
    # Normalised once where it costs little memory: into bf16 on a GPU, and on a CPU where fp32 copies take under a
    # quarter of the free memory (each pass of a search then reads them as they are). Image folders are read anew.
    device = torch.device(device)
    normalised = torch.bfloat16 if device.type == "cuda" else torch.float32
    in_memory = [d for d in (search, test, calibration) if hasattr(d, "images")]
    if normalised.itemsize * sum(d.images.numel() for d in in_memory) > available_memory(device) / 4:
        normalised = None
    batches = [evaluation_batches(d, config.batch_size, device, config.num_workers, normalised) for d in (search, test)]
    if calibration is not None:
        calibration = evaluation_batches(calibration, trained.get("eval_batch_size", 256), device, config.num_workers,
                                         normalised)
    return batches[0], batches[1], calibration, described


def make_evaluate(config: SearchConfig, supernet, batches: TensorBatches | LoaderBatches, cache: EvalCache,
                  data_key: str, ranks: Distributed, calibration: TensorBatches | LoaderBatches | None = None,
                  sides: tuple[str, ...] = ("left",)) -> Evaluate:
    """The search's evaluation of candidates on ``batches``: raced over slices of them (``config.race``; not for a
    segmentation supernet, whose mIoU does not add up over slices), or on all of them, with the BatchNorm statistics
    of a hybrid supernet re-estimated per candidate on ``calibration``; results cached per slice, so a resumed search
    evaluates nothing twice. With several processes each rank evaluates every ``world_size``-th candidate of a slice
    and the results are summed over the ranks, so that every rank races (and searches) on the same numbers as one
    process would; only rank 0 writes the cache. ``sides``: the sides of the super weights each candidate is read
    from, its metrics averaged over them (:func:`evaluate_sides`; ViTAS's evaluation of a two-sided supernet)."""
    dense = getattr(supernet.config, "global_pool", None) == "dense"  # hybrid supernets classify
    slices = [(0, batches.num_images)]
    if config.race and not dense:  # racing compares top-1 intervals; a segmentation search ranks by mIoU
        slices = slice_bounds(batches.num_images, config.race_first_fraction)
    race_config = RaceConfig(config.race_confidence, config.race_first_fraction)
    autocast = torch.bfloat16 if torch.device(batches.device).type == "cuda" else None

    def evaluate_slice(archs: list[Arch], index: int) -> list[EvalResult]:
        start, stop = slices[index]
        key = f"{data_key}|{start}:{stop}"
        mine = archs[ranks.rank::ranks.world_size]
        results = evaluate_sides(supernet, mine, batches.slice(start, stop), sides,
                                 subnets=config.subnets_per_pass or None, cache=cache, data_key=key,
                                 progress=config.progress and ranks.main, autocast_dtype=autocast,
                                 calibration=calibration)
        rows = torch.zeros(len(archs), 5, dtype=torch.float64)
        rows[ranks.rank::ranks.world_size] = torch.tensor(
            [[r.top1, r.top5, r.loss, r.samples, r.miou or 0.0] for r in results], dtype=torch.float64).view(-1, 5)
        gathered = [EvalResult(top1, top5, loss, int(samples), miou if dense else None)
                    for top1, top5, loss, samples, miou in sum_over_ranks(rows, ranks).tolist()]
        for arch, result in zip(archs, gathered):  # several sides: each side's result is cached under key|side
            cache.put(arch, key, result)
        if ranks.main:
            cache.save()
        return gathered

    def evaluate(archs: list[Arch], contenders: Contenders | None) -> list[dict[str, float]]:
        results = race(archs, len(slices), evaluate_slice, contenders or set, race_config)  # set: all go on
        return [{**results[a].to_dict(), "raced_out": results[a].samples < batches.num_images} for a in archs]

    return evaluate


def run_search(config: SearchConfig, resume: bool = False) -> dict:
    """A whole search as ``python -m nas.search`` runs it; returns the summary written to ``search.json``.
    The search owns its output directory meanwhile (``nas.rundir``): a second one there gets a clear error.

    Under ``torchrun --nproc_per_node N`` every rank runs the same search (the same proposals from the same seeded
    searchers), evaluates its share of each step's candidates (:func:`make_evaluate`), and sees every result; rank 0
    alone owns and writes the output directory."""
    if config.checkpoint is None:
        raise ConfigError("a search needs a supernet checkpoint (--checkpoint), written by python -m nas.train")
    device = resolve_device(config.device)
    ranks = init_distributed(device.type)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", ranks.local_rank)  # one GPU per rank unless a device is named
    elif device.type == "cpu" and ranks.enabled:
        torch.set_num_threads(max(1, torch.get_num_threads() // ranks.world_size))  # the ranks share the cores
    output = OwnedDirectory(config.out_dir, "out_dir") if ranks.main else None
    try:
        if not resume and os.path.exists(os.path.join(config.out_dir, STATE_FILE)):
            raise OutputError(f"out_dir {config.out_dir!r} already holds a search ({STATE_FILE}); continue it with "
                              "--resume, or choose another --out-dir")
        if output is not None:
            output.claim()
        return _run(config, resume, device, ranks)
    finally:
        if output is not None:
            output.release()


def _run(config: SearchConfig, resume: bool, device: torch.device, ranks: Distributed) -> dict:
    supernet, space, state = load_supernet(config.checkpoint, device, config.space)
    check_memory(space, config.batch_size, training=False)  # before the data is read
    if config.compound_scale and not family_of(space).compound_scaling:
        raise ConfigError(f"compound_scale: compound scaling is for hybrid spaces (UniNet's), and "
                          f"{config.checkpoint!r} holds a supernet of the {family_of(space).name} space {space.name!r}")
    latency_model = None
    if config.latency_model:
        latency_model = LatencyModel.load(config.latency_model)
        latency_model.check_environment(environment(device), config.latency_other_device,
                                        f"latency model {config.latency_model!r}")
        if latency_model.space != space:
            other = (f"space {latency_model.space.name!r}" if latency_model.space.name != space.name else
                     f"another space named {space.name!r} (other choices or sizes)")
            raise CheckpointMismatchError(f"latency model {config.latency_model!r} is for {other}, the supernet is of "
                                          f"space {space.name!r}")
    costs = Costs(space, latency_model)
    costs.check_reachable(config.parsed_budgets)  # before any data is read
    sampler = None
    if config.algorithm == "sampler":
        trained = state["config"]
        if trained["sampler"] != "learned":
            raise ConfigError(f"--algorithm sampler needs a supernet trained with the learned sampler; "
                              f"{config.checkpoint!r} was trained with {trained['sampler']!r}")
        # A checkpoint from before the sampler served several budget kinds served MAC budgets only.
        options = {"budget_kinds": state["sampler"].get("budget_kinds", ["macs"]), **trained["sampler_options"]}
        try:
            sampler = build_sampler("learned", space, seed=trained["seed"], **options)
            sampler.load_state_dict(state["sampler"])
        except (ValueError, RuntimeError, KeyError) as error:
            raise CheckpointMismatchError(f"the learned sampler of checkpoint {config.checkpoint!r} cannot be "
                                          f"restored: {first_line(error)}") from error
    search_batches, test_batches, calibration, described = search_data(config, state, space, device)
    data_key = f"ckpt={file_digest(config.checkpoint)}|{search_batches.fingerprint}"
    if calibration is not None:
        data_key += f"|bn={calibration.fingerprint}"
    cache = EvalCache(os.path.join(config.out_dir, "eval_cache.json"))
    log = print if config.progress and ranks.main else (lambda _: None)

    # A supernet trained two-sided (ViTAS) scores each candidate by the mean of its left and right side.
    sides = ("left", "right") if state["config"].get("width_sharing") == "two_sided" else ("left",)
    evaluate = make_evaluate(config, supernet, search_batches, cache, data_key, ranks, calibration, sides)
    score = "miou" if space.task == "segmentation" else "top1"
    search = Search(config, space, evaluate, costs, sampler=sampler, score=score, data_key=data_key, log=log)
    state_path = os.path.join(config.out_dir, STATE_FILE)
    if resume:
        if not os.path.exists(state_path):
            raise CheckpointError(f"--resume: no saved search at {state_path!r}")
        search.load_state(state_path)
        log(f"[search] resumed at step {search.step} with {len(search.evaluated)} evaluated candidates")
    log(f"[search] {config.algorithm} on space {space.name!r}, budgets {[b.label for b in search.budgets] or 'none'}; "
        f"searching on {described}")
    search.run(state_path if ranks.main else None)
    if not ranks.main:
        return search.summary()
    best = {label: c for label, c in search.best_per_budget().items() if c is not None}
    test_results = evaluate_sides(supernet, [c.arch for c in best.values()], test_batches, sides, progress=False,
                                  calibration=calibration)
    extra = {"search_data": described, "test_data": f"{test_batches.num_images} test images", "sides": list(sides),
             "test": {label: r.to_dict() for label, r in zip(best, test_results)}}
    if config.compound_scale:
        extra["family"] = write_families(space, best, config)
    if config.export:
        exported = {}
        for label, candidate in best.items():
            path = os.path.join(config.out_dir, "best-" + file_label(label) + ".pt")
            if calibration is not None:
                supernet.recalibrate_batch_norm(calibration, candidate.arch)
            save_subnet(path, extract_subnet(supernet, candidate.arch), candidate.arch, space)
            exported[label] = path
        extra["exported"] = exported
        if len(sides) > 1:  # the scores are both sides' mean; a subnet is exported from one of them
            extra["exported_side"] = "left"
            print(f"[search] the scores are the mean of the {' and '.join(sides)} sides of the two-sided supernet; the "
                  "exported subnets read its left (leading) channels only")
    summary = write_outputs(search, config.out_dir, extra)
    for label, candidate in best.items():
        print(f"[search] best for {label}: search {search.score} {candidate.metrics[search.score]:.2f}, test {score} "
              f"{extra['test'][label][score]:.2f}, {format_count(candidate.metrics['macs'])} MACs, "
              f"{format_count(candidate.metrics['params'])} params: {candidate.arch.to_json()}")
    return summary

"""Architecture search under FLOPs, params and latency budgets: ``python -m nas.search``.

From a supernet checkpoint written by ``python -m nas.train``, a search algorithm (``nas.searchers``:
evolution, nsga2, random, sampler, rl, tpe) proposes candidates step by step; each step's new candidates
of every budget are evaluated together, K subnets per pass over the data (``nas.evaluate``). Several
budgets in one run share every evaluated candidate. The state is saved atomically after every step and
``--resume`` continues exactly; a candidate is never evaluated twice.

Outputs in ``--output``: ``search.json`` (every evaluated arch with its metrics, the Pareto front, the best
arch per budget and its test-split metrics), ``pareto.png``, ``state.pt`` and, with ``--export``, one
standalone subnet per budget (``best-<budget>.pt``, ``nas.export`` format).

Search data is, by default, the training images the checkpoint's supernet never trained on (as AutoFormer
searches on its subImageNet): ``nas.train`` holds out a split (``search_holdout``) and records it in the
checkpoint; ``--holdout-images N`` takes its first N. The test split is reported separately for the best archs.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import time
import types
import typing
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import yaml

from . import cost as cost_model
from .arch import Arch
from .atomic import atomic_open, atomic_torch_save, atomic_write_text
from .errors import CheckpointError, OutputError, UserError, first_line
from .rundir import OwnedDirectory
from .searchers import SEARCHERS, InfeasibleBudgetError, build_searcher
from .space import SearchSpace

STATE_VERSION = 1
STATE_FILE = "state.pt"  # in the output directory
METRICS = ("macs", "params", "latency")
UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


# --- budgets ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Budget:
    """``low <= metric(arch) <= high``; metric is ``macs`` (``flops`` = 2 macs is converted), ``params`` or
    ``latency`` (milliseconds on the current device, from the latency model)."""

    metric: str
    high: float
    low: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "Budget":
        """``"macs=1.3G"``, ``"flops=2.6G"``, ``"params=4M:6M"`` (a window), ``"latency=5ms"``."""
        match = re.fullmatch(r"\s*(\w+)\s*(?:=|<=)\s*([^:]+?)\s*(?::\s*(.+?))?\s*", text)
        if not match:
            raise ValueError(f"budget {text!r}: expected METRIC=LIMIT or METRIC=LOW:HIGH, e.g. macs=1.3G, params=6M, latency=5ms")
        metric, first, second = match.group(1).lower(), match.group(2), match.group(3)
        scale = 0.5 if metric == "flops" else 1.0
        metric = "macs" if metric == "flops" else metric
        if metric not in METRICS:
            raise ValueError(f"budget {text!r}: unknown metric {metric!r}; choose macs, flops, params or latency")
        values = [_number(v, text, metric) * scale for v in ((first, second) if second else (first,))]
        low, high = (values[0], values[1]) if second else (0.0, values[0])
        if not 0 <= low <= high or high <= 0:
            raise ValueError(f"budget {text!r}: need 0 <= low <= high and high > 0")
        return cls(metric, high, low)

    @property
    def label(self) -> str:
        unit = "ms" if self.metric == "latency" else ""
        window = f"{_short(self.low)}:" if self.low > 0 else ""
        return f"{self.metric}={window}{_short(self.high)}{unit}"

    def ok(self, values: np.ndarray) -> np.ndarray:
        return (values >= self.low) & (values <= self.high)


def _number(text: str, budget: str, metric: str) -> float:
    match = re.fullmatch(r"([0-9.eE+-]+)\s*(ms|[kKmMgGtT]?)", text.strip())
    if not match:
        raise ValueError(f"budget {budget!r}: cannot read the number {text!r}")
    number, suffix = float(match.group(1)), match.group(2)
    if metric == "latency":
        return number
    if suffix == "ms":
        raise ValueError(f"budget {budget!r}: 'ms' is for latency budgets")
    return number * UNITS[suffix.lower()]


def _short(value: float) -> str:
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"


class Costs:
    """MACs, params and (with a latency model) predicted milliseconds of archs, vectorised, memoised."""

    def __init__(self, space: SearchSpace, latency_model=None):
        self.space, self.latency_model = space, latency_model
        self._known: dict[Arch, dict[str, float]] = {}

    def __call__(self, archs: Sequence[Arch]) -> dict[str, np.ndarray]:
        new = [a for a in dict.fromkeys(archs) if a not in self._known]
        if new:
            values = {"macs": cost_model.macs_many(new, self.space), "params": cost_model.params_many(new, self.space)}
            if self.latency_model is not None:
                values["latency"] = 1e3 * self.latency_model.predict_many(new)
            for i, arch in enumerate(new):
                self._known[arch] = {name: float(v[i]) for name, v in values.items()}
        return {name: np.array([self._known[a][name] for a in archs]) for name in self._known[archs[0]]} if archs else {}

    def of(self, arch: Arch) -> dict[str, float]:
        self([arch])
        return dict(self._known[arch])

    def feasible(self, budgets: Sequence[Budget]) -> Callable[[Sequence[Arch]], np.ndarray]:
        """archs -> mask of those inside at least one of ``budgets`` (all archs where there are none)."""
        def inside(archs: Sequence[Arch]) -> np.ndarray:
            if not budgets or not archs:
                return np.ones(len(archs), dtype=bool)
            values = self(archs)
            return np.any([b.ok(values[b.metric]) for b in budgets], axis=0)
        return inside

    def metric(self, name: str) -> Callable[[Sequence[Arch]], np.ndarray]:
        return lambda archs: self(archs)[name]

    def check_reachable(self, budgets: Sequence[Budget]) -> None:
        """Raise :class:`InfeasibleBudgetError` for a budget that no arch of the space can meet."""
        for budget in budgets:
            if budget.metric == "latency" and self.latency_model is None:
                raise ValueError(f"budget {budget.label}: a latency budget needs a latency model (--latency-model, "
                                 "written by nas.latency)")
            smallest = self._cheapest(budget.metric)
            largest = self.of(self.space.max_arch())[budget.metric]
            if smallest > budget.high or largest < budget.low:
                raise InfeasibleBudgetError(
                    f"budget {budget.label}: no arch of space {self.space.name!r} can meet it; its {budget.metric} range "
                    f"is {_short(smallest)} (smallest arch) to {_short(largest)} (largest)")

    def _cheapest(self, metric: str) -> float:
        space = self.space
        archs = [space.min_arch()]
        if len(space.patch_sizes) > 1:
            archs += [dataclasses.replace(space.min_arch(), patch_size=p) for p in space.patch_sizes]
        return float(self(archs)[metric].min())


# --- configuration ------------------------------------------------------------------------------------

@dataclass
class SearchConfig:
    """Every setting of a search; YAML keys and ``--flags`` (dashes for underscores) have these names."""

    checkpoint: str | None = None
    space: str | None = None
    algorithm: str = "evolution"
    budgets: list[str] = field(default_factory=list)
    generations: int = 20
    population: int = 50
    parents: int = 10
    mutations: int = 25
    crossovers: int = 25
    mutation_prob: float = 0.2
    depth_embed_prob: float = 0.4
    crossover_prob: float = 0.9
    rl_lr: float = 0.5
    tpe_startup_trials: int = 20
    seed: int = 0
    dataset: str | None = None
    data_root: str | None = None
    search_on: str = "holdout"
    holdout_images: int = 0     # 0: every training image the checkpoint held out (nas.train's search_holdout)
    test_images: int = 0
    batch_size: int = 256
    subnets_per_pass: int = 0
    device: str = "auto"
    latency_model: str | None = None
    output: str = "search-out"
    resume: bool = False
    export: bool = False
    progress: bool = True

    # settings that may change when a search resumes; a moved checkpoint too: the data key holds its content hash
    RESUMABLE = ("generations", "output", "resume", "export", "progress", "device", "subnets_per_pass", "batch_size",
                 "checkpoint")

    def __post_init__(self):
        self.budgets = [self.budgets] if isinstance(self.budgets, str) else self.budgets
        hints = typing.get_type_hints(type(self))
        wrong = [f"{f.name} must be {_type_name(hints[f.name])}, got {getattr(self, f.name)!r}"
                 for f in dataclasses.fields(self) if not _is_a(getattr(self, f.name), hints[f.name])]
        if wrong:  # before the checks of values, which assume the types
            raise ValueError("bad search config: " + "; ".join(wrong))
        problems = []
        if self.algorithm not in SEARCHERS:
            problems.append(f"algorithm {self.algorithm!r} is not one of {', '.join(SEARCHERS)}")
        for name in ("generations", "population", "parents", "batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("mutations", "crossovers", "holdout_images", "test_images", "subnets_per_pass", "tpe_startup_trials"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be an int >= 0, got {getattr(self, name)!r}")
        for name in ("mutation_prob", "depth_embed_prob", "crossover_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                problems.append(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        # Searcher i is seeded with seed + 1000 i; TPE's numpy RandomState takes seeds below 2**32.
        seed_limit = 2**32 - 1 - 1000 * max(0, len(self.budgets) - 1)
        if not 0 <= self.seed <= seed_limit:
            problems.append(f"seed must be in 0..{seed_limit}, got {self.seed!r}")
        if self.search_on not in ("holdout", "test"):
            problems.append(f"search_on must be 'holdout' or 'test', got {self.search_on!r}")
        if problems:
            raise ValueError("bad search config: " + "; ".join(problems))
        self.parsed_budgets = [Budget.parse(b) for b in self.budgets]

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "SearchConfig":
        if not isinstance(data, dict):
            raise ValueError(f"bad search config: expected a mapping, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"bad search config: unknown setting(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "SearchConfig":
        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except yaml.YAMLError as error:
            raise ValueError(f"search config {os.fspath(path)!r} is not valid YAML: "
                             + str(error).replace("\n", " ")) from error
        return cls.from_dict(data or {})


def _is_a(value, hint) -> bool:
    """Whether a setting has its declared type (an int is a float too; a bool is not an int)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_is_a(value, kind) for kind in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return isinstance(value, list) and all(_is_a(item, typing.get_args(hint)[0]) for item in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint) -> str:
    return str(hint) if typing.get_origin(hint) else hint.__name__  # "str | None", "list[str]", "int"


def build_parser() -> argparse.ArgumentParser:
    # Defaults are None so that only the flags given override the config file; the help shows SearchConfig's.
    parser = argparse.ArgumentParser(prog="python -m nas.search", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML file of SearchConfig settings; flags given here override it")
    defaults = SearchConfig()
    for f in dataclasses.fields(SearchConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "budgets":
            parser.add_argument("--budget", dest="budgets", action="append",
                                help="METRIC=LIMIT or METRIC=LOW:HIGH (macs, flops, params, latency in ms); repeat for several")
        elif f.type in ("bool", bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"(default {getattr(defaults, f.name)})")
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(flag, dest=f.name, type=kind, default=None, help=f"(default {getattr(defaults, f.name)})")
    parser.add_argument("--algorithm-help", action="store_true", help="list the search algorithms and exit")
    return parser


def config_from_args(argv: Sequence[str] | None = None) -> SearchConfig:
    args = build_parser().parse_args(argv)
    if args.algorithm_help:
        for name, cls in SEARCHERS.items():
            print(f"{name:10s} {(sys.modules[cls.__module__].__doc__ or '').strip().splitlines()[0]}")
        raise SystemExit(0)
    data = SearchConfig.from_yaml(args.config).to_dict() if args.config else {}
    data.update({k: v for k, v in vars(args).items() if v is not None and k not in ("config", "algorithm_help")})
    return SearchConfig.from_dict(data)


# --- the search loop ----------------------------------------------------------------------------------

Evaluate = Callable[[list[Arch]], list[dict[str, float]]]


@dataclass
class Candidate:
    arch: Arch
    metrics: dict[str, float]
    step: int

    def to_dict(self) -> dict:
        return {"arch": self.arch.to_dict(), "step": self.step, **self.metrics}


class Search:
    """The search loop, independent of where scores come from: ``evaluate(archs) -> [{"top1": ...}, ...]``.

    One searcher per budget (one for all budgets with ``nsga2``, which searches the whole front); every
    step, the new candidates of all of them are evaluated in one call. ``score`` (default top-1) is what
    the searchers maximise.
    """

    def __init__(self, config: SearchConfig, space: SearchSpace, evaluate: Evaluate, costs: Costs, *,
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
            "nsga2": dict(crossover_prob=c.crossover_prob, mutation_prob=c.mutation_prob, depth_embed_prob=c.depth_embed_prob),
            "rl": dict(lr=c.rl_lr),
            "tpe": dict(startup_trials=c.tpe_startup_trials),
            "random": {},
        }
        options["sampler"] = dict(options["evolution"], sampler=sampler)
        if c.algorithm == "nsga2" or not self.budgets:
            metric = self.budgets[0].metric if self.budgets else "macs"
            return [build_searcher(c.algorithm, self.space, self.costs.feasible(self.budgets), seed=c.seed,
                                   cost=self.costs.metric(metric), **options[c.algorithm])]
        searchers = []
        for i, budget in enumerate(self.budgets):
            extra = {"macs_limit": budget.high if budget.metric == "macs" else None} if c.algorithm == "sampler" else {}
            searchers.append(build_searcher(c.algorithm, self.space, self.costs.feasible([budget]), seed=c.seed + 1000 * i,
                                            cost=self.costs.metric(budget.metric), **options[c.algorithm], **extra))
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
            results = self.evaluate(new)
            for arch, metrics in zip(new, results, strict=True):
                self.evaluated[arch] = Candidate(arch, {**metrics, **self.costs.of(arch)}, self.step)
        for searcher, archs in zip(self.searchers, proposals):
            searcher.observe(archs, [self.evaluated[a].metrics[self.score] for a in archs])
        self.step += 1
        best = "; ".join(f"{label}: {c.metrics[self.score]:.2f}" if c else f"{label}: -"
                         for label, c in self.best_per_budget().items())
        self.log(f"[search] step {self.step}/{self.config.generations}: {len(new)} new, {len(self.evaluated)} evaluated, "
                 f"{time.perf_counter() - start:.1f}s; best {self.score} per budget: {best}")

    # -- results ---------------------------------------------------------------------------------------
    def best_per_budget(self) -> dict[str, Candidate | None]:
        groups = {b.label: [b] for b in self.budgets} or {"unconstrained": []}
        best = {}
        for label, budget in groups.items():
            inside = [c for c in self.evaluated.values() if all(b.ok(np.array(c.metrics[b.metric])) for b in budget)]
            best[label] = max(inside, key=lambda c: (c.metrics[self.score], -c.metrics.get("loss", 0.0)), default=None)
        return best

    def pareto_front(self, metric: str) -> list[Candidate]:
        """Evaluated candidates that no other beats on both the score and ``metric``, cheapest first."""
        ranked = sorted(self.evaluated.values(), key=lambda c: (c.metrics[metric], -c.metrics[self.score]))
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
            "config": {k: v for k, v in self.config.to_dict().items() if k not in SearchConfig.RESUMABLE},
            "data_key": self.data_key,
            "step": self.step,
            "evaluated": [(c.arch.to_dict(), c.metrics, c.step) for c in self.evaluated.values()],
            "searchers": [s.state_dict() for s in self.searchers],
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"search state version {state.get('version')!r}, expected {STATE_VERSION}")
        mine = {k: v for k, v in self.config.to_dict().items() if k not in SearchConfig.RESUMABLE}
        changed = sorted(k for k in set(mine) | set(state["config"]) if mine.get(k) != state["config"].get(k))
        if changed:
            raise ValueError("cannot resume: the saved search used other settings for "
                             + ", ".join(f"{k} (saved {state['config'].get(k)!r}, now {mine.get(k)!r})" for k in changed))
        if state["data_key"] != self.data_key:
            raise ValueError(f"cannot resume: the saved search evaluated on other data or another checkpoint "
                             f"(saved {state['data_key']!r}, now {self.data_key!r})")
        self.step = int(state["step"])
        self.evaluated = {}
        for arch, metrics, step in state["evaluated"]:
            arch = Arch.from_dict(arch)
            self.evaluated[arch] = Candidate(arch, dict(metrics), int(step))
        for searcher, saved in zip(self.searchers, state["searchers"], strict=True):
            searcher.load_state_dict(saved)

    def save_state(self, path: str | os.PathLike) -> None:
        atomic_torch_save(self.state_dict(), path)

    def load_state(self, path: str | os.PathLike) -> None:
        try:
            state = torch.load(path, weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unpickling failure means the file is unusable
            raise CheckpointError(f"search state {os.fspath(path)!r} is corrupt or not a nas.search state: "
                                  f"{first_line(error)}") from error
        if not isinstance(state, dict):
            raise CheckpointError(f"search state {os.fspath(path)!r} holds a {type(state).__name__}, "
                                  "not a nas.search state")
        try:
            self.load_state_dict(state)
        except (KeyError, TypeError, AttributeError, IndexError) as error:
            raise CheckpointError(f"search state {os.fspath(path)!r} is malformed: {error!r}") from error


def plot_front(summary: dict, path: str | os.PathLike, budgets: Sequence[Budget]) -> None:
    """Every evaluated arch (score against cost), the Pareto front and the budgets, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = budgets[0].metric if budgets else "macs"
    score = summary["score"]
    figure, axes = plt.subplots(figsize=(6.4, 4.4))
    axes.scatter([c[metric] for c in summary["candidates"]], [c[score] for c in summary["candidates"]],
                 s=8, alpha=0.4, label=f"evaluated ({len(summary['candidates'])})")
    front = summary["pareto_front"].get(metric, [])
    axes.plot([c[metric] for c in front], [c[score] for c in front], "o-", color="C3", markersize=4, label="Pareto front")
    for budget in budgets:
        if budget.metric == metric:
            axes.axvline(budget.high, color="grey", linestyle="--", linewidth=0.8)
    for label, best in summary["best"].items():
        if best is not None:
            axes.scatter([best[metric]], [best[score]], marker="*", s=120, zorder=3, label=f"best {label}")
    axes.set_xlabel({"macs": "MACs", "params": "parameters", "latency": "latency (ms)"}[metric])
    axes.set_ylabel(f"{score} (%)")
    axes.set_title(f"{summary['algorithm']} on {summary['space']}")
    axes.legend(fontsize=7)
    figure.tight_layout()
    with atomic_open(path) as handle:
        figure.savefig(handle, format="png", dpi=120)
    plt.close(figure)


def write_outputs(search: Search, output: str, extra: dict | None = None) -> dict:
    summary = {**search.summary(), **(extra or {})}
    os.makedirs(output, exist_ok=True)
    atomic_write_text(os.path.join(output, "search.json"), json.dumps(summary, indent=1))
    if search.evaluated:
        plot_front(summary, os.path.join(output, "pareto.png"), search.budgets)
    return summary


# --- the command line ---------------------------------------------------------------------------------

class CheckpointMismatchError(UserError, ValueError):
    """A checkpoint, latency model or saved search that belongs to another space or run."""


def load_supernet(path: str | os.PathLike, device: torch.device, space_name: str | None = None):
    """The supernet of a ``nas.train`` checkpoint (its EMA weights where it kept an EMA), its space, and the checkpoint."""
    from .space import load_space
    from .supernet import SupernetConfig, VisionTransformerSupernet
    from .train import load_checkpoint

    state = load_checkpoint(path)
    trained = state["config"]
    if not isinstance(trained.get("space"), str):
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} records no search space (config 'space')")
    if space_name is not None and load_space(space_name) != load_space(trained["space"]):
        raise CheckpointMismatchError(f"checkpoint {os.fspath(path)!r} holds a supernet of space {trained['space']!r}, "
                                      f"not of the requested space {space_name!r}")
    space = load_space(trained["space"])
    supernet = VisionTransformerSupernet(SupernetConfig.from_space(space))
    weights = state["model"]
    if state.get("ema"):
        weights = {k[len("module."):]: v for k, v in state["ema"].items() if k.startswith("module.")}
    try:
        supernet.load_state_dict(weights)
    except RuntimeError as error:
        raise CheckpointMismatchError(f"checkpoint {os.fspath(path)!r} does not fit a supernet of space "
                                      f"{space.name!r}: {error}") from error
    return supernet.to(device).eval(), space, state


def file_digest(path: str | os.PathLike) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def search_data(config: SearchConfig, checkpoint: dict, space: SearchSpace, device: torch.device):
    """``(search batches, test batches, description)``: the training images that ``nas.train`` held out of
    the supernet's training (the split its ``checkpoint`` records; the first ``holdout_images`` of it), or the
    test split with ``search_on="test"``, and the test split."""
    from . import data as data_lib
    from .evaluate import TensorBatches
    from .train import fixed_subset

    trained = checkpoint["config"]
    dataset = config.dataset or trained["dataset"]
    root = config.data_root or trained.get("data_dir")
    if root is None and dataset != "digits":
        from . import DATA_DIR
        root = os.path.join(DATA_DIR, {"cifar10": "cifar-10-batches-py"}.get(dataset, dataset))
    kwargs = dict(image_size=space.img_size, in_chans=space.in_chans)
    test = data_lib.load_dataset(dataset, root, "test", **kwargs)
    data_lib.check_matches(test, space.img_size, space.in_chans, space.num_classes, f"{dataset} test")
    test = fixed_subset(test, config.test_images or None)
    if config.search_on == "test":
        search = test
        described = f"{dataset} test split ({len(test)} images)"
    else:
        train = data_lib.load_dataset(dataset, root, "train", **kwargs)
        split = checkpoint.get("search_split")
        count, seed = held_out_split(config, split, dataset, len(train))
        search = data_lib.subset(train, data_lib.holdout_split(len(train), count, seed)[0])
        never_trained_on = split is not None and split["images"] > 0
        described = f"{count} held-out {dataset} training images" + ("" if never_trained_on else
                                                                      " (which the supernet trained on)")
    batches = [TensorBatches.from_dataset(d, config.batch_size, device) for d in (search, test)]
    return batches[0], batches[1], described


def held_out_split(config: SearchConfig, split: dict | None, dataset: str, train_images: int) -> tuple[int, int]:
    """``(count, seed)`` of the training images to search on: the first ``holdout_images`` (default: all)
    of those the checkpoint held out. A checkpoint that held none out gets a warning and the default rule."""
    from . import data as data_lib

    if split is not None and (split["dataset"], split["of"]) != (dataset, train_images):
        raise CheckpointMismatchError(
            f"checkpoint {config.checkpoint!r} held out search images of a {split['dataset']} training set of "
            f"{split['of']} images, not of this {dataset} one ({train_images}); search on that data set or with "
            f"--search-on test")
    kept_out = split["images"] if split is not None else 0
    if kept_out == 0:
        why = ("was trained with search_holdout=0" if split is not None
               else "records no held-out split (written before nas.train held one out)")
        count = config.holdout_images or data_lib.default_holdout(train_images)
        warnings.warn(f"checkpoint {config.checkpoint!r} {why}: the supernet trained on every {dataset} training "
                      f"image, so the {count} search images score near training accuracy and rank archs poorly; "
                      f"train with search_holdout > 0 (the default) or search with --search-on test", stacklevel=3)
        if not 1 <= count < train_images:
            raise ValueError(f"holdout_images must be in 1..{train_images - 1} (the {dataset} training images), "
                             f"got {config.holdout_images}")
        return count, data_lib.HOLDOUT_SEED
    count = config.holdout_images or kept_out
    if count > kept_out:
        raise ValueError(f"holdout_images={count}, but checkpoint {config.checkpoint!r} held only {kept_out} "
                         f"{dataset} training images out of training (nas.train's search_holdout); ask for at most "
                         f"{kept_out}, or search with --search-on test")
    return count, split["seed"]


def run(config: SearchConfig) -> dict:
    """A whole search as ``python -m nas.search`` runs it; returns the summary written to ``search.json``.
    The search owns its output directory meanwhile (``nas.rundir``): a second one there gets a clear error."""
    if config.checkpoint is None:
        raise ValueError("a search needs a supernet checkpoint (--checkpoint), written by python -m nas.train")
    output = OwnedDirectory(config.output, "output")
    try:
        if not config.resume and os.path.exists(os.path.join(config.output, STATE_FILE)):
            raise OutputError(f"output {config.output!r} already holds a search ({STATE_FILE}); continue it with "
                              "--resume, or choose another --output")
        return _run(config)
    finally:
        output.release()


def _run(config: SearchConfig) -> dict:
    from .evaluate import EvalCache, evaluate_archs
    from .latency import LatencyModel
    from .samplers import build_sampler
    from .train import resolve_device

    device = resolve_device(config.device)
    supernet, space, state = load_supernet(config.checkpoint, device, config.space)
    latency_model = None
    if config.latency_model:
        latency_model = LatencyModel.load(config.latency_model)
        if latency_model.space != space:
            raise CheckpointMismatchError(f"latency model {config.latency_model!r} is for space "
                                          f"{latency_model.space.name!r}, the supernet is of {space.name!r}")
    costs = Costs(space, latency_model)
    costs.check_reachable(config.parsed_budgets)  # before any data is read
    sampler = None
    if config.algorithm == "sampler":
        trained = state["config"]
        if trained["sampler"] != "learned":
            raise ValueError(f"--algorithm sampler needs a supernet trained with the learned sampler; "
                             f"{config.checkpoint!r} was trained with {trained['sampler']!r}")
        sampler = build_sampler("learned", space, seed=trained["seed"], **trained["sampler_options"])
        sampler.load_state_dict(state["sampler"])
    search_batches, test_batches, described = search_data(config, state, space, device)
    data_key = f"ckpt={file_digest(config.checkpoint)}|{search_batches.fingerprint}"
    cache = EvalCache(os.path.join(config.output, "eval_cache.json"))
    log = print if config.progress else (lambda _: None)

    def evaluate(archs: list[Arch]) -> list[dict[str, float]]:
        results = evaluate_archs(supernet, archs, search_batches, subnets=config.subnets_per_pass or None,
                                 cache=cache, data_key=data_key, progress=config.progress)
        cache.save()
        return [r.to_dict() for r in results]

    search = Search(config, space, evaluate, costs, sampler=sampler, data_key=data_key, log=log)
    state_path = os.path.join(config.output, STATE_FILE)
    if config.resume:
        if not os.path.exists(state_path):
            raise FileNotFoundError(f"--resume: no saved search at {state_path!r}")
        search.load_state(state_path)
        log(f"[search] resumed at step {search.step} with {len(search.evaluated)} evaluated candidates")
    log(f"[search] {config.algorithm} on space {space.name!r}, budgets {[b.label for b in search.budgets] or 'none'}; "
        f"searching on {described}")
    search.run(state_path)
    best = {label: c for label, c in search.best_per_budget().items() if c is not None}
    test_results = evaluate_archs(supernet, [c.arch for c in best.values()], test_batches, progress=False)
    extra = {"search_data": described, "test_data": f"{len(test_batches.images)} test images",
             "test": {label: r.to_dict() for label, r in zip(best, test_results)}}
    if config.export:
        from .export import extract_subnet, save_subnet

        exported = {}
        for label, candidate in best.items():
            path = os.path.join(config.output, "best-" + re.sub(r"[^\w.=-]+", "_", label) + ".pt")
            save_subnet(path, extract_subnet(supernet, candidate.arch), candidate.arch)
            exported[label] = path
        extra["exported"] = exported
    summary = write_outputs(search, config.output, extra)
    for label, candidate in best.items():
        print(f"[search] best for {label}: search {search.score} {candidate.metrics[search.score]:.2f}, test top-1 "
            f"{extra['test'][label]['top1']:.2f}, {_short(candidate.metrics['macs'])} MACs, "
            f"{_short(candidate.metrics['params'])} params: {candidate.arch.to_json()}")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    try:
        run(config_from_args(argv))
    # The search config, budget and state checks still raise plain ValueError (not yet in the UserError family).
    except (UserError, ValueError, FileNotFoundError, ImportError) as error:
        print(f"nas.search: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

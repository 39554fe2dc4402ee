"""Resource budgets of a search and the cost table of its candidates.

A :class:`Budget` is ``low <= metric(arch) <= high`` on MACs (``flops`` = 2 MACs is converted), params or latency
(milliseconds on the device of a latency model, ``nas.latency``). :class:`Costs` computes those metrics for many
archs at once and remembers them, so that every candidate's costs are computed once per search.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from . import costs
from .errors import BudgetError, InfeasibleBudgetError
from .family import Arch, Space

METRICS = ("macs", "params", "latency")
UNITS = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


@dataclass(frozen=True)
class Budget:
    """``low <= metric(arch) <= high``; metric is ``macs``, ``params`` or ``latency`` (milliseconds)."""

    metric: str
    high: float
    low: float = 0.0

    @classmethod
    def parse(cls, text: str) -> Budget:
        """``"macs=1.3G"``, ``"flops=2.6G"``, ``"params=4M:6M"`` (a window), ``"latency=5ms"``."""
        match = re.fullmatch(r"\s*(\w+)\s*(?:=|<=)\s*([^:]+?)\s*(?::\s*(.+?))?\s*", text)
        if not match:
            raise BudgetError(f"budget {text!r}: expected METRIC=LIMIT or METRIC=LOW:HIGH, e.g. macs=1.3G, params=6M, "
                              "latency=5ms")
        metric, first, second = match.group(1).lower(), match.group(2), match.group(3)
        scale = 0.5 if metric == "flops" else 1.0
        metric = "macs" if metric == "flops" else metric
        if metric not in METRICS:
            raise BudgetError(f"budget {text!r}: unknown metric {metric!r}; choose macs, flops, params or latency")
        values = [_number(v, text, metric) * scale for v in ((first, second) if second else (first,))]
        low, high = (values[0], values[1]) if second else (0.0, values[0])
        if not 0 <= low <= high or high <= 0:
            raise BudgetError(f"budget {text!r}: need 0 <= low <= high and high > 0")
        return cls(metric, high, low)

    @property
    def label(self) -> str:
        unit = "ms" if self.metric == "latency" else ""
        window = f"{format_count(self.low)}:" if self.low > 0 else ""
        return f"{self.metric}={window}{format_count(self.high)}{unit}"

    def ok(self, values: np.ndarray) -> np.ndarray:
        return (values >= self.low) & (values <= self.high)


def _number(text: str, budget: str, metric: str) -> float:
    match = re.fullmatch(r"([0-9.eE+-]+)\s*(ms|[kKmMgGtT]?)", text.strip())
    if not match:
        raise BudgetError(f"budget {budget!r}: cannot read the number {text!r}")
    try:
        number = float(match.group(1))
    except ValueError:
        raise BudgetError(f"budget {budget!r}: cannot read the number {text!r}") from None
    suffix = match.group(2)
    if metric == "latency":
        return number
    if suffix == "ms":
        raise BudgetError(f"budget {budget!r}: 'ms' is for latency budgets")
    return number * UNITS[suffix.lower()]


def format_count(value: float) -> str:
    """``1.3G``, ``500K``, ``12``: a count for a label or a message."""
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"


class Costs:
    """MACs, params and (with a latency model) predicted milliseconds of archs, vectorised, memoised."""

    def __init__(self, space: Space, latency_model=None):
        self.space, self.latency_model = space, latency_model
        self._known: dict[Arch, dict[str, float]] = {}

    def __call__(self, archs: Sequence[Arch]) -> dict[str, np.ndarray]:
        new = [a for a in dict.fromkeys(archs) if a not in self._known]
        if new:
            values = {"macs": costs.macs_many(new, self.space), "params": costs.params_many(new, self.space)}
            if self.latency_model is not None:
                values["latency"] = 1e3 * self.latency_model.predict_many(new)
            for i, arch in enumerate(new):
                self._known[arch] = {name: float(v[i]) for name, v in values.items()}
        if not archs:
            return {}
        return {name: np.array([self._known[a][name] for a in archs]) for name in self._known[archs[0]]}

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
                raise BudgetError(f"budget {budget.label}: a latency budget needs a latency model (--latency-model, "
                                  "written by nas.latency)")
            smallest, largest = costs.cost_range(self.space, self.metric(budget.metric))
            if smallest > budget.high or largest < budget.low:
                raise InfeasibleBudgetError(
                    f"budget {budget.label}: no arch of space {self.space.name!r} can meet it; its {budget.metric} "
                    f"range is {format_count(smallest)} (smallest arch) to {format_count(largest)} (largest)")

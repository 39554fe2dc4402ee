"""ViTAS's identity probability (Su et al. 2021) and SuperSAM's layer-drop probabilities, in spaces with identity
layers."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import costs
from ..family import Arch, Space, family_of
from ..vit.arch import ArchBatch
from .base import ArchSampler, Measure


def uniform_widths(space: Space, rng: np.random.Generator, count: int) -> tuple[ArchBatch, np.ndarray]:
    """``count`` archs with uniform widths in every layer and all layers on, and their uniform draws ``[count, L]``
    for :func:`drop_layers`."""
    layers = space.max_depth
    widths = space.batch_type(
        embed_dim=np.asarray(space.embed_dims)[rng.integers(len(space.embed_dims), size=count)],
        num_heads=np.asarray(space.num_heads)[rng.integers(len(space.num_heads), size=(count, layers))],
        mlp_ratio=np.asarray(space.mlp_ratios)[rng.integers(len(space.mlp_ratios), size=(count, layers))],
        layer_on=np.ones((count, layers), dtype=bool),
        patch_size=(np.asarray(space.patch_sizes)[rng.integers(len(space.patch_sizes), size=count)]
                    if len(space.patch_sizes) > 1 else np.zeros(count, dtype=np.int64)),
        attn_dim=(np.asarray(space.attn_dims)[rng.integers(len(space.attn_dims), size=(count, layers))]
                  if space.attn_dims else None),
    )
    return widths, rng.random((count, layers))


def drop_layers(space: Space, widths: ArchBatch, uniforms: np.ndarray, probabilities: np.ndarray) -> ArchBatch:
    """``widths`` with layer i off where its uniform draw is below its drop probability, then the fewest dropped
    layers (those closest to their threshold) back on to reach a depth of the space."""
    margin = uniforms - probabilities  # < 0: dropped
    on = margin >= 0
    depths = np.asarray(space.depths)
    target = depths[np.searchsorted(depths, on.sum(axis=1))]
    rank = (-np.where(on, np.inf, margin)).argsort(axis=1).argsort(axis=1)  # kept first, then closest drops
    return dataclasses.replace(widths, layer_on=rank < target[:, None])


def check_drop_space(space: Space, who: str) -> None:
    """Layers may be dropped only in a space whose family has identity layers (``Family.layer_drop_refusal``)."""
    refusal = family_of(space).layer_drop_refusal(space)
    if refusal is not None:
        raise ValueError(f"{who}: {refusal}; use uniform, sandwich, complexity, performance or learned")


class IdentitySampler(ArchSampler):
    """ViTAS identity probability and SuperSAM layer-drop probabilities (spaces with ``identity_layers``).

    Layer ``i`` is an identity with probability ``min(1, scale * profile[i])``; widths are drawn uniformly
    per layer. ``profile`` is ``"uniform"`` (ViTAS: one identity probability for every layer), ``"linear"``
    (SuperSAM: drop probability growing with depth, ``(i + 1) / L``) or a list of per-layer weights. Where
    fewer layers stay on than the space's smallest depth allows, the dropped layers whose draws came
    closest to their threshold come back on. Before training, ``scale`` is found by bisection so that the
    mean MACs of sampled subnets lie in ``macs_range`` (default: the middle third between the smallest and
    the largest subnet); the estimate uses ``samples`` draws with common random numbers, so that it falls
    monotonically as ``scale`` grows.

    The identity probability searched per budget (ViTAS: "we propose to search the sampling probability of identity
    operation"): with ``search_probabilities`` (candidate values of ``scale``, the identity probability itself for the
    uniform profile), at step ``search_step`` of training (default: a quarter of the run) each candidate draws until
    it has ``search_archs`` archs whose MACs lie in ``macs_range`` (the budget), all candidates on the same sequence
    of draws (common random numbers), and is scored by their mean held-out accuracy; the most accurate candidate
    replaces the bisection's scale for the rest of training. Every candidate is judged on as many archs, so how often
    it lands inside the budget does not decide; one that cannot draw ``search_archs`` inside it in ``search_draws``
    draws is left out. The bisection stays the fast default (no
    ``search_probabilities``: nothing is measured). The record, budget, calibrated scale, each candidate's score and
    the choice, is ``probability_search`` (in the sampler's state and the training log).
    """

    name = "identity"

    def __init__(self, space: Space, *, seed: int = 0, total_steps: int = 1,
                 profile: str | Sequence[float] = "uniform", macs_range: Sequence[float] | None = None,
                 samples: int = 1024, search_probabilities: Sequence[float] | None = None,
                 search_step: int | None = None, search_archs: int = 16, search_draws: int = 8192):
        super().__init__(space, seed=seed, total_steps=total_steps)
        check_drop_space(space, "identity sampler")
        layers = space.max_depth
        if isinstance(profile, str):
            if profile not in ("uniform", "linear"):
                raise ValueError(f"identity sampler: profile must be 'uniform', 'linear' or a list, got {profile!r}")
            weights = np.ones(layers) if profile == "uniform" else np.arange(1, layers + 1) / layers
        else:
            weights = np.asarray(profile, dtype=np.float64)
            if weights.shape != (layers,) or (weights < 0).any() or not (weights > 0).any():
                raise ValueError(f"identity sampler: profile must list {layers} non-negative weights, not all zero")
        self.profile = weights
        low, high = costs.macs_range(space)
        if macs_range is None:
            macs_range = (low + (high - low) / 3, low + 2 * (high - low) / 3)
        self.macs_range = (float(macs_range[0]), float(macs_range[1]))
        self.scale = self.search_scale(np.random.default_rng([seed, 1]), samples)
        self.candidates = None
        if search_probabilities is not None:
            self.candidates = tuple(float(p) for p in search_probabilities)
            if not self.candidates or not all(0.0 <= p <= 1.0 / self.profile.max() for p in self.candidates):
                raise ValueError(f"identity sampler: search_probabilities must be a non-empty list of values in "
                                 f"[0, {1.0 / self.profile.max():.4g}], got {list(search_probabilities)}")
        self.search_step = max(1, total_steps // 4) if search_step is None else int(search_step)
        if self.search_step < 1 or int(search_archs) < 1 or int(search_draws) < 1:
            raise ValueError(f"identity sampler: search_step ({search_step}), search_archs ({search_archs}) and "
                             f"search_draws ({search_draws}) must be >= 1")
        self.search_archs, self.search_draws = int(search_archs), int(search_draws)
        self.measures = self.candidates is not None  # update() measures held-out accuracy only to search
        self.probability_search: dict[str, Any] | None = None

    @classmethod
    def measures_with(cls, options: dict[str, Any]) -> bool:
        return options.get("search_probabilities") is not None

    @property
    def probabilities(self) -> np.ndarray:
        """Per-layer identity probability."""
        return np.minimum(1.0, self.scale * self.profile)

    def search_scale(self, rng: np.random.Generator, samples: int) -> float:
        widths, uniforms = uniform_widths(self.space, rng, samples)
        low, high = self.macs_range

        def mean_macs(scale: float) -> float:
            probabilities = np.minimum(1.0, scale * self.profile)
            return float(costs.macs_many(drop_layers(self.space, widths, uniforms, probabilities), self.space).mean())

        lo, hi = 0.0, 1.0 / self.profile.max()
        reachable = (mean_macs(hi), mean_macs(lo))
        if reachable[0] > high or reachable[1] < low:
            raise ValueError(f"identity sampler: the mean MACs of sampled subnets range over [{reachable[0]:.4g}, "
                             f"{reachable[1]:.4g}], which misses macs_range [{low:.4g}, {high:.4g}]")
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            mean = mean_macs(mid)
            if low <= mean <= high:
                return mid
            lo, hi = (mid, hi) if mean > high else (lo, mid)
        raise ValueError(f"identity sampler: no identity probability puts the mean MACs in [{low:.4g}, {high:.4g}]")

    def score_probabilities(self, measure: Measure, rng: np.random.Generator) -> dict[str, Any]:
        """Score every candidate probability by the mean ``measure`` of the first ``search_archs`` archs drawn with it
        whose MACs lie in ``macs_range``, drawing in batches until it has them (at most ``search_draws`` draws), all
        candidates on the same batches; returns the record (under ``"chosen"`` the most accurate candidate of those
        that found them all, None where none did)."""
        batch_size, low, high = 8 * self.search_archs, *self.macs_range
        shared: list[tuple[ArchBatch, np.ndarray]] = []  # every candidate's draws, batch after batch
        scores: dict[Arch, float] = {}  # an arch drawn under several candidates is measured once
        table = []
        for probability in self.candidates:
            archs, drawn = [], 0
            while len(archs) < self.search_archs and drawn < self.search_draws:
                if len(shared) * batch_size <= drawn:
                    shared.append(uniform_widths(self.space, rng, batch_size))
                widths, uniforms = shared[drawn // batch_size]
                batch = drop_layers(self.space, widths, uniforms, np.minimum(1.0, probability * self.profile))
                macs = costs.macs_many(batch, self.space)
                inside = np.flatnonzero((macs >= low) & (macs <= high))[:self.search_archs - len(archs)]
                archs += [self.space.canonical(batch.arch(int(i))) for i in inside]
                drawn += batch_size
            score = None
            if len(archs) == self.search_archs:
                for arch in archs:
                    if arch not in scores:
                        scores[arch] = float(measure(arch))
                score = float(np.mean([scores[a] for a in archs]))
            table.append({"probability": probability, "archs": len(archs), "draws": drawn, "score": score})
        eligible = [row for row in table if row["score"] is not None]
        chosen = max(eligible, key=lambda row: row["score"])["probability"] if eligible else None
        return {"macs_range": list(self.macs_range), "calibrated": float(self.scale), "candidates": table,
                "chosen": chosen}

    def update(self, archs: Sequence[Arch], losses: Sequence[float], measure: Measure | None = None
               ) -> dict[str, Any]:
        if self.candidates is None or self.probability_search is not None or self.step < self.search_step:
            return {}
        record = self.score_probabilities(self.require_measure(measure), self.rng)
        if record["chosen"] is None:
            raise ValueError(f"identity sampler: no candidate probability of {list(self.candidates)} drew "
                             f"{self.search_archs} archs with MACs in {self.macs_range} in {self.search_draws} draws; "
                             "widen macs_range, change the candidates or raise search_draws")
        self.probability_search = record
        self.scale = record["chosen"]
        return {"identity_probability_search": record}

    def draw(self) -> list[Arch]:
        widths, uniforms = uniform_widths(self.space, self.rng, 1)
        return [self.space.canonical(drop_layers(self.space, widths, uniforms, self.probabilities).arch(0))]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "scale": float(self.scale), "probability_search": self.probability_search}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.scale = float(state["scale"])
        self.probability_search = state.get("probability_search")  # states from before the search hold none

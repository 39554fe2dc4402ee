"""Latency of subnets: measure on the current device, and predict from cost features for search budgets.

``measure_latency`` times one callable (warm-up, then the median of repeats, synchronising CUDA).
``measure_archs`` times many archs through a ``build_model(arch)`` callable, so it works with any model
builder (the supernet's extracted subnet, a plain ViT, an exported model). ``LatencyModel`` fits
non-negative least squares on per-arch features that are sums of per-layer terms (``FEATURES``), and
saves to / loads from JSON.

Measurements and predictions are in seconds, for the batch size and device they were measured on
(stored in the model file; a model predicts nothing about other batch sizes or devices).
"""
from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .arch import Arch, ArchBatch
from .atomic import atomic_write_text
from .cost import embed_macs, head_macs, layer_dims, layer_macs_parts
from .errors import CheckpointError, require
from .space import SearchSpace

FORMAT_VERSION = 1

FEATURES = (
    "constant",          # launch and framework overhead of a forward pass
    "layers",            # per-layer overhead (kernel launches)
    "linear_macs",       # patch embedding, qkv, proj, fc1, fc2, classifier
    "attention_macs",    # q @ k^T and attn @ v (softmax work is proportional to it)
    "token_embed",       # LayerNorms, residual adds: tokens * embed_dim per layer
    "token_hidden",      # GELU: tokens * hidden per layer
)


def latency_features(archs: Arch | Sequence[Arch] | ArchBatch, space: SearchSpace) -> np.ndarray:
    """[K, len(FEATURES)] float64 features of each arch; each is a sum over active layers (plus the
    embedding and classifier for ``linear_macs``), so a latency linear in them adds up per layer."""
    d = layer_dims(archs, space)
    on = d.layer_on
    parts = layer_macs_parts(d.embed_dim, d.num_heads, d.hidden, d.tokens, space.head_dim, space.relative_position)
    embed = d.embed_dim[:, 0]

    def active_sum(per_layer):
        return np.where(on, per_layer, 0).sum(axis=1).astype(np.float64)

    columns = {
        "constant": np.ones(len(embed)),
        "layers": on.sum(axis=1).astype(np.float64),
        "linear_macs": (active_sum(parts["projections"] + parts["mlp"])
                        + embed_macs(embed, d.patch_size, d.tokens[:, 0], space.in_chans)
                        + head_macs(embed, space.num_classes)),
        "attention_macs": active_sum(parts["attention"]),
        "token_embed": active_sum(d.tokens * d.embed_dim),
        "token_hidden": active_sum(d.tokens * d.hidden),
    }
    return np.stack([columns[name] for name in FEATURES], axis=1)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(fn: Callable, *inputs, warmup: int = 5, repeats: int = 20) -> float:
    """Median wall time in seconds of ``fn(*inputs)`` under ``torch.no_grad()``, after ``warmup``
    untimed calls. CUDA is synchronised around every timed call (on the device of the first tensor
    input), so the time covers the kernels, not just their launch."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"measure_latency: repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    device = next((x.device for x in inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))
    times = []
    with torch.no_grad():
        for _ in range(warmup):
            fn(*inputs)
        for _ in range(repeats):
            _synchronize(device)
            start = time.perf_counter()
            fn(*inputs)
            _synchronize(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_archs(archs: Sequence[Arch], build_model: Callable[[Arch], torch.nn.Module],
                  make_input: Callable[[Arch], torch.Tensor], device: str | torch.device = "cpu",
                  warmup: int = 5, repeats: int = 20) -> list[tuple[Arch, float]]:
    """``[(arch, seconds)]``: each ``build_model(arch)`` in eval mode on ``device``, timed on
    ``make_input(arch)`` (e.g. ``lambda arch: torch.randn(batch, 3, 224, 224)``)."""
    device = torch.device(device)
    results = []
    for arch in archs:
        model = build_model(arch).to(device).eval()
        results.append((arch, measure_latency(model, make_input(arch).to(device), warmup=warmup, repeats=repeats)))
    return results


@dataclass(frozen=True)
class LatencyModel:
    """Latency in seconds = ``latency_features(arch) @ coef``, with non-negative ``coef`` (one per
    ``FEATURES`` entry, seconds per unit), for one space, batch size and device.
    ``mean_relative_error`` is the mean |predicted - measured| / measured on the fitting data."""

    space: SearchSpace
    coef: tuple[float, ...]
    batch_size: int
    device: str
    mean_relative_error: float

    @classmethod
    def fit(cls, measurements: Sequence[tuple[Arch, float]], space: SearchSpace, batch_size: int,
            device: str) -> "LatencyModel":
        """Fit on ``[(arch, seconds)]`` from ``measure_archs`` (at least as many as ``FEATURES``)."""
        if len(measurements) < len(FEATURES):
            raise ValueError(f"LatencyModel.fit: {len(measurements)} measurements, need at least {len(FEATURES)}")
        archs = [arch for arch, _ in measurements]
        seconds = np.array([t for _, t in measurements], dtype=np.float64)
        if not (np.isfinite(seconds).all() and (seconds > 0).all()):
            raise ValueError("LatencyModel.fit: latencies must be finite and positive seconds")
        for arch in archs:
            space.validate(arch)
        features = latency_features(archs, space)
        # Columns span ~10 orders of magnitude (1 vs MACs): scale them so that NNLS is well conditioned.
        scale = np.abs(features).max(axis=0)
        scale[scale == 0] = 1.0
        nnls = require("scipy.optimize", "nas", "fitting a latency model").nnls
        coef, _ = nnls(features / scale, seconds)
        coef = coef / scale
        relative_error = float(np.mean(np.abs(features @ coef - seconds) / seconds))
        return cls(space, tuple(float(c) for c in coef), int(batch_size), str(device), relative_error)

    def predict_many(self, archs: Sequence[Arch] | ArchBatch) -> np.ndarray:
        return latency_features(archs, self.space) @ np.asarray(self.coef)

    def predict(self, arch: Arch) -> float:
        return float(self.predict_many([arch])[0])

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "features": list(FEATURES),
            "coef": list(self.coef),
            "space": self.space.to_dict(),
            "batch_size": self.batch_size,
            "device": self.device,
            "mean_relative_error": self.mean_relative_error,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON atomically: a temporary file in the same folder, then a rename."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencyModel":
        try:
            data = json.loads(Path(path).read_text())
        except OSError as error:
            raise CheckpointError(f"{path}: cannot read the latency model: {error.strerror or error}") from error
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{path}: not a latency model (invalid JSON: {error})") from error
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: not a latency model (expected a JSON object)")
        keys = {"format_version", "features", "coef", "space", "batch_size", "device", "mean_relative_error"}
        missing = keys - set(data)
        if missing:
            raise CheckpointError(f"{path}: not a latency model (missing {sorted(missing)})")
        if data["format_version"] != FORMAT_VERSION:
            raise CheckpointError(f"{path}: latency model format {data['format_version']}, this code reads "
                                  f"{FORMAT_VERSION}")
        if tuple(data["features"]) != FEATURES or len(data["coef"]) != len(FEATURES):
            raise CheckpointError(f"{path}: latency model features {data['features']} (with {len(data['coef'])} "
                             f"coefficients) differ from this code's {list(FEATURES)}")
        coef = tuple(float(c) for c in data["coef"])
        if not all(np.isfinite(c) and c >= 0 for c in coef):
            raise CheckpointError(f"{path}: latency model coefficients must be finite and >= 0, got {coef}")
        try:
            space = SearchSpace.from_dict(data["space"])
        except (ValueError, TypeError) as error:
            raise CheckpointError(f"{path}: invalid search space in latency model: {error}") from error
        return cls(space, coef, int(data["batch_size"]), str(data["device"]), float(data["mean_relative_error"]))

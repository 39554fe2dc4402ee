"""Latency of subnets: measure on the current device, and predict from cost features for search budgets.

``measure_latency`` times one callable (warm-up, then the median of repeats, synchronising CUDA).
``measure_archs`` times many archs through a ``build_model(arch)`` callable, so it works with any model
builder (the supernet's extracted subnet, a plain ViT, an exported model). ``LatencyModel`` fits
non-negative least squares on per-arch features that are sums of per-layer terms (``FEATURES``), and
saves to / loads from JSON.

Measurements and predictions are in seconds, for the batch size and device they were measured on. The model file
records where (:func:`environment`: the device's name, the dtype, the CPU threads, the torch, elastic-ops and Python
versions), and :meth:`LatencyModel.check_environment` refuses a model measured on another device unless told to.
:func:`measure_space` measures a space's subnets as standalone models on this device; ``python -m nas.latency
measure|fit|validate`` is its command line.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_write_text
from ..build import build_supernet
from ..errors import CheckpointError, CheckpointMismatchError, require
from ..export import extract_subnet
from ..saved import saved_number
from ..vit.arch import Arch, ArchBatch
from ..vit.cost import embed_macs, head_macs, head_outputs, head_tokens, layer_dims, layer_macs_parts
from ..vit.space import SearchSpace

FORMAT_VERSION = 2  # 2: the environment of the measurements; 1 (no environment) still loads

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
    parts = layer_macs_parts(d.embed_dim, d.num_heads, d.hidden, d.tokens, space.head_dim, space.relative_position,
                             d.attn_dim)
    embed = d.embed_dim[:, 0]

    def active_sum(per_layer):
        return np.where(on, per_layer, 0).sum(axis=1).astype(np.float64)

    columns = {
        "constant": np.ones(len(embed)),
        "layers": on.sum(axis=1).astype(np.float64),
        "linear_macs": (active_sum(parts["projections"] + parts["mlp"])
                        + embed_macs(embed, d.patch_size, d.tokens[:, 0], space.in_chans)
                        + head_macs(embed, head_outputs(space), head_tokens(space, d.tokens[:, 0]))),
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


def read_json(path: str | os.PathLike, what: str, kind: str):
    """The JSON in ``path``, or a :class:`~nas.errors.CheckpointError` saying that ``what`` cannot be read or is not
    ``kind``."""
    try:
        return json.loads(Path(path).read_text())
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read {what}: {error.strerror or error}") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path}: not {kind} (invalid JSON: {error})") from error


def device_name(device: torch.device) -> str:
    """The accelerator's or the CPU's model name (the CPU's from /proc/cpuinfo where there is one)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "cpu"


def environment(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Where latencies are measured: the device's kind and name, the dtype, torch's CPU threads, and the versions of
    torch, elastic-ops and Python."""
    device = torch.device(device)
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("elastic-ops")
    except PackageNotFoundError:
        ours = "unknown"
    return {"device": device.type, "device_name": device_name(device), "dtype": str(dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "elastic_ops": ours,
            "python": platform.python_version()}


@dataclass(frozen=True)
class LatencyModel:
    """Latency in seconds = ``latency_features(arch) @ coef``, with non-negative ``coef`` (one per
    ``FEATURES`` entry, seconds per unit), for one space, batch size and device.
    ``mean_relative_error`` is the mean |predicted - measured| / measured on the fitting data; ``environment``
    (:func:`environment`) is where the measurements were taken (empty for files written before it was recorded)."""

    space: SearchSpace
    coef: tuple[float, ...]
    batch_size: int
    device: str
    mean_relative_error: float
    environment: dict = field(default_factory=dict, compare=False)

    @classmethod
    def fit(cls, measurements: Sequence[tuple[Arch, float]], space: SearchSpace, batch_size: int,
            device: str, environment: dict | None = None) -> "LatencyModel":
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
        return cls(space, tuple(float(c) for c in coef), int(batch_size), str(device), relative_error,
                   dict(environment or {}))

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
            "environment": self.environment,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON atomically: a temporary file in the same folder, then a rename."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LatencyModel":
        data = read_json(path, "the latency model", "a latency model")
        if not isinstance(data, dict):
            raise CheckpointError(f"{path}: not a latency model (expected a JSON object)")
        keys = {"format_version", "features", "coef", "space", "batch_size", "device", "mean_relative_error"}
        missing = keys - set(data)
        if missing:
            raise CheckpointError(f"{path}: not a latency model (missing {sorted(missing)})")
        if data["format_version"] not in (1, FORMAT_VERSION):
            raise CheckpointError(f"{path}: latency model format {data['format_version']}, this code reads "
                                  f"{FORMAT_VERSION}")
        if tuple(data["features"]) != FEATURES or len(data["coef"]) != len(FEATURES):
            raise CheckpointError(f"{path}: latency model features {data['features']} (with {len(data['coef'])} "
                             f"coefficients) differ from this code's {list(FEATURES)}")
        coef = tuple(saved_number(c, f"{path}: latency model coefficient {name}", 0)
                     for name, c in zip(FEATURES, data["coef"]))
        try:
            space = SearchSpace.from_dict(data["space"])
        except (ValueError, TypeError) as error:
            raise CheckpointError(f"{path}: invalid search space in latency model: {error}") from error
        if not isinstance(data.get("environment") or {}, dict):
            raise CheckpointError(f"{path}: latency model environment must be a mapping")
        return cls(space, coef, saved_number(data["batch_size"], f"{path}: latency model batch_size", 1, 2**31,
                                             integer=True),
                   str(data["device"]), saved_number(data["mean_relative_error"], f"{path}: latency model "
                                                     "mean_relative_error", 0), dict(data.get("environment") or {}))

    def check_environment(self, here: dict, other_device_ok: bool = False, source: str = "latency model") -> None:
        """Refuse (:class:`~nas.errors.CheckpointMismatchError`) to predict for a device other than the one measured
        (``here`` as :func:`environment` gives it) unless ``other_device_ok``."""
        measured = self.environment.get("device_name")
        if other_device_ok or measured == here["device_name"]:
            return
        where = (f"was measured on {measured} ({self.environment.get('dtype')}, {self.environment.get('threads')} "
                 f"threads, torch {self.environment.get('torch')})" if measured else
                 "does not record the device it was measured on (written before nas.latency recorded it)")
        raise CheckpointMismatchError(f"{source} {where}, and this is {here['device_name']}: its predictions are not "
                                      "latencies here; measure this device (python -m nas.latency measure, then fit), "
                                      "or use it anyway with latency_other_device")


def measure_space(space: SearchSpace, archs: Sequence[Arch], batch_size: int, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32, warmup: int = 5, repeats: int = 20,
                  progress: Callable[[int], None] | None = None) -> list[tuple[Arch, float]]:
    """``[(arch, seconds)]``: each arch of ``space`` as the standalone model it exports to (``nas.export``, random
    weights: latency does not depend on them), in ``dtype`` on ``device``, timed on a batch of ``batch_size``."""
    supernet = build_supernet(space).eval()
    shape = (batch_size, space.in_chans, space.img_size, space.img_size)
    results = []
    for arch in archs:
        results += measure_archs([arch], lambda a: extract_subnet(supernet, a).to(dtype),
                                 lambda a: torch.randn(shape, dtype=dtype), device, warmup, repeats)
        if progress is not None:
            progress(len(results))
    return results


def relative_errors(model: LatencyModel, measurements: Sequence[tuple[Arch, float]]) -> np.ndarray:
    """|predicted - measured| / measured of each measurement."""
    measured = np.array([seconds for _, seconds in measurements])
    return np.abs(model.predict_many([arch for arch, _ in measurements]) - measured) / measured

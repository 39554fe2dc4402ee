"""Latency models from the command line: ``python -m nas.latency measure|fit|validate [settings]``.

- ``measure``: time subnets of a space on this device as the standalone models they export to (``--archs`` of them,
  drawn at random, plus the smallest and largest) and write the measurements, with where they were taken, to JSON.
- ``fit``: fit a latency model on the measurements, holding ``--holdout`` of the archs out, report its error on them,
  and write the model (the JSON that ``nas.search --latency-model`` and the learned sampler read).
- ``validate``: measure other subnets on this device now and report the model's error on them; a model measured on
  another device is refused unless ``--other-device``.

Each command's settings are flags, ``--set`` keys and keys of a ``--config`` file (``nas.config``); errors are one
line and exit status 2 (``nas.errors``).
"""
from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..atomic import atomic_write_text
from ..config import Config, parse_command_line, setting
from ..device import resolve_device
from ..errors import CheckpointError, ConfigError, run_command
from ..spaces import load_space
from ..vit.arch import Arch
from ..vit.space import SearchSpace
from . import LatencyModel, environment, measure_space, read_json, relative_errors

MEASUREMENTS_FORMAT = "nas.latency.measurements/1"
DTYPES = ("float32", "bfloat16", "float16")


def _positive(config: Config, *names: str) -> list[str]:
    return [f"{name}={getattr(config, name)} must be >= 1" for name in names if getattr(config, name) < 1]


@dataclass
class TimingConfig(Config):
    """The settings of the commands that time subnets on this device."""

    device: str = setting("auto", "auto, cpu, cuda, cuda:1, ...")
    warmup: int = setting(5, "untimed calls before timing each subnet")
    repeats: int = setting(20, "timed calls per subnet (the median is kept)")


@dataclass
class MeasureConfig(TimingConfig):
    NAME = "latency measure"

    space: str = setting("digits-tiny", "search space: a preset name (nas/spaces) or a SearchSpace YAML file")
    archs: int = setting(50, "random subnets to time (the smallest and largest are added)")
    batch_size: int = setting(1, "images per forward pass")
    dtype: str = setting("float32", "dtype of the weights and images", choices=DTYPES)
    threads: int | None = setting(None, "torch threads on a CPU (null: torch's default)")
    seed: int = setting(0, "seed of the subnets drawn")
    out: str = setting("latency/measurements.json", "where to write the measurements")

    def problems(self) -> list[str]:
        return _positive(self, "archs", "batch_size", "repeats") + (
            [f"threads={self.threads} must be >= 1 or null"] if self.threads is not None and self.threads < 1 else [])


@dataclass
class FitConfig(Config):
    NAME = "latency fit"

    measurements: str = setting("latency/measurements.json", "measurements written by the measure command")
    holdout: float = setting(0.2, "share of the archs held out of the fit to report its error on")
    seed: int = setting(0, "seed of the held-out draw")
    out: str = setting("latency/model.json", "where to write the latency model")

    def problems(self) -> list[str]:
        return [] if 0 <= self.holdout < 1 else [f"holdout={self.holdout} must be in [0, 1)"]


@dataclass
class ValidateConfig(TimingConfig):
    NAME = "latency validate"

    model: str = setting("latency/model.json", "latency model written by the fit command")
    archs: int = setting(20, "random subnets to time now")
    seed: int = setting(1, "seed of the subnets drawn (another than the measurements' to see new archs)")
    other_device: bool = setting(False, "validate a model measured on another device")

    def problems(self) -> list[str]:
        return _positive(self, "archs", "repeats")


def _space(name: str) -> SearchSpace:
    try:
        return load_space(name)
    except ValueError as error:
        raise ConfigError(f"space={name!r}: {error}") from error


def _draw(space: SearchSpace, count: int, seed: int) -> list[Arch]:
    return list(dict.fromkeys(space.sample_many(seed, count).archs() + [space.min_arch(), space.max_arch()]))


def _errors_line(errors: np.ndarray) -> str:
    return f"mean {100 * errors.mean():.1f}%, median {100 * np.median(errors):.1f}%, max {100 * errors.max():.1f}%"


def measure(config: MeasureConfig) -> None:
    space, device = _space(config.space), resolve_device(config.device)
    if config.threads is not None and device.type == "cpu":
        torch.set_num_threads(config.threads)
    dtype = getattr(torch, config.dtype)
    archs = _draw(space, config.archs, config.seed)
    results = measure_space(space, archs, config.batch_size, device, dtype, config.warmup, config.repeats,
                            progress=lambda done: print(f"\r[latency] {done}/{len(archs)} subnets timed", end=""))
    print()
    payload = {"format": MEASUREMENTS_FORMAT, "space": space.to_dict(), "batch_size": config.batch_size,
               "environment": environment(device, dtype),
               "measurements": [{"arch": arch.to_dict(), "seconds": seconds} for arch, seconds in results]}
    atomic_write_text(config.out, json.dumps(payload, indent=1))
    seconds = [s for _, s in results]
    print(f"[latency] {len(results)} subnets of {space.name} on {payload['environment']['device_name']}: "
          f"{1e3 * min(seconds):.2f} to {1e3 * max(seconds):.2f} ms per batch of {config.batch_size}; "
          f"written to {config.out}")


def read_measurements(path: str) -> tuple[SearchSpace, int, dict, list[tuple[Arch, float]]]:
    """The space, batch size, environment and ``[(arch, seconds)]`` of a measurements file."""
    payload = read_json(path, "the measurements", "latency measurements")
    if not isinstance(payload, dict) or payload.get("format") != MEASUREMENTS_FORMAT:
        raise CheckpointError(f"{path}: not latency measurements written by python -m nas.latency measure")
    try:
        space = SearchSpace.from_dict(payload["space"])
        pairs = [(Arch.from_dict(m["arch"]), float(m["seconds"])) for m in payload["measurements"]]
        return space, int(payload["batch_size"]), dict(payload["environment"]), pairs
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: malformed latency measurements: {error}") from error


def fit(config: FitConfig) -> None:
    space, batch_size, measured_on, pairs = read_measurements(config.measurements)
    order = np.random.default_rng(config.seed).permutation(len(pairs))
    held_out = int(round(config.holdout * len(pairs)))
    train, test = [pairs[i] for i in order[held_out:]], [pairs[i] for i in order[:held_out]]
    try:
        model = LatencyModel.fit(train, space, batch_size, measured_on["device"], measured_on)
    except ValueError as error:
        raise ConfigError(f"cannot fit {config.measurements}: {error}; measure more subnets (--archs) or hold fewer "
                          "out (--holdout)") from error
    model.save(config.out)
    report = f"[latency] fitted on {len(train)} subnets ({_errors_line(relative_errors(model, train))})"
    if test:
        report += f"; on {len(test)} held-out subnets: {_errors_line(relative_errors(model, test))}"
    print(report + f"; written to {config.out}")


def validate(config: ValidateConfig) -> None:
    model, device = LatencyModel.load(config.model), resolve_device(config.device)
    dtype = getattr(torch, model.environment.get("dtype", "float32"))
    if device.type == "cpu" and model.environment.get("threads"):
        torch.set_num_threads(model.environment["threads"])
    model.check_environment(environment(device, dtype), config.other_device, f"latency model {config.model!r}")
    archs = _draw(model.space, config.archs, config.seed)
    pairs = measure_space(model.space, archs, model.batch_size, device, dtype, config.warmup, config.repeats)
    errors = relative_errors(model, pairs)
    predicted, measured = model.predict_many(archs), np.array([s for _, s in pairs])
    ranks = np.corrcoef(np.argsort(np.argsort(predicted)), np.argsort(np.argsort(measured)))[0, 1]
    print(f"[latency] {len(pairs)} new subnets timed on {environment(device)['device_name']}: relative error "
          f"{_errors_line(errors)}; rank correlation {ranks:.3f}")


COMMANDS = {"measure": (MeasureConfig, measure), "fit": (FitConfig, fit), "validate": (ValidateConfig, validate)}


def run(argv: Sequence[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if not argv or argv[0] not in COMMANDS:
        got = f"got {argv[0]!r}" if argv else "got none"
        raise ConfigError(f"python -m nas.latency needs a command, measure, fit or validate ({got}); "
                          "python -m nas.latency COMMAND --help lists its settings")
    cls, command = COMMANDS[argv[0]]
    config, _ = parse_command_line(cls, argv[1:], prog=f"python -m nas.latency {argv[0]}",
                                   description=(command.__doc__ or __doc__.split("\n\n")[1]))
    command(config)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("nas.latency", lambda: run(list(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())

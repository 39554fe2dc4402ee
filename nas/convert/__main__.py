"""Weights from other code as a supernet checkpoint: ``python -m nas.convert --from SOURCE --weights FILE ...``.

Converts AutoFormer's, ElasticViT's, UniNet's or a timm ViT's weights into the supernet of a search space and writes
to ``--out-dir`` a checkpoint that ``python -m nas.search --checkpoint`` and ``python -m nas.export --checkpoint``
take (``checkpoint.pt``), the space it is of (``space.yaml``, unless it is a preset), the converted model's subnet
where the source is one model (``arch.json``), and a conversion report (``conversion.json``: the source tensors
mapped, folded, redundant and unused; a source tensor left unused is an error unless ``--allow-unused``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import convert
from ..atomic import atomic_write_text
from ..checkpoint import CHECKPOINT_FORMAT, read_torch_file, save_checkpoint
from ..config import Config, parse_command_line, setting
from ..errors import CheckpointError, ConfigError, OutputError, run_command
from ..hybrid.convert import elasticvit_space
from ..spaces import PRESETS, load_space
from ..vit.space import SearchSpace, read_autoformer_space


def autoformer_space(config: ConvertConfig, weights: Mapping[str, Tensor]) -> SearchSpace:
    """``--space``: a preset, a space's YAML or an AutoFormer YAML (SEARCH_SPACE and SUPERNET sections); without it,
    the AutoFormer preset whose stored embed dim the weights have."""
    if config.space is not None:
        return read_space(config.space, autoformer_yaml=True)
    embed = weights["cls_token"].shape[-1] if "cls_token" in weights else None
    for name in ("autoformer-t", "autoformer-s", "autoformer-b"):
        if load_space(name).supernet_sizes().embed_dim == embed:
            return load_space(name)
    raise ConfigError(f"--from autoformer: the weights store {embed} channels, which no AutoFormer preset has; give "
                      "their search space with --space (a preset, a space's YAML or AutoFormer's supernet YAML)")


def from_autoformer(weights: Mapping[str, Tensor], config: ConvertConfig) -> convert.Conversion:
    return convert.convert_autoformer(weights, autoformer_space(config, weights), allow_unused=config.allow_unused)


def from_timm(weights: Mapping[str, Tensor], config: ConvertConfig) -> convert.Conversion:
    if config.space is None:
        raise ConfigError("--from timm needs --space: a timm state dict does not record its head count")
    return convert.convert_timm_state_dict(weights, read_space(config.space), allow_unused=config.allow_unused)


def from_elasticvit(weights: Mapping[str, Tensor], config: ConvertConfig) -> convert.Conversion:
    """``--space``: a hybrid space of the elasticvit style (default: the ``elasticvit-mobile`` preset)."""
    try:
        space = elasticvit_space(None if config.space is None else read_space(config.space))
    except ValueError as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"--from elasticvit --space {config.space!r}: {error}") from error
    return convert.convert_elasticvit(weights, space, allow_unused=config.allow_unused)


def from_uninet(weights: Mapping[str, Tensor], config: ConvertConfig) -> convert.Conversion:
    if config.name is None:
        raise ConfigError("--from uninet needs --name, the model the weights are of (B0..B6)")
    return convert.convert_uninet(weights, config.name, allow_unused=config.allow_unused)


# One entry per source: the function that converts its weights (given as read, the config) into a Conversion.
SOURCES: dict[str, Callable[[Mapping[str, Tensor], Any], convert.Conversion]] = {
    "autoformer": from_autoformer,
    "elasticvit": from_elasticvit,
    "uninet": from_uninet,
    "timm": from_timm,
}


@dataclass
class ConvertConfig(Config):
    NAME = "conversion"

    source: str = setting("autoformer", "whose weights", choices=tuple(SOURCES), flag="--from")
    weights: str | None = setting(None, "the weights: a torch file (read with weights_only=True; AutoFormer's "
                                        "checkpoints, which hold an argparse.Namespace, included)")
    space: str | None = setting(None, "the search space of the supernet: a preset name or a space's YAML file "
                                      "(autoformer: also AutoFormer's supernet YAML; default: the AutoFormer preset "
                                      "of the weights' width; elasticvit: default elasticvit-mobile; timm: required)")
    name: str | None = setting(None, "the model the weights are of, for sources with several (uninet: B0..B6)")
    out_dir: str = setting("converted", "output directory")
    allow_unused: bool = setting(False, "leave out source tensors that have no counterpart (listed in the report) "
                                        "instead of refusing them")

    def problems(self) -> list[str]:
        return [] if self.weights else ["a conversion needs the weights (--weights FILE)"]


def read_space(text: str, autoformer_yaml: bool = False):
    """A preset or a space's YAML file; with ``autoformer_yaml``, also one of AutoFormer's config files."""
    try:
        path = Path(text)
        if autoformer_yaml and text not in PRESETS and path.is_file() and "SEARCH_SPACE" in path.read_text():
            return read_autoformer_space(path)
        return load_space(text)
    except (ValueError, OSError) as error:
        raise ConfigError(f"--space {text!r}: {error}") from error


def read_weights(path: str) -> dict[str, Tensor]:
    """The state dict in ``path``: the file's mapping of tensors, or its ``model`` or ``state_dict`` entry."""
    with torch.serialization.safe_globals([argparse.Namespace]):  # AutoFormer saves its arguments beside the model
        loaded = read_torch_file(path, "--weights")
    if isinstance(loaded, dict):
        loaded = next((loaded[key] for key in ("model", "state_dict") if isinstance(loaded.get(key), dict)), loaded)
    if not isinstance(loaded, dict) or not loaded or not all(isinstance(t, Tensor) for t in loaded.values()):
        raise CheckpointError(f"--weights {path!r} holds no state dict (a mapping of names to tensors, or a checkpoint "
                              "with one under 'model' or 'state_dict')")
    return loaded


def space_reference(space, out: Path) -> str:
    """What the checkpoint records as its space: the preset's name where the space is a preset, else the path of the
    space's YAML, written to ``out``."""
    if space.name in PRESETS and load_space(space.name) == space:
        return space.name
    path = out / "space.yaml"
    atomic_write_text(path, space.to_yaml())
    return str(path.resolve())


def run(argv: Sequence[str] | None) -> int:
    config, _ = parse_command_line(ConvertConfig, argv, prog="python -m nas.convert",
                                   description=__doc__.split("\n\n")[1])
    weights = read_weights(config.weights)
    try:
        conversion = SOURCES[config.source](weights, config)
    except ValueError as error:
        if isinstance(error, ConfigError):
            raise
        raise CheckpointError(f"--weights {config.weights!r} (--from {config.source}): {error}") from error
    supernet = conversion.supernet
    space = supernet.config.space
    out = Path(config.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"out_dir {config.out_dir!r} cannot be created: {error.strerror or error}") from error
    source = {"from": config.source, "weights": os.path.abspath(config.weights), "name": config.name}
    save_checkpoint(out / "checkpoint.pt", {
        "format": CHECKPOINT_FORMAT, "step": 0, "world_size": 1,
        "config": {"space": space_reference(space, out), "converted": source},
        "model": {name: t.detach().cpu() for name, t in supernet.state_dict().items()},
    })
    if conversion.arch is not None:
        atomic_write_text(out / "arch.json", conversion.arch.to_json())
    report = {**source, "space": space.name, **conversion.report()}
    atomic_write_text(out / "conversion.json", json.dumps(report, indent=1))
    print(f"[convert] {config.source}: {len(conversion.mapped)} tensors mapped, {len(conversion.folded)} folded, "
          f"{len(conversion.redundant)} redundant, {len(conversion.unused)} unused; a supernet of space "
          f"{space.name!r} in {out / 'checkpoint.pt'} (report: {out / 'conversion.json'})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("nas.convert", lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())

"""The preset search spaces (the YAML files beside this module) and :func:`load_space`, which reads a preset or a
space file of any family (``nas.family``: the family a file's ``family`` key names, else the one that owns it)."""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from ..family import Space, space_from_dict

SPACES_DIR = Path(__file__).resolve().parent
PRESETS: dict[str, Path] = {p.stem: p for p in sorted(SPACES_DIR.glob("*.yaml"))}


def load_space(name_or_path: str | os.PathLike) -> Space:
    """A preset by name (``PRESETS``: files in nas/spaces/) or a space's YAML file, of whichever family it is."""
    key = str(name_or_path)
    path = PRESETS.get(key, Path(key))
    if not path.is_file():
        raise ValueError(f"unknown search space {key!r}: not a preset ({', '.join(PRESETS)}) nor a YAML file")
    try:
        return space_from_dict(yaml.safe_load(path.read_text()))
    except (ValueError, TypeError, yaml.YAMLError) as error:
        raise ValueError(f"{path}: not a valid search space: {error}") from error


__all__ = ["PRESETS", "SPACES_DIR", "Space", "load_space"]

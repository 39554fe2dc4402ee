"""Training checkpoints: the format, where a run keeps them, saving, loading with checks, and the supernet of one.

A checkpoint is a dict of tensors and plain containers (``torch.load(..., weights_only=True)`` reads it; nothing in
it is unpickled as code): ``format`` (:data:`CHECKPOINT_FORMAT`), ``step``, ``config`` (the training config as a
mapping), ``world_size``, ``model``, ``optimizer``, ``scheduler``, ``scaler``, ``ema``, ``sampler``, ``rng`` (the
RNG states of every rank) and ``search_split`` (:class:`nas.data.SearchSplit` as a mapping). Checkpoints are written
atomically (``nas.atomic``) as ``<out_dir>/checkpoints/step_<step>.pt`` and never hold NaN or infinite values.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .atomic import atomic_torch_save
from .build import build_supernet
from .errors import CheckpointError, CheckpointMismatchError, ConfigError, first_line
from .family import Space, Supernet
from .spaces import load_space

CHECKPOINT_FORMAT = "nas.train/1"


def checkpoint_dir(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / "checkpoints"


def checkpoint_path(out_dir: str | os.PathLike, step: int) -> Path:
    return checkpoint_dir(out_dir) / f"step_{step:08d}.pt"


def list_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of the checkpoints in ``out_dir``, by step."""
    found = (re.fullmatch(r"step_(\d+)\.pt", path.name) for path in checkpoint_dir(out_dir).glob("step_*.pt"))
    return sorted((int(match.group(1)), checkpoint_dir(out_dir) / match.group(0)) for match in found if match)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def resume_checkpoint(out_dir: str | os.PathLike, resume: str | bool) -> Path | None:
    """The checkpoint ``--resume`` names: the latest in ``out_dir`` for True, the path given, or None for False."""
    if resume is True:
        return latest_checkpoint(out_dir)
    return Path(resume) if resume else None


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """A crash while saving never leaves a half-written checkpoint (nas.atomic)."""
    atomic_torch_save(state, path)


def read_torch_file(path: str | os.PathLike, what: str) -> Any:
    """What the torch file ``path`` holds, read with ``weights_only=True`` (tensors and plain containers: nothing in it
    runs as code); a one-line CheckpointError naming ``what`` for a missing, corrupt or code-carrying file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what}: no file {str(path)!r}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise CheckpointError(f"{what}: {str(path)!r} is corrupt or not a torch file of tensors (read with "
                              f"weights_only=True): {first_line(error)}") from error


def _read(path: Path, **options) -> dict:
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {str(path)!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, **options)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or not a nas.train checkpoint: "
                              f"{first_line(err)}") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a {CHECKPOINT_FORMAT} checkpoint")
    return state


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint's state, checked: its format, the entries every reader needs, and only finite values."""
    path = Path(path)
    state = _read(path)
    problems = []
    if type(state.get("step")) is not int or state["step"] < 0:
        problems.append(f"its step is {state.get('step')!r}, not an integer >= 0")
    if not isinstance(state.get("config"), dict):
        problems.append(f"its config is {type(state.get('config')).__name__}, not a mapping")
    if not isinstance(state.get("model"), dict) or not all(isinstance(v, Tensor) for v in state["model"].values()):
        problems.append("it has no 'model' entry of weights")
    if problems:
        raise CheckpointError(f"checkpoint {str(path)!r} is malformed: {'; '.join(problems)}")
    non_finite = non_finite_entries(state)
    if non_finite:
        raise CheckpointError(f"checkpoint {str(path)!r} holds NaN or infinite values ({some(non_finite)}): its run "
                              "had diverged; use an earlier one")
    return state


def saved_config(path: str | os.PathLike) -> dict[str, Any]:
    """The training config a checkpoint was written with, read without reading its tensors (memory-mapped)."""
    config = _read(Path(path), mmap=True).get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} is malformed: its config is {type(config).__name__}, "
                              "not a mapping")
    return config


def file_digest(path: str | os.PathLike) -> str:
    """A short digest of a file's bytes: which checkpoint a search's results or an export came from."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def some(names: Sequence[str], shown: int = 3) -> str:
    """``names`` for a message: the first few, then "..."."""
    return ", ".join(list(names[:shown]) + (["..."] if len(names) > shown else []))


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every value of every tensor is finite, with one device synchronisation."""
    checks = [t.isfinite().all() for t in tensors]
    return bool(torch.stack(checks).all()) if checks else True


def non_finite_entries(state: Any, name: str = "") -> list[str]:
    """The names (``model.head.weight``, ``optimizer.state.3.exp_avg``) of the floating-point tensors in a nested
    state that hold NaN or infinite values."""
    if isinstance(state, Tensor):
        return [name] if state.is_floating_point() and not all_finite([state]) else []
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    return [entry for key, value in items for entry in non_finite_entries(value, f"{name}.{key}" if name else str(key))]


def load_supernet(path: str | os.PathLike, device: torch.device | str = "cpu", space_name: str | None = None
                  ) -> tuple[Supernet, Space, dict]:
    """The supernet of a checkpoint (its EMA weights where it kept an EMA) in eval mode on ``device``, its space,
    and the checkpoint's state. ``space_name``, if given, must name the space the supernet was trained on."""
    state = load_checkpoint(path)
    trained = state["config"]
    if not isinstance(trained.get("space"), str):
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} records no search space (config 'space')")
    try:
        space = load_space(trained["space"])
    except ValueError as error:
        raise CheckpointError(f"checkpoint {os.fspath(path)!r} was trained on a space that cannot be loaded here: "
                              f"{error}") from error
    try:
        requested = load_space(space_name) if space_name is not None else space
    except ValueError as error:
        raise ConfigError(f"space={space_name!r}: {error}") from error
    if requested != space:
        raise CheckpointMismatchError(f"checkpoint {os.fspath(path)!r} holds a supernet of space {trained['space']!r}, "
                                      f"not of the requested space {space_name!r}")
    supernet = build_supernet(space)
    weights = state["model"]
    if state.get("ema"):
        weights = {k[len("module."):]: v for k, v in state["ema"].items() if k.startswith("module.")}
    try:
        supernet.load_state_dict(weights)
    except RuntimeError as error:
        raise CheckpointMismatchError(f"checkpoint {os.fspath(path)!r} does not fit a supernet of space "
                                      f"{space.name!r}: {error}") from error
    return supernet.to(device).eval(), space, state

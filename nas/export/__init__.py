"""Subnet export: a family's subnet as a standalone plain module (the ViT's ``elastic_ops/plain.py``, which imports
only torch; the hybrid ``elastic_ops/plain_hybrid.py``), its file format, and TorchScript, ``torch.export``, ONNX and
safetensors (:data:`FORMATS`, each with a way to run it again); ``python -m nas.export`` is the command line.

The saved file is a ``torch.save`` of a dict of plain types (loaded with ``weights_only=True``):
``{"format": FORMAT, "version": VERSION, "kind": family name, "arch": arch.to_dict(), "model": ...,
"state_dict": ...}``, where ``"model"`` is what the family needs to build the plain module again
(``Family.subnet_config``: a ViT's constructor arguments, a hybrid subnet's space). A file without ``"kind"`` is a
ViT's (written before there were families). The safetensors folder's ``config.json`` holds the same, less the
weights.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..atomic import atomic_torch_save, atomic_write_text
from ..errors import require
from ..family import Arch, Family, Space, Supernet, family_of, get_family

FORMAT = "elastic_ops.subnet"
VERSION = 1


def extract_subnet(supernet: Supernet, arch: Arch | None = None) -> nn.Module:
    """A plain module holding copies of the weights of ``arch`` (default: the active subnet), in eval mode, computing
    what ``supernet(images, arch)`` computes in eval mode (``Family.extract``; a supernet with BatchNorm gives its
    statistics as they are: recalibrate them for the arch first)."""
    return family_of(supernet).extract(supernet, arch if arch is not None else supernet.arch)


def subnet_record(model: nn.Module, arch: Arch, space: Space) -> dict[str, Any]:
    """What a saved subnet records besides its weights: the format, the family, the arch and the family's
    ``subnet_config``."""
    family = family_of(space)
    if family_of(arch) is not family:
        raise TypeError(f"save_subnet: the arch is of the {family_of(arch).name} family, the space of the "
                        f"{family.name} family")
    return {"format": FORMAT, "version": VERSION, "kind": family.name, "arch": arch.to_dict(),
            "model": family.subnet_config(model, arch, space)}


def rebuild_subnet(record: dict[str, Any]) -> tuple[nn.Module, Arch]:
    """The plain module (weights not loaded) and the arch of a :func:`subnet_record`."""
    family: Family = get_family(record.get("kind", "vit"))
    arch = family.arch_from_dict(record["arch"])
    return family.rebuild(record["model"], arch), arch


def save_subnet(path: str | os.PathLike, model: nn.Module, arch: Arch, space: Space) -> None:
    """Write ``model`` (an extracted subnet of ``space``) and its ``arch`` to ``path`` atomically (temporary file, then
    rename)."""
    payload = subnet_record(model, arch, space)
    payload["state_dict"] = {name: t.detach().cpu() for name, t in model.state_dict().items()}
    atomic_torch_save(payload, path)


def load_subnet(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[nn.Module, Arch]:
    """The plain module (eval mode) and arch saved by :func:`save_subnet`.

    Raises FileNotFoundError for a missing file and ValueError, naming the file, for one that is corrupt
    or not a saved subnet.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_subnet: no such file: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise ValueError(f"load_subnet: {path} is not a readable torch file (corrupt or truncated?): "
                         f"{error}") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"load_subnet: {path} is not a subnet saved by nas.export.save_subnet (format {FORMAT!r})")
    if payload.get("version") != VERSION:
        raise ValueError(f"load_subnet: {path} has format version {payload.get('version')!r}; this code reads "
                         f"{VERSION}")
    try:
        model, arch = rebuild_subnet(payload)
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"load_subnet: {path} holds an inconsistent subnet: {error}") from error
    return model.to(map_location).eval(), arch


def to_torchscript(model: nn.Module, path: str | os.PathLike | None = None
                   ) -> torch.jit.ScriptModule:
    """``torch.jit.script`` of a plain subnet (eval mode), saved to ``path`` if given.

    TorchScript is deprecated from torch 2.10 on (it warns) but still runs everywhere without this library.
    """
    scripted = torch.jit.script(model.eval())
    if path is not None:
        scripted.save(os.fspath(path))
    return scripted


def _example_batch(example: Tensor) -> dict:
    """The dynamic batch dimension of a model's one input, for torch.export and the ONNX exporter (an example batch
    of one would be specialised to one)."""
    if example.shape[0] < 2:
        raise ValueError(f"export: the example batch must hold at least 2 images, got {example.shape[0]}")
    return {"images": {0: torch.export.Dim("batch")}}


def to_torch_export(model: nn.Module, path: str | os.PathLike, example: Tensor) -> None:
    """``torch.export`` of a plain subnet (eval mode) with a dynamic batch size, saved to ``path``
    (``.pt2``); :func:`load_torch_export` reads it back."""
    program = torch.export.export(model.eval(), (example,), dynamic_shapes=_example_batch(example))
    torch.export.save(program, os.fspath(path))


def load_torch_export(path: str | os.PathLike) -> Callable[[Tensor], Tensor]:
    return torch.export.load(os.fspath(path)).module()


def to_onnx(model: nn.Module, path: str | os.PathLike, example: Tensor) -> None:
    """Export a plain subnet to ONNX with torch's current (``torch.export``-based) exporter, dynamic
    batch size.

    Needs the ``onnx`` and ``onnxscript`` packages (torch's exporter uses them): a
    :class:`~nas.errors.MissingDependencyError` names the extra otherwise.
    """
    for name in ("onnx", "onnxscript"):
        require(name, "export", "ONNX export")
    torch.onnx.export(model.eval(), (example,), os.fspath(path), input_names=["images"], output_names=["logits"],
                      dynamo=True, dynamic_shapes=_example_batch(example), verbose=False)


def load_onnx(path: str | os.PathLike) -> Callable[[Tensor], Tensor]:
    """An ONNX file as a function of CPU images, run by onnxruntime."""
    session = require("onnxruntime", "export", "running an ONNX model").InferenceSession(
        os.fspath(path), providers=["CPUExecutionProvider"])
    return lambda images: torch.from_numpy(session.run(None, {"images": images.cpu().numpy()})[0])


SAFETENSORS_WEIGHTS, SAFETENSORS_CONFIG = "model.safetensors", "config.json"


def to_safetensors(model: nn.Module, arch: Arch, space: Space, directory: str | os.PathLike) -> None:
    """``directory/model.safetensors`` (the weights) and ``directory/config.json`` (the format, the family, the arch
    and what the family builds the plain module from); :func:`load_safetensors` reads them back."""
    save_file = require("safetensors.torch", "export", "safetensors export").save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = subnet_record(model, arch, space)
    save_file({name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()},
              str(directory / SAFETENSORS_WEIGHTS))
    atomic_write_text(directory / SAFETENSORS_CONFIG, json.dumps(config, indent=1))


def load_safetensors(directory: str | os.PathLike) -> tuple[nn.Module, Arch]:
    """The plain module (eval mode) and arch that :func:`to_safetensors` wrote (ValueError for a folder that is not
    one)."""
    load_file = require("safetensors.torch", "export", "reading safetensors").load_file
    directory = Path(directory)
    try:
        config = json.loads((directory / SAFETENSORS_CONFIG).read_text())
        if not isinstance(config, dict) or config.get("format") != FORMAT or config.get("version") != VERSION:
            raise ValueError(f"its {SAFETENSORS_CONFIG} is not of format {FORMAT} version {VERSION}")
        model, arch = rebuild_subnet(config)
        model.load_state_dict(load_file(str(directory / SAFETENSORS_WEIGHTS)))
        return model.eval(), arch
    except (OSError, KeyError, TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"load_safetensors: {os.fspath(directory)} does not hold an exported subnet: "
                         f"{error}") from error


def load_torchscript(path: str | os.PathLike) -> Callable[[Tensor], Tensor]:
    return torch.jit.load(os.fspath(path), map_location="cpu")


@dataclass(frozen=True)
class Subnet:
    """An extracted subnet to export: its plain module, its arch and the space it is a subnet of."""

    model: nn.Module
    arch: Arch
    space: Space


@dataclass(frozen=True)
class Format:
    """An export format: where it writes under an output folder, how, and how the result runs again."""

    path: str
    write: Callable[[Subnet, Path, Tensor], None]
    load: Callable[[Path], Callable[[Tensor], Tensor]]


FORMATS = {
    "pytorch": Format("subnet.pt", lambda subnet, path, example: save_subnet(path, subnet.model, subnet.arch,
                                                                            subnet.space),
                      lambda path: load_subnet(path)[0]),
    "torch-export": Format("subnet.pt2", lambda subnet, path, example: to_torch_export(subnet.model, path, example),
                           load_torch_export),
    "onnx": Format("subnet.onnx", lambda subnet, path, example: to_onnx(subnet.model, path, example), load_onnx),
    "safetensors": Format("safetensors", lambda subnet, path, example: to_safetensors(subnet.model, subnet.arch,
                                                                                     subnet.space, path),
                          lambda path: load_safetensors(path)[0]),
    "torchscript": Format("subnet.ts", lambda subnet, path, example: to_torchscript(subnet.model, path),
                          load_torchscript),
}


__all__ = ["FORMAT", "FORMATS", "VERSION", "Format", "Subnet", "extract_subnet", "load_onnx", "load_safetensors",
           "load_subnet", "load_torch_export", "load_torchscript", "rebuild_subnet", "save_subnet", "subnet_record",
           "to_onnx", "to_safetensors", "to_torch_export", "to_torchscript"]

"""Subnet export: a standalone plain ViT (``elastic_ops/plain.py``, which imports only torch), hybrid network
(``elastic_ops/plain_hybrid.py``) or SAM encoder (``nas/sam/plain.py``), its file format, and TorchScript,
``torch.export``, ONNX and safetensors
(:data:`FORMATS`, each with a way to run it again); ``python -m nas.export`` is the command line.

The saved file is a ``torch.save`` of a dict of plain types (loaded with ``weights_only=True``):
``{"format": FORMAT, "version": VERSION, "arch": Arch.to_dict(), "model": VisionTransformer kwargs,
"state_dict": ...}``; a hybrid subnet's also has ``"kind": "hybrid"``, and its ``"model"`` is its space
(``HybridSpace.to_dict()``), from which and the arch ``nas.hybrid.export.rebuild`` makes the network; a SAM
encoder's has ``"kind": "sam"`` and its ``"model"`` is ``SamEncoder`` kwargs.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from elastic_ops.nn import empty_module
from elastic_ops.plain import VisionTransformer
from elastic_ops.plain_hybrid import HybridNetwork

from ..arch import Arch
from ..atomic import atomic_torch_save, atomic_write_text
from ..errors import require
from ..hybrid.arch import HybridArch
from ..hybrid.export import rebuild
from ..hybrid.space import HybridSpace
from ..hybrid.supernet import HybridSupernet
from ..sam.plain import SamEncoder
from ..supernet import VisionTransformerSupernet

FORMAT = "elastic_ops.subnet"
VERSION = 1


@torch.no_grad()
def extract_subnet(supernet: VisionTransformerSupernet | HybridSupernet, arch: Arch | HybridArch | None = None
                   ) -> VisionTransformer | HybridNetwork:
    """A plain ViT holding copies of the active weights of ``arch`` (default: the active subnet), in eval mode.

    Its outputs match ``supernet(images, arch)`` in eval mode; identity layers are left out. An arch on the right
    side (two-sided width sharing) gets copies of the trailing channels it reads. A hybrid supernet gives
    its plain ``HybridNetwork`` (``HybridSupernet.extract``; recalibrate its BatchNorms for the arch first).
    """
    if hasattr(supernet, "extract"):  # a family with its own plain network (hybrid, SAM's encoder)
        return supernet.extract(arch)
    if arch is not None:
        supernet.set_arch(arch)
    arch, c = supernet.arch, supernet.config
    patch = supernet.patch_size(arch)
    blocks = [block.extract() for block, on in zip(supernet.blocks, arch.layer_on) if on]
    weight = supernet.head.weight
    heads, hidden = [b.attn.num_heads for b in blocks], [b.mlp.fc1.out_features for b in blocks]
    model = empty_module(lambda: VisionTransformer(c.img_size, patch, c.in_chans, c.num_classes, arch.embed_dim, heads,
                                                   hidden, c.head_dim, eps=c.layer_norm_eps,
                                                   relative_position=c.relative_position,
                                                   global_pool=c.global_pool), weight)
    patch_embed, cls_token, pos_embed = supernet.token_layers(patch)
    model.patch_embed = patch_embed.extract()
    channels = supernet.embed_channels(arch.embed_dim, arch.side)
    model.cls_token.copy_(cls_token[..., channels])
    model.pos_embed.copy_(pos_embed[..., channels])
    model.blocks = torch.nn.ModuleList(blocks)
    model.norm = supernet.norm.extract()
    model.head = supernet.head.extract()
    return model.eval()


def model_kwargs(model: VisionTransformer) -> dict[str, Any]:
    """The constructor arguments of a plain ViT, read from its layers."""
    return {
        "img_size": model.img_size,
        "patch_size": model.patch_embed.proj.kernel_size[0],
        "in_chans": model.patch_embed.proj.in_channels,
        "num_classes": model.num_classes,
        "embed_dim": model.cls_token.shape[-1],
        "num_heads": [block.attn.num_heads for block in model.blocks],
        "hidden_features": [block.mlp.fc1.out_features for block in model.blocks],
        "head_dim": model.head_dim,
        "eps": model.norm.eps,
        "qkv_bias": all(block.attn.qkv.bias is not None for block in model.blocks),
        "relative_position": model.relative_position,
        "global_pool": model.global_pool,
    }


def plain_description(model: VisionTransformer | SamEncoder) -> dict[str, Any]:
    """What a saved plain ViT or SAM encoder records to be built again: its constructor arguments, and for a SAM
    encoder ``"kind": "sam"``."""
    if isinstance(model, SamEncoder):
        return {"kind": "sam", "model": model.kwargs()}
    return {"model": model_kwargs(model)}


def plain_module(description: dict[str, Any]) -> VisionTransformer | SamEncoder:
    """The plain ViT or SAM encoder that :func:`plain_description` describes, its weights still to be loaded."""
    return (SamEncoder if description.get("kind") == "sam" else VisionTransformer)(**description["model"])


def save_subnet(path: str | os.PathLike, model: VisionTransformer | HybridNetwork, arch: Arch | HybridArch,
                space: HybridSpace | None = None) -> None:
    """Write ``model`` (an extracted subnet) and its ``arch`` to ``path`` atomically (temporary file, then rename).
    A hybrid subnet also needs its ``space``, from which the loader rebuilds the network."""
    payload = {"format": FORMAT, "version": VERSION, "arch": arch.to_dict(),
               "state_dict": {name: t.detach().cpu() for name, t in model.state_dict().items()}}
    if isinstance(model, HybridNetwork):
        if not isinstance(space, HybridSpace):
            raise TypeError("save_subnet: a hybrid subnet is saved with its space (space=HybridSpace), got "
                            f"{type(space).__name__}")
        space.validate(arch)
        payload.update(kind="hybrid", model=space.to_dict())
    elif isinstance(model, (VisionTransformer, SamEncoder)):
        payload.update(plain_description(model))
    else:
        raise TypeError(f"save_subnet: model must be an elastic_ops.plain.VisionTransformer or "
                        f"elastic_ops.plain_hybrid.HybridNetwork (see extract_subnet), got {type(model).__name__}")
    atomic_torch_save(payload, path)


def load_subnet(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                ) -> tuple[VisionTransformer | HybridNetwork, Arch | HybridArch]:
    """The plain ViT or hybrid network (eval mode) and arch saved by :func:`save_subnet`.

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
        if payload.get("kind") == "hybrid":
            arch = HybridArch.from_dict(payload["arch"])
            model = rebuild(HybridSpace.from_dict(payload["model"]), arch)
        else:
            arch = Arch.from_dict(payload["arch"])
            model = plain_module(payload)
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"load_subnet: {path} holds an inconsistent subnet: {error}") from error
    return model.to(map_location).eval(), arch


def to_torchscript(model: VisionTransformer | HybridNetwork, path: str | os.PathLike | None = None
                   ) -> torch.jit.ScriptModule:
    """``torch.jit.script`` of the plain ViT or hybrid network (eval mode), saved to ``path`` if given.

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


def to_torch_export(model: VisionTransformer | HybridNetwork, path: str | os.PathLike, example: Tensor) -> None:
    """``torch.export`` of the plain ViT or hybrid network (eval mode) with a dynamic batch size, saved to ``path``
    (``.pt2``); :func:`load_torch_export` reads it back."""
    program = torch.export.export(model.eval(), (example,), dynamic_shapes=_example_batch(example))
    torch.export.save(program, os.fspath(path))


def load_torch_export(path: str | os.PathLike) -> Callable[[Tensor], Tensor]:
    return torch.export.load(os.fspath(path)).module()


def to_onnx(model: VisionTransformer | HybridNetwork, path: str | os.PathLike, example: Tensor) -> None:
    """Export the plain ViT or hybrid network to ONNX with torch's current (``torch.export``-based) exporter, dynamic
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


def to_safetensors(model: VisionTransformer, arch: Arch, directory: str | os.PathLike) -> None:
    """``directory/model.safetensors`` (the weights) and ``directory/config.json`` (the format, the arch and the
    constructor arguments of ``elastic_ops.plain.VisionTransformer``); :func:`load_safetensors` reads them back."""
    save_file = require("safetensors.torch", "export", "safetensors export").save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()},
              str(directory / SAFETENSORS_WEIGHTS))
    config = {"format": FORMAT, "version": VERSION, "arch": arch.to_dict(), **plain_description(model)}
    atomic_write_text(directory / SAFETENSORS_CONFIG, json.dumps(config, indent=1))


def load_safetensors(directory: str | os.PathLike) -> tuple[VisionTransformer, Arch]:
    """The plain ViT (eval mode) and arch that :func:`to_safetensors` wrote (ValueError for a folder that is not
    one)."""
    load_file = require("safetensors.torch", "export", "reading safetensors").load_file
    directory = Path(directory)
    try:
        config = json.loads((directory / SAFETENSORS_CONFIG).read_text())
        if config.get("format") != FORMAT or config.get("version") != VERSION:
            raise ValueError(f"its {SAFETENSORS_CONFIG} is not of format {FORMAT} version {VERSION}")
        model = plain_module(config)
        model.load_state_dict(load_file(str(directory / SAFETENSORS_WEIGHTS)))
        return model.eval(), Arch.from_dict(config["arch"])
    except (OSError, KeyError, TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"load_safetensors: {os.fspath(directory)} does not hold an exported subnet: "
                         f"{error}") from error


@dataclass(frozen=True)
class Format:
    """An export format: where it writes under an output folder, how, and how the result runs again."""

    path: str
    write: Callable[[VisionTransformer, Arch, Path, Tensor], None]
    load: Callable[[Path], Callable[[Tensor], Tensor]]


FORMATS = {
    "pytorch": Format("subnet.pt", lambda model, arch, path, example: save_subnet(path, model, arch),
                      lambda path: load_subnet(path)[0]),
    "torch-export": Format("subnet.pt2", lambda model, arch, path, example: to_torch_export(model, path, example),
                           load_torch_export),
    "onnx": Format("subnet.onnx", lambda model, arch, path, example: to_onnx(model, path, example), load_onnx),
    "safetensors": Format("safetensors", lambda model, arch, path, example: to_safetensors(model, arch, path),
                          lambda path: load_safetensors(path)[0]),
}


__all__ = ["FORMAT", "FORMATS", "VERSION", "Format", "extract_subnet", "load_onnx", "load_safetensors", "load_subnet",
           "load_torch_export", "model_kwargs", "save_subnet", "to_onnx", "to_safetensors", "to_torch_export",
           "to_torchscript"]

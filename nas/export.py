"""Subnet export: a standalone plain ViT (``elastic_ops/plain.py``, which imports only torch) or hybrid network
(``elastic_ops/plain_hybrid.py``), its file format, and TorchScript / ONNX.

The saved file is a ``torch.save`` of a dict of plain types (loaded with ``weights_only=True``):
``{"format": FORMAT, "version": VERSION, "arch": Arch.to_dict(), "model": VisionTransformer kwargs,
"state_dict": ...}``; a hybrid subnet's also has ``"kind": "hybrid"``, and its ``"model"`` is its space
(``HybridSpace.to_dict()``), from which and the arch ``nas.hybrid.export.rebuild`` makes the network.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch
from torch import Tensor

from elastic_ops.nn import empty_module
from elastic_ops.plain import VisionTransformer
from elastic_ops.plain_hybrid import HybridNetwork

from .arch import Arch
from .atomic import atomic_torch_save
from .hybrid.arch import HybridArch
from .hybrid.export import rebuild
from .hybrid.space import HybridSpace
from .hybrid.supernet import HybridSupernet
from .supernet import VisionTransformerSupernet

FORMAT = "elastic_ops.subnet"
VERSION = 1


@torch.no_grad()
def extract_subnet(supernet: VisionTransformerSupernet | HybridSupernet, arch: Arch | HybridArch | None = None
                   ) -> VisionTransformer | HybridNetwork:
    """A plain ViT holding copies of the active weights of ``arch`` (default: the active subnet), in eval mode.

    Its outputs match ``supernet(images, arch)`` in eval mode; identity layers are left out. A hybrid supernet gives
    its plain ``HybridNetwork`` (``HybridSupernet.extract``; recalibrate its BatchNorms for the arch first).
    """
    if isinstance(supernet, HybridSupernet):
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
                                                   relative_position=c.relative_position), weight)
    patch_embed, cls_token, pos_embed = supernet.token_layers(patch)
    model.patch_embed = patch_embed.extract()
    model.cls_token.copy_(cls_token[..., : arch.embed_dim])
    model.pos_embed.copy_(pos_embed[..., : arch.embed_dim])
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
        "num_classes": model.head.out_features,
        "embed_dim": model.cls_token.shape[-1],
        "num_heads": [block.attn.num_heads for block in model.blocks],
        "hidden_features": [block.mlp.fc1.out_features for block in model.blocks],
        "head_dim": model.head_dim,
        "eps": model.norm.eps,
        "qkv_bias": all(block.attn.qkv.bias is not None for block in model.blocks),
        "relative_position": model.relative_position,
    }


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
    elif isinstance(model, VisionTransformer):
        payload["model"] = model_kwargs(model)
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
            model = VisionTransformer(**payload["model"])
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


def to_onnx(model: VisionTransformer | HybridNetwork, path: str | os.PathLike, example: Tensor) -> None:
    """Export the plain ViT or hybrid network to ONNX with ``torch.onnx.export`` (dynamic batch size).

    Needs the ``onnx`` and ``onnxscript`` packages (torch's exporter uses them); raises ImportError naming
    what is missing otherwise.
    """
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"to_onnx: ONNX export needs {' and '.join(missing)}, which is not installed "
                          f"(pip install {' '.join(missing)}); TorchScript export (to_torchscript) needs nothing extra")
    torch.onnx.export(model.eval(), (example,), os.fspath(path), input_names=["images"], output_names=["logits"],
                      dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})


__all__ = ["FORMAT", "VERSION", "extract_subnet", "load_subnet", "model_kwargs", "save_subnet", "to_onnx",
           "to_torchscript"]

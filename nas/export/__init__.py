"""Subnet export: a standalone plain ViT (``elastic_ops/plain.py``, which imports only torch), its file
format, and TorchScript / ONNX.

The saved file is a ``torch.save`` of a dict of plain types (loaded with ``weights_only=True``):
``{"format": FORMAT, "version": VERSION, "arch": Arch.to_dict(), "model": VisionTransformer kwargs,
"state_dict": ...}``.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch
from torch import Tensor

from elastic_ops.nn import empty_module
from elastic_ops.plain import VisionTransformer

from ..arch import Arch
from ..atomic import atomic_torch_save
from ..supernet import VisionTransformerSupernet

FORMAT = "elastic_ops.subnet"
VERSION = 1


@torch.no_grad()
def extract_subnet(supernet: VisionTransformerSupernet, arch: Arch | None = None) -> VisionTransformer:
    """A plain ViT holding copies of the active weights of ``arch`` (default: the active subnet), in eval mode.

    Its outputs match ``supernet(images, arch)`` in eval mode; identity layers are left out.
    """
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
        "global_pool": model.global_pool,
    }


def save_subnet(path: str | os.PathLike, model: VisionTransformer, arch: Arch) -> None:
    """Write ``model`` (an extracted subnet) and its ``arch`` to ``path`` atomically (temporary file, then rename)."""
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"save_subnet: model must be an elastic_ops.plain.VisionTransformer (see extract_subnet), "
                        f"got {type(model).__name__}")
    payload = {"format": FORMAT, "version": VERSION, "arch": arch.to_dict(), "model": model_kwargs(model),
               "state_dict": {name: t.detach().cpu() for name, t in model.state_dict().items()}}
    atomic_torch_save(payload, path)


def load_subnet(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[VisionTransformer, Arch]:
    """The plain ViT (eval mode) and arch saved by :func:`save_subnet`.

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
        arch = Arch.from_dict(payload["arch"])
        model = VisionTransformer(**payload["model"])
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"load_subnet: {path} holds an inconsistent subnet: {error}") from error
    return model.to(map_location).eval(), arch


def to_torchscript(model: VisionTransformer, path: str | os.PathLike | None = None) -> torch.jit.ScriptModule:
    """``torch.jit.script`` of the plain ViT (eval mode), saved to ``path`` if given.

    TorchScript is deprecated from torch 2.10 on (it warns) but still runs everywhere without this library.
    """
    scripted = torch.jit.script(model.eval())
    if path is not None:
        scripted.save(os.fspath(path))
    return scripted


def to_onnx(model: VisionTransformer, path: str | os.PathLike, example: Tensor) -> None:
    """Export the plain ViT to ONNX with ``torch.onnx.export`` (dynamic batch size).

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

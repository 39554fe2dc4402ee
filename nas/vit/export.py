"""A ViT subnet as a plain module: :func:`extract` copies an arch's weights out of the supernet into
``elastic_ops.plain.VisionTransformer`` (which imports only torch); :func:`model_kwargs` reads the constructor
arguments back from such a model, which is what a saved subnet records to build it again."""
from __future__ import annotations

from typing import Any

import torch

from elastic_ops.nn import empty_module
from elastic_ops.plain import LayerScale, VisionTransformer

from .arch import Arch
from .supernet import LAYER_SCALE_INIT, VisionTransformerSupernet


@torch.no_grad()
def extract(supernet: VisionTransformerSupernet, arch: Arch | None = None) -> VisionTransformer:
    """A plain ViT holding copies of the active weights of ``arch`` (default: the active subnet), in eval mode.

    Its outputs match ``supernet(images, arch)`` in eval mode; identity layers are left out. An arch on the right
    side (two-sided width sharing) gets copies of the trailing channels it reads.
    """
    if arch is not None:
        supernet.set_arch(arch)
    arch, c = supernet.arch, supernet.config
    patch = supernet.patch_size(arch)
    blocks = [block.extract() for block, on in zip(supernet.blocks, arch.layer_on) if on]
    weight = supernet.head.weight
    heads, hidden = [b.attn.num_heads for b in blocks], [b.mlp.fc1.out_features for b in blocks]
    head_dims = [b.attn.head_dim for b in blocks] if arch.attn_dim is not None else c.head_dim
    model = empty_module(lambda: VisionTransformer(c.img_size, patch, c.in_chans, c.num_classes, arch.embed_dim, heads,
                                                   hidden, head_dims, eps=c.layer_norm_eps,
                                                   relative_position=c.relative_position,
                                                   global_pool=c.global_pool, layer_scale=c.layer_scale), weight)
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
        "head_dim": model.head_dim if isinstance(model.head_dim, int) else list(model.head_dim),
        "eps": model.norm.eps,
        "qkv_bias": all(block.attn.qkv.bias is not None for block in model.blocks),
        "relative_position": model.relative_position,
        "global_pool": model.global_pool,
        # a layer scale's initial value is any: its factors are weights, loaded after
        "layer_scale": LAYER_SCALE_INIT if any(isinstance(block.ls1, LayerScale) for block in model.blocks) else None,
    }


__all__ = ["extract", "model_kwargs"]

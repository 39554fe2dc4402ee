"""K subnets of one supernet in one pass over a batch (DESIGN.md section 3, batched mode).

Activations of K subnets are stacked as ``[K, B, N, E]`` where ``E`` is the largest active embed dim of
the group; subnet k's channels ``e_k:`` are padding and are kept exactly zero, so that every matmul over
the full width ``E`` gives each subnet the result over its own active channels. A :class:`GroupSizes`
per elastic dimension is the size table: a host tuple (for shapes) and a device int32 tensor (what a
grouped kernel reads to skip the tiles past each subnet's active size).

Every layer is one call per op for all K subnets: ``elastic_ops.grouped_linear``, ``grouped_layer_norm``,
``grouped_mlp``, ``grouped_attention``, which run the native (CPU) or Triton (GPU) grouped kernels, or the
grouped PyTorch reference (``elastic_ops.reference``), chosen like every other op.

A supernet with private q/k projections per head count (ViTAS, ``SupernetConfig.private_qk_heads``) or with
relative position (AutoFormer, ``SupernetConfig.relative_position``) is not supported (:func:`supports_batched`):
its subnets run one at a time.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from elastic_ops import GroupSizes, elastic_linear, grouped_attention, grouped_layer_norm, grouped_mlp

from .arch import Arch

# --- the K-subnet supernet forward ----------------------------------------------------------------


@dataclass
class LayerPlan:
    """The subnets that run one supernet layer (``subnets``: indices into the group, None for all) and their sizes."""

    subnets: Tensor | None
    embed: GroupSizes
    heads: GroupSizes
    hidden: GroupSizes


class BatchedSubnets:
    """K subnets of ``supernet`` that share a patch size, run together: ``BatchedSubnets(supernet, archs)(images)``
    returns logits ``[K, B, num_classes]``, subnet k's equal to ``supernet(images, archs[k])``.

    The patch embedding runs once at the group's widest embed dim (a narrower subnet's channels are its
    leading slice); each layer runs once for the subnets that have it on, the others pass through.
    """

    def __init__(self, supernet, archs: Sequence[Arch]):
        if not supports_batched(supernet):
            what = ("private q/k projections per head count (ViTAS)" if supernet.config.private_qk_heads
                    else "relative position (AutoFormer)")
            raise ValueError(f"batched_forward: this supernet has {what}, which the grouped attention does not "
                             "implement; run the subnets one at a time with the supernet's forward "
                             "(nas.evaluate.evaluate_archs does so by itself)")
        self.supernet = supernet
        self.archs = list(archs)
        check_archs(supernet, self.archs)
        patch_sizes = {supernet.patch_size(arch) for arch in self.archs}
        if len(patch_sizes) != 1:
            raise ValueError(f"BatchedSubnets: archs of one pass must share a patch size, got {sorted(patch_sizes)}; "
                             "use batched_forward, which splits them")
        self.patch_size = patch_sizes.pop()
        device = next(supernet.parameters()).device
        self.embed = GroupSizes([arch.embed_dim for arch in self.archs], device)
        self.layers: list[LayerPlan | None] = []
        for i in range(len(supernet.blocks)):
            on = [k for k, arch in enumerate(self.archs) if arch.layer_on[i]]
            if not on:
                self.layers.append(None)
                continue
            members = [self.archs[k] for k in on]
            self.layers.append(LayerPlan(
                subnets=None if len(on) == len(self.archs) else torch.tensor(on, device=device),
                embed=self.embed if len(on) == len(self.archs) else GroupSizes([a.embed_dim for a in members], device),
                heads=GroupSizes([a.num_heads[i] for a in members], device),
                hidden=GroupSizes([a.hidden_features(i) for a in members], device),
            ))

    def __call__(self, images: Tensor) -> Tensor:
        supernet, width = self.supernet, self.embed.width
        c = supernet.config
        if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (c.in_chans, c.img_size, c.img_size):
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"batched_forward: expected images [batch, {c.in_chans}, {c.img_size}, {c.img_size}], got {shape}")
        patch_embed, cls_token, pos_embed = supernet.token_layers(self.patch_size)
        tokens = patch_embed(images, embed_dim=width, patch_size=self.patch_size)
        cls = cls_token[..., :width].to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        shared = torch.cat([cls, tokens], dim=1) + pos_embed[..., :width].to(tokens.dtype)
        x = shared.unsqueeze(0) * self.embed.mask(shared.dtype, 4)
        for block, plan in zip(supernet.blocks, self.layers):
            if plan is None:
                continue
            if plan.subnets is None:
                x = _block(block, x, plan)
            else:
                active = plan.embed.width
                x[plan.subnets, ..., :active] = _block(block, x[plan.subnets, ..., :active], plan)
        cls_out = grouped_layer_norm(x[:, :, 0], self.embed, supernet.norm.weight, supernet.norm.bias, supernet.norm.eps)
        head = supernet.head
        return elastic_linear(cls_out, head.weight, head.bias)


def _block(block, x: Tensor, plan: LayerPlan) -> Tensor:
    """One pre-norm transformer layer (``elastic_ops.nn.ElasticBlock``, eval mode) for the subnets of ``plan``."""
    attn, mlp = block.attn, block.mlp
    h = grouped_layer_norm(x, plan.embed, block.norm1.weight, block.norm1.bias, block.norm1.eps)
    x = x + grouped_attention(h, plan.embed, attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias,
                              plan.heads, attn.head_dim)
    h = grouped_layer_norm(x, plan.embed, block.norm2.weight, block.norm2.bias, block.norm2.eps)
    return x + grouped_mlp(h, plan.embed, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, plan.hidden)


def supports_batched(supernet) -> bool:
    """Whether :func:`batched_forward` runs this supernet: not with private q/k per head count, since the grouped
    attention reads every subnet's q, k and v from the one shared qkv weight, nor with relative position, which
    it has no path for."""
    return not supernet.config.private_qk_heads and not supernet.config.relative_position


def check_archs(supernet, archs: Sequence[Arch]) -> None:
    """Every arch must be a subnet of ``supernet`` (ValueError naming the first that is not)."""
    for index, arch in enumerate(archs):
        try:
            supernet.check_arch(arch)
        except (ValueError, TypeError) as error:
            raise type(error)(f"arch {index} of {len(archs)}: {error}") from error


def batched_forward(supernet, images: Tensor, archs: Sequence[Arch]) -> Tensor:
    """Logits ``[K, B, num_classes]`` of the K subnets ``archs`` on one batch, computed in one pass per patch size."""
    archs = list(archs)
    if not archs:
        raise ValueError("batched_forward: no archs given")
    if supernet.training:
        raise ValueError("batched_forward: the supernet is in training mode; batched evaluation runs in eval mode "
                         "(call supernet.eval())")
    by_patch: dict[int, list[int]] = {}
    for k, arch in enumerate(archs):
        by_patch.setdefault(supernet.patch_size(arch) if isinstance(arch, Arch) else 0, []).append(k)
    if len(by_patch) == 1:
        return BatchedSubnets(supernet, archs)(images)
    logits = [None] * len(archs)
    for members in by_patch.values():
        for k, out in zip(members, BatchedSubnets(supernet, [archs[k] for k in members])(images)):
            logits[k] = out
    return torch.stack(logits)


def pass_memory_per_image(supernet, archs: Sequence[Arch], dtype: torch.dtype) -> int:
    """Bytes of activations one subnet of a batched pass needs per image at its peak (inside one layer),
    sized at the group's widest subnet: the residual stream, the normalised input, q/k/v, attention
    scores and context, and the MLP hidden layer with its GELU."""
    c = supernet.config
    tokens = max(c.num_tokens(supernet.patch_size(arch)) for arch in archs)
    embed = max(arch.embed_dim for arch in archs)
    attn_width = max(max(arch.num_heads) for arch in archs) * c.head_dim
    heads = max(max(arch.num_heads) for arch in archs)
    hidden = max(arch.hidden_features(i) for arch in archs for i in range(arch.max_depth))
    elements = tokens * (4 * embed + 8 * attn_width + 3 * hidden) + 2 * heads * tokens * tokens
    return elements * torch.finfo(dtype).bits // 8

"""K subnets of one supernet in one pass over a batch (DESIGN.md section 3, batched mode).

Activations of K subnets are stacked as ``[K, B, N, E]`` where ``E`` is the largest active embed dim of
the group; subnet k's channels ``e_k:`` are padding and are kept exactly zero, so that every matmul over
the full width ``E`` gives each subnet the result over its own active channels. A :class:`GroupSizes`
per elastic dimension is the size table: a host tuple (for shapes) and a device int32 tensor (what a
grouped kernel reads to skip the tiles past each subnet's active size).

Subnets that agree on the embed dim and on every layer so far have the same activations: each distinct
prefix (a *branch*) is computed once and splits where the subnets part, so a search generation of mutants
of a few parents costs less than its K subnets run side by side.

Every layer is one call per op for all the branches it runs: ``elastic_ops.grouped_linear``, ``grouped_layer_norm``,
``grouped_mlp``, ``grouped_attention``, which run the native (CPU) or Triton (GPU) grouped kernels, or the
grouped PyTorch reference (``elastic_ops.reference``), chosen like every other op.

The layers compute themselves (``ElasticBlock.grouped_forward``, including ViTAS's private q/k and AutoFormer's
relative position), as the tokens do (``VisionTransformerSupernet.embed_tokens``); this module only plans which
branch runs which layer, and the q/k sources of each layer once per pass.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from elastic_ops import GroupSizes, elastic_linear
from elastic_ops.nn import QkGroup

from ..family import check_archs
from .arch import Arch
from .supernet import pool

# --- the K-subnet supernet forward ----------------------------------------------------------------

# Bytes of the stacked residual stream per chunk of a batched pass on a CPU (a share of an L3 cache).
CPU_CHUNK_BYTES = 8 << 20


@dataclass
class LayerPlan:
    """One supernet layer of a batched pass. ``parents[b]``: the branch before the layer that branch b after it
    continues (None: no branch splits here); ``running``: the branches after the split that run the layer
    (None: all); the sizes are those of the running branches (``widths``: their attention widths where the archs
    choose them, else None)."""

    parents: Tensor | None
    running: Tensor | None
    embed: GroupSizes
    heads: GroupSizes
    hidden: GroupSizes
    widths: GroupSizes | None
    qk_groups: tuple[QkGroup, ...]


class BatchedSubnets:
    """K subnets of ``supernet`` that share a patch size, run together: ``BatchedSubnets(supernet, archs)(images)``
    returns logits ``[K, B, num_classes]`` (dense: ``[K, B, num_classes, H, W]``), subnet k's equal to
    ``supernet(images, archs[k])``.

    The patch embedding runs once at the group's widest embed dim (a narrower subnet's channels are its
    leading slice); each layer runs once per branch (distinct prefix of the subnets that have it on), the
    other branches pass through.
    """

    def __init__(self, supernet, archs: Sequence[Arch]):
        self.supernet = supernet
        self.archs = list(archs)
        check_archs(supernet, self.archs)
        check_leading(supernet, self.archs)
        patch_sizes = {supernet.patch_size(arch) for arch in self.archs}
        if len(patch_sizes) != 1:
            raise ValueError(f"BatchedSubnets: archs of one pass must share a patch size, got {sorted(patch_sizes)}; "
                             "use forward_by_patch_size, which splits them")
        self.patch_size = patch_sizes.pop()
        device = next(supernet.parameters()).device
        prefixes = [(arch.embed_dim,) for arch in self.archs]
        branches = list(dict.fromkeys(prefixes))
        self.embed = GroupSizes([prefix[0] for prefix in branches], device)
        self.layers: list[LayerPlan | None] = []
        for i in range(len(supernet.blocks)):
            # An identity layer leaves the activations, so the prefix, as they are. The layer index is part of
            # the key: the same sizes in another layer are other weights.
            prefixes = [prefix + ((i, arch.num_heads[i], arch.hidden_features(i), supernet.attn_dim(arch, i)),)
                        if arch.layer_on[i] else prefix for prefix, arch in zip(prefixes, self.archs)]
            after = list(dict.fromkeys(prefixes))
            index = {prefix: b for b, prefix in enumerate(branches)}
            parents = [index[prefix] if prefix in index else index[prefix[:-1]] for prefix in after]
            running = [b for b, prefix in enumerate(after) if prefix not in index]
            branches = after
            if not running:
                self.layers.append(None)
                continue
            heads = GroupSizes([after[b][-1][1] for b in running], device)
            widths = None if self.archs[0].attn_dim is None else GroupSizes([after[b][-1][3] for b in running], device)
            self.layers.append(LayerPlan(
                parents=None if parents == list(range(len(index))) else torch.tensor(parents, device=device),
                running=None if len(running) == len(after) else torch.tensor(running, device=device),
                embed=GroupSizes([after[b][0] for b in running], device),
                heads=heads,
                hidden=GroupSizes([after[b][-1][2] for b in running], device),
                widths=widths,
                qk_groups=supernet.blocks[i].attn.qk_groups(heads, widths),
            ))
        final = {prefix: b for b, prefix in enumerate(branches)}
        self.branch_of_subnet = torch.tensor([final[prefix] for prefix in prefixes], device=device)
        self.final_embed = GroupSizes([prefix[0] for prefix in branches], device)

    @property
    def branches(self) -> int:
        """Distinct subnet prefixes that the pass computes (at most K), counted after the last layer."""
        return len(self.final_embed)

    def __call__(self, images: Tensor) -> Tensor:
        c = self.supernet.config
        expected = (c.in_chans, c.img_size, c.img_size)
        if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != expected:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"batched_forward: expected images [batch, {c.in_chans}, {c.img_size}, {c.img_size}], "
                             f"got {shape}")
        if images.device.type != "cpu":
            return self._forward(images)
        # On a CPU the stacked activations of a whole batch stream through memory between every two ops; in
        # chunks whose residual stream fits the last-level cache the pass is compute-bound, as one subnet is.
        per_image = self.branches * c.num_tokens(self.patch_size) * self.embed.width * images.element_size()
        rows = max(1, CPU_CHUNK_BYTES // per_image)
        return torch.cat([self._forward(chunk) for chunk in images.split(rows)], dim=1)

    def _forward(self, images: Tensor) -> Tensor:
        supernet = self.supernet
        shared = supernet.embed_tokens(images, self.embed.width, self.patch_size)
        x = shared.unsqueeze(0) * self.embed.mask(shared.dtype, 4)
        for block, plan in zip(supernet.blocks, self.layers):
            if plan is None:
                continue
            if plan.parents is not None:
                x = x[plan.parents]
            if plan.running is None:
                x = block.grouped_forward(x, plan.embed, plan.heads, plan.hidden, plan.qk_groups, plan.widths)
            else:
                active = plan.embed.width
                x[plan.running, ..., :active] = block.grouped_forward(x[plan.running, ..., :active], plan.embed,
                                                                      plan.heads, plan.hidden, plan.qk_groups,
                                                                      plan.widths)
        return self.read_out(x)

    def read_out(self, x: Tensor) -> Tensor:
        """Each subnet's logits from the branches' tokens after the last layer ``[branches, B, N, E]``."""
        supernet = self.supernet
        if supernet.config.global_pool == "token":  # the class token alone is normalised
            pooled = supernet.norm.grouped_forward(x[:, :, 0], self.final_embed)
        else:
            pooled = pool(supernet.norm.grouped_forward(x, self.final_embed), supernet.config.global_pool)
        head = supernet.head
        return supernet.config.read_out(elastic_linear(pooled, head.weight, head.bias)[self.branch_of_subnet])


def check_leading(supernet, archs: Sequence[Arch]) -> None:
    """The grouped ops read leading channels only: refuse an arch on the right side (it runs alone, with
    ``supernet(images, arch)``), and put the layers, which keep the side of the last arch set, on the left."""
    for index, arch in enumerate(archs):
        if getattr(arch, "side", "left") != "left":
            raise ValueError(f"arch {index} of {len(archs)}: batched passes read the leading channels only, but it is "
                             "on the right side; run it alone with supernet(images, arch)")
    active = getattr(supernet, "arch", None)
    if getattr(active, "side", "left") != "left":
        supernet.set_arch(active.on_side("left"))


def forward_by_patch_size(supernet, images: Tensor, archs: Sequence[Arch]) -> Tensor:
    """Logits ``[K, B, num_classes]`` (dense: ``[K, B, num_classes, H, W]``) of the K subnets ``archs`` (checked by
    ``nas.evaluate.batched_forward``) on one batch, computed in one pass per patch size."""
    by_patch: dict[int, list[int]] = {}
    for k, arch in enumerate(archs):
        by_patch.setdefault(supernet.patch_size(arch), []).append(k)
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
    attn_width = max(arch.attention_width(i, c.head_dim) for arch in archs for i in range(arch.max_depth))
    heads = max(max(arch.num_heads) for arch in archs)
    hidden = max(arch.hidden_features(i) for arch in archs for i in range(arch.max_depth))
    elements = tokens * (4 * embed + 8 * attn_width + 3 * hidden) + 2 * heads * tokens * tokens
    return elements * torch.finfo(dtype).bits // 8

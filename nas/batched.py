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

With private q/k projections per head count (ViTAS, ``SupernetConfig.private_qk_heads``) or relative position
(AutoFormer, ``SupernetConfig.relative_position``) the attention runs unfused, as in the single-subnet forward
(``elastic_ops.nn.ElasticAttention``): q, k and v from grouped linears, the attention math in torch.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from elastic_ops import (GroupSizes, elastic_linear, grouped_attention, grouped_layer_norm, grouped_linear, grouped_mlp,
                         plain)

from .arch import Arch

# --- the K-subnet supernet forward ----------------------------------------------------------------

# Bytes of the stacked residual stream per chunk of a batched pass on a CPU (a share of an L3 cache).
CPU_CHUNK_BYTES = 8 << 20


@dataclass
class LayerPlan:
    """One supernet layer of a batched pass. ``parents[b]``: the branch before the layer that branch b after it
    continues (None: no branch splits here); ``running``: the branches after the split that run the layer
    (None: all); the sizes are those of the running branches."""

    parents: Tensor | None
    running: Tensor | None
    embed: GroupSizes
    heads: GroupSizes
    hidden: GroupSizes
    qk_sources: tuple[QkSource, ...]


@dataclass
class QkSource:
    """Running branches whose q and k come from one weight: the shared qkv rows (``private_heads`` None) or the
    private projections of one head count; ``subnets`` indexes them among the running branches (None: all)."""

    private_heads: int | None
    subnets: Tensor | None
    width: GroupSizes


def _qk_sources(heads: GroupSizes, private_heads: Sequence[int], head_dim: int) -> tuple[QkSource, ...]:
    width = heads.scaled(head_dim)
    by_source: dict[int | None, list[int]] = {}
    for index, count in enumerate(heads.values):
        by_source.setdefault(count if count in private_heads else None, []).append(index)
    if len(by_source) == 1:
        return (QkSource(next(iter(by_source)), None, width),)
    device = heads.table.device
    return tuple(QkSource(source, torch.tensor(subnets, device=device),
                          GroupSizes([width.values[k] for k in subnets], device))
                 for source, subnets in by_source.items())


class BatchedSubnets:
    """K subnets of ``supernet`` that share a patch size, run together: ``BatchedSubnets(supernet, archs)(images)``
    returns logits ``[K, B, num_classes]``, subnet k's equal to ``supernet(images, archs[k])``.

    The patch embedding runs once at the group's widest embed dim (a narrower subnet's channels are its
    leading slice); each layer runs once per branch (distinct prefix of the subnets that have it on), the
    other branches pass through.
    """

    def __init__(self, supernet, archs: Sequence[Arch]):
        self.supernet = supernet
        self.archs = list(archs)
        check_archs(supernet, self.archs)
        patch_sizes = {supernet.patch_size(arch) for arch in self.archs}
        if len(patch_sizes) != 1:
            raise ValueError(f"BatchedSubnets: archs of one pass must share a patch size, got {sorted(patch_sizes)}; "
                             "use batched_forward, which splits them")
        self.patch_size = patch_sizes.pop()
        device = next(supernet.parameters()).device
        prefixes = [(arch.embed_dim,) for arch in self.archs]
        branches = list(dict.fromkeys(prefixes))
        self.embed = GroupSizes([prefix[0] for prefix in branches], device)
        self.layers: list[LayerPlan | None] = []
        for i in range(len(supernet.blocks)):
            # An identity layer leaves the activations, so the prefix, as they are. The layer index is part of
            # the key: the same sizes in another layer are other weights.
            prefixes = [prefix + ((i, arch.num_heads[i], arch.hidden_features(i)),) if arch.layer_on[i] else prefix
                        for prefix, arch in zip(prefixes, self.archs)]
            after = list(dict.fromkeys(prefixes))
            index = {prefix: b for b, prefix in enumerate(branches)}
            parents = [index[prefix] if prefix in index else index[prefix[:-1]] for prefix in after]
            running = [b for b, prefix in enumerate(after) if prefix not in index]
            branches = after
            if not running:
                self.layers.append(None)
                continue
            heads = GroupSizes([after[b][-1][1] for b in running], device)
            attn = supernet.blocks[i].attn
            self.layers.append(LayerPlan(
                parents=None if parents == list(range(len(index))) else torch.tensor(parents, device=device),
                running=None if len(running) == len(after) else torch.tensor(running, device=device),
                embed=GroupSizes([after[b][0] for b in running], device),
                heads=heads,
                hidden=GroupSizes([after[b][-1][2] for b in running], device),
                qk_sources=_qk_sources(heads, attn.private_qk_heads, attn.head_dim),
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
        if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (c.in_chans, c.img_size, c.img_size):
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"batched_forward: expected images [batch, {c.in_chans}, {c.img_size}, {c.img_size}], got {shape}")
        if images.device.type != "cpu":
            return self._forward(images)
        # On a CPU the stacked activations of a whole batch stream through memory between every two ops; in
        # chunks whose residual stream fits the last-level cache the pass is compute-bound, as one subnet is.
        per_image = self.branches * c.num_tokens(self.patch_size) * self.embed.width * images.element_size()
        rows = max(1, CPU_CHUNK_BYTES // per_image)
        return torch.cat([self._forward(chunk) for chunk in images.split(rows)], dim=1)

    def _forward(self, images: Tensor) -> Tensor:
        supernet, width = self.supernet, self.embed.width
        patch_embed, cls_token, pos_embed = supernet.token_layers(self.patch_size)
        tokens = patch_embed(images, embed_dim=width, patch_size=self.patch_size)
        cls = cls_token[..., :width].to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        shared = torch.cat([cls, tokens], dim=1) + pos_embed[..., :width].to(tokens.dtype)
        x = shared.unsqueeze(0) * self.embed.mask(shared.dtype, 4)
        for block, plan in zip(supernet.blocks, self.layers):
            if plan is None:
                continue
            if plan.parents is not None:
                x = x[plan.parents]
            if plan.running is None:
                x = _block(block, x, plan)
            else:
                active = plan.embed.width
                x[plan.running, ..., :active] = _block(block, x[plan.running, ..., :active], plan)
        cls_out = grouped_layer_norm(x[:, :, 0], self.final_embed, supernet.norm.weight, supernet.norm.bias,
                                     supernet.norm.eps)
        head = supernet.head
        return elastic_linear(cls_out, head.weight, head.bias)[self.branch_of_subnet]


def _block(block, x: Tensor, plan: LayerPlan) -> Tensor:
    """One pre-norm transformer layer (``elastic_ops.nn.ElasticBlock``, eval mode) for the subnets of ``plan``."""
    attn, mlp = block.attn, block.mlp
    h = grouped_layer_norm(x, plan.embed, block.norm1.weight, block.norm1.bias, block.norm1.eps)
    if attn.rel_pos is None and len(plan.qk_sources) == 1 and plan.qk_sources[0].private_heads is None:
        x = x + grouped_attention(h, plan.embed, attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias,
                                  plan.heads, attn.head_dim)
    else:
        x = x + _unfused_attention(attn, h, plan)
    h = grouped_layer_norm(x, plan.embed, block.norm2.weight, block.norm2.bias, block.norm2.eps)
    return x + grouped_mlp(h, plan.embed, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias, plan.hidden)


def _unfused_attention(attn, h: Tensor, plan: LayerPlan) -> Tensor:
    """``ElasticAttention._unfused_attention`` for the subnets of ``plan``: q, k and v by grouped linears on the
    rows of their super weights (q and k per :class:`QkSource`), the attention in torch over
    ``[K * B, heads, N, head_dim]``, padded heads zeroed before the projection."""
    groups, batch, tokens, _ = h.shape
    head_dim, max_width = attn.head_dim, attn.num_heads * attn.head_dim
    width = plan.heads.scaled(head_dim)
    weight, bias = attn.qkv.weight, attn.qkv.bias

    def rows(source_weight: Tensor, source_bias: Tensor | None, start: int, subnets: Tensor | None = None,
             sizes: GroupSizes = width) -> Tensor:
        x = h if subnets is None else h[subnets]
        return grouped_linear(x, source_weight[start:], None if source_bias is None else source_bias[start:], sizes)

    def q_and_k(source: QkSource) -> tuple[Tensor, Tensor]:
        if source.private_heads is None:
            return (rows(weight, bias, 0, source.subnets, source.width),
                    rows(weight, bias, max_width, source.subnets, source.width))
        private = attn.private_qk[str(source.private_heads)]
        return (rows(private.weight, private.bias, 0, source.subnets, source.width),
                rows(private.weight, private.bias, source.private_heads * head_dim, source.subnets, source.width))

    if len(plan.qk_sources) == 1:
        q, k = q_and_k(plan.qk_sources[0])
    else:
        q, k = (h.new_zeros(groups, batch, tokens, width.width) for _ in range(2))
        for source in plan.qk_sources:
            part_q, part_k = q_and_k(source)
            q[source.subnets, ..., :part_q.shape[-1]] = part_q
            k[source.subnets, ..., :part_k.shape[-1]] = part_k
    v = rows(weight, bias, 2 * max_width)
    q, k, v = (t.view(groups * batch, tokens, -1, head_dim).transpose(1, 2) for t in (q, k, v))
    scale = head_dim ** -0.5
    if attn.rel_pos is None:
        context = F.scaled_dot_product_attention(q, k, v, scale=scale)
    else:
        rel_k, rel_v = attn.rel_pos(tokens)
        context = plain.relative_attention(q, k, v, rel_k.to(q.dtype), rel_v.to(q.dtype), scale)
    context = context.transpose(1, 2).reshape(groups, batch, tokens, width.width) * width.mask(context.dtype, 4)
    return grouped_linear(context, attn.proj.weight, attn.proj.bias, plan.embed)


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

"""K subnets of one supernet in one pass over a batch (DESIGN.md section 3, batched mode).

Activations of K subnets are stacked as ``[K, B, N, E]`` where ``E`` is the largest active embed dim of
the group; subnet k's channels ``e_k:`` are padding and are kept exactly zero, so that every matmul over
the full width ``E`` gives each subnet the result over its own active channels. A :class:`GroupSizes`
per elastic dimension is the size table: a host tuple (for shapes) and a device int32 tensor (what a
grouped kernel reads to skip the tiles past each subnet's active size).

Every layer is one call per op for all K subnets: ``grouped_linear``, ``grouped_layer_norm``,
``grouped_mlp``, ``grouped_attention``. The supernet's weights are shared by all subnets (weight
entanglement), so the grouped PyTorch implementation of a linear layer is one GEMM of the ``[K * B * N, E]``
rows against the leading ``[out, E]`` slice of the super weight, followed by the padding mask. Native or
Triton grouped kernels plug in per op through :data:`GROUPED_IMPLEMENTATIONS`.

A supernet with private q/k projections per head count (ViTAS, ``SupernetConfig.private_qk_heads``) or with
relative position (AutoFormer, ``SupernetConfig.relative_position``) is not supported (:func:`supports_batched`):
its subnets run one at a time.
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from elastic_ops._backend import select

from .arch import Arch

# op -> backend -> "module:function" of a grouped kernel taking the same arguments as the PyTorch one.
# The "reference" backend is the grouped PyTorch implementation in this module.
GROUPED_IMPLEMENTATIONS: dict[str, dict[str, str]] = {
    op: {"native": f"elastic_ops._native:{op}_grouped", "triton": f"elastic_ops.ops.grouped:grouped_{op}"}
    for op in ("linear", "layer_norm", "mlp", "attention")
}


class GroupSizes:
    """Active size of one elastic dimension for each of K subnets.

    ``values``: host tuple; ``width``: the largest (the padded width of the stacked activations);
    ``table``: int32 tensor ``[K]`` on the device, for grouped kernels.
    """

    def __init__(self, values: Sequence[int], device: torch.device | str):
        self.values = tuple(int(v) for v in values)
        if not self.values or min(self.values) < 1:
            raise ValueError(f"GroupSizes: every subnet needs an active size >= 1, got {self.values}")
        self.width = max(self.values)
        self.uniform = min(self.values) == self.width
        self.table = torch.tensor(self.values, dtype=torch.int32, device=device)
        self._masks: dict[tuple[torch.dtype, int], Tensor] = {}
        self._scaled: dict[int, GroupSizes] = {}

    def __len__(self) -> int:
        return len(self.values)

    def __repr__(self) -> str:
        return f"GroupSizes({list(self.values)})"

    def scaled(self, factor: int) -> "GroupSizes":
        """Sizes in units ``factor`` times smaller: heads -> channels of the attention context."""
        if factor not in self._scaled:
            self._scaled[factor] = GroupSizes([v * factor for v in self.values], self.table.device)
        return self._scaled[factor]

    def mask(self, dtype: torch.dtype, ndim: int) -> Tensor:
        """1 on each subnet's active channels, 0 on its padding; shape ``[K, 1, ..., 1, width]`` (``ndim`` dims)."""
        key = (dtype, ndim)
        if key not in self._masks:
            channels = torch.arange(self.width, device=self.table.device)
            active = (channels[None, :] < self.table[:, None]).to(dtype)
            self._masks[key] = active.view(len(self), *([1] * (ndim - 2)), self.width)
        return self._masks[key]


def _zero_padding(y: Tensor, sizes: GroupSizes) -> Tensor:
    return y if sizes.uniform else y * sizes.mask(y.dtype, y.dim())


def _active(tensor: Tensor | None, *sizes: int, dtype: torch.dtype) -> Tensor | None:
    if tensor is None:
        return None
    view = tensor[tuple(slice(0, s) for s in sizes)]
    return view if view.dtype == dtype else view.to(dtype)


def _grouped_kernel(op: str, x: Tensor, *tensors: Tensor | None):
    """The grouped kernel that runs ``op`` here, or None for the grouped PyTorch implementation.

    The backend is chosen as for the single-subnet ops (DESIGN.md section 4); the native and Triton grouped
    kernels are forward-only, so a call that needs gradients runs the PyTorch implementation.
    """
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *tensors))
    backend = select(f"grouped {op}", x.device, x.dtype, needs_grad, has_native=True, triton_backward=False)
    if backend == "reference":
        return None
    module, function = GROUPED_IMPLEMENTATIONS[op][backend].split(":")
    return getattr(importlib.import_module(module), function)


def grouped_linear(x: Tensor, weight: Tensor, bias: Tensor | None, out_sizes: GroupSizes,
                   activation: str | None = None) -> Tensor:
    """``act(x[k] @ weight[:out_k, :in].T + bias[:out_k])`` for each subnet k, zero past ``out_k``.

    x: ``[K, ..., in]`` with each subnet's input padding zero; out: ``[K, ..., out_sizes.width]``.
    """
    kernel = _grouped_kernel("linear", x, weight, bias)
    if kernel is not None:
        return kernel(x, weight, bias, out_sizes, activation)
    width = out_sizes.width
    y = F.linear(x, _active(weight, width, x.shape[-1], dtype=x.dtype), _active(bias, width, dtype=x.dtype))
    if activation == "gelu":
        y = F.gelu(y)
    return _zero_padding(y, out_sizes)


def grouped_layer_norm(x: Tensor, sizes: GroupSizes, weight: Tensor | None, bias: Tensor | None,
                       eps: float = 1e-5) -> Tensor:
    """LayerNorm of each subnet over ITS active channels ``:e_k`` (``weight[:e_k]``, ``bias[:e_k]``); padding stays zero.

    x: ``[K, ..., sizes.width]`` with zero padding.
    """
    kernel = _grouped_kernel("layer_norm", x, weight, bias)
    if kernel is not None:
        return kernel(x, sizes, weight, bias, eps)
    if sizes.uniform:
        return F.layer_norm(x, (sizes.width,), _active(weight, sizes.width, dtype=x.dtype),
                            _active(bias, sizes.width, dtype=x.dtype), eps)
    # Statistics in float32 (as F.layer_norm keeps them) also for half-precision activations.
    stats = x.float()
    mask = sizes.mask(torch.float32, x.dim())
    count = sizes.table.to(torch.float32).view(mask.shape[:-1] + (1,))
    mean = stats.sum(-1, keepdim=True) / count
    centred = (stats - mean) * mask
    rstd = torch.rsqrt((centred * centred).sum(-1, keepdim=True) / count + eps)
    y = centred * rstd
    if weight is not None:
        y = y * _active(weight, sizes.width, dtype=torch.float32)
    if bias is not None:
        y = y + _active(bias, sizes.width, dtype=torch.float32) * mask
    return y.to(x.dtype)


def grouped_mlp(x: Tensor, sizes: GroupSizes, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor,
                fc2_bias: Tensor | None, hidden_sizes: GroupSizes) -> Tensor:
    """``fc2(gelu(fc1(x)))`` of each subnet with ``W1[:hidden_k, :e_k]``, ``W2[:e_k, :hidden_k]``."""
    kernel = _grouped_kernel("mlp", x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    if kernel is not None:
        return kernel(x, sizes, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden_sizes)
    hidden = grouped_linear(x, fc1_weight, fc1_bias, hidden_sizes, activation="gelu")
    return grouped_linear(hidden, fc2_weight, fc2_bias, sizes)


def grouped_attention(x: Tensor, sizes: GroupSizes, qkv_weight: Tensor, qkv_bias: Tensor | None, proj_weight: Tensor,
                      proj_bias: Tensor | None, head_counts: GroupSizes, head_dim: int = 64) -> Tensor:
    """Self-attention of each subnet with its ``h_k`` heads (block qkv layout), then ``W_o[:e_k, :h_k*Dh]``.

    x: ``[K, B, N, sizes.width]`` with zero padding. Heads past ``h_k`` are computed on the group's
    widest head count and zeroed before the output projection, so they contribute nothing.
    """
    kernel = _grouped_kernel("attention", x, qkv_weight, qkv_bias, proj_weight, proj_bias)
    if kernel is not None:
        return kernel(x, sizes, qkv_weight, qkv_bias, proj_weight, proj_bias, head_counts, head_dim)
    groups, batch, tokens, embed = x.shape
    heads = head_counts.width
    max_width = qkv_weight.shape[0] // 3
    # The active rows of q, k and v are the leading rows of three blocks: gather them into one small
    # weight so that all three come out of one GEMM.
    weight = _active(qkv_weight.view(3, max_width, qkv_weight.shape[1]), 3, heads * head_dim, embed, dtype=x.dtype)
    bias = None if qkv_bias is None else _active(qkv_bias.view(3, max_width), 3, heads * head_dim, dtype=x.dtype)
    qkv = F.linear(x, weight.reshape(3 * heads * head_dim, embed), None if bias is None else bias.reshape(-1))
    q, k, v = qkv.view(groups * batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    context = F.scaled_dot_product_attention(q, k, v, scale=1.0 / math.sqrt(head_dim))
    context = context.transpose(1, 2).reshape(groups, batch, tokens, heads * head_dim)
    context = _zero_padding(context, head_counts.scaled(head_dim))
    return grouped_linear(context, proj_weight, proj_bias, sizes)


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
        return F.linear(cls_out, _active(head.weight, head.weight.shape[0], width, dtype=cls_out.dtype),
                        _active(head.bias, head.weight.shape[0], dtype=cls_out.dtype))


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

"""K subnets of a hybrid supernet in one pass over a batch (DESIGN.md sections 3 and 9).

Subnets that share their operator *layout* (the resolution and, stage by stage, the operator, depth and DSM: see
:func:`layout`) run the same modules in the same order and differ only in widths (channels, expansion, kernel size,
V-scale). A pass runs them layer by layer: a layer with a grouped forward (UniNet's attention block,
``ElasticPositionalAttentionBlock.grouped_forward``) runs the K subnets in one call on their tokens stacked as
``[K, B, N, C]`` (zero past each subnet's channels, as ``nas.vit.batched``); any other layer runs them one after
another. The images are resized once per pass.

BatchNorm: each subnet can run with its own running statistics (:class:`BatchNormStats`, captured after recalibrating
the BatchNorms for it), loaded into a layer's BatchNorms before that subnet runs the layer; the pass then computes
what K single forwards, each with its subnet's statistics, compute. The supernet's active subnet and statistics are as
before after every pass.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from elastic_ops import GroupSizes, plain_hybrid
from elastic_ops.hybrid import ElasticPositionalAttentionBlock

from ..batch_norm import BatchNormStats
from .arch import HybridArch
from .supernet import GRID, HybridSupernet, convert


def layout(arch: HybridArch) -> tuple:
    """What subnets must share to run in one pass: the resolution, and per stage the operator, depth and DSM."""
    return arch.resolution, tuple((stage.op, stage.depth, stage.dsm) for stage in arch.stages)


class HybridBatchedSubnets:
    """K subnets of ``supernet`` of one :func:`layout`, run together: ``HybridBatchedSubnets(supernet, archs)(images)``
    returns logits ``[K, B, num_classes]``, subnet k's equal to ``supernet(images, archs[k])`` with the BatchNorm
    statistics ``statistics[k]`` (default: the supernet's own, for every subnet)."""

    def __init__(self, supernet: HybridSupernet, archs: Sequence[HybridArch],
                 statistics: Sequence[BatchNormStats] | None = None):
        self.supernet, self.archs = supernet, list(archs)
        if not self.archs:
            raise ValueError("HybridBatchedSubnets: no archs given")
        layouts = {layout(arch) for arch in self.archs}
        if len(layouts) != 1:
            raise ValueError(f"HybridBatchedSubnets: archs of one pass must share their layout (resolution, and per "
                             f"stage operator, depth and DSM); got {len(layouts)} layouts: use batched_forward, which "
                             "splits them")
        if statistics is not None and len(statistics) != len(self.archs):
            raise ValueError(f"HybridBatchedSubnets: {len(statistics)} BatchNorm statistics for {len(self.archs)} "
                             "archs")
        self.statistics = None if statistics is None else list(statistics)
        active = supernet.arch
        # Per subnet, the active configuration of every module it runs: the stem, the stages' layers, the head.
        self.configs: list[list[dict[str, int]]] = []
        for arch in self.archs:
            supernet.set_arch(arch)
            self.configs.append([dict(module.active) for module in self._modules()])
        self.layers = [(supernet.stem, GRID, GRID), *supernet.active_layers]
        supernet.set_arch(active)
        self.resolution = self.archs[0].resolution
        self.device = next(supernet.parameters()).device

    def _modules(self) -> list[nn.Module]:
        return [self.supernet.stem, *(module for module, _, _ in self.supernet.active_layers), self.supernet.head]

    def _run(self, k: int, index: int, module: nn.Module, x: Tensor) -> Tensor:
        """Subnet ``k`` through ``module`` (the ``index``-th of :meth:`_modules`), with its configuration and
        statistics."""
        module.set_active(**self.configs[k][index])
        if self.statistics is not None:
            self.statistics[k].load(module)
        return module(x)

    def _grouped(self, index: int, block: ElasticPositionalAttentionBlock, xs: list[Tensor]) -> list[Tensor]:
        """Every subnet through an attention block in one grouped call, on tokens zero-padded to the widest."""
        configs = [self.configs[k][index] for k in range(len(xs))]
        sizes = GroupSizes([c["embed_dim"] for c in configs], self.device)
        stacked = xs[0].new_zeros(len(xs), *xs[0].shape[:-1], sizes.width)
        for k, x in enumerate(xs):
            stacked[k, ..., :x.shape[-1]] = x
        out = block.grouped_forward(stacked, sizes, GroupSizes([c["num_heads"] for c in configs], self.device),
                                    GroupSizes([c["hidden_features"] for c in configs], self.device))
        return [out[k, ..., :width] for k, width in enumerate(sizes.values)]

    @torch.no_grad()
    def __call__(self, images: Tensor) -> Tensor:
        supernet = self.supernet
        if supernet.training:
            raise ValueError("HybridBatchedSubnets: the supernet is in training mode; batched evaluation runs in eval "
                             "mode (call supernet.eval())")
        own = BatchNormStats(supernet) if self.statistics is not None else None
        try:
            x = plain_hybrid.resize(images, self.resolution)
            xs, layout_now = [x] * len(self.archs), GRID
            for index, (module, wanted, layout_out) in enumerate(self.layers):
                xs = [convert(x, layout_now, wanted) for x in xs]
                if isinstance(module, ElasticPositionalAttentionBlock) and len(xs) > 1:
                    xs = self._grouped(index, module, xs)
                else:
                    xs = [self._run(k, index, module, x) for k, x in enumerate(xs)]
                layout_now = layout_out
            head = len(self.layers)
            logits = torch.stack([self._run(k, head, supernet.head, convert(x, layout_now, GRID))
                                  for k, x in enumerate(xs)])
        finally:
            if own is not None:
                own.load(supernet)
            supernet.set_arch(supernet.arch)
        return logits


def batched_pass(supernet: HybridSupernet, archs: Sequence[HybridArch],
                 statistics: Sequence[BatchNormStats] | None = None) -> Callable[[Tensor], Tensor]:
    """images -> logits ``[K, B, num_classes]`` of ``archs``: one :class:`HybridBatchedSubnets` per layout, planned
    once for every batch the returned function is called on."""
    groups: dict[tuple, list[int]] = {}
    for k, arch in enumerate(archs):
        groups.setdefault(layout(arch), []).append(k)
    passes = [(members, HybridBatchedSubnets(supernet, [archs[k] for k in members],
                                             None if statistics is None else [statistics[k] for k in members]))
              for members in groups.values()]

    def forward(images: Tensor) -> Tensor:
        logits: list[Tensor | None] = [None] * len(archs)
        for members, run in passes:
            for k, out in zip(members, run(images)):
                logits[k] = out
        return torch.stack(logits)

    return forward


def pass_memory_per_image(supernet: HybridSupernet, archs: Sequence[HybridArch], dtype: torch.dtype) -> int:
    """Bytes of activations one subnet of a batched pass needs per image: its largest feature map kept between layers,
    plus, at the peak inside a layer, the expanded hidden map three times and an attention's scores, sized at the
    group's widest subnet."""
    space, elements = supernet.space, 0
    for arch in archs:
        for stage, side in zip(arch.stages, space.grid_sides(arch.resolution)):
            tokens = side * side
            scores = 2 * (stage.channels // space.head_dim) * tokens * tokens if stage.op == "attention" else 0
            elements = max(elements, tokens * (4 * stage.channels + 3 * stage.hidden_features) + scores)
    return elements * torch.finfo(dtype).bits // 8


__all__ = ["HybridBatchedSubnets", "batched_pass", "layout", "pass_memory_per_image"]

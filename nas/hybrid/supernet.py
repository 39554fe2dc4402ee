"""The hybrid supernet: a stem, stages of conv / attention / MLP blocks joined by downsampling modules (DSMs), and a
classifier head, built from the elastic layers of ``elastic_ops`` and running any subnet of its ``HybridSpace``
(DESIGN.md section 9).

A stage holds, for every operator its space allows there, as many blocks as the stage's largest depth
(``stages.<i>.blocks.<op>.<j>``), and a module for every DSM it allows (``stages.<i>.dsm.<kind>``); a subnet runs
the first ``depth`` blocks of its operator after its DSM. Conv blocks and DSMs take feature maps ``[B, C, H, W]``,
attention and MLP blocks tokens ``[B, H * W, C]``: the forward pass converts where the layout changes (views, as
UniNet does). Images are resized to the subnet's resolution (bicubic) when they have another size.

BatchNorm keeps running statistics per supernet: re-estimate them for a subnet
(:meth:`HybridSupernet.recalibrate_batch_norm`) before evaluating or exporting it, as OFA and AttentiveNAS do.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from elastic_ops import plain_hybrid
from elastic_ops.conv import (
    ElasticBatchNorm2d,
    ElasticClassifierHead,
    ElasticConvNormAct,
    ElasticInvertedResidual,
    recalibrate_batch_norm,
)
from elastic_ops.hybrid import (
    ElasticGlobalDSM,
    ElasticLocalDSM,
    ElasticLocalGlobalDSM,
    ElasticMixerBlock,
    ElasticPositionalAttentionBlock,
    ElasticVScaleBlock,
)
from elastic_ops.nn import ElasticLinear

from .arch import HybridArch, Stage
from .space import ATTENTION_DSMS, HybridSpace, StageChoices
from .style import LAYER_SCALE, SE_REDUCTION, STYLES, TRANSITION_EXPANSION, TRANSITION_KERNEL, Style

GRID, TOKENS = "grid", "tokens"  # the two activation layouts


@dataclass
class HybridSupernetConfig:
    """``space``: the subnets the supernet runs (its largest sizes are the super weights'); ``drop_path_rate``: the
    stochastic depth of the last block, rising linearly over all blocks from 0; ``head_dropout``: dropout before the
    classifier (ElasticViT: 0.2). Both act in training only."""

    space: HybridSpace = field(repr=False)
    drop_path_rate: float = 0.0
    head_dropout: float = 0.0

    def __post_init__(self):
        if not isinstance(self.space, HybridSpace):
            raise TypeError(f"HybridSupernetConfig: space must be a HybridSpace, got {type(self.space).__name__}")
        for name in ("drop_path_rate", "head_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"HybridSupernetConfig: {name} must be in [0, 1), got {getattr(self, name)}")


class HybridStage(nn.Module):
    """One stage: a module per DSM choice but ``none`` (``dsm``) and, per operator choice, the blocks (``blocks``)."""

    def __init__(self, space: HybridSpace, index: int, in_channels: int, drop_paths: list[float]):
        super().__init__()
        choices: StageChoices = space.stages[index]
        self.choices, self.style = choices, STYLES[space.style]
        self.channels = max(choices.channels)
        self.dsm = nn.ModuleDict({kind: self._dsm(kind, in_channels, space.head_dim)
                                  for kind in choices.dsms if kind != "none"})
        self.blocks = nn.ModuleDict({op: nn.ModuleList(self._block(op, j, in_channels, space, index, rate)
                                                       for j, rate in enumerate(drop_paths))
                                     for op in choices.ops})

    def _conv_block(self, in_channels: int, expansion: int, kernel_size: int, stride: int, se: bool,
                    reshapes: bool, drop_path: float = 0.0) -> ElasticInvertedResidual:
        """An inverted residual of the style; ``reshapes``: it may change the shape, so it needs the style's shortcut
        (the others keep the shape, and their residual is the identity)."""
        style: Style = self.style
        return ElasticInvertedResidual(in_channels, self.channels, expansion, kernel_size, stride, style.activation,
                                       SE_REDUCTION if se else 0, style.se_divisor, style.input_norm,
                                       style.shortcut_pool if reshapes else "none", drop_path)

    def _dsm(self, kind: str, in_channels: int, head_dim: int) -> nn.Module:
        stride = self.choices.stride
        if kind == "local":
            return ElasticLocalDSM(in_channels, self.channels, stride)
        if kind == "mbconv":
            return self._conv_block(in_channels, TRANSITION_EXPANSION, TRANSITION_KERNEL, stride, True, True)
        dsm_type = ElasticLocalGlobalDSM if kind == "local-global" else ElasticGlobalDSM
        return dsm_type(in_channels, self.channels, self.channels // head_dim, head_dim, stride)

    def _block(self, op: str, j: int, in_channels: int, space: HybridSpace, index: int, drop_path: float) -> nn.Module:
        choices, channels = self.choices, self.channels
        hidden = channels * max(choices.expansions)
        if op == "conv":
            first = j == 0 and "none" in choices.dsms  # reads the previous stage's width and map, and downsamples
            return self._conv_block(in_channels if first else channels, max(choices.expansions),
                                    max(choices.kernel_sizes), choices.stride if first else 1, choices.se, first,
                                    drop_path)
        max_side = space.grid_sides(space.img_size)[index]
        if op == "mlp":
            return ElasticMixerBlock(channels, hidden, max_side, space.token_hidden(index), drop_path=drop_path)
        heads = channels // space.head_dim
        if self.style.v_scale:
            return ElasticVScaleBlock(channels, heads, max(choices.v_scales), hidden, head_dim=space.head_dim,
                                      max_grid=max_side, activation=self.style.activation, drop_path=drop_path,
                                      norm=space.norm, qkv_layout=space.qkv_layout)
        return ElasticPositionalAttentionBlock(channels, heads, hidden, head_dim=space.head_dim, drop_path=drop_path,
                                               layer_scale=LAYER_SCALE)

    def activate(self, stage: Stage, in_channels: int, side: int, head_dim: int) -> list[tuple[nn.Module, str, str]]:
        """Set the active configuration of ``stage``'s modules (reading ``in_channels`` on a map of the stage's side
        ``side`` after the DSM); returns them in order as ``(module, layout in, layout out)``."""
        channels, layers = stage.channels, []
        if stage.dsm != "none":
            dsm, config = self.dsm[stage.dsm], {"in_channels": in_channels, "out_channels": channels}
            if stage.dsm in ATTENTION_DSMS:
                config["num_heads"] = channels // head_dim
            elif stage.dsm == "mbconv":
                config.update(expand_ratio=TRANSITION_EXPANSION, kernel_size=TRANSITION_KERNEL)
            layers.append((dsm.set_active(**config), GRID, TOKENS if stage.dsm in ATTENTION_DSMS else GRID))
            in_channels = channels
        for block in self.blocks[stage.op][:stage.depth]:
            if stage.op == "conv":
                block.set_active(in_channels=in_channels, out_channels=channels, expand_ratio=stage.expansion,
                                 kernel_size=stage.kernel_size)
                layers.append((block, GRID, GRID))
                in_channels = channels
                continue
            config = {"embed_dim": channels, "hidden_features": stage.hidden_features}
            if stage.op == "mlp":
                config["grid_size"] = side
            else:
                config["num_heads"] = channels // head_dim
                if self.style.v_scale:
                    config["v_scale"] = stage.v_scale
            layers.append((block.set_active(**config), TOKENS, TOKENS))
        return layers


def own_grid_tables(module: nn.Module, side: int) -> nn.Module:
    """``module`` (extracted) with every relative position table cut to the 2D offsets of a ``side x side`` grid
    (rows ``(dy + side - 1) * (2 * side - 1) + dx + side - 1`` of the largest grid's layout), the rows that grid
    reads."""
    for layer in module.modules():
        bias = getattr(layer, "rel_pos_bias", None)
        if isinstance(bias, plain_hybrid.RelativePositionBias) and bias.max_side > side:
            largest = bias.max_side
            offsets = torch.arange(largest - side, largest + side - 1, device=bias.table.device)
            rows = (offsets[:, None] * (2 * largest - 1) + offsets[None, :]).flatten()
            trimmed = plain_hybrid.RelativePositionBias(side, bias.table.shape[1]).to(bias.table)  # device, dtype
            with torch.no_grad():
                trimmed.table.copy_(bias.table[rows])
            layer.rel_pos_bias = trimmed
    return module


def convert(x: Tensor, layout: str, wanted: str) -> Tensor:
    """``x`` in the layout ``wanted`` (a view)."""
    if layout == wanted:
        return x
    return plain_hybrid.to_tokens(x) if wanted == TOKENS else plain_hybrid.to_grid(x)


class HybridSupernet(nn.Module):
    """A hybrid supernet whose active subnet is a :class:`~nas.hybrid.arch.HybridArch` (``set_arch`` or
    ``forward(images, arch)``). Parameter names: ``stem``, ``stages.<i>.dsm.<kind>``, ``stages.<i>.blocks.<op>.<j>``,
    ``head``."""

    family: ClassVar[str] = "hybrid"

    def __init__(self, config: HybridSupernetConfig):
        super().__init__()
        self.config = config
        space = self.space = config.space
        style = STYLES[space.style]
        stem_channels = space.stem_channels or max(space.stages[0].channels)
        self.stem = ElasticConvNormAct(space.in_chans, stem_channels, 3, space.stem_stride, style.activation)
        # numpy, not torch: a supernet built on the meta device (nas.hybrid.export.rebuild) has no values to read
        rates = np.linspace(0, config.drop_path_rate, sum(max(s.depths) for s in space.stages)).tolist()
        stages, width = [], stem_channels
        for i, choices in enumerate(space.stages):
            depth = max(choices.depths)
            stages.append(HybridStage(space, i, width, rates[:depth]))
            rates, width = rates[depth:], max(choices.channels)
        self.stages = nn.ModuleList(stages)
        self.head = ElasticClassifierHead(width, space.num_classes, space.head_features, space.head_expansion,
                                          space.pre_logits, style.activation, config.head_dropout)
        self.reset_parameters()
        self.set_arch(space.max_arch())

    def reset_parameters(self) -> None:
        """timm's initialisation of linear layers (normal, std 0.02, zero bias), as UniNet and ElasticViT; convs keep
        torch's default. timm truncates the normal at +-2, that is +-100 std: the plain normal draw is the same
        distribution in practice, and ten times faster on a CPU. The last BatchNorm of every conv block starts at zero,
        so that each residual branch starts as nothing (UniNet's ``DWConvBlock``, ElasticViT's ``MobileBlock``)."""
        for module in self.modules():
            if isinstance(module, ElasticLinear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, ElasticInvertedResidual) and isinstance(module.bn3, ElasticBatchNorm2d):
                nn.init.zeros_(module.bn3.weight)

    def check_arch(self, arch: HybridArch) -> None:
        """Raise TypeError or ValueError naming the problem if ``arch`` is not a subnet of this supernet's space."""
        self.space.validate(arch)

    def set_arch(self, arch: HybridArch) -> None:
        """Make ``arch`` the active subnet (validated against the space first; a rejected arch changes nothing)."""
        self.check_arch(arch)
        width = self.space.stem_width(arch)
        self.stem.set_active(out_channels=width)
        layers, sides = [], []
        for stage_module, stage, side in zip(self.stages, arch.stages, self.space.grid_sides(arch.resolution)):
            stage_layers = stage_module.activate(stage, width, side, self.space.head_dim)
            layers, sides = layers + stage_layers, sides + [side] * len(stage_layers)
            width = stage.channels
        self.head.set_active(in_channels=width)
        self.arch, self.active_layers, self.active_sides = arch, layers, sides

    def forward(self, images: Tensor, arch: HybridArch | None = None) -> Tensor:
        """Logits ``[B, num_classes]`` of the subnet ``arch`` (which becomes the active one) or of the active one."""
        if arch is not None:
            self.set_arch(arch)
        space = self.space
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != space.in_chans \
                or images.shape[2] != images.shape[3]:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"HybridSupernet: expected square images [batch, {space.in_chans}, side, side], got "
                             f"{shape}")
        x, layout = self.stem(plain_hybrid.resize(images, self.arch.resolution)), GRID
        for module, wanted, layout_out in self.active_layers:
            x, layout = module(convert(x, layout, wanted)), layout_out
        return self.head(convert(x, layout, GRID))

    def recalibrate_batch_norm(self, batches: Iterable, arch: HybridArch | None = None) -> HybridSupernet:
        """Re-estimate every BatchNorm's running statistics for ``arch`` (default: the active subnet) on ``batches``
        (images, or tuples whose first item is the images), as ``elastic_ops.recalibrate_batch_norm`` does; the
        statistics of channels the subnet does not use are reset."""
        if arch is not None:
            self.set_arch(arch)
        return recalibrate_batch_norm(self, batches, lambda batch: self(batch[0] if isinstance(batch, (tuple, list))
                                                                         else batch))

    @torch.no_grad()
    def extract(self, arch: HybridArch | None = None) -> plain_hybrid.HybridNetwork:
        """A plain :class:`elastic_ops.plain_hybrid.HybridNetwork` holding copies of the active weights of ``arch``
        (default: the active subnet) and its BatchNorm statistics, in eval mode; it computes what the supernet
        computes for ``arch`` (recalibrate the BatchNorms first for meaningful statistics). It runs at ``arch``'s
        resolution only, so its relative position tables keep the rows of their own grid."""
        if arch is not None:
            self.set_arch(arch)
        layers, layout = [], GRID
        for (module, wanted, layout_out), side in zip(self.active_layers, self.active_sides):
            if layout != wanted:
                layers.append(plain_hybrid.ToTokens() if wanted == TOKENS else plain_hybrid.ToGrid())
            layers.append(own_grid_tables(module.extract(), side))
            layout = layout_out
        if layout != GRID:
            layers.append(plain_hybrid.ToGrid())
        return plain_hybrid.HybridNetwork(self.arch.resolution, self.stem.extract(), layers, self.head.extract()).eval()


__all__ = ["HybridStage", "HybridSupernet", "HybridSupernetConfig"]

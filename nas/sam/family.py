"""SAM's image encoder as a family (``nas.family``): SuperSAM's supernets over the encoder segment-anything builds.

The encoder's layers are the ViT family's (``nas.vit``: the same archs, samplers' decisions and batched branches);
what differs is the space (ImageEncoderViT's arguments under ``sam:``), the supernet (no class token, windowed
attention, SAM's relative position, the neck), its costs, its plain module and the names of SAM's pretrained
weights.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..family import Family, MemoryEstimate
from ..vit.family import FAMILY as VIT
from . import cost
from .arch import SamArch
from .plain import SamEncoder
from .space import SamSpace, is_sam


class SamFamily(Family):
    """The supernet and its plain encoder are imported when first used, so that spaces and costs load without
    them."""

    name = "sam"
    space_type = SamSpace
    arch_type = SamArch
    pretrained_init = True

    def owns_space_data(self, data: Mapping[str, Any]) -> bool:
        return is_sam(data)

    def build_supernet(self, space: SamSpace, drop_path_rate: float = 0.0):
        from .supernet import SamEncoderConfig, SamEncoderSupernet
        return SamEncoderSupernet(SamEncoderConfig.from_space(space, drop_path_rate=drop_path_rate))

    def memory_estimate(self, space: SamSpace) -> MemoryEstimate:
        """The ViT family's estimate of the blocks with each layer's attention scores counted over its own windows
        (SAM pads the grid to whole windows), plus the neck: a 1x1 and a 3x3 convolution to ``out_chans`` with a
        LayerNorm after each, and its two feature maps per image. Python ints, as the ViT family's."""
        vit = VIT.memory_estimate(space)
        side, tokens, heads = space.grid, space.max_tokens, space.max_heads
        scores = 0
        for layer in range(space.max_depth):
            window = space.window(layer)
            windows, span = (1, tokens) if window == 0 else (-(-side // window) ** 2, window * window)
            scores += 2 * heads * (windows * span * span - tokens * tokens)  # the ViT estimate's global scores, mended
        neck = space.max_embed_dim * space.out_chans + 9 * space.out_chans ** 2 + 4 * space.out_chans
        return MemoryEstimate(vit.parameters + neck, vit.activations + scores + 2 * tokens * space.out_chans,
                              vit.inference + 2 * tokens * space.out_chans)

    def params_many(self, archs, space: SamSpace) -> np.ndarray:
        return cost.params_many(archs, space)

    def macs_many(self, archs, space: SamSpace) -> np.ndarray:
        return cost.macs_many(archs, space)

    def cost_range(self, space: SamSpace, cost_of) -> tuple[float, float]:
        return cost.cost_range(space, cost_of)

    def batched_pass(self, supernet, archs: Sequence[SamArch], statistics=None) -> Callable[[Tensor], Tensor]:
        return supernet.batched_pass(archs)

    def pass_memory_per_image(self, supernet, archs: Sequence[SamArch], dtype: torch.dtype) -> int:
        return VIT.pass_memory_per_image(supernet, archs, dtype)

    def grouping_key(self, arch: SamArch) -> tuple:
        return VIT.grouping_key(arch)

    def extract(self, supernet, arch: SamArch) -> SamEncoder:
        return supernet.extract(arch)

    def subnet_config(self, model: SamEncoder, arch: SamArch, space: SamSpace) -> dict[str, Any]:
        if not isinstance(model, SamEncoder):
            raise TypeError(f"a SAM subnet is a nas.sam.plain.SamEncoder (see extract_subnet), got "
                            f"{type(model).__name__}")
        return model.kwargs()

    def rebuild(self, config: Mapping[str, Any], arch: SamArch) -> SamEncoder:
        return SamEncoder(**config)

    def decisions(self, space: SamSpace) -> list[Sequence[Any]]:
        return VIT.decisions(space)

    def decode_decisions(self, space: SamSpace, choices: np.ndarray):
        return VIT.decode_decisions(space, choices)

    def layer_drop_refusal(self, space: SamSpace) -> str | None:
        return None  # every SAM space drops layers (identity_layers)

    def pretrained_weights(self, weights: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
        """SAM's names (a whole SAM checkpoint's ``image_encoder.*``, or an encoder's own state dict) as the
        supernet's; a whole checkpoint's prompt encoder and mask decoder are not for the encoder."""
        from .supernet import pretrained_state
        return pretrained_state(weights)


FAMILY = SamFamily()

"""The search space of a SAM encoder supernet: SuperSAM's choices over an encoder that segment-anything builds.

A space's YAML names the encoder under a ``sam:`` key with the keyword arguments of segment-anything's
``ImageEncoderViT`` (``ImageEncoderViT(**sam, norm_layer=partial(nn.LayerNorm, eps=layer_norm_eps))`` builds its
largest subnet; SAM builds its encoders with ``eps=1e-6``, the default here), and beside it the choices SuperSAM
searches: ``depths`` (any layers may be dropped: ``identity_layers`` is always on), per-layer ``num_heads`` and
``mlp_ratios``, and optionally ``embed_dims``. The largest choice of each is the encoder's own size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from ..vit.space import SearchSpace
from .arch import SamArch, SamArchBatch

# ImageEncoderViT's arguments that this family reproduces, and the values it needs of the others.
ENCODER_ARGS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "out_chans",
                "window_size", "global_attn_indexes")
FIXED_ARGS = {"qkv_bias": True, "use_abs_pos": True, "use_rel_pos": True}  # SAM's released encoders
IGNORED_ARGS = ("rel_pos_zero_init",)  # initialisation only


@dataclass(frozen=True)
class SamSpace(SearchSpace):
    """A :class:`~nas.space.SearchSpace` of SAM encoder subnets (no class token: ``g * g`` tokens) plus the encoder's
    windowed attention (``window_size``; ``global_layers`` attend over the whole grid) and neck (``out_chans``)."""

    window_size: int = 14
    global_layers: tuple[int, ...] = ()
    out_chans: int = 256
    layer_norm_eps: float = 1e-6

    family: ClassVar[str] = "sam"
    arch_type: ClassVar[type] = SamArch
    batch_type: ClassVar[type] = SamArchBatch

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "global_layers", tuple(sorted({int(i) for i in self.global_layers})))
        if not self.identity_layers:
            raise ValueError("SamSpace: SuperSAM drops any layer; identity_layers must be true")
        if len(self.patch_sizes) != 1:
            raise ValueError(f"SamSpace: one patch size, got {self.patch_sizes}")
        if self.window_size < 0 or self.out_chans < 1:
            raise ValueError(f"SamSpace: window_size {self.window_size} must be >= 0 (0: global attention everywhere) "
                             f"and out_chans {self.out_chans} >= 1")
        bad = [i for i in self.global_layers if not 0 <= i < self.max_depth]
        if bad:
            raise ValueError(f"SamSpace: global layers {bad} outside 0..{self.max_depth - 1}")
        if self.num_classes and self.task != "segmentation":
            raise ValueError(f"SamSpace: SAM's encoder outputs a feature map, so its head is dense (a class per "
                             f"pixel); task must be segmentation, got {self.task!r}")
        if self.private_qk or self.private_class_tokens or self.relative_position or self.attn_dims:
            raise ValueError("SamSpace: SAM's encoder has no private q/k, class tokens, AutoFormer relative position "
                             "or attention widths of their own")

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_sizes[0]

    def num_tokens(self, patch_size: int | None = None) -> int:
        """Patch tokens only: SAM's encoder has no class token."""
        return (self.img_size // self.resolve_patch_size(patch_size)) ** 2

    def window(self, layer: int) -> int:
        """The window side of ``layer`` (0: it attends over the whole grid)."""
        return 0 if layer in self.global_layers else self.window_size

    @property
    def sam(self) -> dict[str, Any]:
        """The keyword arguments of segment-anything's ``ImageEncoderViT`` that build the largest subnet (with
        ``norm_layer=partial(nn.LayerNorm, eps=self.layer_norm_eps)``)."""
        return {"img_size": self.img_size, "patch_size": self.patch_sizes[0], "in_chans": self.in_chans,
                "embed_dim": self.max_embed_dim, "depth": self.max_depth, "num_heads": self.max_heads,
                "mlp_ratio": self.max_mlp_ratio, "out_chans": self.out_chans, "window_size": self.window_size,
                "global_attn_indexes": list(self.global_layers), **FIXED_ARGS}

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        for name in ("img_size", "patch_sizes", "in_chans", "head_dim", "window_size", "global_layers", "out_chans",
                     "identity_layers", "private_class_tokens", "private_qk", "relative_position"):
            del data[name]
        return {"family": self.family, **data, "sam": self.sam}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SamSpace":
        """A space from its YAML mapping: ``sam`` (ImageEncoderViT's arguments), the choices, ``num_classes``
        (0: the encoder's features, no head), ``task`` and ``layer_norm_eps``."""
        if not isinstance(data, dict) or not isinstance(data.get("sam"), dict):
            raise ValueError("SamSpace: expected a mapping with a 'sam' mapping of ImageEncoderViT's arguments")
        data = {name: value for name, value in data.items() if name != "family"}  # the key that names the family
        encoder = dict(data.pop("sam"))
        unknown = set(encoder) - set(ENCODER_ARGS) - set(FIXED_ARGS) - set(IGNORED_ARGS)
        missing = set(ENCODER_ARGS) - set(encoder)
        if unknown or missing:
            raise ValueError(f"SamSpace: sam: unknown arguments {sorted(unknown)}, missing {sorted(missing)} (of "
                             f"ImageEncoderViT's {', '.join(ENCODER_ARGS + tuple(FIXED_ARGS))})")
        wrong = [f"{name}={encoder[name]!r}" for name, value in FIXED_ARGS.items()
                 if name in encoder and encoder[name] != value]
        if wrong:
            raise ValueError(f"SamSpace: sam: {', '.join(wrong)} not supported (this family builds SAM's encoders as "
                             f"released: {FIXED_ARGS})")
        embed, heads, depth = int(encoder["embed_dim"]), int(encoder["num_heads"]), int(encoder["depth"])
        if heads < 1 or embed % heads:
            raise ValueError(f"SamSpace: sam: embed_dim {embed} is not a multiple of num_heads {heads}")
        data.setdefault("embed_dims", [embed])
        data.setdefault("depths", [depth])
        data.setdefault("num_heads", [heads])
        data.setdefault("mlp_ratios", [encoder["mlp_ratio"]])
        largest = {"embed_dims": embed, "depths": depth, "num_heads": heads}
        problems = [f"{name} largest {max(data[name])} is not sam's {value}" for name, value in largest.items()
                    if max(data[name]) != value]
        if not math.isclose(max(data["mlp_ratios"]), float(encoder["mlp_ratio"])):
            problems.append(f"mlp_ratios largest {max(data['mlp_ratios'])} is not sam's mlp_ratio "
                            f"{encoder['mlp_ratio']}")
        if problems:
            raise ValueError(f"SamSpace {data.get('name')!r}: the largest choices must be the encoder's: "
                             + "; ".join(problems))
        return super().from_dict({
            **data, "img_size": encoder["img_size"], "patch_sizes": [encoder["patch_size"]],
            "in_chans": encoder["in_chans"], "head_dim": embed // heads, "identity_layers": True,
            "window_size": encoder["window_size"], "global_layers": encoder["global_attn_indexes"],
            "out_chans": encoder["out_chans"]})


def is_sam(data: dict) -> bool:
    """Whether a space's mapping (a YAML file's contents) describes a SAM encoder space: it has a ``sam`` key."""
    return isinstance(data, dict) and "sam" in data


__all__ = ["SamSpace", "is_sam"]

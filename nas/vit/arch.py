"""A sub-network of the ViT supernet: its architecture, hashable and serialisable."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar

import numpy as np
import yaml

SIDES = ("left", "right")  # as elastic_ops.nn.SIDES; nas.vit.arch imports nothing heavy


@dataclass(frozen=True)
class Arch:
    """One subnet of a ViT supernet (DESIGN.md section 2).

    Per-layer fields have one entry per supernet layer (the supernet's max depth). ``layer_on[i]``
    False makes layer i an identity; AutoFormer's depth d is "the first d layers on" (``from_depth``).
    The MLP hidden size of layer i is ``int(embed_dim * mlp_ratio[i])``, as in AutoFormer.
    ``patch_size`` is None where the space has one patch size.
    ``attn_dim``: per layer, the attention's q/k/v width where the space chooses it as a gene of its own (ViTAS:
    ``SearchSpace.attn_dims``; a layer's head dim is then ``attn_dim[i] // num_heads[i]``), None where the width is
    ``num_heads * head_dim`` (AutoFormer; written out only when it is set).
    ``side``: which channels of the super weights every width reads, the leading (``"left"``, the default) or the
    trailing ones (``"right"``; two-sided width sharing, BCNet as ViTAS trains it). It is how the supernet runs the
    arch, not a gene: searches and the cost model ignore it, and it is written out only when it is ``"right"``.
    """

    family: ClassVar[str] = "vit"
    embed_dim: int
    num_heads: tuple[int, ...]
    mlp_ratio: tuple[float, ...]
    layer_on: tuple[bool, ...]
    patch_size: int | None = None
    side: str = "left"
    attn_dim: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.side not in SIDES:
            raise ValueError(f"Arch: side must be one of {SIDES}, got {self.side!r}")
        if self.attn_dim is not None:
            object.__setattr__(self, "attn_dim", tuple(int(w) for w in self.attn_dim))
            if len(self.attn_dim) != len(self.layer_on):
                raise ValueError(f"Arch: attn_dim ({len(self.attn_dim)}) must have one entry per supernet layer "
                                 f"({len(self.layer_on)})")
        # Normalise lists from JSON/YAML into tuples so that equal archs hash equally.
        object.__setattr__(self, "num_heads", tuple(int(h) for h in self.num_heads))
        try:
            object.__setattr__(self, "mlp_ratio", tuple(float(r) for r in self.mlp_ratio))
        except OverflowError:  # an int past a float's range, from an untrusted file
            raise ValueError(f"Arch: mlp_ratio {list(self.mlp_ratio)!r} holds a number too large for a float") from None
        object.__setattr__(self, "layer_on", tuple(bool(on) for on in self.layer_on))
        object.__setattr__(self, "embed_dim", int(self.embed_dim))
        if not (len(self.num_heads) == len(self.mlp_ratio) == len(self.layer_on)):
            raise ValueError(
                f"Arch: num_heads ({len(self.num_heads)}), mlp_ratio ({len(self.mlp_ratio)}) and layer_on "
                f"({len(self.layer_on)}) must have one entry per supernet layer"
            )

    @classmethod
    def from_depth(cls, embed_dim: int, depth: int, num_heads, mlp_ratio, max_depth: int,
                   patch_size: int | None = None, attn_dim=None) -> "Arch":
        """AutoFormer's form: the first ``depth`` of ``max_depth`` layers on. ``num_heads``/``mlp_ratio`` (and
        ``attn_dim``, None for none) are per active layer (length ``depth``) or per supernet layer (length
        ``max_depth``); an int or float applies to every layer."""
        def per_layer(value, fill):
            values = [value] * depth if isinstance(value, (int, float)) else list(value)
            if len(values) == depth:
                values += [fill] * (max_depth - depth)
            if len(values) != max_depth:
                raise ValueError(f"Arch.from_depth: expected {depth} or {max_depth} per-layer values, "
                                 f"got {len(values)}")
            return values

        def filled(value):
            # Inactive layers keep the last active layer's choice so that the arch stays inside its space.
            values = per_layer(value, None)
            last = values[max(depth - 1, 0)]
            return tuple(last if v is None else v for v in values)

        return cls(embed_dim, filled(num_heads), filled(mlp_ratio), tuple(i < depth for i in range(max_depth)),
                   patch_size, attn_dim=None if attn_dim is None else filled(attn_dim))

    @property
    def max_depth(self) -> int:
        return len(self.layer_on)

    @property
    def depth(self) -> int:
        return sum(self.layer_on)

    def hidden_features(self, layer: int) -> int:
        return int(self.embed_dim * self.mlp_ratio[layer])

    def attention_width(self, layer: int, head_dim: int) -> int:
        """The q/k/v width of ``layer``: its ``attn_dim`` gene, else ``num_heads * head_dim`` (the space's)."""
        return self.num_heads[layer] * head_dim if self.attn_dim is None else self.attn_dim[layer]

    def on_side(self, side: str) -> "Arch":
        """This arch read from the other ``side`` of the super weights."""
        return replace(self, side=side)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.side == "left":
            del data["side"]
        if self.attn_dim is None:
            del data["attn_dim"]
        else:
            data["attn_dim"] = list(self.attn_dim)
        for name in ("num_heads", "mlp_ratio", "layer_on"):
            data[name] = list(getattr(self, name))
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Arch":
        known = {"embed_dim", "num_heads", "mlp_ratio", "layer_on", "patch_size", "side", "attn_dim"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Arch: unknown field(s) {sorted(unknown)}; expected {sorted(known)}")
        missing = known - {"patch_size", "side", "attn_dim"} - set(data)
        if missing:
            raise ValueError(f"Arch: missing field(s) {sorted(missing)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Arch":
        return cls.from_dict(json.loads(text))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=True)

    @classmethod
    def from_yaml(cls, text: str) -> "Arch":
        return cls.from_dict(yaml.safe_load(text))


@dataclass(frozen=True)
class ArchBatch:
    """Many archs of one supernet as numpy arrays, for the vectorised cost model and samplers.

    Shapes, with K archs of L supernet layers: ``embed_dim`` [K] int64, ``num_heads`` [K, L] int64,
    ``mlp_ratio`` [K, L] float64, ``layer_on`` [K, L] bool, ``patch_size`` [K] int64 where 0 stands for
    ``Arch.patch_size=None`` (the space's only patch size), ``attn_dim`` [K, L] int64 or None (``Arch.attn_dim``).
    """

    family: ClassVar[str] = "vit"
    arch_type: ClassVar[type] = Arch  # what arch() gives (a family built on this one names its own)
    embed_dim: np.ndarray
    num_heads: np.ndarray
    mlp_ratio: np.ndarray
    layer_on: np.ndarray
    patch_size: np.ndarray
    attn_dim: np.ndarray | None = None

    def __post_init__(self):
        object.__setattr__(self, "embed_dim", np.asarray(self.embed_dim, dtype=np.int64).reshape(-1))
        object.__setattr__(self, "num_heads", np.atleast_2d(np.asarray(self.num_heads, dtype=np.int64)))
        object.__setattr__(self, "mlp_ratio", np.atleast_2d(np.asarray(self.mlp_ratio, dtype=np.float64)))
        object.__setattr__(self, "layer_on", np.atleast_2d(np.asarray(self.layer_on, dtype=bool)))
        object.__setattr__(self, "patch_size", np.asarray(self.patch_size, dtype=np.int64).reshape(-1))
        per_layer = [self.num_heads, self.mlp_ratio, self.layer_on]
        if self.attn_dim is not None:
            object.__setattr__(self, "attn_dim", np.atleast_2d(np.asarray(self.attn_dim, dtype=np.int64)))
            per_layer.append(self.attn_dim)
        k = len(self.embed_dim)
        shapes = {a.shape for a in per_layer}
        if len(shapes) != 1 or next(iter(shapes))[0] != k or len(self.patch_size) != k:
            raise ValueError(
                f"ArchBatch: expected embed_dim [K], patch_size [K] and per-layer arrays [K, L] with one K; got "
                f"embed_dim {self.embed_dim.shape}, num_heads {self.num_heads.shape}, "
                f"mlp_ratio {self.mlp_ratio.shape}, "
                f"layer_on {self.layer_on.shape}, patch_size {self.patch_size.shape}"
                + ("" if self.attn_dim is None else f", attn_dim {self.attn_dim.shape}")
            )

    @classmethod
    def from_archs(cls, archs) -> "ArchBatch":
        archs = list(archs)
        if not archs:
            raise ValueError("ArchBatch.from_archs: no archs given")
        if len({a.max_depth for a in archs}) != 1:
            raise ValueError(f"ArchBatch.from_archs: archs of different supernet depths "
                             f"{sorted({a.max_depth for a in archs})}")
        gene = {a.attn_dim is None for a in archs}
        if len(gene) != 1:
            raise ValueError("ArchBatch.from_archs: some archs have an attn_dim gene and some do not (archs of "
                             "different spaces)")
        return cls(
            embed_dim=[a.embed_dim for a in archs],
            num_heads=[a.num_heads for a in archs],
            mlp_ratio=[a.mlp_ratio for a in archs],
            layer_on=[a.layer_on for a in archs],
            patch_size=[a.patch_size or 0 for a in archs],
            attn_dim=None if gene.pop() else [a.attn_dim for a in archs],
        )

    def __len__(self) -> int:
        return len(self.embed_dim)

    @property
    def max_depth(self) -> int:
        return self.layer_on.shape[1]

    @property
    def hidden_features(self) -> np.ndarray:
        """[K, L] MLP hidden sizes, ``int(embed_dim * mlp_ratio)`` as in ``Arch.hidden_features``."""
        return np.floor(self.embed_dim[:, None] * self.mlp_ratio).astype(np.int64)

    def attention_width(self, head_dim: int) -> np.ndarray:
        """[K, L] q/k/v widths, as ``Arch.attention_width``."""
        return self.num_heads * head_dim if self.attn_dim is None else self.attn_dim

    def arch(self, index: int) -> Arch:
        patch = int(self.patch_size[index])
        return self.arch_type(
            int(self.embed_dim[index]),
            tuple(self.num_heads[index].tolist()),
            tuple(self.mlp_ratio[index].tolist()),
            tuple(self.layer_on[index].tolist()),
            patch or None,
            attn_dim=None if self.attn_dim is None else tuple(self.attn_dim[index].tolist()),
        )

    def archs(self) -> list[Arch]:
        return [self.arch(i) for i in range(len(self))]

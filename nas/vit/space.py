"""ViT search spaces: the choices, validation, sampling, evolution operators, and AutoFormer's config files (the
presets and ``load_space``, for every family: ``nas.spaces``).

Randomness: every function that draws takes a ``numpy.random.Generator`` (or an int seed, turned into
one with ``numpy.random.default_rng``). The number and order of draws depend only on the space and the
arguments, so DDP ranks holding generators seeded alike draw the same archs.

Archs returned by ``sample``/``mutate``/``crossover`` are canonical (``SearchSpace.canonical``):
an inactive layer holds the choices of the nearest active layer before it (of the first active layer
when none is before it), as ``Arch.from_depth`` does, so that equal networks are equal ``Arch``es.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import yaml

from ..rng import as_generator
from .arch import Arch, ArchBatch


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and (
        isinstance(value, int) or math.isfinite(value))


def _is_integer(value) -> bool:
    """An int, or a float with an integer value (YAML's 32.0); never a bool."""
    return _is_finite_number(value) and (isinstance(value, int) or value.is_integer())


def _choices(name: str, values, kind) -> tuple:
    if isinstance(values, (int, float)):
        values = [values]
    # int(True) is 1 and int(32.7) is 32: a file that says either means something else. NaN would pass every check.
    wrong = [v for v in values if not (_is_integer(v) if kind is int else _is_finite_number(v))]
    if wrong:
        raise ValueError(f"SearchSpace.{name}: choices must be finite {'integers' if kind is int else 'numbers'}, got "
                         f"{wrong[0]!r}")
    values = tuple(sorted({kind(v) for v in values}))
    if not values:
        raise ValueError(f"SearchSpace.{name}: needs at least one choice")
    if values[0] <= 0:
        raise ValueError(f"SearchSpace.{name}: choices must be positive, got {values}")
    return values


TASKS = ("classification", "segmentation")
QKV_BIAS_LAYOUTS = ("blocks", "autoformer")  # elastic_ops.nn.ElasticAttention's
CLASSIFIER_POOLS = ("token", "avg")


@dataclass(frozen=True)
class SupernetSizes:
    """The sizes of a supernet's stored weights: its embed dim, depth, heads and MLP ratio (hidden units
    ``int(embed_dim * mlp_ratio)``). AutoFormer trains supernets wider than its search space's largest choices (its
    YAML's SUPERNET section beside SEARCH_SPACE: AutoFormer-T stores 256 channels and searches 192-240); a subnet reads
    the leading part of the weights, as always."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float

    @property
    def hidden_features(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


@dataclass(frozen=True)
class SearchSpace:
    """Choices of a ViT supernet (DESIGN.md sections 2 and 7).

    ``depths`` are the allowed numbers of active layers; the supernet has ``max(depths)`` layers.
    Without ``identity_layers`` (AutoFormer) the first ``depth`` layers are on; with it (ViTAS) any
    layers may be identities. ``num_heads`` and ``mlp_ratios`` are per-layer choices; attention has
    ``num_heads * head_dim`` channels. With several ``patch_sizes`` every arch names its own.
    ``private_class_tokens``/``private_qk`` tell the supernet to keep a class token, position and patch
    embedding per patch size (so the space needs several), and q/k projections per head choice (ViTAS); they
    change neither sampling nor the subnet's cost. ``relative_position`` > 0 gives every layer AutoFormer's 2D relative
    position with that maximum distance (0: none); it adds to the cost but not to sampling.
    ``task``: ``"classification"`` (a class per image) or ``"segmentation"`` (a class per pixel: the head maps every
    patch token to its ``p x p`` pixels' logits, ``nas.vit.supernet``; one patch size only; ``num_classes`` counts the
    background class too). ``supernet``: the sizes of the stored weights where they exceed the largest choices
    (:class:`SupernetSizes`; a mapping in YAML; None: the largest choices). ``qkv_bias_layout``: ``"blocks"`` or
    ``"autoformer"`` (AutoFormer's q, k, v biases of ``h`` heads: one leading block ``bias[:3 * h * head_dim]``;
    ``elastic_ops.nn.ElasticAttention``). ``global_pool``: what a classifier reads, the class token or the patch
    tokens' mean (``"avg"``, AutoFormer's ``--gp``); ``layer_norm_eps``: the LayerNorms' eps (AutoFormer's: torch's
    1e-5); ``layer_scale``: the blocks scale each branch by a learnt vector (timm's LayerScale: CaiT, DeiT III).
    ``attn_dims`` (ViTAS): the attention's q/k/v widths, a per-layer gene of their own (``Arch.attn_dim``), so that a
    head has ``attn_dim / num_heads`` channels; every width must divide by every head count (the genes are drawn
    independently), the largest is the stored width ``num_heads * head_dim`` of the supernet, and the attention has
    neither relative position nor AutoFormer's bias layout, which assume the fixed head dim. Empty (the default): the
    width is ``num_heads * head_dim``. Choices are stored sorted and without repeats.
    """

    name: str
    embed_dims: tuple[int, ...]
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    mlp_ratios: tuple[float, ...]
    head_dim: int = 64
    patch_sizes: tuple[int, ...] = (16,)
    img_size: int = 224
    in_chans: int = 3
    num_classes: int = 1000
    identity_layers: bool = False
    private_class_tokens: bool = False
    private_qk: bool = False
    relative_position: int = 0
    task: str = "classification"
    supernet: SupernetSizes | None = None
    qkv_bias_layout: str = "blocks"
    global_pool: str = "token"
    layer_norm_eps: float = 1e-6
    layer_scale: bool = False
    attn_dims: tuple[int, ...] = ()

    family: ClassVar[str] = "vit"
    arch_type: ClassVar[type] = Arch
    batch_type: ClassVar[type] = ArchBatch

    def __post_init__(self):
        set_field = functools.partial(object.__setattr__, self)
        set_field("name", str(self.name))
        set_field("embed_dims", _choices("embed_dims", self.embed_dims, int))
        set_field("depths", _choices("depths", self.depths, int))
        set_field("num_heads", _choices("num_heads", self.num_heads, int))
        set_field("mlp_ratios", _choices("mlp_ratios", self.mlp_ratios, float))
        set_field("patch_sizes", _choices("patch_sizes", self.patch_sizes, int))
        for name, least in (("head_dim", 1), ("img_size", 1), ("in_chans", 1), ("relative_position", 0),
                            ("num_classes", 0)):
            value = getattr(self, name)
            if not _is_integer(value) or value < least:
                meaning = " (0: none)" if name == "relative_position" else ""
                raise ValueError(f"SearchSpace.{name}={value!r} must be an int >= {least}{meaning}")
            set_field(name, int(value))
        for name in ("identity_layers", "private_class_tokens", "private_qk", "layer_scale"):
            set_field(name, bool(getattr(self, name)))
        if self.task not in TASKS:
            raise ValueError(f"SearchSpace.task={self.task!r} must be one of {', '.join(TASKS)}")
        if self.task == "segmentation" and len(self.patch_sizes) > 1:
            raise ValueError(f"SearchSpace: a segmentation head predicts the pixels of one patch size, but the space "
                             f"has several {self.patch_sizes}")
        if self.qkv_bias_layout not in QKV_BIAS_LAYOUTS:
            raise ValueError(f"SearchSpace.qkv_bias_layout={self.qkv_bias_layout!r} must be one of "
                             f"{', '.join(QKV_BIAS_LAYOUTS)}")
        if self.qkv_bias_layout == "autoformer" and self.private_qk:
            raise ValueError("SearchSpace: AutoFormer's qkv bias layout goes with shared q/k, not private_qk")
        if self.global_pool not in CLASSIFIER_POOLS:
            raise ValueError(f"SearchSpace.global_pool={self.global_pool!r} must be one of "
                             f"{', '.join(CLASSIFIER_POOLS)}")
        if self.task == "segmentation" and self.global_pool != "token":
            raise ValueError("SearchSpace.global_pool: a segmentation head reads every patch token; leave it 'token'")
        if not (isinstance(self.layer_norm_eps, (int, float)) and 0 < self.layer_norm_eps < 1):
            raise ValueError(f"SearchSpace.layer_norm_eps={self.layer_norm_eps!r} must be a number in (0, 1)")
        set_field("layer_norm_eps", float(self.layer_norm_eps))
        if self.supernet is not None:
            set_field("supernet", self._supernet_sizes(self.supernet))
        if self.attn_dims is None or (isinstance(self.attn_dims, (tuple, list)) and not self.attn_dims):
            set_field("attn_dims", ())
        else:
            set_field("attn_dims", _choices("attn_dims", self.attn_dims, int))
            self._check_attn_dims()
        bad = [p for p in self.patch_sizes if self.img_size % p]
        if bad:
            raise ValueError(f"SearchSpace.patch_sizes {tuple(bad)} do not divide img_size={self.img_size}")
        if self.private_class_tokens and len(self.patch_sizes) == 1:
            raise ValueError(f"SearchSpace.private_class_tokens keeps a class token, position and patch embedding per "
                             f"patch size, but the only patch size is {self.patch_sizes[0]}; set it to false")
        if int(self.embed_dims[0] * self.mlp_ratios[0]) < 1:
            raise ValueError(f"SearchSpace: smallest MLP hidden size int({self.embed_dims[0]} * {self.mlp_ratios[0]}) "
                             "is 0")

    def _supernet_sizes(self, sizes) -> SupernetSizes:
        if isinstance(sizes, dict):
            names = {f.name for f in fields(SupernetSizes)}
            if set(sizes) != names:
                raise ValueError(f"SearchSpace.supernet: needs exactly {sorted(names)}, got {sorted(sizes)}")
            try:
                sizes = SupernetSizes(int(sizes["embed_dim"]), int(sizes["depth"]), int(sizes["num_heads"]),
                                      float(sizes["mlp_ratio"]))
            except (TypeError, ValueError) as error:
                raise ValueError(f"SearchSpace.supernet: sizes must be numbers: {error}") from None
        if not isinstance(sizes, SupernetSizes):
            raise ValueError(f"SearchSpace.supernet: expected a mapping of sizes, got {type(sizes).__name__}")
        smaller = [f"{name} {have} < {need}" for name, have, need in (
            ("embed_dim", sizes.embed_dim, self.max_embed_dim), ("num_heads", sizes.num_heads, self.max_heads),
            ("hidden units", sizes.hidden_features, self.max_hidden)) if have < need]
        if smaller:
            raise ValueError(f"SearchSpace.supernet: the stored weights must hold the largest choices: "
                             f"{', '.join(smaller)}")
        if sizes.depth != self.max_depth:
            raise ValueError(f"SearchSpace.supernet.depth={sizes.depth} must be the largest depth {self.max_depth} "
                             "(deeper layers would never run)")
        return sizes

    def _check_attn_dims(self) -> None:
        stored = self.supernet_sizes().num_heads * self.head_dim
        widest = self.attn_dims[-1]
        if widest > stored or (self.supernet is None and widest != stored):
            raise ValueError(f"SearchSpace.attn_dims: the widest attention {widest} must be the stored width num_heads "
                             f"* head_dim = {stored}" + (" or less" if self.supernet is not None else ""))
        uneven = [(w, h) for w in self.attn_dims for h in self.num_heads if w % h]
        if uneven:
            raise ValueError(f"SearchSpace.attn_dims: width {uneven[0][0]} does not divide by {uneven[0][1]} heads; "
                             "every width must divide by every head count")
        if self.relative_position or self.qkv_bias_layout != "blocks":
            raise ValueError("SearchSpace.attn_dims: relative position and AutoFormer's qkv bias layout assume the "
                             "fixed head dim; leave them off with attention widths")

    def supernet_sizes(self) -> SupernetSizes:
        """The sizes of the supernet's stored weights: ``supernet`` where given, else the largest choices."""
        return self.supernet or SupernetSizes(self.max_embed_dim, self.max_depth, self.max_heads, self.max_mlp_ratio)

    # -- derived sizes -------------------------------------------------------------------------------
    @property
    def max_embed_dim(self) -> int:
        return self.embed_dims[-1]

    @property
    def max_depth(self) -> int:
        return self.depths[-1]

    @property
    def max_heads(self) -> int:
        return self.num_heads[-1]

    @property
    def max_mlp_ratio(self) -> float:
        return self.mlp_ratios[-1]

    @property
    def max_hidden(self) -> int:
        return int(self.max_embed_dim * self.max_mlp_ratio)

    def num_tokens(self, patch_size: int | None = None) -> int:
        """Patches plus the class token; ``None`` means the only patch size of the space."""
        return (self.img_size // self.resolve_patch_size(patch_size)) ** 2 + 1

    @property
    def max_tokens(self) -> int:
        return self.num_tokens(self.patch_sizes[0])

    def resolve_patch_size(self, patch_size: int | None) -> int:
        if patch_size is None:
            if len(self.patch_sizes) > 1:
                raise ValueError(f"patch_size=None but space {self.name!r} has several patch sizes {self.patch_sizes}")
            return self.patch_sizes[0]
        return patch_size

    def narrowed_fields(self) -> list[tuple[str, SearchSpace]]:
        """Each size field with its largest value, and this space with that field cut to its smallest (the image to
        one patch): what ``nas.memory`` weighs to name the field an estimate owes most to."""
        cuts = {name: (getattr(self, name)[-1], {name: getattr(self, name)[:1]})
                for name in ("embed_dims", "depths", "num_heads", "mlp_ratios")}
        if self.attn_dims:  # fewer heads keep the widest width, which the stored weights hold
            cuts["num_heads"] = (self.max_heads, {"num_heads": self.num_heads[:1],
                                                  "head_dim": self.max_heads * self.head_dim // self.num_heads[0]})
        cuts["img_size"] = (self.img_size, {"img_size": math.lcm(*self.patch_sizes)})
        return [(f"{name} (largest {largest})", dataclasses.replace(self, **cut))
                for name, (largest, cut) in cuts.items()]

    # -- membership ----------------------------------------------------------------------------------
    def validate(self, arch: Arch) -> None:
        """Raise ValueError naming the first field of ``arch`` that is outside this space."""
        if not isinstance(arch, Arch):
            raise TypeError(f"expected an Arch, got {type(arch).__name__}")
        where = f"space {self.name!r}"
        if arch.max_depth != self.max_depth:
            raise ValueError(f"arch has {arch.max_depth} layers (len(arch.layer_on)) but {where} has max depth "
                             f"{self.max_depth}")
        if arch.embed_dim not in self.embed_dims:
            raise ValueError(f"arch.embed_dim={arch.embed_dim} not in {self.embed_dims} ({where})")
        for i, (heads, ratio) in enumerate(zip(arch.num_heads, arch.mlp_ratio)):
            if heads not in self.num_heads:
                raise ValueError(f"arch.num_heads[{i}]={heads} not in {self.num_heads} ({where})")
            if not any(math.isclose(ratio, r, rel_tol=1e-9) for r in self.mlp_ratios):
                raise ValueError(f"arch.mlp_ratio[{i}]={ratio} not in {self.mlp_ratios} ({where})")
        if (arch.attn_dim is None) != (not self.attn_dims):
            raise ValueError(f"arch.attn_dim is {'missing' if arch.attn_dim is None else 'set'} but {where} "
                             f"{'chooses attention widths ' + str(self.attn_dims) if self.attn_dims else 'has none'}")
        for i, width in enumerate(arch.attn_dim or ()):
            if width not in self.attn_dims:
                raise ValueError(f"arch.attn_dim[{i}]={width} not in {self.attn_dims} ({where})")
        if arch.depth not in self.depths:
            raise ValueError(f"arch.depth={arch.depth} (layers on) not in {self.depths} ({where})")
        if not self.identity_layers and arch.layer_on != tuple(i < arch.depth for i in range(self.max_depth)):
            first_gap = arch.layer_on.index(False)
            raise ValueError(
                f"arch.layer_on[{first_gap}]=False before an active layer: {where} turns on the first `depth` layers "
                "only"
            )
        if arch.patch_size is None:
            if len(self.patch_sizes) > 1:
                raise ValueError(f"arch.patch_size=None but {where} has several patch sizes {self.patch_sizes}")
        elif arch.patch_size not in self.patch_sizes:
            raise ValueError(f"arch.patch_size={arch.patch_size} not in {self.patch_sizes} ({where})")

    def contains(self, arch: Arch) -> bool:
        try:
            self.validate(arch)
        except (ValueError, TypeError):
            return False
        return True

    def canonical(self, arch: Arch) -> Arch:
        """The same network with inactive layers holding their nearest active layer's choices."""
        return self.canonical_batch(self.batch_type.from_archs([arch])).arch(0)

    def canonical_batch(self, batch: ArchBatch) -> ArchBatch:
        """``canonical`` of every arch of a batch, vectorised."""
        layers = np.arange(batch.max_depth)
        source = np.maximum.accumulate(np.where(batch.layer_on, layers, -1), axis=1)
        source = np.where(source < 0, batch.layer_on.argmax(axis=1)[:, None], source)
        return self.batch_type(
            batch.embed_dim,
            np.take_along_axis(batch.num_heads, source, axis=1),
            np.take_along_axis(batch.mlp_ratio, source, axis=1),
            batch.layer_on,
            batch.patch_size,
            None if batch.attn_dim is None else np.take_along_axis(batch.attn_dim, source, axis=1),
        )

    def max_arch(self) -> Arch:
        """The largest and most costly arch: every maximum, all layers on, the smallest patch size."""
        return self._uniform_arch(self.max_embed_dim, self.max_depth, self.max_heads, self.max_mlp_ratio,
                                  self.patch_sizes[0], self.attn_dims[-1:])

    def min_arch(self) -> Arch:
        """The smallest and cheapest arch: every minimum, the first ``min(depths)`` layers on, the largest patch
        size."""
        return self._uniform_arch(self.embed_dims[0], self.depths[0], self.num_heads[0], self.mlp_ratios[0],
                                  self.patch_sizes[-1], self.attn_dims[:1])

    def _uniform_arch(self, embed_dim, depth, heads, ratio, patch_size, attn_dim: tuple[int, ...]) -> Arch:
        """``attn_dim``: the width of every layer, or () where the space has no attention widths."""
        patch = patch_size if len(self.patch_sizes) > 1 else None
        return self.arch_type.from_depth(embed_dim, depth, heads, ratio, self.max_depth, patch,
                                         attn_dim=attn_dim[0] if attn_dim else None)

    # -- sampling ------------------------------------------------------------------------------------
    def sample_many(self, rng: np.random.Generator | int, count: int) -> ArchBatch:
        """``count`` uniform draws, AutoFormer style: a depth, one embed dim, per-layer heads and MLP
        ratios (and a patch size where there are several). With identity layers, the active layers
        are a uniform subset of the drawn size."""
        return self.canonical_batch(self._draw(as_generator(rng), int(count)))

    def _draw(self, rng: np.random.Generator, n: int) -> ArchBatch:
        """Uniform draws, not yet canonical (inactive layers hold random choices)."""
        choices, layers = self._choice_arrays, self.max_depth
        depth = choices["depths"][rng.integers(len(self.depths), size=n)]
        if self.identity_layers:
            order = rng.random((n, layers)).argsort(axis=1).argsort(axis=1)
            layer_on = order < depth[:, None]
        else:
            layer_on = np.arange(layers) < depth[:, None]
        return self.batch_type(
            embed_dim=choices["embed_dims"][rng.integers(len(self.embed_dims), size=n)],
            num_heads=choices["num_heads"][rng.integers(len(self.num_heads), size=(n, layers))],
            mlp_ratio=choices["mlp_ratios"][rng.integers(len(self.mlp_ratios), size=(n, layers))],
            layer_on=layer_on,
            patch_size=(choices["patch_sizes"][rng.integers(len(self.patch_sizes), size=n)]
                        if len(self.patch_sizes) > 1 else np.zeros(n, dtype=np.int64)),
            attn_dim=(choices["attn_dims"][rng.integers(len(self.attn_dims), size=(n, layers))]
                      if self.attn_dims else None),
        )

    @functools.cached_property
    def _choice_arrays(self) -> dict[str, np.ndarray]:
        names = ("embed_dims", "depths", "num_heads", "mlp_ratios", "patch_sizes", "attn_dims")
        return {name: np.asarray(getattr(self, name)) for name in names}

    def sample(self, rng: np.random.Generator | int) -> Arch:
        return self.sample_many(rng, 1).arch(0)

    def sample_where(self, rng: np.random.Generator | int, accept: Callable[[ArchBatch], np.ndarray], what: str,
                     max_tries: int = 64, batch_size: int = 256) -> Arch:
        """A uniform draw conditioned on ``accept(batch)`` (a bool mask over a batch of draws), by rejection over
        vectorised batches of candidates (32 first, growing to ``batch_size``). ``what`` names the condition in the
        RuntimeError raised when no draw of ``max_tries`` batches meets it."""
        rng = as_generator(rng)
        # Small batches first: a condition that a good share of the space meets is met by the first few draws.
        draws, drawn = min(32, batch_size), 0
        for _ in range(max_tries):
            batch = self._draw(rng, draws)
            drawn += draws
            hits = np.flatnonzero(accept(batch))
            if hits.size:
                return self.canonical(batch.arch(int(hits[0])))
            draws = min(4 * draws, batch_size)
        raise RuntimeError(f"no arch of space {self.name!r} in {what} after {drawn} uniform draws; widen the window "
                           "or raise max_tries")

    # -- evolution -----------------------------------------------------------------------------------
    def mutate(self, arch: Arch, rng: np.random.Generator | int, prob: float = 0.2,
               depth_embed_prob: float = 0.4) -> Arch:
        """AutoFormer's evolution mutation: with ``depth_embed_prob`` redraw the depth (new layers get
        fresh choices), then redraw each active layer's MLP ratio and heads (and attention width, where the space
        has attention widths) with ``prob`` each, then the embed dim (and the patch size, where there are several)
        with ``depth_embed_prob``. With identity layers a new depth switches random layers on or off."""
        self.validate(arch)
        rng = as_generator(rng)
        heads, ratios, layer_on = list(arch.num_heads), list(arch.mlp_ratio), list(arch.layer_on)
        widths = list(arch.attn_dim or ())
        embed_dim, patch_size = arch.embed_dim, arch.patch_size
        if rng.random() < depth_embed_prob:
            new_depth = self._pick(rng, self.depths)
            on = [i for i, active in enumerate(layer_on) if active]
            off = [i for i, active in enumerate(layer_on) if not active]
            if self.identity_layers:
                if new_depth > len(on):
                    switched = rng.permutation(off)[: new_depth - len(on)].tolist()
                else:
                    switched = rng.permutation(on)[: len(on) - new_depth].tolist()
            else:
                switched = list(range(min(len(on), new_depth), max(len(on), new_depth)))
            for i in sorted(switched):
                layer_on[i] = not layer_on[i]
                if layer_on[i]:
                    heads[i], ratios[i] = self._pick(rng, self.num_heads), self._pick(rng, self.mlp_ratios)
                    if widths:
                        widths[i] = self._pick(rng, self.attn_dims)
        active = [i for i, on in enumerate(layer_on) if on]
        for i in active:
            if rng.random() < prob:
                ratios[i] = self._pick(rng, self.mlp_ratios)
        for i in active:
            if rng.random() < prob:
                heads[i] = self._pick(rng, self.num_heads)
        for i in active if widths else ():
            if rng.random() < prob:
                widths[i] = self._pick(rng, self.attn_dims)
        if rng.random() < depth_embed_prob:
            embed_dim = self._pick(rng, self.embed_dims)
        if len(self.patch_sizes) > 1 and rng.random() < depth_embed_prob:
            patch_size = self._pick(rng, self.patch_sizes)
        return self.canonical(self.arch_type(embed_dim, tuple(heads), tuple(ratios), tuple(layer_on), patch_size,
                                             attn_dim=tuple(widths) if widths else None))

    def crossover(self, a: Arch, b: Arch, rng: np.random.Generator | int) -> Arch:
        """AutoFormer's uniform crossover: every gene from either parent with probability 1/2. The
        genes are the embed dim, the patch size, the set of active layers (the depth) and each layer's
        heads and MLP ratio (and attention width, where the space has attention widths)."""
        self.validate(a)
        self.validate(b)
        rng = as_generator(rng)
        layers = self.max_depth
        from_a = rng.random(3 + (3 if self.attn_dims else 2) * layers) < 0.5

        def per_layer(x: tuple, y: tuple, gene: int) -> tuple:
            picks = from_a[3 + gene * layers:3 + (gene + 1) * layers]
            return tuple(p if pick else q for p, q, pick in zip(x, y, picks))

        child = self.arch_type(
            a.embed_dim if from_a[0] else b.embed_dim,
            per_layer(a.num_heads, b.num_heads, 0),
            per_layer(a.mlp_ratio, b.mlp_ratio, 1),
            a.layer_on if from_a[1] else b.layer_on,
            a.patch_size if from_a[2] else b.patch_size,
            attn_dim=per_layer(a.attn_dim, b.attn_dim, 2) if self.attn_dims else None,
        )
        return self.canonical(child)

    @staticmethod
    def _pick(rng: np.random.Generator, values: tuple):
        return values[int(rng.integers(len(values)))]

    # -- categorical genes (REINFORCE, TPE) ------------------------------------------------------------------
    def genes(self) -> list[tuple[str, tuple]]:
        """The space as independent categorical genes: embed dim, depth, patch size (where several), and per layer
        heads and MLP ratio; with identity layers, per layer an on/off preference; with attention widths, per layer
        the width."""
        layers = range(self.max_depth)
        genes: list[tuple[str, tuple]] = [("embed_dim", self.embed_dims), ("depth", self.depths)]
        if len(self.patch_sizes) > 1:
            genes.append(("patch_size", self.patch_sizes))
        genes += [(f"num_heads_{i}", self.num_heads) for i in layers]
        genes += [(f"mlp_ratio_{i}", self.mlp_ratios) for i in layers]
        if self.identity_layers:
            genes += [(f"layer_on_{i}", (False, True)) for i in layers]
        if self.attn_dims:
            genes += [(f"attn_dim_{i}", self.attn_dims) for i in layers]
        return genes

    def decode_genes(self, indices: np.ndarray) -> ArchBatch:
        """Canonical archs from ``[B, genes]`` choice indices (in the order of :meth:`genes`). With identity layers,
        the layers that prefer to be on come first, in order, and the depth gene says how many are on."""
        indices = np.atleast_2d(np.asarray(indices, dtype=np.int64))
        values = {name: np.asarray(choices)[indices[:, g]] for g, (name, choices) in enumerate(self.genes())}
        layers = range(self.max_depth)
        depth = values["depth"]
        if self.identity_layers:
            prefers_off = ~np.stack([values[f"layer_on_{i}"] for i in layers], axis=1)
            order = np.argsort(prefers_off, axis=1, kind="stable")
            layer_on = np.argsort(order, axis=1) < depth[:, None]
        else:
            layer_on = np.arange(self.max_depth) < depth[:, None]
        batch = self.batch_type(values["embed_dim"], np.stack([values[f"num_heads_{i}"] for i in layers], axis=1),
                                np.stack([values[f"mlp_ratio_{i}"] for i in layers], axis=1), layer_on,
                                values.get("patch_size", np.zeros(len(indices), dtype=np.int64)),
                                np.stack([values[f"attn_dim_{i}"] for i in layers], axis=1) if self.attn_dims else None)
        return self.canonical_batch(batch)

    # -- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        def plain(value):
            return list(value) if isinstance(value, tuple) else asdict(value) if is_dataclass(value) else value
        data = {f.name: plain(getattr(self, f.name)) for f in fields(self)}
        if not self.attn_dims:  # a space without attention widths reads as it did before they existed
            del data["attn_dims"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SearchSpace":
        if not isinstance(data, dict):
            raise ValueError(f"SearchSpace: expected a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"SearchSpace: unknown field(s) {sorted(unknown)}; expected some of {sorted(known)}")
        missing = {"name", "embed_dims", "depths", "num_heads", "mlp_ratios"} - set(data)
        if missing:
            raise ValueError(f"SearchSpace: missing field(s) {sorted(missing)}")
        return cls(**data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "SearchSpace":
        return cls.from_dict(yaml.safe_load(text))


# -- AutoFormer's own config files (microsoft/Cream, AutoFormer/experiments) ------------------------------
def _autoformer_section(config: dict, section: str, path,
                        keys=("MLP_RATIO", "NUM_HEADS", "DEPTH", "EMBED_DIM")) -> dict:
    values = config.get(section)
    if not isinstance(values, dict):
        raise ValueError(f"{path}: no {section} section")
    missing = [k for k in keys if k not in values]
    if missing:
        raise ValueError(f"{path}: {section} lacks {', '.join(missing)}")
    return values


def _read_autoformer_config(path) -> dict:
    config = yaml.safe_load(Path(path).read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not an AutoFormer config (expected a mapping with SEARCH_SPACE or RETRAIN)")
    return config


def read_autoformer_space(path: str | os.PathLike, name: str | None = None, **overrides) -> SearchSpace:
    """The space of an AutoFormer supernet or subnet YAML: its SEARCH_SPACE section (MLP_RATIO, NUM_HEADS, DEPTH,
    EMBED_DIM lists) and, where there is one, its SUPERNET section (the sizes of the stored weights, which may exceed
    the choices: ``SearchSpace.supernet``), with AutoFormer's qkv bias layout, patch-token pooling (``--gp``, as its
    released supernets) and LayerNorm eps. AutoFormer's ImageNet defaults (224 px, patch 16, head dim 64, 1000
    classes) apply unless ``overrides`` set other SearchSpace fields."""
    config = _read_autoformer_config(path)
    s = _autoformer_section(config, "SEARCH_SPACE", path)
    if "SUPERNET" in config:
        sizes = _autoformer_section(config, "SUPERNET", path)
        overrides.setdefault("supernet", {"embed_dim": sizes["EMBED_DIM"], "depth": sizes["DEPTH"],
                                          "num_heads": sizes["NUM_HEADS"], "mlp_ratio": sizes["MLP_RATIO"]})
    for field_name, value in (("qkv_bias_layout", "autoformer"), ("global_pool", "avg"), ("layer_norm_eps", 1e-5)):
        overrides.setdefault(field_name, value)
    return SearchSpace(name=name or Path(path).stem, embed_dims=s["EMBED_DIM"], depths=s["DEPTH"],
                       num_heads=s["NUM_HEADS"], mlp_ratios=s["MLP_RATIO"], **overrides)


def read_autoformer_subnet(path: str | os.PathLike, max_depth: int | None = None) -> Arch:
    """The RETRAIN section of an AutoFormer subnet YAML (per-layer MLP_RATIO and NUM_HEADS lists,
    DEPTH and EMBED_DIM ints) as an Arch with the first DEPTH of ``max_depth`` layers on.
    ``max_depth`` defaults to the file's largest SEARCH_SPACE depth (else SUPERNET.DEPTH, else DEPTH).
    The arch is not checked against the file's SEARCH_SPACE: the released AutoFormer-T uses MLP ratio
    3.0, which its own space (3.5, 4) lacks."""
    config = _read_autoformer_config(path)
    r = _autoformer_section(config, "RETRAIN", path)
    depth = int(r["DEPTH"])
    for key in ("MLP_RATIO", "NUM_HEADS"):
        if not isinstance(r[key], list) or len(r[key]) != depth:
            raise ValueError(f"{path}: RETRAIN.{key} must list one value per layer (DEPTH={depth}), got {r[key]!r}")
    if max_depth is None:
        search_depths = config.get("SEARCH_SPACE", {}).get("DEPTH")
        max_depth = max(search_depths) if search_depths else int(config.get("SUPERNET", {}).get("DEPTH", depth))
    if depth > max_depth:
        raise ValueError(f"{path}: RETRAIN.DEPTH={depth} exceeds the supernet's max depth {max_depth}")
    return Arch.from_depth(r["EMBED_DIM"], depth, r["NUM_HEADS"], r["MLP_RATIO"], max_depth)


def read_autoformer_yaml(path: str | os.PathLike) -> SearchSpace | Arch:
    """An AutoFormer YAML: the subnet (Arch) when it has a RETRAIN section, else its SearchSpace."""
    if "RETRAIN" in _read_autoformer_config(path):
        return read_autoformer_subnet(path)
    return read_autoformer_space(path)


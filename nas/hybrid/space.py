"""Hybrid search spaces (ElasticViT, UniNet): the choices of each stage, validation, sampling, evolution operators and
their YAML form (DESIGN.md section 9).

A hybrid space offers the same methods, under the same names, as the ViT ``SearchSpace`` (``validate``, ``canonical``,
``min_arch``, ``max_arch``, ``sample``, ``sample_many``, ``sample_where``, ``mutate``, ``crossover``, ``genes`` and
``decode_genes``), so that the samplers and searchers work on either. Randomness follows ``nas.vit.space``: every
function that draws takes a ``numpy.random.Generator`` or an int seed, and the number and order of draws depend only on
the space and the arguments.

Archs returned by the sampling and evolution operators are canonical: a field that does not apply to a stage's
operator (the kernel size of a non-conv stage, the V-scale of a stage that is not a V-scale attention stage) is 0, so
that equal networks are equal archs.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np
import yaml

from ..rng import as_generator
from .arch import DSMS, OPS, STAGE_FIELDS, HybridArch, HybridArchBatch, Stage, check_mapping
from .style import STYLES

NUMERIC_CHOICES = ("depths", "channels", "expansions", "kernel_sizes", "v_scales")
ATTENTION_DSMS = ("local-global", "global")  # DSMs with attention heads: they need channels >= head_dim


def _numbers(where: str, values, allow_empty: bool = False) -> tuple[int, ...]:
    values = [values] if isinstance(values, int) else list(values)
    if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in values):
        raise ValueError(f"{where} must be integers, got {values}")
    choices = tuple(sorted({int(v) for v in values}))
    if not choices and not allow_empty:
        raise ValueError(f"{where} needs at least one choice")
    if choices and choices[0] <= 0:
        raise ValueError(f"{where} must be positive, got {choices}")
    return choices


def _names(where: str, values, known: tuple[str, ...]) -> tuple[str, ...]:
    values = [values] if isinstance(values, str) else list(values)
    unknown = [v for v in values if v not in known]
    if unknown or not values:
        raise ValueError(f"{where} must be some of {', '.join(known)}, got {values}")
    return tuple(dict.fromkeys(values))


@dataclass(frozen=True)
class StageChoices:
    """The choices of one stage. ``ops`` and ``dsms`` are listed so that the first is the cheapest at the stage's
    smallest sizes and the last the costliest at its largest: ``min_arch`` takes the first, ``max_arch`` the last
    (numeric choices are sorted). Which operator costs most depends on the sizes, so the order is the space's to
    declare; ``nas.costs.cost_range`` finds the true extremes of any cost whatever the order. ``stride`` is the
    stage's downsampling (done by its DSM, or with ``dsms: [none]`` by its first block); ``se``: its conv blocks have
    squeeze-excite; ``v_scales``: ElasticViT's value widths, for the attention stages of the ``elasticvit`` style
    only."""

    ops: tuple[str, ...]
    depths: tuple[int, ...]
    channels: tuple[int, ...]
    expansions: tuple[int, ...]
    kernel_sizes: tuple[int, ...] = (3,)
    v_scales: tuple[int, ...] = ()
    dsms: tuple[str, ...] = ("none",)
    stride: int = 1
    se: bool = False

    def __post_init__(self):
        set_field = functools.partial(object.__setattr__, self)
        set_field("ops", _names("ops", self.ops, OPS))
        set_field("dsms", _names("dsms", self.dsms, DSMS))
        for name in NUMERIC_CHOICES:
            set_field(name, _numbers(name, getattr(self, name), allow_empty=name == "v_scales"))
        if any(k % 2 == 0 for k in self.kernel_sizes):
            raise ValueError(f"kernel_sizes {self.kernel_sizes} must be odd (a smaller kernel is the centre of the "
                             "largest)")
        if self.stride not in (1, 2):
            raise ValueError(f"stride={self.stride} must be 1 or 2")
        set_field("se", bool(self.se))
        if "none" in self.dsms and (len(self.dsms) > 1 or self.ops != ("conv",)):
            raise ValueError(f"dsms {list(self.dsms)}: 'none' makes the first block downsample and change the width, "
                             "which only a conv stage can do; it cannot be mixed with other DSMs (the block's stride "
                             "is fixed)")

    def applies(self, op: str, field: str) -> bool:
        """Whether ``field`` (kernel_size, v_scale) applies to a stage of operator ``op`` (depth, channels,
        expansion and dsm always do)."""
        if field == "kernel_size":
            return op == "conv"
        if field == "v_scale":
            return op == "attention" and bool(self.v_scales)
        return True


@dataclass(frozen=True)
class HybridSpace:
    """The choices of a hybrid supernet: per stage a :class:`StageChoices`, and for the whole network the input
    ``resolutions`` (square images), the ``style`` of its blocks (``nas.hybrid.style``), the stem and the head.

    Stem: a 3x3 conv with ``stem_stride``, BatchNorm and the activation, to ``stem_channels`` (None: the first stage's
    channels, as ElasticViT's stem). Head: a 1x1 conv to ``head_features`` channels (UniNet: 1280), or to
    ``head_expansion`` times the last stage's channels (ElasticViT: 6), BatchNorm and the activation, global average
    pooling, then with ``pre_logits`` > 0 a linear layer to that width and the activation (ElasticViT: 1984), and the
    classifier. Attention has heads of ``head_dim`` channels; the MLP operator's token MLP has
    ``token_mlp_ratio`` times the tokens of its largest grid hidden units.
    """

    name: str
    style: str
    resolutions: tuple[int, ...]
    stages: tuple[StageChoices, ...]
    stem_channels: int | None = None
    stem_stride: int = 2
    head_features: int = 0
    head_expansion: int = 0
    pre_logits: int = 0
    head_dim: int = 32
    token_mlp_ratio: float = 0.5
    in_chans: int = 3
    num_classes: int = 1000

    family: ClassVar[str] = "hybrid"
    arch_type: ClassVar[type] = HybridArch
    task: ClassVar[str] = "classification"  # a hybrid supernet's head pools its last stage

    def __post_init__(self):
        set_field = functools.partial(object.__setattr__, self)
        set_field("name", str(self.name))
        if self.style not in STYLES:
            raise ValueError(f"style={self.style!r} must be one of {', '.join(STYLES)}")
        set_field("resolutions", _numbers("resolutions", self.resolutions))
        stages = tuple(s if isinstance(s, StageChoices) else self._stage_from_dict(i, s)
                       for i, s in enumerate(self.stages))
        if not stages:
            raise ValueError("stages: needs at least one stage")
        set_field("stages", stages)
        for name in ("stem_stride", "head_dim", "in_chans"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
            set_field(name, int(getattr(self, name)))
        for name in ("head_features", "head_expansion", "pre_logits", "num_classes"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
            set_field(name, int(getattr(self, name)))
        if (self.head_features > 0) == (self.head_expansion > 0):
            raise ValueError("set one of head_features (a fixed head width) and head_expansion (times the last stage's "
                             f"channels), got {self.head_features} and {self.head_expansion}")
        if self.stem_channels is not None:
            if int(self.stem_channels) <= 0:
                raise ValueError(f"stem_channels={self.stem_channels} must be positive (or null: the first stage's)")
            set_field("stem_channels", int(self.stem_channels))
        if not float(self.token_mlp_ratio) > 0:
            raise ValueError(f"token_mlp_ratio={self.token_mlp_ratio} must be positive")
        set_field("token_mlp_ratio", float(self.token_mlp_ratio))
        self._check_stages()

    @staticmethod
    def _stage_from_dict(index: int, data) -> StageChoices:
        check_mapping(f"stages[{index}]", data, [f.name for f in fields(StageChoices)],
                      ("ops", "depths", "channels", "expansions"))
        try:
            return StageChoices(**data)
        except (ValueError, TypeError) as error:
            raise ValueError(f"stages[{index}]: {error}") from error

    def _check_stages(self) -> None:
        style = STYLES[self.style]
        for i, stage in enumerate(self.stages):
            attends = "attention" in stage.ops or set(stage.dsms) & set(ATTENTION_DSMS)
            if attends and stage.channels[0] < self.head_dim:
                raise ValueError(f"stages[{i}]: attention needs channels >= head_dim={self.head_dim} (one head), but "
                                 f"the smallest is {stage.channels[0]}")
            if bool(stage.v_scales) != (style.v_scale and "attention" in stage.ops):
                raise ValueError(f"stages[{i}]: v_scales are for the attention stages of the elasticvit style "
                                 f"(V-scale attention); style {self.style!r}, ops {list(stage.ops)}, v_scales "
                                 f"{list(stage.v_scales)}")

    # -- sizes -----------------------------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def img_size(self) -> int:
        """The largest resolution: the size of the images a data set gives (smaller ones are resized to)."""
        return self.resolutions[-1]

    def grid_sides(self, resolution: int) -> tuple[int, ...]:
        """The side of each stage's feature map (and token grid) at ``resolution``: every stride rounds up, as a
        padded conv, max-pool or strided slice does."""
        side, sides = -(-resolution // self.stem_stride), []
        for stage in self.stages:
            side = -(-side // stage.stride)
            sides.append(side)
        return tuple(sides)

    def token_hidden(self, stage: int) -> int:
        """Hidden units of the MLP operator's token MLP in ``stage``: fixed, from its largest grid."""
        side = self.grid_sides(self.img_size)[stage]
        return max(1, round(self.token_mlp_ratio * side * side))

    def stem_width(self, arch: HybridArch) -> int:
        """The stem's channels: ``stem_channels``, or the first stage's."""
        return arch.stages[0].channels if self.stem_channels is None else self.stem_channels

    # -- membership ------------------------------------------------------------------------------------------
    def validate(self, arch: HybridArch) -> None:
        """Raise ValueError naming the first field of ``arch`` that is outside this space."""
        if not isinstance(arch, HybridArch):
            raise TypeError(f"expected a HybridArch for hybrid space {self.name!r}, got {type(arch).__name__}")
        where = f"space {self.name!r}"
        if arch.num_stages != self.num_stages:
            raise ValueError(f"arch has {arch.num_stages} stages but {where} has {self.num_stages}")
        if arch.resolution not in self.resolutions:
            raise ValueError(f"arch.resolution={arch.resolution} not in {self.resolutions} ({where})")
        for i, (stage, choices) in enumerate(zip(arch.stages, self.stages)):
            checks = [("op", choices.ops), ("depth", choices.depths), ("channels", choices.channels),
                      ("expansion", choices.expansions), ("kernel_size", choices.kernel_sizes),
                      ("v_scale", choices.v_scales), ("dsm", choices.dsms)]
            for name, allowed in checks:
                value = getattr(stage, name)
                if not choices.applies(stage.op, name):
                    allowed = (0,)  # canonical: a field that does not apply is 0
                if value not in allowed:
                    for_op = f"; {name} does not apply to operator {stage.op!r}" if allowed == (0,) else ""
                    raise ValueError(f"arch.stages[{i}].{name}={value!r} not in {tuple(allowed)} ({where}{for_op})")

    def contains(self, arch: HybridArch) -> bool:
        try:
            self.validate(arch)
        except (ValueError, TypeError):
            return False
        return True

    def canonical(self, arch: HybridArch) -> HybridArch:
        return self.canonical_batch(HybridArchBatch.from_archs([arch])).arch(0)

    def canonical_batch(self, batch: HybridArchBatch) -> HybridArchBatch:
        """Zero the kernel size of non-conv stages and the V-scale of stages that are not V-scale attention."""
        conv = batch.op == OPS.index("conv")
        vscale = (batch.op == OPS.index("attention")) & self._table["has_v_scale"]
        return HybridArchBatch(batch.resolution, batch.op, batch.depth, batch.channels, batch.expansion,
                               np.where(conv, batch.kernel_size, 0), np.where(vscale, batch.v_scale, 0), batch.dsm)

    def max_arch(self) -> HybridArch:
        """Every numeric choice at its largest, each stage's last listed operator and DSM, the largest resolution."""
        return self._extreme_arch(-1)

    def min_arch(self) -> HybridArch:
        """Every numeric choice at its smallest, each stage's first listed operator and DSM, the smallest
        resolution."""
        return self._extreme_arch(0)

    def _extreme_arch(self, end: int) -> HybridArch:
        stages = tuple(Stage(s.ops[end], s.depths[end], s.channels[end], s.expansions[end], s.kernel_sizes[end],
                             s.v_scales[end] if s.v_scales else 0, s.dsms[end]) for s in self.stages)
        return self.canonical(HybridArch(self.resolutions[end], stages))

    # -- sampling --------------------------------------------------------------------------------------------
    @functools.cached_property
    def _table(self) -> dict[str, np.ndarray]:
        """Per stage field, the choices padded to one width (``[S, widest]``) and their number (``[S]``); ops and DSMs
        as indices into OPS and DSMS, an empty choice list as (0,)."""
        lists = {"op": [[OPS.index(o) for o in s.ops] for s in self.stages],
                 "depth": [s.depths for s in self.stages], "channels": [s.channels for s in self.stages],
                 "expansion": [s.expansions for s in self.stages],
                 "kernel_size": [s.kernel_sizes for s in self.stages],
                 "v_scale": [s.v_scales or (0,) for s in self.stages],
                 "dsm": [[DSMS.index(d) for d in s.dsms] for s in self.stages]}
        table = {}
        for name, per_stage in lists.items():
            width = max(len(choices) for choices in per_stage)
            table[name] = np.array([list(c) + [c[-1]] * (width - len(c)) for c in per_stage], dtype=np.int64)
            table[name + "_count"] = np.array([len(c) for c in per_stage], dtype=np.int64)
        table["has_v_scale"] = np.array([bool(s.v_scales) for s in self.stages])
        return table

    def _draw(self, rng: np.random.Generator, n: int) -> HybridArchBatch:
        """``n`` uniform draws of every field of every stage, not yet canonical: one generator call."""
        table, stages = self._table, np.arange(self.num_stages)
        uniforms = rng.random((n, 1 + len(STAGE_FIELDS) * self.num_stages))
        resolution = np.asarray(self.resolutions)[(uniforms[:, 0] * len(self.resolutions)).astype(np.int64)]
        per_stage = uniforms[:, 1:].reshape(n, len(STAGE_FIELDS), self.num_stages)
        columns = []
        for f, name in enumerate(STAGE_FIELDS):
            index = (per_stage[:, f] * table[name + "_count"]).astype(np.int64)
            columns.append(table[name][stages, index])
        return HybridArchBatch(resolution, *columns)

    def sample_many(self, rng: np.random.Generator | int, count: int) -> HybridArchBatch:
        """``count`` uniform draws: every field of every stage and the resolution independently uniform over its
        choices."""
        return self.canonical_batch(self._draw(as_generator(rng), int(count)))

    def sample(self, rng: np.random.Generator | int) -> HybridArch:
        return self.sample_many(rng, 1).arch(0)

    def sample_where(self, rng: np.random.Generator | int, accept: Callable[[HybridArchBatch], np.ndarray], what: str,
                     max_tries: int = 64, batch_size: int = 256) -> HybridArch:
        """A uniform draw conditioned on ``accept(batch)``, by rejection over vectorised batches (32 first, growing to
        ``batch_size``), as ``SearchSpace.sample_where``."""
        rng = as_generator(rng)
        draws, drawn = min(32, batch_size), 0
        for _ in range(max_tries):
            batch = self.sample_many(rng, draws)
            drawn += draws
            hits = np.flatnonzero(accept(batch))
            if hits.size:
                return batch.arch(int(hits[0]))
            draws = min(4 * draws, batch_size)
        raise RuntimeError(f"no arch of space {self.name!r} in {what} after {drawn} uniform draws; widen the window "
                           "or raise max_tries")

    # -- evolution -------------------------------------------------------------------------------------------
    def mutate(self, arch: HybridArch, rng: np.random.Generator | int, prob: float = 0.2,
               structure_prob: float = 0.4) -> HybridArch:
        """Redraw the resolution, and each stage's operator, depth and DSM, with ``structure_prob`` each (the role the
        depth and embed dim play in AutoFormer's mutation), and each stage's channels, expansion, kernel size and
        V-scale with ``prob`` each. A field that comes to apply (the kernel size of a stage that became a conv stage)
        is drawn fresh."""
        self.validate(arch)
        rng = as_generator(rng)
        parent, fresh = HybridArchBatch.from_archs([arch]), self._draw(rng, 1)
        structural = ("op", "depth", "dsm")
        chance = np.array([structure_prob if name in structural else prob for name in STAGE_FIELDS])
        redraw = rng.random((len(STAGE_FIELDS), self.num_stages)) < chance[:, None]
        columns = {name: np.where(redraw[f], getattr(fresh, name), getattr(parent, name))
                   for f, name in enumerate(STAGE_FIELDS)}
        for name in ("kernel_size", "v_scale"):  # canonical zeros that now apply take the fresh draw
            columns[name] = np.where(columns[name] == 0, getattr(fresh, name), columns[name])
        resolution = fresh.resolution if rng.random() < structure_prob else parent.resolution
        return self.canonical_batch(HybridArchBatch(resolution, **columns)).arch(0)

    def crossover(self, a: HybridArch, b: HybridArch, rng: np.random.Generator | int) -> HybridArch:
        """Uniform crossover with whole stages as genes: the resolution and every stage from either parent with
        probability 1/2 (a stage's fields only make sense together: its kernel size is 0 unless it is a conv
        stage)."""
        self.validate(a)
        self.validate(b)
        from_a = as_generator(rng).random(1 + self.num_stages) < 0.5
        stages = tuple(x if pick else y for x, y, pick in zip(a.stages, b.stages, from_a[1:]))
        return HybridArch(a.resolution if from_a[0] else b.resolution, stages)

    # -- categorical genes (REINFORCE, TPE, the learned sampler's policy) --------------------------------------
    def genes(self) -> list[tuple[str, tuple]]:
        """The space as independent categorical genes: the resolution, then per stage its operator, depth, channels,
        expansion, kernel size, V-scale (where the stage has V-scale choices) and DSM."""
        genes: list[tuple[str, tuple]] = [("resolution", self.resolutions)]
        for i, s in enumerate(self.stages):
            genes += [(f"stage{i}.op", s.ops), (f"stage{i}.depth", s.depths), (f"stage{i}.channels", s.channels),
                      (f"stage{i}.expansion", s.expansions), (f"stage{i}.kernel_size", s.kernel_sizes)]
            if s.v_scales:
                genes.append((f"stage{i}.v_scale", s.v_scales))
            genes.append((f"stage{i}.dsm", s.dsms))
        return genes

    def decode_genes(self, indices: np.ndarray) -> HybridArchBatch:
        """Canonical archs from ``[B, genes]`` choice indices (in the order of :meth:`genes`)."""
        indices = np.atleast_2d(np.asarray(indices, dtype=np.int64))
        values = {name: np.asarray(choices)[indices[:, g]] for g, (name, choices) in enumerate(self.genes())}
        count = len(indices)
        columns = {}
        for name in STAGE_FIELDS:
            per_stage = []
            for i in range(self.num_stages):
                value = values.get(f"stage{i}.{name}", np.zeros(count, dtype=np.int64))
                codes = {"op": OPS, "dsm": DSMS}.get(name)
                per_stage.append([codes.index(v) for v in value] if codes else value)
            columns[name] = np.stack(per_stage, axis=1)
        return self.canonical_batch(HybridArchBatch(values["resolution"], **columns))

    # -- serialisation ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["resolutions"] = list(self.resolutions)
        data["stages"] = [{f.name: list(v) if isinstance(v := getattr(s, f.name), tuple) else v
                           for f in fields(StageChoices)} for s in self.stages]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HybridSpace:
        check_mapping("HybridSpace", data, [f.name for f in fields(cls)], ("name", "style", "resolutions", "stages"))
        if not isinstance(data["stages"], list):
            raise ValueError(f"HybridSpace.stages must be a list of mappings, got {type(data['stages']).__name__}")
        return cls(**data)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> HybridSpace:
        return cls.from_dict(yaml.safe_load(text))


__all__ = ["ATTENTION_DSMS", "HybridSpace", "StageChoices"]

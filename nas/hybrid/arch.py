"""A sub-network of a hybrid conv / attention / MLP supernet: a list of stages and an input resolution, hashable and
serialisable like the ViT's :class:`nas.vit.arch.Arch` (DESIGN.md section 9)."""
from __future__ import annotations

import functools
import json
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import numpy as np
import yaml

# The operator of a stage's blocks: an inverted residual (MBConv), an attention block, an MLP-Mixer block.
OPS = ("conv", "attention", "mlp")
# What enters a stage (DSM: downsampling module). "none": the stage's first block takes the previous width (and the
# stride); "local", "local-global", "global": UniNet's DSMs and the global one; "mbconv": ElasticViT's reduction
# block (an inverted residual, expansion 6, kernel 3, squeeze-excite) before a transformer stage.
DSMS = ("none", "local", "local-global", "global", "mbconv")


@dataclass(frozen=True)
class Stage:
    """One stage of a hybrid subnet: ``depth`` blocks of operator ``op`` at ``channels`` channels after the
    downsampling module ``dsm``.

    ``expansion`` is the conv block's expansion ratio or the attention and MLP blocks' MLP ratio (hidden units
    ``channels * expansion``); ``kernel_size`` is the depthwise kernel of conv blocks and ``v_scale`` ElasticViT's
    value width per head in units of the head dim. A field that does not apply to the stage's operator is 0 (see
    ``HybridSpace.canonical``). Attention heads are ``channels // head_dim``, as both UniNet and ElasticViT derive them.
    """

    op: str
    depth: int
    channels: int
    expansion: int
    kernel_size: int = 0
    v_scale: int = 0
    dsm: str = "none"

    def __post_init__(self):
        for name in ("depth", "channels", "expansion", "kernel_size", "v_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"Stage.{name} must be an int, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.op not in OPS:
            raise ValueError(f"Stage.op={self.op!r} is not one of {', '.join(OPS)}")
        if self.dsm not in DSMS:
            raise ValueError(f"Stage.dsm={self.dsm!r} is not one of {', '.join(DSMS)}")

    @property
    def hidden_features(self) -> int:
        return self.channels * self.expansion


STAGE_FIELDS = tuple(f.name for f in fields(Stage))


def check_mapping(where: str, data, known, required) -> None:
    """Raise ValueError unless ``data`` is a mapping whose keys are some of ``known`` and include ``required``."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping, got {type(data).__name__}")
    unknown, missing = set(data) - set(known), set(required) - set(data)
    if unknown or missing:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}, missing field(s) {sorted(missing)}; expected "
                         f"some of {list(known)}")


@dataclass(frozen=True)
class HybridArch:
    """One subnet of a hybrid supernet: its input ``resolution`` (square images) and its ``stages``."""

    family: ClassVar[str] = "hybrid"
    resolution: int
    stages: tuple[Stage, ...]

    def __post_init__(self):
        if isinstance(self.resolution, bool) or not isinstance(self.resolution, (int, np.integer)):
            raise ValueError(f"HybridArch.resolution must be an int, got {self.resolution!r}")
        object.__setattr__(self, "resolution", int(self.resolution))
        stages = tuple(self.stages)
        if not stages or not all(isinstance(stage, Stage) for stage in stages):
            raise ValueError("HybridArch.stages must be a non-empty sequence of Stage")
        object.__setattr__(self, "stages", stages)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def depth(self) -> int:
        """Blocks in all stages (DSMs not counted)."""
        return sum(stage.depth for stage in self.stages)

    def to_dict(self) -> dict[str, Any]:
        return {"resolution": self.resolution, "stages": [asdict(stage) for stage in self.stages]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HybridArch:
        check_mapping("HybridArch", data, ("resolution", "stages"), ("resolution", "stages"))
        if not isinstance(data["stages"], list):
            raise ValueError(f"HybridArch.stages must be a list of mappings, got {type(data['stages']).__name__}")
        stages = []
        for i, stage in enumerate(data["stages"]):
            check_mapping(f"HybridArch.stages[{i}]", stage, STAGE_FIELDS, ("op", "depth", "channels", "expansion"))
            try:
                stages.append(Stage(**stage))
            except ValueError as error:
                raise ValueError(f"HybridArch.stages[{i}]: {error}") from error
        return cls(data["resolution"], tuple(stages))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HybridArch:
        return cls.from_dict(json.loads(text))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> HybridArch:
        return cls.from_dict(yaml.safe_load(text))


@dataclass(frozen=True)
class HybridArchBatch:
    """Many archs of one hybrid space as numpy arrays, for the vectorised cost model and sampling.

    With K archs of S stages: ``resolution`` [K] int64; ``op`` and ``dsm`` [K, S] int64 indices into :data:`OPS` and
    :data:`DSMS`; ``depth``, ``channels``, ``expansion``, ``kernel_size``, ``v_scale`` [K, S] int64.
    """

    family: ClassVar[str] = "hybrid"
    resolution: np.ndarray
    op: np.ndarray
    depth: np.ndarray
    channels: np.ndarray
    expansion: np.ndarray
    kernel_size: np.ndarray
    v_scale: np.ndarray
    dsm: np.ndarray

    def __post_init__(self):
        object.__setattr__(self, "resolution", np.asarray(self.resolution, dtype=np.int64).reshape(-1))
        for name in STAGE_FIELDS:
            object.__setattr__(self, name, np.atleast_2d(np.asarray(getattr(self, name), dtype=np.int64)))
        shapes = {getattr(self, name).shape for name in STAGE_FIELDS}
        if len(shapes) != 1 or next(iter(shapes))[0] != len(self.resolution):
            raise ValueError(f"HybridArchBatch: expected resolution [K] and per-stage arrays [K, S] with one K and S; "
                             f"got resolution {self.resolution.shape} and per-stage shapes {sorted(shapes)}")

    @classmethod
    def from_archs(cls, archs) -> HybridArchBatch:
        archs = list(archs)
        if not archs:
            raise ValueError("HybridArchBatch.from_archs: no archs given")
        if len({arch.num_stages for arch in archs}) != 1:
            raise ValueError(f"HybridArchBatch.from_archs: archs of different numbers of stages "
                             f"{sorted({arch.num_stages for arch in archs})}")
        rows = [[(OPS.index(s.op), s.depth, s.channels, s.expansion, s.kernel_size, s.v_scale, DSMS.index(s.dsm))
                 for s in arch.stages] for arch in archs]
        columns = np.asarray(rows, dtype=np.int64).transpose(2, 0, 1)
        return cls([arch.resolution for arch in archs], *columns)

    def __len__(self) -> int:
        return len(self.resolution)

    @property
    def num_stages(self) -> int:
        return self.op.shape[1]

    def arch(self, index: int) -> HybridArch:
        return self._archs([index])[0]

    def archs(self) -> list[HybridArch]:
        return self._archs(range(len(self)))

    def _archs(self, indices) -> list[HybridArch]:
        columns = [getattr(self, name)[list(indices)].tolist() for name in STAGE_FIELDS]
        resolutions = self.resolution[list(indices)].tolist()
        return [HybridArch(resolution, tuple(_stage(*values) for values in zip(*(column[row] for column in columns))))
                for row, resolution in enumerate(resolutions)]


@functools.lru_cache(maxsize=1 << 16)
def _stage(op: int, depth: int, channels: int, expansion: int, kernel_size: int, v_scale: int, dsm: int) -> Stage:
    """The stage of these codes and sizes. Stages repeat across the archs of a space: each is built (and checked)
    once, which makes turning thousands of sampled arrays into archs several times faster."""
    return Stage(OPS[op], depth, channels, expansion, kernel_size, v_scale, DSMS[dsm])


__all__ = ["DSMS", "OPS", "STAGE_FIELDS", "HybridArch", "HybridArchBatch", "Stage", "check_mapping"]

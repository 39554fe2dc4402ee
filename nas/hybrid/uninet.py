"""UniNet's released models (Sense-X/UniNet ``uninet.py``, ``UniNetB0`` to ``UniNetB6``), each as an arch of a space
that holds it alone, as the members of ``nas.hybrid.scaling`` are; the presets ``uninet-b0`` .. ``uninet-b6``
(nas/spaces/) are these spaces, so ``python -m nas.train --space uninet-b3`` trains UniNet-B3.

Every model has the same layout: a 3x3 stride-2 stem to 32 channels, six stages with strides [1, 2, 2, 2, 1, 2] and
expansions [1, 4, 6, 3, 2, 5], conv blocks in stages 0-3 and attention blocks in stages 4-5, a local DSM into stages 1-3
and a local-global DSM into stages 4-5, and a 1x1 conv to 1280 channels before the classifier. The models differ in
their repeats, channels and input size, which the authors set by hand: B1 is B0 at 224 px, B2 deepens B0 at 256 px,
B3-B6 widen it too. EfficientNet's compound rule (``nas.hybrid.scaling``) gives none of them.

The released models have a bias in the last 1x1 conv of every conv block, which feeds a BatchNorm: it adds nothing the
BatchNorm's own shift cannot, so these models have none (``nas.hybrid.convert.from_uninet_state_dict`` folds it into
the running mean). Otherwise their parameters are UniNet's.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .arch import HybridArch, Stage
from .space import HybridSpace, StageChoices


@dataclass(frozen=True)
class ReleasedModel:
    """One of ``uninet.py``'s models: blocks per stage (``repeats``), channels per stage and input size."""

    repeats: tuple[int, ...]
    channels: tuple[int, ...]
    input_size: int


UNINET_MODELS = {
    "b0": ReleasedModel((1, 2, 4, 4, 4, 8), (24, 48, 80, 128, 128, 256), 160),
    "b1": ReleasedModel((1, 2, 4, 4, 4, 8), (24, 48, 80, 128, 128, 256), 224),
    "b2": ReleasedModel((2, 3, 6, 6, 6, 12), (24, 48, 80, 128, 128, 256), 256),
    "b3": ReleasedModel((2, 3, 7, 7, 7, 14), (24, 56, 96, 160, 160, 288), 288),
    "b4": ReleasedModel((2, 4, 9, 9, 9, 18), (32, 64, 112, 192, 192, 352), 320),
    "b5": ReleasedModel((3, 5, 10, 10, 10, 20), (32, 64, 112, 224, 224, 448), 384),
    "b6": ReleasedModel((4, 6, 12, 12, 12, 24), (48, 96, 160, 256, 256, 512), 448),
}
EXPANSIONS = (1, 4, 6, 3, 2, 5)
STRIDES = (1, 2, 2, 2, 1, 2)
OPERATORS = ("conv",) * 4 + ("attention",) * 2
DSMS = ("none", "local", "local", "local", "local-global", "local-global")
STEM_CHANNELS, HEAD_FEATURES, HEAD_DIM, KERNEL_SIZE = 32, 1280, 32, 3


def model_key(name: str) -> str:
    """``b3`` for ``B3``, ``uninet-b3``, ``UniNetB3``; ConfigError for a name that is not a released model."""
    key = str(name).lower().replace("-", "").removeprefix("uninet")
    if key not in UNINET_MODELS:
        released = ", ".join(k.upper() for k in UNINET_MODELS)
        raise ConfigError(f"unknown UniNet model {name!r}: uninet.py releases {released}")
    return key


def uninet_model(name: str) -> tuple[HybridSpace, HybridArch]:
    """UniNet's released model ``name`` (``B0`` .. ``B6``, or ``uninet-b0`` ..) as ``(space, arch)``: the space holds
    the model alone (named ``uninet-b<i>``), at the model's input size."""
    key = model_key(name)
    model = UNINET_MODELS[key]
    stages = tuple(Stage(op, depth, channels, expansion, KERNEL_SIZE if op == "conv" else 0, 0, dsm)
                   for op, depth, channels, expansion, dsm in zip(OPERATORS, model.repeats, model.channels,
                                                                  EXPANSIONS, DSMS))
    choices = tuple(StageChoices(ops=(s.op,), depths=(s.depth,), channels=(s.channels,), expansions=(s.expansion,),
                                 kernel_sizes=(KERNEL_SIZE,), dsms=(s.dsm,), stride=stride, se=True)
                    for s, stride in zip(stages, STRIDES))
    space = HybridSpace(f"uninet-{key}", "uninet", (model.input_size,), choices, stem_channels=STEM_CHANNELS,
                        head_features=HEAD_FEATURES, head_dim=HEAD_DIM)
    arch = HybridArch(model.input_size, stages)
    space.validate(arch)
    return space, arch


__all__ = ["UNINET_MODELS", "ReleasedModel", "model_key", "uninet_model"]

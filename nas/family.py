"""Families of supernets: what the shared machinery (training, search, evaluation, cost, export, samplers) needs to
know about one kind of network, and the registry that finds a space's, arch's or supernet's family.

A family (the isotropic ViT: ``nas.vit``; the hybrid conv/attention/MLP networks: ``nas.hybrid``) is a package of
``nas`` holding a module ``family.py`` that defines ``FAMILY``, an instance of :class:`Family`. Its spaces, archs and
supernets carry the family's name (a class attribute ``family``); :func:`family_of` reads it, so the shared code
dispatches without knowing a family's classes. A newcomer adds a family by adding such a package: nothing outside it
changes.

What a family provides besides :class:`Family`'s methods is duck-typed:

- a space (:class:`Space`) samples, mutates, crosses over and validates archs, gives its smallest and largest, and
  serialises (``to_dict``); its ``arch_type`` reads an arch back (``from_dict``);
- an arch (:class:`Arch`) is hashable, frozen, and serialises (``to_dict``, ``to_json``);
- a supernet (:class:`Supernet`) is an ``nn.Module`` with ``forward(images, arch)``, ``set_arch`` and ``check_arch``;
  a family with BatchNorm (``Family.batch_norm``) also has ``recalibrate_batch_norm(batches, arch)``.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn


@runtime_checkable
class Arch(Protocol):
    """A subnet of a space: frozen and hashable; ``family`` names its family."""

    family: ClassVar[str]

    def to_dict(self) -> dict[str, Any]: ...

    def to_json(self) -> str: ...


@runtime_checkable
class Space(Protocol):
    """The choices of a family's supernet and the operators the samplers and searchers draw with."""

    family: ClassVar[str]
    arch_type: ClassVar[type]
    name: str
    num_classes: int
    in_chans: int

    @property
    def img_size(self) -> int: ...

    @property
    def task(self) -> str: ...

    def validate(self, arch: Any) -> None: ...

    def sample(self, rng: np.random.Generator | int) -> Any: ...

    def sample_many(self, rng: np.random.Generator | int, count: int) -> Any: ...

    def mutate(self, arch: Any, rng: np.random.Generator | int, prob: float = ...) -> Any: ...

    def crossover(self, a: Any, b: Any, rng: np.random.Generator | int) -> Any: ...

    def min_arch(self) -> Any: ...

    def max_arch(self) -> Any: ...

    def to_dict(self) -> dict[str, Any]: ...


class Supernet(Protocol):
    """A family's supernet: an ``nn.Module`` running any subnet of its space."""

    family: ClassVar[str]

    def __call__(self, images: Tensor, arch: Any = None) -> Tensor: ...

    def set_arch(self, arch: Any) -> None: ...

    def check_arch(self, arch: Any) -> None: ...


Cost = Callable[[Sequence[Any]], np.ndarray]  # a vectorised cost: archs -> [K] values


class MemoryEstimate(NamedTuple):
    """What a supernet takes (``nas.memory``): ``parameters`` (the supernet's, from the cost model's counts),
    ``activations``: the values one image's training step keeps for the backward pass (fp32), and ``inference``: the
    values live at once at the peak of one image's pass without gradients (an evaluation), at the largest sizes."""

    parameters: int
    activations: int
    inference: int


class Family(ABC):
    """One kind of supernet. Capabilities the shared code asks about are class attributes; everything else is a
    method taking the family's own objects (a method given another family's objects may fail in any way)."""

    name: ClassVar[str]
    space_type: ClassVar[type]
    arch_type: ClassVar[type]
    batch_norm: ClassVar[bool] = False  # subnets re-estimate BatchNorm statistics (calibration images) before use
    two_sided: ClassVar[bool] = False  # ViTAS's two-sided width sharing (archs read from the left or the right)
    pretrained_init: ClassVar[bool] = False  # nas.train's init_from (nas.pretrained) and reorder_mlp
    compound_scaling: ClassVar[bool] = False  # nas.search's compound_scale (nas.hybrid.scaling)

    # -- spaces and archs -----------------------------------------------------------------------------------------
    @abstractmethod
    def owns_space_data(self, data: Mapping[str, Any]) -> bool:
        """Whether a space's mapping (a YAML file's contents) is one of this family's spaces."""

    def space_from_dict(self, data: Mapping[str, Any]) -> Space:
        """The space a mapping describes (ValueError or TypeError for a bad one)."""
        return self.space_type.from_dict(dict(data))

    def arch_from_dict(self, data: Mapping[str, Any]) -> Arch:
        """An arch from ``Arch.to_dict()``'s mapping (ValueError, TypeError or KeyError for a bad one)."""
        return self.arch_type.from_dict(data)

    # -- the supernet ---------------------------------------------------------------------------------------------
    @abstractmethod
    def build_supernet(self, space: Space, drop_path_rate: float = 0.0) -> nn.Module:
        """A freshly initialised supernet holding every subnet of ``space``."""

    # -- cost -----------------------------------------------------------------------------------------------------
    @abstractmethod
    def params_many(self, archs: Sequence[Arch], space: Space) -> np.ndarray:
        """[K] int64 parameter counts: every weight of each extracted subnet."""

    @abstractmethod
    def macs_many(self, archs: Sequence[Arch], space: Space) -> np.ndarray:
        """[K] int64 multiply-accumulates of one image's forward pass of each subnet."""

    @abstractmethod
    def cost_range(self, space: Space, cost: Cost) -> tuple[float, float]:
        """The smallest and the largest ``cost`` of an arch of ``space``."""

    @abstractmethod
    def memory_estimate(self, space: Space) -> MemoryEstimate:
        """What the supernet of ``space`` takes, from the sizes the space declares, before anything is allocated; in
        Python ints, so that no size a file declares overflows it (``nas.memory.check_memory``)."""

    # -- batched evaluation ---------------------------------------------------------------------------------------
    @abstractmethod
    def batched_pass(self, supernet: Supernet, archs: Sequence[Arch],
                     statistics: Sequence[Any] | None = None) -> Callable[[Tensor], Tensor]:
        """images -> the stacked outputs ``[K, B, ...]`` of the subnets ``archs`` (checked), each equal to
        ``supernet(images, arch)`` in eval mode; ``statistics``: per arch, the BatchNorm statistics it runs with
        (``nas.batch_norm.BatchNormStats``; families with ``batch_norm`` only)."""

    @abstractmethod
    def pass_memory_per_image(self, supernet: Supernet, archs: Sequence[Arch], dtype: torch.dtype) -> int:
        """Bytes of activations one subnet of a batched pass of ``archs`` needs per image at its peak."""

    @abstractmethod
    def grouping_key(self, arch: Arch) -> tuple:
        """A sort key that puts archs sharing most of a batched pass next to each other."""

    # -- extraction and export ------------------------------------------------------------------------------------
    @abstractmethod
    def extract(self, supernet: Supernet, arch: Arch) -> nn.Module:
        """A plain module (eval mode) holding copies of ``arch``'s weights, computing what ``supernet(images, arch)``
        computes in eval mode (with the BatchNorm statistics the supernet holds now, where the family has them)."""

    @abstractmethod
    def subnet_config(self, model: nn.Module, arch: Arch, space: Space) -> dict[str, Any]:
        """What :meth:`rebuild` needs to make ``model``'s structure again, as plain (JSON) values."""

    @abstractmethod
    def rebuild(self, config: Mapping[str, Any], arch: Arch) -> nn.Module:
        """The plain module :meth:`subnet_config` describes, its weights to be loaded (any values)."""

    # -- sampler hooks --------------------------------------------------------------------------------------------
    @abstractmethod
    def decisions(self, space: Space) -> list[Sequence[Any]]:
        """The choices of the independent categorical decisions that make an arch (the learned sampler's policy)."""

    @abstractmethod
    def decode_decisions(self, space: Space, choices: np.ndarray) -> Any:
        """Canonical archs (a batch) from ``[B, decisions]`` choice indices into :meth:`decisions`."""

    def pretrained_weights(self, weights: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
        """Pretrained tensors (``nas.train``'s ``init_from``, families with ``pretrained_init``) under the supernet's
        names, and the names of those that are not for this family's supernets by design (listed apart in the
        report). The default: the names are the supernet's already."""
        return dict(weights), []

    def layer_drop_refusal(self, space: Space) -> str | None:
        """Why layers of ``space`` cannot be dropped (identity layers: ViTAS, SuperSAM), or None where they can."""
        return f"space {space.name!r} is of the {self.name} family, whose layers cannot be dropped"


def check_archs(supernet: Supernet, archs: Sequence[Arch]) -> None:
    """Every arch must be a subnet of ``supernet`` (ValueError or TypeError naming the first that is not)."""
    for index, arch in enumerate(archs):
        try:
            supernet.check_arch(arch)
        except (ValueError, TypeError) as error:
            raise type(error)(f"arch {index} of {len(archs)}: {error}") from error


FAMILY_MODULE = "family"  # nas/<package>/family.py defines FAMILY


@functools.cache
def families() -> dict[str, Family]:
    """Every family, by name: the ``FAMILY`` of each package of ``nas`` that has a ``family`` module."""
    root = Path(__file__).resolve().parent
    found = {}
    for package in pkgutil.iter_modules([str(root)]):
        if package.ispkg and (root / package.name / f"{FAMILY_MODULE}.py").is_file():
            family = importlib.import_module(f"{__package__}.{package.name}.{FAMILY_MODULE}").FAMILY
            found[family.name] = family
    return found


def get_family(name: str) -> Family:
    """The family called ``name`` (ValueError naming the known ones otherwise)."""
    found = families().get(name) if isinstance(name, str) else None
    if found is None:
        raise ValueError(f"unknown family {name!r}: known are {', '.join(sorted(families()))}")
    return found


def family_of(obj: Space | Arch | Supernet | nn.Module) -> Family:
    """The family of a space, an arch (or a batch of archs) or a supernet, read from its ``family`` attribute."""
    name = getattr(obj, "family", None)
    if not isinstance(name, str):
        raise TypeError(f"{type(obj).__name__} belongs to no family (it has no 'family' name); expected a space, an "
                        "arch or a supernet")
    return get_family(name)


def family_of_space_data(data: Any) -> Family:
    """The family a space's mapping belongs to: the one its ``family`` key names, else the one family that owns it."""
    if not isinstance(data, dict):
        raise ValueError(f"a search space is a mapping, got {type(data).__name__}")
    if "family" in data:
        return get_family(data["family"])
    owners = [family for family in families().values() if family.owns_space_data(data)]
    if len(owners) != 1:
        names = ", ".join(sorted(f.name for f in owners)) if owners else "none"
        raise ValueError(f"no single family owns this space (owners: {names}); name one with a 'family' key "
                         f"({', '.join(sorted(families()))})")
    return owners[0]


def space_from_dict(data: Any) -> Space:
    """The space of whichever family a mapping describes (a ``family`` key, if any, is the family's name)."""
    family = family_of_space_data(data)
    return family.space_from_dict({k: v for k, v in data.items() if k != "family"})


__all__ = ["Arch", "Cost", "Family", "Space", "Supernet", "check_archs", "families", "family_of",
           "family_of_space_data", "get_family", "space_from_dict"]

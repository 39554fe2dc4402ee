"""A supernet initialised from pretrained weights of another size (SuperSAM): ``--init-from`` of ``nas.train``.

:func:`read_weights` reads a file the user passes (``torch.load(..., weights_only=True)``): a ``nas.train``
checkpoint (its ``model``), or a state dict with this library's (and timm's) names, alone or under ``"model"`` or
``"state_dict"``. Nothing is downloaded.

:func:`init_from` copies them into a supernet whose sizes may differ (DESIGN.md section 2: the active part is always
the leading block):

- a tensor of the same shape is copied whole (*loaded*);
- a tensor whose shape differs is copied over the leading block the two share (*partial*): a smaller pretrained
  model fills the leading slices of the supernet, a larger one gives its leading slices. qkv weights and biases are
  copied per block (q, k, v each), so that heads stay heads. Before slicing a wider pretrained MLP, its hidden
  units are put in order of importance (``reorder="magnitude"``: the L1 norm of each unit's outgoing ``fc2`` column,
  as OFA), so that the leading slice keeps its most important units;
- a supernet tensor the file lacks, a position embedding of another token count, a head for another number of
  classes, or SAM's relative position tables for a window of another side keep their initialisation (*not
  loaded*); pretrained tensors that fit nowhere are *unused*.

The :class:`InitReport` lists the four groups (``loaded``, ``partial``, ``not_loaded``, ``unused``) and the file's
tensors that are not for this model by design (``unused_by_design``: a whole SAM checkpoint's prompt encoder and mask
decoder); the trainer logs it and writes it to ``init_report.json``. It refuses an initialisation that leaves a
pretrained tensor unused or a supernet tensor at its initialisation although the file has one of its name
(:meth:`InitReport.problems`), unless ``allow_partial_init`` is set.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import read_torch_file
from .errors import CheckpointError, ConfigError


def read_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """The pretrained tensors in ``path`` by name; a clear one-line CheckpointError for anything else."""
    path = Path(path)
    loaded = read_torch_file(path, "init_from")
    for key in ("model", "state_dict"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
            break
    if not isinstance(loaded, Mapping):
        raise CheckpointError(f"init_from: {str(path)!r} holds a {type(loaded).__name__}, not a state dict (a mapping "
                              "of names to tensors)")
    tensors = {str(name): value for name, value in loaded.items() if isinstance(value, Tensor)}
    if not tensors:
        raise CheckpointError(f"init_from: {str(path)!r} holds no tensors")
    bad = sorted(name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all())
    if bad:
        raise CheckpointError(f"init_from: {str(path)!r} holds NaN or infinite values in {', '.join(bad[:5])}")
    return tensors


@dataclasses.dataclass
class InitReport:
    """What :func:`init_from` did to each tensor of the supernet, and which pretrained tensors it did not use:
    ``unused`` fit nowhere; ``unused_by_design`` are not for this kind of model (a whole SAM checkpoint's prompt
    encoder and mask decoder, for an image encoder)."""

    loaded: list[str] = dataclasses.field(default_factory=list)
    partial: list[str] = dataclasses.field(default_factory=list)      # "name: pretrained shape -> supernet shape"
    not_loaded: list[str] = dataclasses.field(default_factory=list)  # "name (why)"
    unused: list[str] = dataclasses.field(default_factory=list)
    unused_by_design: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list, repr=False)  # not loaded though the file has them

    def to_dict(self) -> dict[str, list[str]]:
        return {name: value for name, value in dataclasses.asdict(self).items() if name != "skipped"}

    def summary(self) -> str:
        return (f"loaded {len(self.loaded)} tensors whole, {len(self.partial)} partially (leading slices), "
                f"{len(self.not_loaded)} not at all; {len(self.unused)} pretrained tensors unused, "
                f"{len(self.unused_by_design)} not for this model")

    def problems(self) -> str | None:
        """What makes the initialisation partial, or None: pretrained tensors left unused, and supernet tensors left
        at their initialisation although the file has a tensor of that name."""
        parts = [f"{len(names)} {what}: {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}"
                 for what, names in (("pretrained tensors unused", self.unused),
                                     ("supernet tensors not loaded though the file has them", self.skipped)) if names]
        return "; ".join(parts) or None


def mlp_units_by_magnitude(weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``weights`` with the hidden units of every MLP (``*.mlp.fc1`` rows and bias, ``*.mlp.fc2`` columns) in order
    of their outgoing weights' L1 norm, largest first; the function the weights compute is unchanged."""
    out = dict(weights)
    for name, fc2 in weights.items():
        if not name.endswith("mlp.fc2.weight"):
            continue
        if fc2.dim() != 2:  # not an MLP's weight: init_from reports it as not fitting
            continue
        prefix = name[: -len("fc2.weight")]
        perm = torch.argsort(fc2.abs().sum(dim=0), descending=True, stable=True)
        out[name] = fc2.index_select(1, perm)
        for part in ("fc1.weight", "fc1.bias"):
            if prefix + part in weights and weights[prefix + part].dim() >= 1 \
                    and weights[prefix + part].shape[0] == len(perm):
                out[prefix + part] = weights[prefix + part].index_select(0, perm)
    return out


def _leading(target: Tensor, source: Tensor) -> tuple[slice, ...]:
    return tuple(slice(0, min(a, b)) for a, b in zip(target.shape, source.shape))


@torch.no_grad()
def init_from(model: nn.Module, weights: Mapping[str, Tensor], *, reorder: str = "magnitude",
              unused_by_design: Sequence[str] = ()) -> InitReport:
    """Copy ``weights`` into ``model``'s parameters and buffers as the module's description says; returns the
    report (``unused_by_design``: the file's names that are not for this model, listed as such). Raises
    CheckpointError where no tensor fits at all (most likely a file of another kind of model)."""
    if reorder not in ("magnitude", "none"):
        raise ConfigError(f"init_from: reorder must be 'magnitude' or 'none', got {reorder!r}")
    target = model.state_dict()
    for name in sorted(set(weights) & set(target)):
        source, tensor = weights[name], target[name]
        if (source.is_floating_point(), source.dtype == torch.bool, source.is_complex()) != \
                (tensor.is_floating_point(), tensor.dtype == torch.bool, tensor.is_complex()):
            raise CheckpointError(f"init_from: pretrained {name} holds {source.dtype} values, the supernet's "
                                  f"{tensor.dtype}: not weights of this kind of model")
    if reorder == "magnitude":
        weights = mlp_units_by_magnitude(weights)
    report = InitReport(unused_by_design=sorted(unused_by_design))
    for name, tensor in target.items():
        source = weights.get(name)
        if source is None:
            report.not_loaded.append(f"{name} (not in the file)")
            continue
        if source.dim() != tensor.dim():
            report.skipped.append(name)
            report.not_loaded.append(f"{name} (pretrained {tuple(source.shape)}, supernet {tuple(tensor.shape)})")
            continue
        if source.shape == tensor.shape:
            tensor.copy_(source)
            report.loaded.append(name)
            continue
        if name.startswith("head.") and source.shape[0] != tensor.shape[0]:
            report.skipped.append(name)
            report.not_loaded.append(f"{name} ({source.shape[0]} pretrained classes, {tensor.shape[0]} here)")
            continue
        if "pos_embed" in name and source.shape[-2] != tensor.shape[-2]:
            report.skipped.append(name)
            report.not_loaded.append(f"{name} ({source.shape[-2]} pretrained tokens, {tensor.shape[-2]} here)")
            continue
        if name.endswith(("attn.rel_pos_h", "attn.rel_pos_w")) and source.shape[0] != tensor.shape[0]:
            # SAM's tables are indexed by offset from their middle row: no leading slice is a table of another side.
            report.skipped.append(name)
            report.not_loaded.append(f"{name} (relative position over {(source.shape[0] + 1) // 2} pretrained "
                                     f"positions, {(tensor.shape[0] + 1) // 2} here)")
            continue
        if name.endswith("attn.qkv.weight") or name.endswith("attn.qkv.bias"):  # q, k, v blocks alike
            for block_target, block_source in zip(tensor.chunk(3), source.chunk(3)):
                block_target[_leading(block_target, block_source)] = block_source[_leading(block_target, block_source)]
        else:
            tensor[_leading(tensor, source)] = source[_leading(tensor, source)]
        report.partial.append(f"{name}: {tuple(source.shape)} -> {tuple(tensor.shape)}")
    report.unused = sorted(set(weights) - set(target))
    if not report.loaded and not report.partial:
        shared = sorted(set(weights) & set(target))
        if not shared:
            raise CheckpointError(f"init_from: none of the {len(weights)} pretrained tensors has a name of this "
                                  f"supernet (e.g. {sorted(weights)[:3]}; expected names like {sorted(target)[:3]})")
        raise CheckpointError(f"init_from: none of the pretrained tensors fits this supernet: "
                              f"{'; '.join(r for r in report.not_loaded if r.split(' ')[0] in shared)[:300]}")
    return report


__all__ = ["InitReport", "init_from", "mlp_units_by_magnitude", "read_weights"]

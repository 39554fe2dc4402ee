"""Standalone subnets from the command line: ``python -m nas.export --checkpoint CKPT --arch ARCH --format ...``.

The subnet ``--arch`` of a ``python -m nas.train`` checkpoint's supernet becomes a plain PyTorch ViT
(``elastic_ops/plain.py``) or hybrid network (``elastic_ops/plain_hybrid.py``), written in each ``--format`` (repeat
the flag) to ``--out-dir``: ``pytorch`` (``subnet.pt``, ``nas.export.load_subnet``), ``torch-export``
(``subnet.pt2``, ``torch.export.load``), ``onnx`` (``subnet.onnx``, dynamic batch; needs
``pip install 'elastic-ops[export]'``), ``safetensors`` (``safetensors/model.safetensors`` with ``config.json``) and
``torchscript`` (``subnet.ts``, ``torch.jit.load``). Each file is loaded back and run on random batches of two
sizes; its logits must equal the supernet's (to ``--tolerance``), else the file is not kept. ``export.json`` in
``--out-dir`` records the checkpoint, the arch and the formats written; an out-dir holding the export of another subnet
(or files of an export it does not record) is refused, so that an out-dir never mixes two subnets. Settings are flags,
``--set`` keys and keys of a ``--config`` file (``nas.config``); errors are one line and exit status 2 (``nas.errors``).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import Tensor

from .. import data as data_lib
from ..atomic import atomic_write_text
from ..checkpoint import file_digest, load_supernet
from ..config import Config, parse_command_line, setting
from ..errors import CheckpointMismatchError, ConfigError, ExportCheckError, OutputError, run_command
from ..evaluate import evaluation_batches
from ..family import Arch, Space, Supernet, family_of
from . import FORMATS, Subnet, extract_subnet

MANIFEST = "export.json"


@dataclass
class ExportConfig(Config):
    NAME = "export"

    checkpoint: str | None = setting(None, "supernet checkpoint written by python -m nas.train")
    arch: str = setting("largest", "the subnet: largest, smallest, an arch mapping (JSON or YAML, as search.json "
                                   "holds them) or a file holding one")
    formats: list[str] = setting(["pytorch", "torch-export"], f"formats to write; of {', '.join(FORMATS)}",
                                 flag="--format")
    out_dir: str = setting("export", "output directory")
    check_batches: list[int] = setting([2, 3], "batch sizes the exported model is run on and compared with the "
                                               "supernet (the first is also the example batch of the export)",
                                       flag="--check-batch")
    bn_calibration_images: int | None = setting(
        None, "families with BatchNorm (hybrid): re-estimate the subnet's BatchNorm statistics before it is exported "
              "on this many training images, those its training calibrated on (null: as many as its training did; a "
              "checkpoint that records no training images, as a converted one, keeps its statistics unless this is "
              "set; 0: keep the checkpoint's statistics, which belong to no one subnet)")
    dataset: str | None = setting(None, "data set of the BatchNorm calibration images (null: the checkpoint's)",
                                  choices=(None, *data_lib.DATASETS))
    data_dir: str | None = setting(None, "data directory of the BatchNorm calibration images (null: the checkpoint's)")
    tolerance: float = setting(1e-4, "largest difference of logits allowed, relative to their largest magnitude (a "
                                     "checkpoint's supernet runs in float32: 1e-4 is some 800 rounding steps of the "
                                     "largest logit, room for the other kernels of each format's runtime)")
    seed: int = setting(0, "seed of the random check images")

    def problems(self) -> list[str]:
        problems = [f"format {f!r} is not one of {', '.join(FORMATS)}" for f in self.formats if f not in FORMATS]
        if not self.formats:
            problems.append("no format to write")
        if not self.check_batches or min(self.check_batches) < 1 or self.check_batches[0] < 2:
            problems.append(f"check_batches={self.check_batches}: batch sizes >= 1, the first >= 2 (the example batch "
                            "of an export with a dynamic batch size)")
        if self.bn_calibration_images is not None and self.bn_calibration_images < 0:
            problems.append(f"bn_calibration_images={self.bn_calibration_images} must be >= 0 or null")
        if self.tolerance < 0:
            problems.append(f"tolerance={self.tolerance:g} must be >= 0")
        return problems


def read_arch(text: str, space: Space) -> Arch:
    """``largest``, ``smallest``, an arch mapping or a file holding one, checked against ``space``."""
    if text in ("largest", "smallest"):
        return space.max_arch() if text == "largest" else space.min_arch()
    source = Path(text).read_text() if os.path.isfile(text) else text
    try:
        values = yaml.safe_load(source)
        arch = space.arch_type.from_dict(values.get("arch", values) if isinstance(values, dict) else values)
        space.validate(arch)
    except (yaml.YAMLError, ValueError, TypeError, KeyError, AttributeError) as error:
        raise ConfigError(f"arch {text[:80]!r} is not an arch of space {space.name!r} (largest, smallest, an arch "
                          f"mapping or a file holding one): {error}") from error
    return arch


def recalibrate(supernet: Supernet, arch: Arch, space: Space, checkpoint: dict, config: ExportConfig
                ) -> dict | None:
    """Re-estimate, for a family with BatchNorm, the statistics of ``arch`` on the training images its training
    calibrated on (the first ``bn_calibration_images`` kept for training by the split ``checkpoint`` records, in
    batches of its ``eval_batch_size``, as ``nas.train`` and ``nas.search`` do): a supernet's running statistics
    belong to no one subnet (DESIGN.md section 9). What it did, for the manifest, or None where the checkpoint's
    statistics stay."""
    if not family_of(space).batch_norm or config.bn_calibration_images == 0:
        return None
    trained, recorded = checkpoint["config"], checkpoint.get("search_split")
    source = f"checkpoint {config.checkpoint!r}"
    if recorded is None and config.bn_calibration_images is None:
        print(f"[export] BatchNorm statistics as {source} holds them: it records no training images to re-estimate "
              "them on (--bn-calibration-images N re-estimates them on the first N training images of --dataset)")
        return None
    dataset = config.dataset or trained.get("dataset")
    if dataset is None:
        raise ConfigError(f"{source} records no data set to re-estimate BatchNorm statistics on; give --dataset, or "
                          "--bn-calibration-images 0 to keep the statistics it holds")
    train = data_lib.load_dataset(dataset, config.data_dir or trained.get("data_dir"), "train",
                                  image_size=space.img_size, in_chans=space.in_chans)
    data_lib.check_matches(train, space.img_size, space.in_chans, space.num_classes, f"{dataset} train")
    if recorded is None:
        split = data_lib.SearchSplit.hold_out(dataset, len(train), 0)
    else:
        split = data_lib.SearchSplit.from_dict(recorded, source)
        if (split.dataset, split.of) != (dataset, len(train)):
            raise CheckpointMismatchError(
                f"{source} was trained on a {split.dataset} training set of {split.of} images, not on this {dataset} "
                f"one ({len(train)}); re-estimate BatchNorm statistics on the checkpoint's data set, or keep them "
                "with --bn-calibration-images 0")
    count = config.bn_calibration_images or trained.get("bn_calibration_images", 512)
    images = data_lib.subset(train, split.calibration_indices(count))
    supernet.recalibrate_batch_norm(evaluation_batches(images, trained.get("eval_batch_size", 256)), arch)
    print(f"[export] BatchNorm statistics re-estimated for the subnet on {len(images)} {dataset} training images")
    return {"dataset": dataset, "images": len(images)}


IDENTITY = ("checkpoint_digest", "space", "arch")  # what makes two exports the same subnet
CALIBRATION = "batch_norm_calibration"  # and the same weights: the images BatchNorm statistics were re-estimated on


def claim(out: Path, subnet: dict) -> dict:
    """The manifest of the export into ``out`` of ``subnet`` (checkpoint path and digest, space, arch): the one ``out``
    holds where it records the same subnet (its formats are kept, those written again replaced), else a new one. An
    OutputError where ``out`` holds the export of another subnet, or export files that no manifest records."""
    subnet = json.loads(json.dumps(subnet))  # as a manifest reads back (lists, not tuples)
    path = out / MANIFEST
    if path.exists():
        try:
            manifest = json.loads(path.read_text())
            recorded = {key: manifest[key] for key in (*IDENTITY, "checkpoint")}
            recorded[CALIBRATION] = manifest.get(CALIBRATION)  # not in the manifests of exports before it
            if not isinstance(manifest["formats"], dict):
                raise TypeError("its formats are not a mapping")
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise OutputError(f"out_dir {str(out)!r} holds an unreadable {MANIFEST} ({error}); export into another "
                              "--out-dir or empty this one") from error
        if any(recorded[key] != subnet[key] for key in IDENTITY):
            raise OutputError(f"out_dir {str(out)!r} holds the export of another subnet (arch {recorded['arch']} of "
                              f"{recorded['checkpoint']!r}); export into another --out-dir or empty this one")
        if recorded[CALIBRATION] != subnet[CALIBRATION]:
            raise OutputError(f"out_dir {str(out)!r} holds the export of this subnet with other BatchNorm statistics "
                              f"(re-estimated on: {recorded[CALIBRATION]}; now: {subnet[CALIBRATION]}); export into "
                              "another --out-dir or empty this one")
        return {**manifest, **subnet}
    found = sorted(export.path for export in FORMATS.values() if (out / export.path).exists())
    if found:
        raise OutputError(f"out_dir {str(out)!r} holds export files ({', '.join(found)}) without the {MANIFEST} "
                          "that says of which subnet; export into another --out-dir or empty this one")
    return {**subnet, "formats": {}}


def largest_difference(runner: Callable[[Tensor], Tensor], batches: Sequence[Tensor], expected: Sequence[Tensor]
                       ) -> float:
    """The largest difference of ``runner``'s logits from the ``expected`` ones, relative to the largest magnitude of
    the expected logits of each batch (NaN or infinite where a logit is not finite)."""
    with torch.no_grad():
        differences = [float((runner(images) - logits).abs().max() / logits.abs().max().clamp(min=1e-12))
                       for images, logits in zip(batches, expected)]
    return math.nan if any(math.isnan(d) for d in differences) else max(differences)


def remove(path: Path) -> None:
    """Remove a file or a folder (safetensors) if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def run(argv: Sequence[str] | None) -> int:
    config, _ = parse_command_line(ExportConfig, argv, prog="python -m nas.export",
                                   description=__doc__.split("\n\n")[1])
    if config.checkpoint is None:
        raise ConfigError("an export needs a supernet checkpoint (--checkpoint), written by python -m nas.train")
    supernet, space, checkpoint = load_supernet(config.checkpoint)
    arch = read_arch(config.arch, space)
    calibration = recalibrate(supernet, arch, space, checkpoint, config)
    model = extract_subnet(supernet, arch)
    generator = torch.Generator().manual_seed(config.seed)
    batches = [torch.randn(n, space.in_chans, space.img_size, space.img_size, generator=generator)
               for n in config.check_batches]
    with torch.no_grad():
        expected = [supernet(images, arch) for images in batches]
    out = Path(config.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"out_dir {config.out_dir!r} cannot be created: {error.strerror or error}") from error
    manifest = claim(out, {"checkpoint": os.path.abspath(config.checkpoint),
                           "checkpoint_digest": file_digest(config.checkpoint), "space": space.name,
                           "arch": arch.to_dict(), CALIBRATION: calibration})
    # Recorded before any file is written, so that a failed export still says whose files these are.
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    subnet = Subnet(model, arch, space)
    for name in config.formats:
        export = FORMATS[name]
        path = out / export.path
        # Written and checked under a name of its own, then moved into place: a failed check leaves a file of an
        # earlier export of this subnet as it was.
        staged = out / f".staged-{export.path}"
        remove(staged)
        try:
            export.write(subnet, staged, batches[0])
            difference = largest_difference(export.load(staged), batches, expected)
            if not difference <= config.tolerance:  # also a NaN difference
                raise ExportCheckError(f"the {name} export of arch {arch.to_json()} computes other logits than the "
                                       f"supernet: largest difference {difference:.3g} of the largest logit's "
                                       f"magnitude, over the tolerance {config.tolerance:g} (--tolerance); nothing "
                                       f"was written to {path}")
            remove(path)
            os.replace(staged, path)
        finally:
            remove(staged)
        manifest["formats"][name] = export.path
        atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
        print(f"[export] {name}: {path}; loaded back and run on batches of {', '.join(map(str, config.check_batches))}:"
              f" largest relative difference {difference:.2g}")
    print(f"[export] subnet {arch.to_json()}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("nas.export", lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())

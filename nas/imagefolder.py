"""Image folders at ImageNet scale (``root/<class>/<image>``), read lazily: an image is decoded (PIL) and cropped when a
batch asks for it, in the DataLoader's worker processes, and nothing holds more than the file list in memory.

Crops (timm's, hence AutoFormer's; every resize is bicubic, :func:`resize_bicubic`):

- evaluation (:class:`CentreCrop`): the shorter side resized to ``image_size / crop_fraction`` (224 -> 256), then the
  centre ``image_size`` square.
- training (:class:`RandomResizedCrop`): a box of a random fraction of the area (0.08..1) and aspect ratio
  (3/4..4/3, log-uniform) placed uniformly (:func:`random_resized_crop_box`, torchvision's draw), resized to the
  square. Its randomness is a pure function of ``(seed, epoch, image)`` (:meth:`ImageFolder.for_epoch`), so a resumed
  run reads the same crops; the rest of the training recipe runs batched on the device (``nas.augment``).

The file list is two numpy arrays (relative paths as bytes, labels) rather than a list of Python objects: worker
processes share it without the reference-count writes that copy a list of a million tuples into every worker.
"""
from __future__ import annotations

import copy
import hashlib
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
GREY_STATS = ((0.5,), (0.5,))


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def eight_bit(image, mode: str, path: str) -> np.ndarray:
    """The pixels of a PIL ``image`` in ``mode`` ("RGB" or "L"), uint8 ``[H, W(, 3)]``, scaled from the range of the
    image's own mode: PIL's ``convert`` clips 16-bit and float values to 0..255, which turns a 16-bit grey image of
    mean 32768 white. 16-bit grey (and PNG's 32-bit grey, which holds 16-bit values) is divided by 257; floats are read
    as 0..1 and refused outside it, where their range is unknown; other modes are PIL's to convert."""
    if image.mode in SIXTEEN_BIT_MODES or (image.mode == "I" and image.format == "PNG"):
        grey = np.asarray(image, dtype=np.float64) / 257
    elif image.mode == "F":
        grey = np.asarray(image, dtype=np.float64)
        if not np.isfinite(grey).all() or grey.min() < 0 or grey.max() > 1:
            raise DataError(f"ImageFolder: image {path!r} holds floating-point pixels outside 0..1 "
                            f"({np.nanmin(grey):g}..{np.nanmax(grey):g}): their range is unknown; convert it to 8 bits")
        grey = grey * 255
    elif image.mode in ("I", "I;32", "I;32B", "I;32L"):
        raise DataError(f"ImageFolder: image {path!r} holds 32-bit integer pixels (PIL mode {image.mode}) of unknown "
                        "range; convert it to 8 bits")
    else:
        return np.array(image.convert(mode), dtype=np.uint8)
    grey = np.rint(grey).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2) if mode == "RGB" else grey


def resize_bicubic(image: Tensor, height: int, width: int) -> Tensor:
    """uint8 ``[..., C, H, W]`` resized to ``height x width``, bicubic with antialiasing: torch's
    ``interpolate(mode="bicubic", antialias=True)``, which uses PIL's filter (cubic ``a = -0.5``, its support widened
    by the downscale factor), rounded to uint8. It equals PIL's ``Image.resize(..., BICUBIC)`` to within one level
    where the filter's overshoot stays inside 0..255 (PIL rounds and clips between its horizontal and vertical pass;
    this keeps full precision)."""
    batched = image.reshape(-1, *image.shape[-3:]).float()
    out = F.interpolate(batched, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8).reshape(*image.shape[:-2], height, width)


def random_resized_crop_box(height: int, width: int, generator: torch.Generator,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """``(top, left, box height, box width)`` as torchvision's ``RandomResizedCrop.get_params`` draws it: up to ten
    tries of an area fraction uniform in ``scale`` and an aspect ratio (width / height) log-uniform in ``ratio``; the
    first box that fits is placed uniformly. If none fits, the centred largest box whose ratio is clipped to
    ``ratio``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * float(torch.empty(1).uniform_(scale[0], scale[1], generator=generator))
        aspect = math.exp(float(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class CentreCrop:
    """Evaluation crop: the shorter side resized to ``floor(size / crop_fraction)``, then the centre square."""

    crop_fraction: float = 0.875

    def __call__(self, image: Tensor, size: int, generator: torch.Generator | None) -> Tensor:
        height, width = image.shape[-2:]
        short = math.floor(size / self.crop_fraction)
        # torchvision's Resize: the longer side scaled alike and truncated.
        new_h, new_w = (short, int(short * width / height)) if height <= width else (int(short * height / width), short)
        resized = resize_bicubic(image, new_h, new_w)
        top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
        return resized[..., top:top + size, left:left + size]


@dataclass(frozen=True)
class RandomResizedCrop:
    """Training crop: a :func:`random_resized_crop_box`, resized to the square."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __call__(self, image: Tensor, size: int, generator: torch.Generator | None) -> Tensor:
        top, left, h, w = random_resized_crop_box(image.shape[-2], image.shape[-1], generator, self.scale, self.ratio)
        return resize_bicubic(image[..., top:top + h, left:left + w], size, size)


def sample_generator(*key: int) -> torch.Generator:
    """A generator that is a pure function of ``key`` (seed, epoch, image index)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


class ImageFolder(Dataset):
    """``root/<class>/<image>`` (classes: the sub-folders, sorted; images found at any depth below them), each image
    decoded with PIL when asked for and cropped by ``crop`` to ``image_size`` square. Items are uint8 ``[C, S, S]``
    and the label; ``__getitems__`` (what a DataLoader's workers call) stacks a batch."""

    def __init__(self, root: str, image_size: int, in_chans: int = 3,
                 crop: CentreCrop | RandomResizedCrop = CentreCrop(), seed: int = 0):
        try:
            from PIL import Image  # noqa: F401
        except ImportError as err:
            raise DataError(f"ImageFolder needs Pillow to read {root!r} (pip install pillow): {err}") from err
        if in_chans not in (1, 3):
            raise DataError(f"ImageFolder: in_chans must be 1 (grey) or 3 (RGB), got {in_chans}")
        self.root = root
        self.classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
        if not self.classes:
            raise DataError(f"ImageFolder: {root!r} has no class sub-folders (expected root/<class>/<image>)")
        paths, labels = [], []
        real_root = os.path.realpath(root)
        for label, cls in enumerate(self.classes):
            folder = os.path.join(root, cls)
            real = os.path.realpath(folder)
            if real == real_root or real_root.startswith(real + os.sep):
                raise DataError(f"ImageFolder: class folder {folder!r} is a link to {real!r}, which holds the data set "
                                "itself: it would be a class of every image")
            found = len(paths)
            for directory, subdirectories, names in os.walk(folder):
                subdirectories.sort()
                for name in sorted(names):
                    if name.lower().endswith(IMAGE_EXTENSIONS):
                        paths.append(os.fsencode(os.path.relpath(os.path.join(directory, name), root)))
                        labels.append(label)
            if len(paths) == found:
                raise DataError(f"ImageFolder: class folder {folder!r} holds no images "
                                f"({', '.join(IMAGE_EXTENSIONS)}); remove it, or the classes are not the data's")
        self.paths = np.array(paths)  # fixed-width bytes
        self.labels = torch.tensor(labels)
        self.image_size, self.in_chans, self.crop, self.seed, self.epoch = image_size, in_chans, crop, seed, 0
        self.mean, self.std = IMAGENET_STATS if in_chans == 3 else GREY_STATS

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.in_chans, self.image_size, self.image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def _replace(self, **changes) -> ImageFolder:
        other = copy.copy(self)
        other.__dict__.update(changes)
        return other

    def subset(self, indices: Sequence[int] | Tensor) -> ImageFolder:
        index = np.asarray(indices, dtype=np.int64)
        return self._replace(paths=self.paths[index], labels=self.labels[torch.from_numpy(index)])

    def with_crop(self, crop: CentreCrop | RandomResizedCrop, seed: int = 0) -> ImageFolder:
        """The same images cropped by ``crop``; a random crop draws from ``(seed, epoch, index)``."""
        return self._replace(crop=crop, seed=seed)

    def for_epoch(self, epoch: int) -> ImageFolder:
        """The images as epoch ``epoch`` reads them (a random crop draws anew each epoch)."""
        return self._replace(epoch=epoch)

    def path(self, index: int) -> str:
        return os.path.join(self.root, os.fsdecode(self.paths[index]))

    def load(self, index: int) -> Tensor:
        """Image ``index`` decoded and cropped: uint8 ``[C, S, S]``."""
        from PIL import Image

        path = self.path(index)
        try:
            with warnings.catch_warnings():
                # PIL warns of an image past MAX_IMAGE_PIXELS and raises past twice that; either is refused here
                # rather than decoded into gigabytes.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(path) as image:
                    pixels = eight_bit(image, "RGB" if self.in_chans == 3 else "L", path)
        except (OSError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise DataError(f"ImageFolder: cannot read image {path!r}: {err}") from err
        tensor = torch.from_numpy(pixels.reshape(pixels.shape[0], pixels.shape[1], self.in_chans)).permute(2, 0, 1)
        random = isinstance(self.crop, RandomResizedCrop)
        generator = sample_generator(self.seed, self.epoch, index) if random else None
        return self.crop(tensor, self.image_size, generator)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.load(index), self.labels[index]

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        return (torch.stack([self.load(i) for i in indices]),
                self.labels[torch.as_tensor(list(indices), dtype=torch.long)])

    def fingerprint(self) -> str:
        """A key for what this folder yields: its files (relative paths, sizes and modification times), labels, crop
        and size; cheap enough for ImageNet's validation set (a ``stat`` per file, no pixel read)."""
        digest = hashlib.sha1(repr((self.image_size, self.in_chans, self.crop, self.mean, self.std)).encode())
        digest.update(self.paths.tobytes())
        digest.update(self.labels.numpy().tobytes())
        for index in range(len(self)):
            stat = os.stat(self.path(index))
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns};".encode())
        return f"n={len(self)}:{digest.hexdigest()[:16]}"

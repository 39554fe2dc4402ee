"""Training augmentation of whole batches on the training device, with plain torch ops (no torchvision or timm).

A training step hands :class:`Augmentation` its uint8 batch ``[B, C, H, W]`` and labels; it returns normalised images
and the targets of the loss. The steps, in timm's order (AutoFormer trains with timm's ``create_transform`` and
``Mixup``):

1. RandAugment (:class:`RandAugment`, timm's ``rand-m9-mstd0.5-inc1`` notation) on uint8 pixels: each image draws its
   own ops, magnitudes and signs; every op then runs once on the images that drew it.
2. normalisation (``nas.data.normalize``), then a random crop after zero padding and a horizontal flip
   (:func:`pad_crop_flip`, the CIFAR recipe; for image folders the random-resized crop happens while reading,
   ``nas.imagefolder``, and only the flip here).
3. random erasing (:func:`random_erasing`, timm's ``RandomErasing(mode="pixel")``) on the normalised images.
4. mixup or cutmix (:func:`mix`, timm's ``Mixup`` in batch mode): images mixed with the batch reversed, and target
   probabilities mixed alike (the loss adds label smoothing).

Every random choice is drawn on the CPU from the step's ``torch.Generator`` (so a seed fixes it on any device) and
then applied with a few batched ops on the images' device.

The RandAugment ops follow PIL's definitions, as timm applies them (``ImageOps``, ``ImageEnhance``,
``Image.transform``): the colour ops give PIL's pixels exactly; the geometric ops read the input point PIL reads and
fill the pixels PIL fills, sampling bicubically with torch's ``grid_sample`` (its cubic, ``a = -0.75``, is not the
one of PIL's transforms, so interpolated values differ slightly).
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .data import normalize

MAX_LEVEL = 10.0  # timm's _LEVEL_DENOM: magnitudes run from 0 to 10
TRANSLATE_FRACTION = 0.45  # timm's translate_pct: TranslateXRel moves up to 45% of the width at magnitude 10


# -- draws -----------------------------------------------------------------------------------------------------

def uniform(generator: torch.Generator, size: int | tuple, low: float = 0.0, high: float = 1.0) -> Tensor:
    """float64 draws in ``[low, high)`` on the CPU."""
    return low + (high - low) * torch.rand(size, generator=generator, dtype=torch.float64)


def numpy_generator(generator: torch.Generator) -> np.random.Generator:
    """A numpy generator seeded from ``generator``, for the draws torch has no seeded sampler for (Beta)."""
    return np.random.default_rng(int(torch.randint(2**62, (), generator=generator)))


def coin(generator: torch.Generator, size: int, probability: float) -> Tensor:
    return uniform(generator, size) < probability


# -- pixel ops (uint8 [n, C, H, W] in, uint8 out; per-image arguments are tensors of n values) -----------------

def _per_image(values: Tensor, like: Tensor) -> Tensor:
    return values.to(like.device).view(-1, *([1] * (like.dim() - 1)))


def invert(x: Tensor) -> Tensor:
    return 255 - x


def posterize(x: Tensor, bits: Tensor) -> Tensor:
    """Keep the ``bits`` (0..8) highest bits of every value (``ImageOps.posterize``)."""
    mask = (0xFF << (8 - bits.clamp(0, 8).long())) & 0xFF
    return x & _per_image(mask, x).to(x.dtype)


def solarize(x: Tensor, threshold: Tensor) -> Tensor:
    """Values at or above ``threshold`` inverted (``ImageOps.solarize``)."""
    return torch.where(x >= _per_image(threshold, x), 255 - x, x)


def solarize_add(x: Tensor, add: Tensor, threshold: int = 128) -> Tensor:
    """``add`` added to values below ``threshold``, saturating at 255 (timm's ``solarize_add``)."""
    added = (x.short() + _per_image(add, x).short()).clamp(max=255).to(x.dtype)
    return torch.where(x < threshold, added, x)


def auto_contrast(x: Tensor) -> Tensor:
    """Every channel stretched so that its darkest value becomes 0 and its brightest 255, with PIL's arithmetic
    (``ImageOps.autocontrast``: ``int(v * scale + offset)`` in double precision); a flat channel is left alone."""
    low = x.amin(dim=(-2, -1), keepdim=True).double()
    high = x.amax(dim=(-2, -1), keepdim=True).double()
    flat = high <= low
    # A tensor dividend: torch computes ``number / tensor`` as a reciprocal times the number, an ulp off PIL's scale.
    scale = torch.full_like(high, 255.0) / torch.where(flat, torch.ones_like(high), high - low)
    stretched = (x.double() * scale + -low * scale).floor().clamp(0, 255).to(x.dtype)
    return torch.where(flat, x, stretched)


def equalize(x: Tensor) -> Tensor:
    """Histogram equalisation of every channel (``ImageOps.equalize``): ``lut[i] = (step // 2 + count below i) //
    step`` with ``step = (pixels - count of the brightest value) // 255``; a channel with one value or a zero step is
    left alone."""
    n, channels = x.shape[:2]
    flat = x.reshape(n * channels, -1).long()
    counts = torch.zeros(n * channels, 256, dtype=torch.long, device=x.device).scatter_add_(
        1, flat, torch.ones_like(flat))
    brightest = flat.amax(dim=1, keepdim=True)
    step = (flat.shape[1] - counts.gather(1, brightest)) // 255
    below = counts.cumsum(dim=1) - counts
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp(max=255)
    used = (counts > 0).sum(dim=1, keepdim=True)
    keep = (used <= 1) | (step == 0)
    mapped = lut.gather(1, flat)
    return torch.where(keep, flat, mapped).to(x.dtype).view_as(x)


def grayscale(x: Tensor) -> Tensor:
    """PIL's RGB to L: ``(19595 R + 38470 G + 7471 B + 0x8000) >> 16``, as ``[n, 1, H, W]`` uint8."""
    r, g, b = x.int().unbind(1)
    return ((19595 * r + 38470 * g + 7471 * b + 0x8000) >> 16).to(x.dtype).unsqueeze(1)


def blend(degenerate: Tensor, x: Tensor, factor: Tensor) -> Tensor:
    """``Image.blend(degenerate, x, factor)``: ``degenerate + factor * (x - degenerate)`` in float32, saturated to
    0..255 and truncated, as PIL does; what every ``ImageEnhance`` op computes."""
    out = degenerate.float() + _per_image(factor.float(), x) * (x.float() - degenerate.float())
    return out.clamp(0, 255).trunc().to(x.dtype)


def color(x: Tensor, factor: Tensor) -> Tensor:
    """``ImageEnhance.Color``: towards (factor < 1) or away from the grey image."""
    return blend(grayscale(x).expand_as(x), x, factor) if x.shape[1] == 3 else x


def contrast(x: Tensor, factor: Tensor) -> Tensor:
    """``ImageEnhance.Contrast``: towards or away from the image's mean grey level, rounded to an integer."""
    grey = grayscale(x) if x.shape[1] == 3 else x
    mean = (grey.double().mean(dim=(-3, -2, -1), keepdim=True) + 0.5).floor().to(x.dtype)
    return blend(mean.expand_as(x), x, factor)


def brightness(x: Tensor, factor: Tensor) -> Tensor:
    """``ImageEnhance.Brightness``: towards or away from black."""
    return blend(torch.zeros_like(x), x, factor)


SMOOTH = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0  # PIL's ImageFilter.SMOOTH


def sharpness(x: Tensor, factor: Tensor) -> Tensor:
    """``ImageEnhance.Sharpness``: towards or away from PIL's SMOOTH filter of the image (the 3x3 kernel rounded to
    the nearest value inside, the border pixels kept as they are)."""
    channels = x.shape[1]
    kernel = SMOOTH.to(x.device).expand(channels, 1, 3, 3)
    smooth = (F.conv2d(x.float(), kernel, groups=channels) + 0.5).floor().clamp(0, 255).to(x.dtype)
    degenerate = x.clone()
    degenerate[..., 1:-1, 1:-1] = smooth
    return blend(degenerate, x, factor)


def affine(x: Tensor, matrices: Tensor, fill: Sequence[int], mode: str = "bicubic") -> Tensor:
    """``Image.transform(size, AFFINE, matrix, resample, fillcolor)`` of each image: output pixel ``(x, y)`` reads
    the input at ``matrix @ (x + 0.5, y + 0.5, 1)``, in coordinates whose origin is the image's top-left corner
    (PIL's convention); a pixel whose point falls outside the input takes the ``fill`` colour, the others are
    sampled with ``mode`` (``"nearest"`` reads the pixel the point falls in, as PIL's NEAREST does).
    ``matrices``: ``[n, 2, 3]`` float64."""
    n, channels, height, width = x.shape
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64) + 0.5,
                            torch.arange(width, dtype=torch.float64) + 0.5, indexing="ij")
    points = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1).view(1, -1, 3)
    source = points @ matrices.transpose(1, 2)  # [n, H * W, 2], (x, y) in the input
    inside = ((source[..., 0] >= 0) & (source[..., 0] < width) & (source[..., 1] >= 0) & (source[..., 1] < height))
    if mode == "nearest":  # the pixel the point falls in; grid_sample's rounding would differ on ties
        source = source.floor() + 0.5
    size = torch.tensor([width, height], dtype=torch.float64)
    grid = (2 * source / size - 1).view(n, height, width, 2).to(x.device, torch.float32)
    sampled = F.grid_sample(x.float(), grid, mode=mode, padding_mode="border", align_corners=False)
    fill_t = torch.tensor(list(fill)[:channels], dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    out = torch.where(inside.view(n, 1, height, width).to(x.device), sampled, fill_t)
    return out.round().clamp(0, 255).to(x.dtype)


def _matrices(rows: list[list[Tensor]]) -> Tensor:
    """``[n, 2, 3]`` from a 2 x 3 nesting of per-image values (tensors of n, or numbers)."""
    n = next(len(v) for row in rows for v in row if isinstance(v, Tensor))
    return torch.stack([torch.stack([torch.as_tensor(v, dtype=torch.float64).expand(n) for v in row], dim=-1)
                        for row in rows], dim=1)


def rotate(x: Tensor, degrees: Tensor, fill: Sequence[int], mode: str = "bicubic") -> Tensor:
    """``Image.rotate(degrees, resample, fillcolor=fill)``: counter-clockwise about the image's centre, with PIL's
    matrix (cosine and sine rounded to 15 decimals, so that quarter turns are exact)."""
    height, width = x.shape[-2:]
    cx, cy = width / 2.0, height / 2.0
    rows = []
    for angle in (-math.radians(float(d)) for d in degrees):
        cos, sin = round(math.cos(angle), 15), round(math.sin(angle), 15)
        # Output point p reads R (p - centre) + centre.
        rows.append([[cos, sin, cos * -cx + sin * -cy + cx], [-sin, cos, -sin * -cx + cos * -cy + cy]])
    return affine(x, torch.tensor(rows, dtype=torch.float64), fill, mode)


def shear_x(x: Tensor, factor: Tensor, fill: Sequence[int], mode: str = "bicubic") -> Tensor:
    """timm's ShearX: ``Image.transform(AFFINE, (1, factor, 0, 0, 1, 0))``."""
    return affine(x, _matrices([[1.0, factor, 0.0], [0.0, 1.0, 0.0]]), fill, mode)


def shear_y(x: Tensor, factor: Tensor, fill: Sequence[int], mode: str = "bicubic") -> Tensor:
    """timm's ShearY: ``Image.transform(AFFINE, (1, 0, 0, factor, 1, 0))``."""
    return affine(x, _matrices([[1.0, 0.0, 0.0], [factor, 1.0, 0.0]]), fill, mode)


def translate_x(x: Tensor, fraction: Tensor, fill: Sequence[int], mode: str = "bicubic") -> Tensor:
    """timm's TranslateXRel: ``Image.transform(AFFINE, (1, 0, fraction * width, 0, 1, 0))``."""
    return affine(x, _matrices([[1.0, 0.0, fraction * x.shape[-1]], [0.0, 1.0, 0.0]]), fill, mode)


def translate_y(x: Tensor, fraction: Tensor, fill: Sequence[int], mode: str = "bicubic") -> Tensor:
    """timm's TranslateYRel: ``Image.transform(AFFINE, (1, 0, 0, 0, 1, fraction * height))``."""
    return affine(x, _matrices([[1.0, 0.0, 0.0], [0.0, 1.0, fraction * x.shape[-2]]]), fill, mode)


# -- RandAugment ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Op:
    """A RandAugment op: ``apply(images, argument, fill)``, and the argument at a magnitude (0..10) and sign."""

    apply: Callable[[Tensor, Tensor, Sequence[int]], Tensor]
    argument: Callable[[Tensor, Tensor], Tensor] | None = None  # (magnitude, negate) -> argument; None: takes none


def _signed(scale: float) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda m, negate: torch.where(negate, -1.0, 1.0).double() * m / MAX_LEVEL * scale


def _enhance_increasing(m: Tensor, negate: Tensor) -> Tensor:
    return 1.0 + _signed(0.9)(m, negate)


def _no_argument(op: Callable[[Tensor], Tensor]) -> Callable:
    return lambda x, argument, fill: op(x)


def _pixels_only(op: Callable[[Tensor, Tensor], Tensor]) -> Callable:
    return lambda x, argument, fill: op(x, argument)


# timm's RandAugment ops and how a magnitude maps to each op's argument (auto_augment.py: LEVEL_TO_ARG).
RAND_AUGMENT_OPS: dict[str, Op] = {
    "AutoContrast": Op(_no_argument(auto_contrast)),
    "Equalize": Op(_no_argument(equalize)),
    "Invert": Op(_no_argument(invert)),
    "Rotate": Op(rotate, _signed(30.0)),
    "Posterize": Op(_pixels_only(posterize), lambda m, negate: (m / MAX_LEVEL * 4).floor()),
    "PosterizeIncreasing": Op(_pixels_only(posterize), lambda m, negate: 4 - (m / MAX_LEVEL * 4).floor()),
    "Solarize": Op(_pixels_only(solarize), lambda m, negate: (m / MAX_LEVEL * 256).floor()),
    "SolarizeIncreasing": Op(_pixels_only(solarize), lambda m, negate: 256 - (m / MAX_LEVEL * 256).floor()),
    "SolarizeAdd": Op(_pixels_only(solarize_add), lambda m, negate: (m / MAX_LEVEL * 110).floor()),
    "Color": Op(_pixels_only(color), lambda m, negate: m / MAX_LEVEL * 1.8 + 0.1),
    "ColorIncreasing": Op(_pixels_only(color), _enhance_increasing),
    "Contrast": Op(_pixels_only(contrast), lambda m, negate: m / MAX_LEVEL * 1.8 + 0.1),
    "ContrastIncreasing": Op(_pixels_only(contrast), _enhance_increasing),
    "Brightness": Op(_pixels_only(brightness), lambda m, negate: m / MAX_LEVEL * 1.8 + 0.1),
    "BrightnessIncreasing": Op(_pixels_only(brightness), _enhance_increasing),
    "Sharpness": Op(_pixels_only(sharpness), lambda m, negate: m / MAX_LEVEL * 1.8 + 0.1),
    "SharpnessIncreasing": Op(_pixels_only(sharpness), _enhance_increasing),
    "ShearX": Op(shear_x, _signed(0.3)),
    "ShearY": Op(shear_y, _signed(0.3)),
    "TranslateXRel": Op(translate_x, _signed(TRANSLATE_FRACTION)),
    "TranslateYRel": Op(translate_y, _signed(TRANSLATE_FRACTION)),
}

# timm's op lists: _RAND_TRANSFORMS and, with "inc1", _RAND_INCREASING_TRANSFORMS (stronger with the magnitude).
_COMMON = ("AutoContrast", "Equalize", "Invert", "Rotate")
_GEOMETRIC = ("ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_OPS = _COMMON + ("Posterize", "Solarize", "SolarizeAdd", "Color", "Contrast", "Brightness", "Sharpness") \
    + _GEOMETRIC
RAND_INCREASING_OPS = _COMMON + ("PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing",
                                 "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing") + _GEOMETRIC


@dataclass(frozen=True)
class RandAugment:
    """timm's ``rand_augment_transform``: ``layers`` ops per image, each drawn uniformly from ``ops`` and applied with
    ``probability``, at a magnitude drawn from ``N(magnitude, magnitude_std)`` (clipped to 0..``magnitude_max``) and,
    where the op has a direction, a random sign; geometric ops fill with ``fill`` (timm: the data set's mean colour)."""

    ops: tuple[str, ...] = RAND_INCREASING_OPS
    layers: int = 2
    magnitude: float = 9.0
    magnitude_std: float = 0.5
    magnitude_max: float = MAX_LEVEL
    probability: float = 0.5
    fill: tuple[int, ...] = (128, 128, 128)

    @classmethod
    def parse(cls, text: str, fill: Sequence[int] = (128, 128, 128)) -> RandAugment:
        """From timm's notation: ``rand`` then ``-``-separated ``m<magnitude>``, ``n<layers>``, ``mstd<std>``,
        ``mmax<max>``, ``p<probability>``, ``inc<0|1>``; e.g. AutoFormer's ``rand-m9-mstd0.5-inc1``."""
        parts = text.split("-")
        if parts[0] != "rand":
            raise ValueError(f"RandAugment {text!r} must start with 'rand' (timm's notation, e.g. "
                             "rand-m9-mstd0.5-inc1)")
        keys = {"m": "magnitude", "n": "layers", "mstd": "magnitude_std", "mmax": "magnitude_max", "p": "probability"}
        values: dict = {"fill": tuple(int(v) for v in fill), "ops": RAND_OPS}
        for part in parts[1:]:
            match = re.fullmatch(r"(mstd|mmax|inc|m|n|p)(\d+(?:\.\d*)?)", part)
            if match is None:
                raise ValueError(f"RandAugment {text!r}: cannot read {part!r}; expected m<magnitude>, n<layers>, "
                                 "mstd<std>, mmax<max>, p<probability> or inc<0|1>")
            key, number = match.groups()
            if key == "inc":
                values["ops"] = RAND_INCREASING_OPS if float(number) else RAND_OPS
            else:
                values[keys[key]] = int(number) if key == "n" else float(number)
        return cls(**values)

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """``images`` (uint8 ``[B, C, H, W]``) augmented, each image with its own draws."""
        batch = images.shape[0]
        out = images.clone()
        for _ in range(self.layers):
            chosen = torch.randint(len(self.ops), (batch,), generator=generator)
            applied = coin(generator, batch, self.probability)
            magnitude = self.magnitude + self.magnitude_std * torch.randn(batch, generator=generator,
                                                                         dtype=torch.float64)
            magnitude = magnitude.clamp(0.0, self.magnitude_max)
            negate = coin(generator, batch, 0.5)
            for index, name in enumerate(self.ops):
                members = torch.nonzero(applied & (chosen == index)).flatten()
                if len(members) == 0:
                    continue
                op = RAND_AUGMENT_OPS[name]
                argument = op.argument(magnitude[members], negate[members]) if op.argument else None
                on_device = members.to(images.device)
                out[on_device] = op.apply(out[on_device], argument, self.fill)
        return out


# -- crop and flip, random erasing, mixup and cutmix ----------------------------------------------------------

def pad_crop_flip(images: Tensor, padding: int, flip: bool, generator: torch.Generator) -> Tensor:
    """Random crop after zero padding by ``padding`` on each side, and a random horizontal flip.

    Offsets and flips are drawn on the CPU from ``generator`` (so a seed fixes them on any device); the
    crop is one gather on the images' device.
    """
    batch, channels, height, width = images.shape
    out = images
    if padding > 0:
        padded = F.pad(images, (padding, padding, padding, padding))
        dy = torch.randint(0, 2 * padding + 1, (batch,), generator=generator).to(images.device)
        dx = torch.randint(0, 2 * padding + 1, (batch,), generator=generator).to(images.device)
        rows = (dy[:, None] + torch.arange(height, device=images.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(width, device=images.device))[:, None, None, :]
        out = padded[torch.arange(batch, device=images.device)[:, None, None, None],
                     torch.arange(channels, device=images.device)[None, :, None, None], rows, cols]
    if flip:
        flipped = torch.rand(batch, generator=generator).lt(0.5).to(images.device)
        out = torch.where(flipped[:, None, None, None], out.flip(-1), out)
    return out


def erasing_boxes(height: int, width: int, count: int, probability: float, generator: torch.Generator,
                  area: tuple[float, float] = (0.02, 1 / 3), aspect: tuple[float, float] = (0.3, 1 / 0.3),
                  attempts: int = 10) -> Tensor:
    """timm's ``RandomErasing`` boxes, ``[count, 4]`` int64 ``(top, left, height, width)`` (height 0: nothing erased):
    with ``probability`` an image gets one box of a fraction of its area uniform in ``area`` and an aspect ratio
    (height / width) log-uniform in ``aspect``, the first of ``attempts`` draws that fits, placed uniformly."""
    boxes = torch.zeros(count, 4, dtype=torch.long)
    erased = coin(generator, count, probability)
    target = uniform(generator, (count, attempts), *area) * height * width
    ratio = torch.exp(uniform(generator, (count, attempts), math.log(aspect[0]), math.log(aspect[1])))
    heights = torch.sqrt(target * ratio).round().long()
    widths = torch.sqrt(target / ratio).round().long()
    fits = (heights < height) & (widths < width)
    top_draw, left_draw = uniform(generator, count), uniform(generator, count)
    for i in torch.nonzero(erased & fits.any(dim=1)).flatten().tolist():
        first = int(fits[i].nonzero()[0])
        h, w = int(heights[i, first]), int(widths[i, first])
        boxes[i] = torch.tensor([int(top_draw[i] * (height - h + 1)), int(left_draw[i] * (width - w + 1)), h, w])
    return boxes


def random_erasing(images: Tensor, probability: float, generator: torch.Generator) -> Tensor:
    """timm's ``RandomErasing(probability, mode="pixel", max_count=1)`` of normalised images: the pixels of each
    image's box (:func:`erasing_boxes`) replaced with standard normal noise, one value per channel and pixel."""
    batch, channels, height, width = images.shape
    boxes = erasing_boxes(height, width, batch, probability, generator).to(images.device)
    rows = torch.arange(height, device=images.device).view(1, height, 1)
    cols = torch.arange(width, device=images.device).view(1, 1, width)
    top, left, h, w = (boxes[:, i].view(-1, 1, 1) for i in range(4))
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    noise = torch.randn(images.shape, generator=generator).to(images.device, images.dtype)
    return torch.where(inside.unsqueeze(1), noise, images)


def cutmix_box(height: int, width: int, lam: float, generator: torch.Generator) -> tuple[int, int, int, int]:
    """timm's ``rand_bbox``: ``(top, bottom, left, right)`` of a box of sides ``int(side * sqrt(1 - lam))`` centred at
    a uniform pixel and clipped to the image."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy = int(torch.randint(height, (), generator=generator))
    cx = int(torch.randint(width, (), generator=generator))
    return (max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height),
            max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width))


def mix(images: Tensor, labels: Tensor, num_classes: int, mixup: float, cutmix: float,
        generator: torch.Generator, switch_probability: float = 0.5) -> tuple[Tensor, Tensor]:
    """timm's ``Mixup`` in batch mode (one draw per batch): each image mixed with the image at the mirrored position
    of the batch, either blended (mixup, ``lam ~ Beta(mixup, mixup)``) or with a box pasted (cutmix, ``lam ~
    Beta(cutmix, cutmix)``, then ``lam = 1 - box area / image area``); with both on, cutmix with
    ``switch_probability``. Returns the images and target probabilities ``lam * onehot(y) + (1 - lam) *
    onehot(y reversed)``."""
    use_cutmix = cutmix > 0 and (mixup <= 0 or bool(coin(generator, 1, switch_probability)))
    alpha = cutmix if use_cutmix else mixup
    lam = float(numpy_generator(generator).beta(alpha, alpha))
    out = images.clone()
    if use_cutmix:
        top, bottom, left, right = cutmix_box(images.shape[-2], images.shape[-1], lam, generator)
        out[..., top:bottom, left:right] = images.flip(0)[..., top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / (images.shape[-2] * images.shape[-1])
    else:
        out = images * lam + images.flip(0) * (1.0 - lam)
    one_hot = F.one_hot(labels, num_classes).to(images.dtype)
    return out, one_hot * lam + one_hot.flip(0) * (1.0 - lam)


# -- the recipe of a run ------------------------------------------------------------------------------------------

CROPS = ("random-resized", "pad", "none")
AUTOFORMER_RAND_AUGMENT = "rand-m9-mstd0.5-inc1"


@dataclass(frozen=True)
class Augmentation:
    """What a training step does to its batch (see the module's description); the defaults do nothing but
    normalise. ``pad``: the padding of the random crop (0: none)."""

    pad: int = 0
    flip: bool = False
    rand_augment: RandAugment | None = None
    random_erasing: float = 0.0
    mixup: float = 0.0
    cutmix: float = 0.0

    def __call__(self, images: Tensor, labels: Tensor, generator: torch.Generator, mean: Sequence[float],
                 std: Sequence[float], num_classes: int) -> tuple[Tensor, Tensor]:
        """Normalised augmented images (float32) and the targets of the loss: ``labels`` as they are, or target
        probabilities ``[B, num_classes]`` where images were mixed."""
        if self.rand_augment is not None:
            images = self.rand_augment(images, generator)
        x = normalize(images, mean, std)
        if self.pad or self.flip:
            x = pad_crop_flip(x, self.pad, self.flip, generator)
        if self.random_erasing:
            x = random_erasing(x, self.random_erasing, generator)
        if self.mixup or self.cutmix:
            return mix(x, labels, num_classes, self.mixup, self.cutmix, generator)
        return x, labels


def training_crop(dataset: str, crop: str | None = None) -> str:
    """``crop`` (one of :data:`CROPS`), or where None the data set's: random-resized for image folders, none for the
    8x8 digits, a crop after padding for the others."""
    return crop or ("random-resized" if dataset == "imagefolder" else "none" if dataset in ("digits", "mnist-seg")
                    else "pad")


def recipe(dataset: str, img_size: int, mean: Sequence[float], *, crop: str | None = None, flip: bool | None = None,
           rand_augment: str | None = None, random_erasing: float | None = None, mixup: float | None = None,
           cutmix: float | None = None) -> Augmentation:
    """The batch augmentation of a training run on ``dataset`` with the ``crop`` of :func:`training_crop`; each part
    left None takes the data set's default. Image folders get AutoFormer's recipe (timm's ImageNet training transform
    with ``rand-m9-mstd0.5-inc1``, random erasing 0.25, mixup 0.8, cutmix 1.0; the random-resized crop is made while
    reading, ``nas.imagefolder``); CIFAR a crop after padding by an eighth of the side and a flip; MNIST the crop
    only (its mirror images are other symbols); the 8x8 digits nothing (a one-pixel shift already moves an eighth of
    the image and stalls a short run), nor the digit canvases (labelled per pixel: a crop would move the images
    without their label maps). ``rand_augment`` is timm's notation, or "none"."""
    folder = dataset == "imagefolder"
    crop = training_crop(dataset, crop)
    flip = (dataset not in ("digits", "mnist", "mnist-seg")) if flip is None else flip
    rand_augment = rand_augment or (AUTOFORMER_RAND_AUGMENT if folder else "none")
    fill = tuple(min(255, round(255 * m)) for m in mean)  # timm fills with the mean colour
    return Augmentation(
        pad=max(1, img_size // 8) if crop == "pad" else 0, flip=flip,
        rand_augment=None if rand_augment == "none" else RandAugment.parse(rand_augment, fill),
        random_erasing=(0.25 if folder else 0.0) if random_erasing is None else random_erasing,
        mixup=(0.8 if folder else 0.0) if mixup is None else mixup,
        cutmix=(1.0 if folder else 0.0) if cutmix is None else cutmix)

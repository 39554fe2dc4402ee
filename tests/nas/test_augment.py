"""Every augmentation op against its definition: RandAugment's ops against PIL (which timm applies) and against values
worked out by hand on tiny images; random erasing, random-resized crop and cutmix boxes against their distributions;
mixup and cutmix label mixing; the crop after padding and the flip; the recipes of the data sets."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from nas import augment as A
from nas.data import normalize
from nas.imagefolder import IMAGENET_STATS, random_resized_crop_box

FILL = (124, 116, 104)  # timm's fill: ImageNet's mean colour


def random_images(count: int, height: int = 7, width: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (count, 3, height, width), dtype=np.uint8))


def with_pil(images: torch.Tensor, op) -> torch.Tensor:
    """``op(PIL image)`` for each image of a uint8 batch."""
    return torch.stack([torch.from_numpy(np.array(op(Image.fromarray(image.permute(1, 2, 0).numpy()))))
                        .permute(2, 0, 1) for image in images])


def per_image(values, count: int) -> torch.Tensor:
    return torch.tensor([values] * count if np.isscalar(values) else values, dtype=torch.float64)


# -- the ops against PIL ----------------------------------------------------------------------------------------

def test_pixel_ops_give_pils_pixels():
    images = random_images(6)
    images[1, 0] = 77  # a flat channel: autocontrast and equalize leave it alone
    images[2] = images[2] // 64  # few values: equalize's step is zero
    n = len(images)
    assert torch.equal(A.auto_contrast(images), with_pil(images, ImageOps.autocontrast))
    assert torch.equal(A.equalize(images), with_pil(images, ImageOps.equalize))
    assert torch.equal(A.invert(images), with_pil(images, ImageOps.invert))
    for bits in (1, 4, 7, 8):
        expected = with_pil(images, lambda i: ImageOps.posterize(i, bits))
        assert torch.equal(A.posterize(images, per_image(bits, n)), expected)
    for threshold in (0, 26, 128, 256):
        assert torch.equal(A.solarize(images, per_image(threshold, n)),
                           with_pil(images, lambda i: ImageOps.solarize(i, threshold)))


@pytest.mark.parametrize("name, enhancer", [("color", ImageEnhance.Color), ("contrast", ImageEnhance.Contrast),
                                            ("brightness", ImageEnhance.Brightness),
                                            ("sharpness", ImageEnhance.Sharpness)])
def test_enhance_ops_give_pils_pixels(name, enhancer):
    images = random_images(5, seed=1)
    factors = [0.1, 0.55, 1.0, 1.37, 1.9]  # timm's range at magnitude 10, both sides of 1
    expected = torch.stack([with_pil(images[i:i + 1], lambda im: enhancer(im).enhance(f))[0]
                            for i, f in enumerate(factors)])
    assert torch.equal(getattr(A, name)(images, torch.tensor(factors, dtype=torch.float64)), expected)


@pytest.mark.parametrize("op, pil_matrix", [
    (A.shear_x, lambda v, w, h: (1, v, 0, 0, 1, 0)),
    (A.shear_y, lambda v, w, h: (1, 0, 0, v, 1, 0)),
    (A.translate_x, lambda v, w, h: (1, 0, v * w, 0, 1, 0)),
    (A.translate_y, lambda v, w, h: (1, 0, 0, 0, 1, v * h)),
])
def test_affine_ops_read_the_points_pil_reads_and_fill_what_pil_fills(op, pil_matrix):
    """With nearest sampling the pixels must be PIL's own (same point read, same pixels filled); values avoid ties."""
    images = random_images(4, 11, 13, seed=2)
    values = [0.213, -0.271, 0.377, -0.0531]
    out = op(images, torch.tensor(values, dtype=torch.float64), FILL, mode="nearest")
    for image, value, got in zip(images, values, out):
        pil = Image.fromarray(image.permute(1, 2, 0).numpy())
        matrix = pil_matrix(value, pil.width, pil.height)
        expected = pil.transform(pil.size, Image.AFFINE, matrix, Image.NEAREST, fillcolor=FILL)
        assert torch.equal(got.permute(1, 2, 0), torch.from_numpy(np.array(expected))), (op.__name__, value)


def test_rotate_reads_the_points_pil_reads():
    images = random_images(3, 10, 14, seed=3)
    degrees = [17.3, -24.9, 90.0]
    out = A.rotate(images, torch.tensor(degrees, dtype=torch.float64), FILL, mode="nearest")
    for image, angle, got in zip(images, degrees, out):
        pil = Image.fromarray(image.permute(1, 2, 0).numpy())
        expected = np.array(pil.rotate(angle, resample=Image.NEAREST, fillcolor=FILL))
        mismatch = (got.permute(1, 2, 0).numpy() != expected).any(-1)
        # A point on a pixel boundary (cos and sin of 90 degrees are not exact in floating point) may round either way.
        assert mismatch.mean() < (0.05 if angle == 90.0 else 0.0) + 1e-9, angle


def test_bicubic_geometry_is_exact_where_no_interpolation_is_needed():
    images = random_images(2, 8, 8, seed=4)
    shifted = A.translate_x(images, torch.tensor([2 / 8, -3 / 8], dtype=torch.float64), FILL)
    assert torch.equal(shifted[0, :, :, :6], images[0, :, :, 2:])  # output x reads input x + 2
    assert torch.equal(shifted[0, :, :, 6:], torch.tensor(FILL, dtype=torch.uint8).view(3, 1, 1).expand(3, 8, 2))
    assert torch.equal(shifted[1, :, :, 3:], images[1, :, :, :5])
    turned = A.rotate(images, torch.tensor([180.0, 180.0], dtype=torch.float64), FILL)
    assert torch.equal(turned, images.flip(-1).flip(-2))


# -- the ops by hand ------------------------------------------------------------------------------------------------

def tiny(values) -> torch.Tensor:
    """A one-image, one-channel uint8 batch."""
    return torch.tensor(values, dtype=torch.uint8).view(1, 1, *np.shape(values))


def test_ops_on_tiny_images_worked_out_by_hand():
    x = tiny([[10, 20], [30, 40]])
    # autocontrast: scale 255 / 30 = 8.5, offset -85: 10 -> 0, 20 -> 85, 30 -> 170, 40 -> 255.
    assert A.auto_contrast(x).flatten().tolist() == [0, 85, 170, 255]
    # equalize, counts 1, 1, 1, 1: step = (4 - 1) // 255 = 0, so nothing changes.
    assert torch.equal(A.equalize(x), x)
    # 300 pixels: 100 of value 0, 100 of 50, 100 of 200. step = (300 - 100) // 255 = 0: unchanged. With 600 pixels
    # (200 each) step = 400 // 255 = 1, lut[v] = (0 + count below v) // 1: 0 -> 0, 50 -> 200, 200 -> 400 -> 255.
    x = tiny([[0] * 200 + [50] * 200 + [200] * 200])
    assert A.equalize(x).flatten().unique().tolist() == [0, 200, 255]
    x = tiny([[0, 127, 128, 200, 255]])
    one = torch.ones(1, dtype=torch.float64)
    assert A.posterize(x, one).flatten().tolist() == [0, 0, 128, 128, 128]
    assert A.posterize(x, 0 * one).flatten().tolist() == [0] * 5  # timm's PosterizeIncreasing at magnitude 10
    assert A.solarize(x, 128 * one).flatten().tolist() == [0, 127, 127, 55, 0]
    assert A.solarize_add(x, 100 * one).flatten().tolist() == [100, 227, 128, 200, 255]
    rgb = torch.tensor([[[[255]], [[0]], [[0]]]], dtype=torch.uint8)  # pure red: grey = 19595 * 255 + 0x8000 >> 16
    assert A.grayscale(rgb).item() == (19595 * 255 + 0x8000) >> 16 == 76
    assert A.color(rgb, 0.5 * one).flatten().tolist() == [int(76 + 0.5 * (255 - 76)), 38, 38]
    assert A.brightness(tiny([[100, 200]]), 1.5 * one).flatten().tolist() == [150, 255]
    assert A.contrast(tiny([[100, 200]]), 2 * one).flatten().tolist() == [50, 250]  # mean 150: 150 -+ 2 * 50


def test_rand_augment_magnitudes_map_to_timms_arguments():
    nine, negate, keep = torch.tensor([9.0], dtype=torch.float64), torch.tensor([True]), torch.tensor([False])
    ops = A.RAND_AUGMENT_OPS

    def arg(name, sign=keep, magnitude=nine):
        return float(ops[name].argument(magnitude, sign))

    assert arg("Rotate") == pytest.approx(27.0) and arg("Rotate", negate) == pytest.approx(-27.0)
    assert arg("ShearX") == pytest.approx(0.27) and arg("TranslateXRel", negate) == pytest.approx(-0.405)
    assert arg("PosterizeIncreasing") == 1 and arg("Posterize") == 3  # 4 - int(3.6); int(3.6)
    assert arg("SolarizeIncreasing") == 256 - 230 and arg("Solarize") == 230 and arg("SolarizeAdd") == 99
    assert arg("ColorIncreasing") == pytest.approx(1.81) and arg("ContrastIncreasing", negate) == pytest.approx(0.19)
    assert arg("Sharpness") == pytest.approx(1.72)


def test_rand_augment_notation():
    policy = A.RandAugment.parse("rand-m9-mstd0.5-inc1", FILL)
    assert (policy.magnitude, policy.magnitude_std, policy.layers, policy.probability) == (9.0, 0.5, 2, 0.5)
    assert policy.ops == A.RAND_INCREASING_OPS and len(policy.ops) == 15 and policy.fill == FILL
    assert A.RandAugment.parse("rand-n3-m5-p0.8").ops == A.RAND_OPS
    assert A.RandAugment.parse("rand-n3-m5-p0.8").layers == 3
    for bad in ("augmix-m9", "rand-x3"):
        with pytest.raises(ValueError, match="rand"):
            A.RandAugment.parse(bad)


def test_rand_augment_runs_each_images_own_ops():
    images = random_images(400, 8, 8, seed=5)
    # One op, applied with probability 0.5 in each of two layers: an image is inverted after an odd number of them.
    policy = A.RandAugment(ops=("Invert",), layers=2, probability=0.5)
    out = policy(images, torch.Generator().manual_seed(0))
    inverted = (out == 255 - images).flatten(1).all(1)
    assert bool(((out == images).flatten(1).all(1) | inverted).all())
    assert 0.4 < inverted.float().mean() < 0.6  # P(odd) = 2 * 0.5 * 0.5
    again = policy(images, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    policy = A.RandAugment.parse("rand-m9-mstd0.5-inc1", FILL)
    full = policy(random_images(16, 32, 32), torch.Generator().manual_seed(1))
    assert full.dtype == torch.uint8 and full.shape == (16, 3, 32, 32)


# -- random erasing, crops, mixing ----------------------------------------------------------------------------------

def test_random_erasing_boxes_follow_timms_distribution():
    height, width, count = 64, 48, 4000
    boxes = A.erasing_boxes(height, width, count, 0.25, torch.Generator().manual_seed(0))
    top, left, h, w = boxes.T.double()
    erased = h > 0
    assert 0.23 < erased.double().mean() < 0.27
    h, w, top, left = h[erased], w[erased], top[erased], left[erased]
    assert bool(((top + h <= height) & (left + w <= width) & (h < height) & (w < width)).all())
    area = h * w / (height * width)
    assert area.min() > 0.015 and area.max() < 0.36  # uniform in [0.02, 1/3] before rounding the sides
    log_aspect = torch.log(h / w)
    assert abs(log_aspect.mean()) < 0.1 and log_aspect.abs().max() < math.log(1 / 0.3) + 0.2
    images = torch.zeros(300, 3, height, width)
    out = A.random_erasing(images, 1.0, torch.Generator().manual_seed(1))
    changed = (out != 0).any(1)  # noise is never exactly zero
    sizes = changed.flatten(1).sum(1)
    assert bool((sizes > 0).all()) and 0.5 < out[changed.unsqueeze(1).expand_as(out)].std() < 1.5


def test_random_resized_crop_boxes_follow_torchvisions_distribution():
    generator = torch.Generator().manual_seed(0)
    height, width = 240, 320
    boxes = torch.tensor([random_resized_crop_box(height, width, generator) for _ in range(3000)], dtype=torch.double)
    top, left, h, w = boxes.T
    assert bool(((top >= 0) & (left >= 0) & (top + h <= height) & (left + w <= width)).all())
    area = h * w / (height * width)
    assert area.min() > 0.07 and area.max() <= 1.0
    log_ratio = torch.log(w / h)
    assert log_ratio.min() > math.log(3 / 4) - 0.05 and log_ratio.max() < math.log(4 / 3) + 0.05
    # Up to half the area every allowed ratio fits a 240 x 320 image, so there the first draw is kept: the area is
    # uniform (as many boxes in [0.08, 0.29) as in [0.29, 0.5)) and the log ratio uniform about 0.
    small = area < 0.5
    lower = int((area[small] < 0.29).sum())
    assert abs(lower / int(small.sum()) - 0.5) < 0.04
    assert abs(float(log_ratio[small].mean())) < 0.02
    # Nothing fits a 1000 x 10 strip: the fallback is the centred box of the widest allowed ratio.
    assert random_resized_crop_box(1000, 10, generator) == ((1000 - 13) // 2, 0, round(10 / (3 / 4)), 10)


def test_mixup_blends_images_and_labels_alike():
    images, labels = torch.randn(8, 3, 4, 4), torch.arange(8)
    out, targets = A.mix(images, labels, 10, mixup=0.8, cutmix=0.0, generator=torch.Generator().manual_seed(0))
    lam = float(targets[0, 0])
    assert torch.allclose(targets.sum(1), torch.ones(8))
    assert torch.allclose(targets[0, 7], torch.tensor(1 - lam))
    torch.testing.assert_close(out, lam * images + (1 - lam) * images.flip(0))
    lams = [float(A.mix(images, labels, 10, 0.8, 0.0, torch.Generator().manual_seed(s))[1][0, 0]) for s in range(400)]
    assert abs(np.mean(lams) - 0.5) < 0.05  # Beta(0.8, 0.8) is symmetric about 1/2


def test_cutmix_pastes_a_box_and_labels_by_its_area():
    images, labels = torch.randn(6, 3, 20, 16), torch.arange(6)
    for seed in range(20):
        out, targets = A.mix(images, labels, 6, mixup=0.0, cutmix=1.0, generator=torch.Generator().manual_seed(seed))
        pasted = (out != images).any(1)[0]
        rows, cols = pasted.any(1).nonzero().flatten(), pasted.any(0).nonzero().flatten()
        area = int(pasted.sum())
        if area:
            box = (slice(int(rows.min()), int(rows.max()) + 1), slice(int(cols.min()), int(cols.max()) + 1))
            assert area == pasted[box].numel()  # one rectangle
            assert torch.equal(out[:, :, box[0], box[1]], images.flip(0)[:, :, box[0], box[1]])
        assert targets[0, 0] == pytest.approx(1 - area / (20 * 16))
        assert targets[0, 5] == pytest.approx(area / (20 * 16))
    # timm's box: sides int(side * sqrt(1 - lam)) about a uniform centre, clipped.
    assert A.cutmix_box(20, 16, 0.75, torch.Generator().manual_seed(0))[1] - \
        A.cutmix_box(20, 16, 0.75, torch.Generator().manual_seed(0))[0] <= 10


@pytest.mark.parametrize("flip", [False, True])
def test_pad_crop_flip_is_a_padded_crop_or_its_mirror(flip):
    images = torch.randn(64, 2, 6, 7)
    padding = 2
    out = A.pad_crop_flip(images, padding, flip, torch.Generator().manual_seed(4))
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    flips = 0
    for b in range(len(images)):
        crops = [padded[b, :, dy:dy + 6, dx:dx + 7] for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)]
        plain = any(torch.equal(out[b], c) for c in crops)
        mirrored = any(torch.equal(out[b], c.flip(-1)) for c in crops)
        assert plain or (flip and mirrored)
        flips += not plain
    assert (8 < flips < 56) if flip else flips == 0
    again = A.pad_crop_flip(images, padding, flip, torch.Generator().manual_seed(4))
    assert torch.equal(out, again)


def test_recipes_of_the_data_sets():
    autoformer = A.recipe("imagefolder", 224, IMAGENET_STATS[0])
    timm = A.RandAugment.parse("rand-m9-mstd0.5-inc1", FILL)
    assert autoformer == A.Augmentation(pad=0, flip=True, rand_augment=timm, random_erasing=0.25, mixup=0.8, cutmix=1.0)
    assert A.training_crop("imagefolder") == "random-resized" and A.training_crop("cifar10") == "pad"
    assert A.recipe("cifar10", 32, (0.5,) * 3) == A.Augmentation(pad=4, flip=True)
    assert A.recipe("mnist", 28, (0.1,)) == A.Augmentation(pad=3)
    assert A.recipe("digits", 8, (0.1,)) == A.Augmentation()
    assert A.recipe("imagefolder", 32, (0.5,) * 3, rand_augment="none", mixup=0, cutmix=0, random_erasing=0,
                    flip=False) == A.Augmentation()


def test_augmentation_returns_normalised_images_and_loss_targets():
    images, labels = random_images(8, 16, 16), torch.arange(8) % 3
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.2, 0.2)
    x, targets = A.Augmentation()(images, labels, torch.Generator(), mean, std, 3)
    assert torch.equal(x, normalize(images, mean, std)) and targets is labels
    x, targets = A.recipe("imagefolder", 16, mean)(images, labels, torch.Generator().manual_seed(0), mean, std, 3)
    assert x.dtype == torch.float32 and targets.shape == (8, 3) and torch.allclose(targets.sum(1), torch.ones(8))

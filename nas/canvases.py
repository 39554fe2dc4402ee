"""A small real segmentation data set, ``mnist-seg``: canvases of several real MNIST digits, labelled per pixel.

Built from the MNIST test set (``--data-dir`` holding ``t10k-images-idx3-ubyte[.gz]`` and its labels; nothing is
downloaded or written): each digit is shrunk from 28x28 to 14x14 by averaging 2x2 blocks and put on a black 32x32
canvas, :data:`DIGITS_PER_CANVAS` digits a canvas in distinct cells of a 2x2 grid, shifted at random inside their cells
(:func:`place`). A canvas pixel holds the brightest digit pixel over it; its label is the class of that digit where
its ink is at least :data:`INK` (of 255), else :data:`BACKGROUND`. So the labels come from the digit
images themselves, and there are 11 classes: the ten digits and the background.

Training canvases use MNIST test images 0..7999, test canvases images 8000..9999: no digit image is in both. The
canvases are a fixed function of the MNIST files (a seeded generator per split).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CANVAS = 32
DIGIT = 14
DIGITS_PER_CANVAS = 3
INK = 128
BACKGROUND = 10
CLASSES = [str(d) for d in range(10)] + ["background"]
SPLITS = {"train": (range(0, 8000), 8000, 1), "test": (range(8000, 10000), 1000, 2)}  # digits, canvases, seed


@dataclass
class Placement:
    """Where each canvas's digits are: ``digits [N, K]`` indices into the source digits, ``rows``/``cols`` [N, K] the
    top-left corners, in the order they were placed."""

    digits: np.ndarray
    rows: np.ndarray
    cols: np.ndarray


def shrink(digits: np.ndarray) -> np.ndarray:
    """``[N, 28, 28]`` uint8 digits as ``[N, 14, 14]`` uint8: the rounded mean of each 2x2 block."""
    blocks = digits.reshape(len(digits), DIGIT, 2, DIGIT, 2).astype(np.float64).mean(axis=(2, 4))
    return np.round(blocks).astype(np.uint8)


def place(count: int, pool: int, rng: np.random.Generator) -> Placement:
    """``count`` canvases of :data:`DIGITS_PER_CANVAS` digits drawn from ``pool`` source digits: the canvas is a 2x2
    grid of 16x16 cells, the digits go to distinct random cells, each shifted by 0..2 pixels inside its cell."""
    digits = rng.integers(pool, size=(count, DIGITS_PER_CANVAS))
    cells = np.argsort(rng.random((count, 4)), axis=1)[:, :DIGITS_PER_CANVAS]
    cell = CANVAS // 2
    shifts = rng.integers(cell - DIGIT + 1, size=(2, count, DIGITS_PER_CANVAS))
    return Placement(digits, cell * (cells // 2) + shifts[0], cell * (cells % 2) + shifts[1])


def paint(small: np.ndarray, labels: np.ndarray, placement: Placement) -> tuple[np.ndarray, np.ndarray]:
    """Canvases ``[N, 32, 32]`` uint8 and their label maps ``[N, 32, 32]`` int64 from shrunk digits and their labels."""
    count = len(placement.digits)
    ink = np.zeros((count, DIGITS_PER_CANVAS, CANVAS, CANVAS), dtype=np.uint8)  # each digit on its own canvas
    for k in range(DIGITS_PER_CANVAS):
        for n in range(count):
            r, c = placement.rows[n, k], placement.cols[n, k]
            ink[n, k, r:r + DIGIT, c:c + DIGIT] = small[placement.digits[n, k]]
    images = ink.max(axis=1)
    top = ink.argmax(axis=1)  # the first of equal maxima: the digit placed first
    classes = np.take_along_axis(labels[placement.digits], top.reshape(count, -1), axis=1).reshape(top.shape)
    return images, np.where(images >= INK, classes, BACKGROUND)


__all__ = ["BACKGROUND", "CANVAS", "CLASSES", "DIGIT", "DIGITS_PER_CANVAS", "INK", "SPLITS", "Placement", "paint",
           "place", "shrink"]

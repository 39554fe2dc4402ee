"""Image classification data for supernet training, with no torchvision.

Every data set yields batches ``(images, labels)``: ``uint8 [B, C, H, W]`` and ``int64 [B]``. Images are
normalised (:func:`normalize`) and augmented (``nas.augment``) on the training device, batch at a time, with plain
torch ops, so that a GPU does that work and no per-image Python runs.

Built in:
- ``digits``: scikit-learn's 8x8 digits (ships inside the package, no files needed), a fixed 80/20 split.
- ``cifar10`` / ``cifar100``: the standard "python version" layout (``data_batch_1..5``/``test_batch``,
  or ``train``/``test``).
- ``mnist``: IDX files (``train-images-idx3-ubyte[.gz]``, ``t10k-...``), gzipped or not.
- ``imagefolder``: ``root/{train,val|test}/<class>/<image>``, read lazily (``nas.imagefolder``): decoded with PIL and
  cropped to the model's size when a batch asks for it, in the data loader's workers.

Held-out search split (:class:`SearchSplit`): the first images of a fixed permutation of the training set
(``np.random.default_rng(HOLDOUT_SEED)``) stay out of training, so that ``nas.search`` ranks archs on images the
supernet never saw; training records the split in its checkpoints and the search reads it back
(:func:`images_to_search`).

Sharding and order come from :class:`torch.utils.data.DistributedSampler`: batch ``i`` of epoch ``e`` is a
pure function of ``(seed, e, rank, world_size)``, which is what lets a resumed run see the same batches.
"""
from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler

from . import canvases
from .errors import CheckpointError, CheckpointMismatchError, ConfigError, DataError, require
from .imagefolder import ImageFolder
from .memory import memory_limit_bytes

DATASETS = ("digits", "cifar10", "cifar100", "mnist", "mnist-seg", "imagefolder")
DENSE_DATASETS = ("mnist-seg",)  # labelled per pixel (nas.canvases)
HOLDOUT_SEED = 1  # seed of the permutation whose first images are held out of training for search

# Published per-channel statistics (pixel values in [0, 1]).
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
MNIST_STATS = ((0.1307,), (0.3081,))


class TensorImageDataset(Dataset):
    """Images held in memory as one ``uint8 [N, C, H, W]`` tensor; a batch is one indexing op. Labels are ``[N]``,
    or ``[N, H, W]`` for a segmentation data set (a class per pixel)."""

    def __init__(self, images: Tensor, labels: Tensor, classes: Sequence[str], mean: Sequence[float],
                 std: Sequence[float]):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"TensorImageDataset: images must be uint8 [N, C, H, W], got {images.dtype} "
                             f"{tuple(images.shape)}")
        if labels.shape not in ((images.shape[0],), (images.shape[0], *images.shape[2:])):
            raise ValueError(f"TensorImageDataset: {images.shape[0]} images of {tuple(images.shape[1:])} but labels of "
                             f"shape {tuple(labels.shape)}")
        self.images, self.labels = images, labels.long()
        self.classes, self.mean, self.std = list(classes), tuple(mean), tuple(std)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.images[index], self.labels[index]

    def subset(self, indices: Sequence[int] | Tensor) -> "TensorImageDataset":
        index = torch.as_tensor(indices, dtype=torch.long)
        return TensorImageDataset(self.images[index], self.labels[index], self.classes, self.mean, self.std)


def _require_dir(root: str | None, name: str) -> str:
    if not root:
        raise DataError(f"data set {name!r} needs a data directory (data_dir / --data-dir)")
    if not os.path.isdir(root):
        raise DataError(f"data directory for {name!r} not found: {os.path.abspath(root)!r}")
    return root


# numpy's own array reconstructors, wherever this numpy version keeps them (pickles name numpy.core.* or numpy._core.*).
_RECONSTRUCT_ARRAY = np.ndarray((0,), np.uint8).__reduce__()[0]
_ARRAY_FROM_BUFFER = np.zeros(1, np.uint8).__reduce_ex__(5)[0]


def _declared_bytes(shape, dtype) -> int:
    """Bytes an array of ``shape`` and ``dtype`` takes, from the declaration alone (nothing allocated)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if not all(isinstance(side, int) and side >= 0 for side in shape):
        raise pickle.UnpicklingError(f"an array of shape {shape!r}, not of non-negative ints")
    return math.prod(shape) * np.dtype(dtype).itemsize


def _numeric_dtype(*args):
    dtype = np.dtype(*args)
    if dtype.kind not in "biuf":
        raise pickle.UnpicklingError(f"an array of dtype {dtype}, not of numbers")
    return dtype


class CifarUnpickler(pickle.Unpickler):
    """Unpickles what a CIFAR batch holds (dicts, lists, bytes, str, numbers, numpy arrays of numbers) and
    nothing else: a plain unpickler calls whatever function a file names, so a crafted file runs any code. An array is
    made only once the size it declares is checked: no larger than the file, whose bytes are all its values can come
    from (a 60-byte file may declare ``ndarray((10**13,))``, which numpy would allocate)."""

    def __init__(self, file, max_array_bytes: int, **options):
        super().__init__(file, **options)
        self.max_array_bytes = max_array_bytes
        self.globals = {
            ("numpy", "ndarray"): self._ndarray,
            ("numpy", "dtype"): _numeric_dtype,
            ("numpy.core.multiarray", "_reconstruct"): self._reconstruct,   # pickle protocols 2 to 4
            ("numpy._core.multiarray", "_reconstruct"): self._reconstruct,
            ("numpy.core.numeric", "_frombuffer"): _ARRAY_FROM_BUFFER,       # protocol 5: a view of the file's bytes
            ("numpy._core.numeric", "_frombuffer"): _ARRAY_FROM_BUFFER,
        }

    def _check_size(self, shape, dtype) -> None:
        declared = _declared_bytes(shape, dtype)
        if declared > self.max_array_bytes:
            raise pickle.UnpicklingError(f"it declares an array of shape {shape!r} "
                                         f"({declared} bytes) in a file of {self.max_array_bytes} bytes")

    def _ndarray(self, shape, dtype=float, *args, **kwargs) -> np.ndarray:
        self._check_size(shape, _numeric_dtype(dtype))
        return np.ndarray(shape, _numeric_dtype(dtype), *args, **kwargs)

    def _reconstruct(self, subtype, shape, typecode) -> np.ndarray:
        """numpy's ``_reconstruct`` of a plain array; the values and the real shape follow (``__setstate__``, which
        checks them against the bytes the file holds)."""
        if subtype != self._ndarray:
            raise pickle.UnpicklingError(f"an array of type {subtype!r}, not numpy.ndarray")
        self._check_size(shape, np.uint8)
        return _RECONSTRUCT_ARRAY(np.ndarray, shape, typecode)

    def find_class(self, module: str, name: str):
        try:
            return self.globals[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR batch never holds") from None


def _unpickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            batch = CifarUnpickler(f, os.fstat(f.fileno()).st_size, encoding="bytes").load()
    except FileNotFoundError as err:
        raise DataError(f"CIFAR file missing: {path!r} (expected the standard python layout)") from err
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, OverflowError) as err:
        raise DataError(f"CIFAR file {path!r} is corrupt or not a CIFAR batch (not unpickled): {err}") from err
    if not isinstance(batch, dict):
        raise DataError(f"CIFAR file {path!r} holds a {type(batch).__name__}, not a CIFAR batch (a dict)")
    return batch


def _read_cifar_batch(path: str, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``uint8 [N, 3, 32, 32]`` images and int64 labels of one batch file, checked."""
    batch = _unpickle(path)
    try:
        images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (KeyError, ValueError, TypeError, OverflowError) as err:
        raise DataError(f"CIFAR file {path!r} does not hold {b'data'!r} (N x 3072 pixels) and {label_key!r} "
                        f"(N labels): {err!r}") from err
    if labels.shape != images.shape[:1]:
        raise DataError(f"CIFAR file {path!r}: {images.shape[0]} images but labels of shape {labels.shape}")
    _check_labels(labels, num_classes, path)
    return images, labels


def _check_labels(labels: np.ndarray, num_classes: int, path: str) -> None:
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if outside.size:
        raise DataError(f"{path!r}: {outside.size} label(s) outside 0..{num_classes - 1}, e.g. {int(outside[0])}")


def load_cifar(root: str | None, split: str, num_classes: int = 10) -> TensorImageDataset:
    name = f"cifar{num_classes}"
    root = _require_dir(root, name)
    if num_classes == 10:
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        label_key, meta_file, names_key, stats = b"labels", "batches.meta", b"label_names", CIFAR10_STATS
    else:
        files = ["train"] if split == "train" else ["test"]
        label_key, meta_file, names_key, stats = b"fine_labels", "meta", b"fine_label_names", CIFAR100_STATS
    batches = [_read_cifar_batch(os.path.join(root, f), label_key, num_classes) for f in files]
    images = np.concatenate([images for images, _ in batches])
    labels = np.concatenate([labels for _, labels in batches])
    meta_path = os.path.join(root, meta_file)
    classes = [str(i) for i in range(num_classes)]
    if os.path.exists(meta_path):
        try:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in _unpickle(meta_path)[names_key]]
        except (KeyError, TypeError, UnicodeDecodeError) as err:
            raise DataError(f"CIFAR file {meta_path!r} does not hold the list {names_key!r} of class names: "
                            f"{err!r}") from err
    return TensorImageDataset(torch.from_numpy(images), torch.from_numpy(labels), classes, *stats)


def _read_idx(root: str, stem: str) -> tuple[np.ndarray, str]:
    """The array in the IDX file ``stem`` (gzipped or not) under ``root``, and the file's path."""
    for path in (os.path.join(root, stem), os.path.join(root, stem + ".gz")):
        if os.path.exists(path):
            break
    else:
        raise DataError(f"MNIST file missing: {os.path.join(root, stem)}[.gz]")
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:  # the header first: a gzip file may inflate to far more than it declares
            zero, dtype_code, ndim = struct.unpack(">HBB", f.read(4))
            if zero != 0 or dtype_code != 0x08:
                raise ValueError(f"bad IDX magic (expected unsigned bytes), got {zero:04x}{dtype_code:02x}{ndim:02x}")
            shape = struct.unpack(f">{ndim}I", f.read(4 * ndim))
            declared = math.prod(shape)
            if declared > memory_limit_bytes(None):
                raise ValueError(f"it declares {shape} bytes of pixels, more than this machine's memory allows")
            data = f.read(declared + 1)
        if len(data) != declared:
            raise ValueError(f"it declares an array of shape {shape} ({declared} bytes) but holds "
                             f"{'more' if len(data) > declared else len(data)} bytes")
        return np.frombuffer(data, dtype=np.uint8).reshape(shape), path
    except (OSError, EOFError, ValueError, struct.error) as err:
        raise DataError(f"MNIST file {path!r} is corrupt: {err}") from err


def load_mnist(root: str | None, split: str) -> TensorImageDataset:
    root = _require_dir(root, "mnist")
    prefix = "train" if split == "train" else "t10k"
    images, images_path = _read_idx(root, f"{prefix}-images-idx3-ubyte")
    labels, labels_path = _read_idx(root, f"{prefix}-labels-idx1-ubyte")
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(f"MNIST {split}: expected N x H x W images and N labels, got shapes {images.shape} "
                        f"({images_path!r}) and {labels.shape} ({labels_path!r})")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels under {root!r}")
    labels = labels.astype(np.int64)
    _check_labels(labels, 10, labels_path)
    return TensorImageDataset(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels),
                              [str(i) for i in range(10)], *MNIST_STATS)


def load_digit_canvases(root: str | None, split: str) -> TensorImageDataset:
    """The ``split`` of ``mnist-seg`` (``nas.canvases``: digit canvases labelled per pixel) from the MNIST test files
    under ``root``."""
    source = load_mnist(root, "test")
    indices, count, seed = canvases.SPLITS[split]
    index = torch.as_tensor(list(indices))
    small = canvases.shrink(source.images[index, 0].numpy())
    placement = canvases.place(count, len(small), np.random.default_rng(seed))
    images, labels = canvases.paint(small, source.labels[index].numpy(), placement)
    mean, std = canvas_stats(root) if split == "test" else (images.mean() / 255.0, images.std() / 255.0)
    return TensorImageDataset(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels), canvases.CLASSES,
                              (float(mean),), (float(std),))


def canvas_stats(root: str | None) -> tuple[float, float]:
    """Mean and standard deviation of the training canvases' pixels (in [0, 1]), which both splits normalise by."""
    train = load_digit_canvases(root, "train")
    return train.mean[0], train.std[0]


def load_digits(split: str, test_fraction: float = 0.2) -> TensorImageDataset:
    """scikit-learn's 1797 8x8 digits (grey levels 0..16 scaled to 0..255); a fixed shuffled split."""
    bunch = require("sklearn.datasets", "nas", "the digits data set").load_digits()
    order = np.random.default_rng(0).permutation(len(bunch.target))
    n_test = int(round(len(order) * test_fraction))
    index = order[n_test:] if split == "train" else order[:n_test]
    pixels = np.round(bunch.images[index] * (255.0 / 16.0)).astype(np.uint8)
    images = torch.from_numpy(pixels).unsqueeze(1)
    train_pixels = bunch.images[order[n_test:]] / 16.0
    return TensorImageDataset(images, torch.from_numpy(bunch.target[index].astype(np.int64)),
                              [str(i) for i in range(10)], (float(train_pixels.mean()),), (float(train_pixels.std()),))


def load_dataset(name: str, root: str | None = None, split: str = "train", image_size: int | None = None,
                 in_chans: int = 3) -> Dataset:
    """One split (``"train"`` or ``"test"``) of a data set named in :data:`DATASETS`.

    ``image_size``/``in_chans`` only matter for ``imagefolder`` (images are cropped to the model's input with the
    evaluation crop; training switches to its own, ``ImageFolder.with_crop``); the other data sets have a fixed size
    that the search space must match.
    """
    if split not in ("train", "test"):
        raise ValueError(f"load_dataset: split must be 'train' or 'test', got {split!r}")
    if name == "digits":
        return load_digits(split)
    if name in ("cifar10", "cifar100"):
        return load_cifar(root, split, num_classes=int(name[5:]))
    if name == "mnist":
        return load_mnist(root, split)
    if name == "mnist-seg":
        return load_digit_canvases(root, split)
    if name == "imagefolder":
        root = _require_dir(root, name)
        candidates = ["train"] if split == "train" else ["test", "val"]
        for sub in candidates:
            if os.path.isdir(os.path.join(root, sub)):
                return ImageFolder(os.path.join(root, sub), image_size or 224, in_chans)
        raise DataError(f"imagefolder: no {' or '.join(candidates)} folder under {os.path.abspath(root)!r}")
    raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")


def subset(dataset: Dataset, indices: Sequence[int] | np.ndarray | Tensor) -> Dataset:
    """The images ``indices`` of ``dataset``, in that order (still one tensor for in-memory data sets, still a lazy
    folder for image folders)."""
    index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
    if isinstance(dataset, (TensorImageDataset, ImageFolder)):
        return dataset.subset(index)
    return torch.utils.data.Subset(dataset, index.tolist())


def fixed_subset(dataset: Dataset, count: int | None, seed: int = 0) -> Dataset:
    """``count`` images of ``dataset`` picked by a fixed permutation (all when None or larger)."""
    if count is None or count >= len(dataset):
        return dataset
    return subset(dataset, np.random.default_rng(seed).permutation(len(dataset))[:count])


def default_holdout(num_images: int) -> int:
    """Training images held out for search unless told otherwise: AutoFormer's 10,000, at most a fifth."""
    return min(10_000, num_images // 5)


def holdout_split(num_images: int, count: int, seed: int = HOLDOUT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """``(held_out, kept)`` indices into a training set of ``num_images``: the first ``count`` images of
    ``np.random.default_rng(seed).permutation(num_images)``, and every other image in its original order.
    Held-out sets of one seed are nested: fewer images are the first ones of more."""
    if not 0 <= count <= num_images:
        raise ValueError(f"holdout_split: cannot hold out {count} of {num_images} images")
    order = np.random.default_rng(seed).permutation(num_images)
    return order[:count], np.sort(order[count:])


@dataclass(frozen=True)
class SearchSplit:
    """The training images kept out of supernet training for the search: the first ``images`` of
    :func:`holdout_split`'s permutation (``seed``) of the ``dataset`` training set of ``of`` images. Training
    writes it into its checkpoints as a mapping (:meth:`to_dict`), the search reads it back (:meth:`from_dict`)."""

    images: int
    seed: int
    of: int
    dataset: str

    @classmethod
    def hold_out(cls, dataset: str, train_images: int, count: int | None) -> SearchSplit:
        """``count`` images of a training set of ``train_images`` (None: :func:`default_holdout`; 0: none)."""
        count = default_holdout(train_images) if count is None else count
        if count >= train_images:
            raise ConfigError(f"search_holdout={count} leaves no images to train on: the {dataset} training set has "
                              f"{train_images}")
        return cls(count, HOLDOUT_SEED, train_images, dataset)

    def indices(self) -> tuple[np.ndarray, np.ndarray]:
        """``(held_out, kept)``: see :func:`holdout_split`."""
        return holdout_split(self.of, self.images, self.seed)

    def calibration_indices(self, count: int) -> np.ndarray:
        """The first ``count`` training images kept for training: those a supernet with BatchNorm re-estimates its
        statistics on for each subnet it evaluates, in training and in the search alike."""
        return self.indices()[1][:count]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping, source: str) -> SearchSplit:
        """The split a checkpoint (named ``source`` in errors) records."""
        kinds = {"images": int, "seed": int, "of": int, "dataset": str}
        if not isinstance(values, Mapping) or not all(type(values.get(k)) is kind for k, kind in kinds.items()):
            raise CheckpointError(f"{source} records a malformed search split {values!r}; expected a mapping of "
                                  "images, seed, of (integers) and dataset (a name)")
        return cls(**{k: values[k] for k in kinds})


def images_to_search(split: SearchSplit | None, dataset: str, train_images: int, requested: int,
                     source: str) -> np.ndarray:
    """Indices of the training images to search on: the first ``requested`` (0: all) of those that ``split``, the
    split the ``source`` checkpoint records, held out. A checkpoint that held none out (or that records no split)
    gets a warning and the default count of the same permutation: the supernet trained on those images."""
    if split is not None and (split.dataset, split.of) != (dataset, train_images):
        raise CheckpointMismatchError(
            f"{source} held out search images of a {split.dataset} training set of {split.of} images, not of this "
            f"{dataset} one ({train_images}); search on that data set or with --set search_on=test")
    if split is None or split.images == 0:
        why = ("was trained with search_holdout=0" if split is not None
               else "records no held-out split (written before nas.train held one out)")
        count = requested or default_holdout(train_images)
        warnings.warn(f"{source} {why}: the supernet trained on every {dataset} training image, so the {count} "
                      f"search images score near training accuracy and rank archs poorly; train with search_holdout "
                      f"> 0 (the default) or search with --search-on test", stacklevel=2)
        if not 1 <= count < train_images:
            raise ConfigError(f"holdout_images must be in 1..{train_images - 1} (the {dataset} training images), "
                              f"got {requested}")
        return holdout_split(train_images, count)[0]
    count = requested or split.images
    if count > split.images:
        raise ConfigError(f"holdout_images={count}, but {source} held only {split.images} {dataset} training images "
                          f"out of training (nas.train's search_holdout); ask for at most {split.images}, or search "
                          "with --set search_on=test")
    return holdout_split(train_images, count, split.seed)[0]


def check_task(dataset: str, task: str) -> None:
    """A data set labelled per pixel needs a segmentation space, one labelled per image a classification space."""
    dense = dataset in DENSE_DATASETS
    if dense != (task == "segmentation"):
        raise DataError(f"data set {dataset!r} is labelled per {'pixel' if dense else 'image'} but the search space's "
                        f"task is {task}; use a {'segmentation' if dense else 'classification'} space")


def num_classes_of(dataset: Dataset) -> int:
    return len(dataset.classes)


def check_matches(dataset: Dataset, img_size: int, in_chans: int, num_classes: int, what: str) -> None:
    """Clear error where a data set does not fit the model's input or classifier."""
    channels, height, width = dataset.image_shape
    if (channels, height, width) != (in_chans, img_size, img_size):
        raise DataError(f"{what}: images are {channels}x{height}x{width} but the search space expects "
                        f"{in_chans}x{img_size}x{img_size}; pick a matching space")
    if num_classes_of(dataset) != num_classes:
        raise DataError(f"{what}: {num_classes_of(dataset)} classes but the search space has num_classes={num_classes}")


# Loader worker processes a run may ask for: far past what feeds one GPU, short of a slip that forks thousands.
MAX_WORKERS = 256


def _as_batch(batch):
    return batch


def _iterate(dataset: Dataset, index_batches: list, num_workers: int, seed: tuple[int, ...]) -> Iterator:
    """Batches through a DataLoader (workers where asked). Its own generator: a DataLoader draws its workers'
    base seed from the global RNG otherwise, which would shift drop-path and break exact resume."""
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence(list(seed)).generate_state(1)[0]))
    return iter(DataLoader(dataset, batch_sampler=index_batches, collate_fn=_as_batch, num_workers=num_workers,
                           generator=generator))


def train_batches(dataset: Dataset, batch_size: int, *, epoch: int, seed: int, rank: int = 0, world_size: int = 1,
                  start: int = 0, num_workers: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """The training batches of one epoch for ``rank``, shuffled by ``(seed, epoch)``, from batch ``start`` on (an image
    folder's random crops drawn for ``epoch``)."""
    if isinstance(dataset, ImageFolder):
        dataset = dataset.for_epoch(epoch)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    index_batches = list(BatchSampler(sampler, batch_size, drop_last=True))[start:]
    return _iterate(dataset, index_batches, num_workers, seed=(seed, epoch, rank))


def steps_per_epoch(dataset: Dataset, batch_size: int, world_size: int = 1) -> int:
    steps = (len(dataset) // world_size) // batch_size
    if steps == 0:
        raise DataError(f"the training set ({len(dataset)} images) is smaller than one batch of {batch_size} "
                        f"on each of {world_size} process(es); lower batch_size")
    return steps


def eval_batches(dataset: Dataset, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """Every image exactly once over all ranks (rank r takes images r, r + world_size, ...), in order."""
    shard = list(range(rank, len(dataset), world_size))
    index_batches = [shard[i:i + batch_size] for i in range(0, len(shard), batch_size)]
    return _iterate(dataset, index_batches, num_workers, seed=(rank,))


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float],
              dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 ``[B, C, H, W]`` -> ``(x / 255 - mean) / std`` in ``dtype``, on the images' device."""
    mean_t = torch.tensor(mean, dtype=dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=dtype, device=images.device).view(1, -1, 1, 1)
    return (images.to(dtype) / 255.0 - mean_t) / std_t

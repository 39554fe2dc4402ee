"""Evaluation of many subnets of one supernet over a data loader: top-1, top-5 and loss per arch (a segmentation
supernet: per-pixel top-1 and top-5, the pixels' mean cross-entropy, and the mean IoU over the classes).

Subnets are evaluated K at a time in one pass over the data (their family's batched pass: ``nas.family``), K chosen
from the memory available; results are cached by (arch, data), so that a search never evaluates a candidate twice.

A supernet with BatchNorm (a hybrid one) evaluates each subnet with statistics re-estimated for it on calibration
images (DESIGN.md section 9): before a pass, the BatchNorms are recalibrated for each of its subnets in turn and the
statistics kept (``nas.batch_norm.BatchNormStats``); the pass runs each subnet with its own. The supernet's
statistics are as before afterwards.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Subset

from .atomic import atomic_write_text
from .batch_norm import BatchNormStats, has_batch_norm
from .data import TensorImageDataset, eval_batches, normalize
from .errors import CheckpointError
from .family import Arch, Supernet, check_archs, family_of
from .report import progress_bar


@dataclass(frozen=True)
class EvalResult:
    """Metrics of one subnet over one data set; accuracies in percent, loss is the mean cross-entropy. For
    segmentation the accuracies and the loss are over pixels (each image's mean, averaged over images), and ``miou``
    is the mean intersection over union of the classes (in percent; None for classification)."""

    top1: float
    top5: float
    loss: float
    samples: int
    miou: float | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None or k != "miou"}

    @classmethod
    def from_dict(cls, values: dict) -> "EvalResult":
        names = [f.name for f in fields(cls)]
        required = [n for n in names if n != "miou"]
        if not isinstance(values, dict) or not set(required) <= set(values) <= set(names) or not all(
                isinstance(values[n], (int, float)) and not isinstance(values[n], bool) for n in values):
            raise ValueError(f"an evaluation result is a mapping of {', '.join(required)} (and for segmentation "
                             f"miou) to numbers, got {values!r}")
        return cls(**values)


def confusion_matrix(predictions: Tensor, labels: Tensor, classes: int) -> Tensor:
    """``[classes, classes]`` int64 counts of (label, prediction) pairs over all pixels."""
    pairs = labels.reshape(-1) * classes + predictions.reshape(-1)
    return torch.bincount(pairs, minlength=classes * classes).view(classes, classes)


def mean_iou(confusion: Tensor) -> float:
    """Mean over the classes that occur (in the labels or the predictions) of intersection over union, in 0..1."""
    confusion = confusion.double()
    hits = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - hits
    present = union > 0
    return float((hits[present] / union[present]).mean()) if present.any() else 0.0


class EvalCache:
    """Results keyed by (data fingerprint, arch); optionally persisted to a JSON file, written atomically."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        self._results: dict[str, EvalResult] = {}
        if self.path is not None and os.path.exists(self.path):
            try:
                with open(self.path) as f:
                    self.load_state_dict(json.load(f))
            except (ValueError, AttributeError) as error:
                raise CheckpointError(f"evaluation cache {self.path!r} is corrupt ({error}); delete it to evaluate "
                                      "those archs again") from error

    @staticmethod
    def key(arch: Arch, data_key: str) -> str:
        return f"{data_key}|{arch.to_json()}"

    def get(self, arch: Arch, data_key: str) -> EvalResult | None:
        return self._results.get(self.key(arch, data_key))

    def put(self, arch: Arch, data_key: str, result: EvalResult) -> None:
        self._results[self.key(arch, data_key)] = result

    def __len__(self) -> int:
        return len(self._results)

    def state_dict(self) -> dict:
        return {key: result.to_dict() for key, result in self._results.items()}

    def load_state_dict(self, state: dict) -> None:
        self._results = {key: EvalResult.from_dict(value) for key, value in state.items()}

    def save(self) -> None:
        if self.path is not None:
            atomic_write_text(self.path, json.dumps(self.state_dict()))


class TensorBatches:
    """Re-iterable evaluation batches of in-memory ``uint8 [N, C, H, W]`` images, held on ``device`` in order.

    With ``normalised_dtype`` the images are normalised (``nas.data.normalize``) once, into that dtype (bf16 on a
    GPU, where evaluation runs under bf16 autocast anyway), and every pass of a search reuses them; otherwise they
    stay uint8 (four times smaller than fp32) and each batch is normalised as it is read."""

    def __init__(self, images: Tensor, labels: Tensor, mean: Sequence[float], std: Sequence[float], batch_size: int,
                 device: torch.device | str = "cpu", normalised_dtype: torch.dtype | None = None):
        label_shapes = (images.shape[:1], images.shape[:1] + images.shape[2:])
        if images.dtype != torch.uint8 or images.dim() != 4 or labels.shape not in label_shapes:
            raise ValueError(f"TensorBatches: need uint8 images [N, C, H, W] and labels [N] or [N, H, W], got "
                             f"{images.dtype} {tuple(images.shape)} and {tuple(labels.shape)}")
        if batch_size < 1:
            raise ValueError(f"TensorBatches: batch_size must be >= 1, got {batch_size}")
        self.mean, self.std, self.batch_size = tuple(mean), tuple(std), int(batch_size)
        self._fingerprint: str | None = self._hash(images, labels)
        self.images, self.labels = images.to(device), labels.long().to(device)
        self.normalised = normalised_dtype is not None
        if self.normalised:
            self.images = normalize(self.images, self.mean, self.std).to(normalised_dtype)

    @classmethod
    def from_dataset(cls, dataset, batch_size: int, device: torch.device | str = "cpu",
                     normalised_dtype: torch.dtype | None = None) -> "TensorBatches":
        """From a ``nas.data.TensorImageDataset``."""
        return cls(dataset.images, dataset.labels, dataset.mean, dataset.std, batch_size, device, normalised_dtype)

    @property
    def num_images(self) -> int:
        return self.images.shape[0]

    def __len__(self) -> int:
        return -(-self.images.shape[0] // self.batch_size)

    @property
    def device(self) -> torch.device:
        return self.images.device

    def slice(self, start: int, stop: int) -> "TensorBatches":
        """The images ``start:stop`` (views of these, on the same device: nothing is copied), fingerprinted as the
        slice of these data."""
        part = copy.copy(self)
        part.images, part.labels = self.images[start:stop], self.labels[start:stop]
        part._fingerprint = f"{self._fingerprint}[{start}:{stop}]"
        return part

    def __iter__(self):
        for start in range(0, self.images.shape[0], self.batch_size):
            images = self.images[start:start + self.batch_size]
            if not self.normalised:
                images = normalize(images, self.mean, self.std)
            yield images, self.labels[start:start + self.batch_size]

    def _hash(self, images: Tensor, labels: Tensor) -> str:
        digest = hashlib.sha1(repr((self.mean, self.std)).encode())
        digest.update(images.cpu().contiguous().numpy().tobytes())
        digest.update(labels.cpu().contiguous().numpy().tobytes())
        return f"n={images.shape[0]}:{digest.hexdigest()[:16]}"

    @property
    def fingerprint(self) -> str:
        """A hash of every image and label (as uint8, whether kept normalised or not) and the normalisation."""
        return self._fingerprint


class LoaderBatches:
    """Re-iterable evaluation batches of a data set read lazily (``nas.imagefolder.ImageFolder``): every pass reads it
    in order through a DataLoader with ``num_workers`` worker processes, and the batches are normalised on ``device``.
    Nothing is kept between passes, so a folder of any size evaluates in the memory of a few batches."""

    def __init__(self, dataset, batch_size: int, device: torch.device | str = "cpu", num_workers: int = 0):
        if batch_size < 1:
            raise ValueError(f"LoaderBatches: batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size, self.device, self.num_workers = dataset, int(batch_size), device, num_workers
        self.mean, self.std = dataset.mean, dataset.std
        self._fingerprint: str | None = None

    @property
    def num_images(self) -> int:
        return len(self.dataset)

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def __iter__(self):
        for images, labels in eval_batches(self.dataset, self.batch_size, num_workers=self.num_workers):
            images = images.to(self.device, non_blocking=True)
            yield normalize(images, self.mean, self.std), labels.to(self.device, non_blocking=True)

    def slice(self, start: int, stop: int) -> "LoaderBatches":
        """The images ``start:stop``, read lazily as these are, fingerprinted as the slice of these data."""
        part = copy.copy(self)
        part.dataset = Subset(self.dataset, range(start, stop))
        part._fingerprint = f"{self.fingerprint}[{start}:{stop}]"
        return part

    @property
    def fingerprint(self) -> str:
        """The data set's own (``ImageFolder.fingerprint``): its files, labels and crop."""
        if self._fingerprint is None:
            self._fingerprint = self.dataset.fingerprint()
        return self._fingerprint


def evaluation_batches(dataset, batch_size: int, device: torch.device | str = "cpu", num_workers: int = 0,
                       normalised_dtype: torch.dtype | None = None) -> TensorBatches | LoaderBatches:
    """Re-iterable normalised batches of ``dataset`` in order: held on ``device`` once for an in-memory data set
    (:class:`TensorBatches`, normalised once into ``normalised_dtype`` if given), read anew on each pass for an image
    folder (:class:`LoaderBatches`)."""
    if isinstance(dataset, TensorImageDataset):
        return TensorBatches.from_dataset(dataset, batch_size, device, normalised_dtype)
    return LoaderBatches(dataset, batch_size, device, num_workers)


def data_fingerprint(loader: Iterable) -> str:
    """A key for the data a loader yields: :attr:`TensorBatches.fingerprint` or :attr:`LoaderBatches.fingerprint`,
    else its size and a hash of its first batch (loaders for evaluation do not shuffle)."""
    if isinstance(loader, (TensorBatches, LoaderBatches)):
        return loader.fingerprint
    images, labels = next(iter(loader))
    digest = hashlib.sha1()
    digest.update(images.detach().cpu().contiguous().numpy().tobytes())
    digest.update(labels.detach().cpu().contiguous().numpy().tobytes())
    dataset = getattr(loader, "dataset", None)
    size = len(dataset) if dataset is not None and hasattr(dataset, "__len__") else "?"
    return f"n={size}:{digest.hexdigest()[:16]}"


def available_memory(device: torch.device) -> int:
    """Bytes free for activations on ``device``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def subnets_per_pass(supernet, archs: Sequence[Arch], batch_size: int, device: torch.device, dtype: torch.dtype,
                     memory_fraction: float = 0.5, limit: int = 64) -> int:
    """How many subnets fit in one pass: ``memory_fraction`` of the free memory over one subnet's peak activations."""
    per_subnet = family_of(supernet).pass_memory_per_image(supernet, archs, dtype) * batch_size
    fits = int(available_memory(device) * memory_fraction // max(per_subnet, 1))
    return max(1, min(limit, len(archs), fits))


def _accumulate(totals: Tensor, logits: Tensor, labels: Tensor, confusion: Tensor | None = None) -> None:
    """Add ``[loss sum, top-1 hits, top-5 hits]`` of each subnet's logits ``[K, B, C]`` into ``totals [K, 3]``; for
    segmentation (logits ``[K, B, C, H, W]``, labels ``[B, H, W]``) each image's means over its pixels, and each
    subnet's pixels into ``confusion [K, C, C]``."""
    groups, batch, classes = logits.shape[:3]
    logits = logits.float()
    loss = F.cross_entropy(logits.flatten(0, 1), labels.repeat(groups, *([1] * (labels.dim() - 1))),
                           reduction="none").view(groups, batch, -1).mean(-1)
    top = logits.topk(min(5, classes), dim=2).indices
    hits = top == labels.unsqueeze(0).unsqueeze(2)
    totals[:, 0] += loss.sum(1)
    totals[:, 1] += hits[:, :, 0].reshape(groups, batch, -1).float().mean(-1).sum(1)
    totals[:, 2] += hits.any(2).reshape(groups, batch, -1).float().mean(-1).sum(1)
    if confusion is not None:
        for k in range(groups):
            confusion[k] += confusion_matrix(top[k, :, 0], labels, classes)


def _order_for_grouping(archs: Sequence[Arch]) -> list[int]:
    """Indices of ``archs`` in the order of their family's grouping key (``Family.grouping_key``), so that archs
    sharing most of a batched pass share one."""
    return sorted(range(len(archs)), key=lambda i: family_of(archs[i]).grouping_key(archs[i]))


@torch.no_grad()
def evaluate_archs(supernet, archs: Sequence[Arch], loader: Iterable, *, device: torch.device | str | None = None,
                   subnets: int | None = None, batched: bool = True, cache: EvalCache | None = None,
                   data_key: str | None = None, progress: bool = True, memory_fraction: float = 0.5,
                   autocast_dtype: torch.dtype | None = None, calibration: Iterable | None = None
                   ) -> list[EvalResult]:
    """Top-1/top-5 accuracy and loss (and for segmentation mIoU) of every arch in ``archs`` over ``loader``, a
    re-iterable of normalised
    ``(images, labels)`` batches (e.g. :class:`TensorBatches`, or a DataLoader without shuffling).

    ``calibration``: a re-iterable of normalised batches (images, or tuples whose first item is the images) on which a
    supernet with BatchNorm re-estimates its statistics for each arch before evaluating it; such a supernet needs it
    (ValueError without), and its results are cached under ``data_key`` with the calibration data's fingerprint.

    ``batched``: evaluate ``subnets`` archs per pass over the data (default: as many as fit in
    ``memory_fraction`` of the free memory); False runs each arch alone with the supernet's own forward.
    ``cache``: results already there (same arch, same ``data_key``) are returned without evaluating;
    new results are added. ``data_key`` defaults to :func:`data_fingerprint` of the loader.
    """
    archs = list(archs)
    if not archs:
        return []
    device = torch.device(device) if device is not None else next(supernet.parameters()).device
    check_archs(supernet, archs)
    if has_batch_norm(supernet) and calibration is None:
        raise ValueError("evaluate_archs: the supernet has BatchNorm, whose statistics are re-estimated for each "
                         "subnet before it is evaluated: pass calibration batches (calibration=...)")
    if cache is not None and data_key is None:
        data_key = data_fingerprint(loader)
        if calibration is not None:
            data_key += f"|bn={data_fingerprint(calibration)}"
    results: dict[Arch, EvalResult] = {}
    if cache is not None:
        results = {arch: cached for arch in archs if (cached := cache.get(arch, data_key)) is not None}
    todo = list(dict.fromkeys(arch for arch in archs if arch not in results))
    if todo:
        was_training = supernet.training
        supernet.eval()
        own_statistics = BatchNormStats(supernet) if calibration is not None else None
        try:
            results.update(_evaluate_uncached(supernet, todo, loader, device, subnets, batched, progress,
                                              memory_fraction, autocast_dtype, calibration))
        finally:
            if own_statistics is not None:
                own_statistics.load(supernet)
            supernet.train(was_training)
        if cache is not None:
            for arch in todo:
                cache.put(arch, data_key, results[arch])
    return [results[arch] for arch in archs]


def _pass(supernet, group, batched: bool, calibration, autocast):
    """images -> logits ``[K, B, num_classes]`` of the subnets ``group``, in one pass (``batched``) or a single forward
    of a group of one; with ``calibration``, each subnet's BatchNorm statistics are re-estimated first and kept for
    its share of the pass."""
    statistics = None
    if calibration is not None:
        statistics = []
        for arch in group:
            with autocast():
                supernet.recalibrate_batch_norm(calibration, arch)
            statistics.append(BatchNormStats(supernet))
    if not batched:
        return lambda images: supernet(images, group[0]).unsqueeze(0)
    return family_of(supernet).batched_pass(supernet, group, statistics)


def batched_forward(supernet: Supernet, images: Tensor, archs: Sequence[Arch]) -> Tensor:
    """The outputs ``[K, B, ...]`` of the K subnets ``archs`` of ``supernet`` (in eval mode) on one batch, each equal
    to ``supernet(images, arch)``, computed in batched passes (``Family.batched_pass``; a supernet with BatchNorm runs
    every subnet with the statistics it holds)."""
    archs = list(archs)
    if not archs:
        raise ValueError("batched_forward: no archs given")
    if supernet.training:
        raise ValueError("batched_forward: the supernet is in training mode; batched evaluation runs in eval mode "
                         "(call supernet.eval())")
    check_archs(supernet, archs)
    return family_of(supernet).batched_pass(supernet, archs)(images)


def evaluate_sides(supernet, archs: Sequence[Arch], loader: Iterable, sides: Sequence[str] = ("left",), *,
                   cache: EvalCache | None = None, data_key: str | None = None, batched: bool = True,
                   **options) -> list[EvalResult]:
    """:func:`evaluate_archs` of every arch read from each of ``sides``, the metrics averaged over the sides: ViTAS
    scores a subnet of its two-sided supernet by the mean of its left and right accuracy. Batched passes read leading
    channels, so the right side runs arch by arch. With several sides, results are cached under ``data_key`` and the
    side (each side's alone, never the average)."""
    sides = tuple(sides)
    if sides == ("left",):
        return evaluate_archs(supernet, archs, loader, cache=cache, data_key=data_key, batched=batched, **options)
    if cache is not None and data_key is None:
        data_key = data_fingerprint(loader)
    per_side = [evaluate_archs(supernet, [arch.on_side(side) for arch in archs], loader, cache=cache,
                               data_key=None if data_key is None else f"{data_key}|{side}",
                               batched=batched and side == "left", **options) for side in sides]
    def mean(results: tuple[EvalResult, ...], name: str) -> float | None:
        values = [getattr(r, name) for r in results]
        return None if values[0] is None else sum(values) / len(values)

    return [EvalResult(mean(results, "top1"), mean(results, "top5"), mean(results, "loss"), results[0].samples,
                       mean(results, "miou")) for results in zip(*per_side)]


def _evaluate_uncached(supernet, archs, loader, device, subnets, batched, progress, memory_fraction, autocast_dtype,
                       calibration):
    if batched:
        order = [archs[i] for i in _order_for_grouping(archs)]
        if subnets is None:
            batch_size = getattr(loader, "batch_size", None) or next(iter(loader))[0].shape[0]
            dtype = autocast_dtype or next(supernet.parameters()).dtype
            subnets = subnets_per_pass(supernet, order, batch_size, device, dtype, memory_fraction)
        groups = [order[i: i + subnets] for i in range(0, len(order), subnets)]
    else:
        groups = [[arch] for arch in archs]
    results = {}
    bar = progress_bar(progress, total=len(archs), desc="evaluating subnets", unit="subnet", leave=False)

    def autocast():
        return torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)

    dense = getattr(supernet.config, "global_pool", None) == "dense"  # hybrid supernets classify
    for group in groups:
        totals = torch.zeros(len(group), 3, dtype=torch.float64, device=device)
        classes = supernet.config.num_classes if dense else 0
        confusion = torch.zeros(len(group), classes, classes, dtype=torch.int64, device=device) if dense else None
        samples = 0
        forward = _pass(supernet, group, batched, calibration, autocast)
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with autocast():
                logits = forward(images)
            _accumulate(totals, logits, labels, confusion)
            samples += labels.shape[0]
        if samples == 0:
            raise ValueError("evaluate_archs: the data loader yielded no batches")
        totals = totals.cpu()
        for k, (arch, (loss, top1, top5)) in enumerate(zip(group, totals.tolist())):
            miou = 100.0 * mean_iou(confusion[k]) if dense else None
            results[arch] = EvalResult(top1=100.0 * top1 / samples, top5=100.0 * top5 / samples,
                                       loss=loss / samples, samples=samples, miou=miou)
        bar.update(len(group))
    bar.close()
    return results

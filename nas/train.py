"""Supernet training: ``python -m nas.train [--config FILE] [--set key=value ...] [--resume [PATH]]``.

With no arguments it trains a small supernet of the ``digits-tiny`` space on scikit-learn's 8x8 digits (no
files needed, a few minutes on a laptop CPU) and reports the test accuracy of its smallest and largest
subnets.

One step: the sampler (``nas.samplers``) picks the archs, each runs forward and backward on the step's batch
(gradients summed; with the sandwich rule the smaller subnets learn from the largest's outputs), then
AdamW with warmup + cosine, label smoothing, drop-path, gradient clipping, mixed precision on GPU and an
optional EMA of the weights.

Several processes (``torchrun --nproc_per_node N -m nas.train``): every rank builds the same model and the
same sampler, reads its own shard of each batch, and the gradients are all-reduced by hand after backward.
The model is not wrapped in DistributedDataParallel: the Triton ops add weight gradients into slices of
``param.grad`` in place, which DDP's autograd hooks would never see.

Held-out search split: ``search_holdout`` training images (by default 10,000, at most a fifth of the
training set) never enter a training batch: the first images of the fixed permutation of
:func:`nas.data.holdout_split` (seed ``nas.data.HOLDOUT_SEED``). Checkpoints record the split (count, seed,
data set size) and ``nas.search`` ranks archs on exactly those images. Samplers that measure accuracy (the
learned sampler) measure it on the first ``measure_images`` of the same split; ``train_subset`` picks from
the images left for training.

Checkpoints (model, optimizer, scheduler, scaler, EMA, sampler, RNG states of every rank, step) are written
atomically every ``ckpt_every`` steps and hold only tensors and plain containers (``torch.load(...,
weights_only=True)``), never NaN or infinite values (a diverging run stops and names its last good checkpoint).
``--resume`` continues exactly: data order and augmentation are functions of ``(seed, step, rank)`` and
everything else random is restored, so a resumed run logs the same losses as an uninterrupted one.

The out_dir belongs to one run (``nas.rundir``): the run locks it while it lives, a new run refuses an out_dir
that holds files, and ``--resume`` continues the run there. ``log.jsonl`` is only ever appended to; a resumed
run marks where it continued from, and :func:`read_log` reads the records as they stand.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import time
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

import elastic_ops

from . import data as data_lib
from .arch import Arch
from .atomic import atomic_open, atomic_torch_save, atomic_write_text
from .errors import CheckpointError, OutputError, UserError, first_line
from .rundir import OwnedDirectory
from .samplers import SAMPLERS, ArchSampler, build_sampler
from .space import SearchSpace, load_space
from .supernet import SupernetConfig, VisionTransformerSupernet

CHECKPOINT_FORMAT = "nas.train/1"
# Config fields that may change on --resume without changing the trajectory.
RESUMABLE_CHANGES = {"out_dir", "resume", "progress", "plot", "log_every", "ckpt_every", "keep_checkpoints",
                     "eval_every", "eval_batch_size", "num_workers", "cpu_threads"}


class ConfigError(UserError, ValueError):
    """A training config that cannot be used."""


class NonFiniteLossError(UserError, RuntimeError):
    """The loss or its gradients became NaN or infinite (training stopped before the bad step changed any weight),
    or the weights or optimizer state did (training stopped before writing them to a checkpoint)."""


@dataclass
class TrainConfig:
    """Everything that defines a training run. YAML keys and ``--set`` keys are these field names."""

    space: str = "digits-tiny"                  # preset name or SearchSpace YAML
    dataset: str = "digits"                     # one of nas.data.DATASETS
    data_dir: str | None = None                 # needed by every data set except digits
    train_subset: int | None = None             # train on this many images (a fixed random subset of those
                                                # not held out for search)
    test_subset: int | None = None              # evaluate on this many test images
    search_holdout: int | None = None           # training images kept out of training for nas.search (the first
                                                # of nas.data.holdout_split's permutation); null: min(10000,
                                                # a fifth of the training set); 0: none
    measure_images: int = 256                   # samplers that measure accuracy use the first this many
                                                # (at most all) of the held-out search images
    sampler: str = "sandwich"                   # one of nas.samplers.SAMPLERS
    sampler_options: dict = field(default_factory=dict)  # keyword arguments of the sampler class
    epochs: int = 80
    max_steps: int | None = None                # overrides epochs
    batch_size: int = 64                        # per process
    lr: float = 3e-3                            # peak learning rate (not scaled: set it for your total batch)
    min_lr: float = 1e-5
    warmup_steps: int = 50
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    drop_path: float = 0.0
    clip_grad: float | None = 5.0               # max global gradient norm; None: no clipping
    augment: bool = True                        # random crop with padding (+ horizontal flip for natural images)
    amp: bool = True                            # autocast on CUDA (ignored on CPU)
    amp_dtype: str = "bfloat16"                 # "bfloat16" or "float16" (the latter with a GradScaler)
    ema_decay: float | None = None              # e.g. 0.999: evaluate an EMA of the weights
    eval_archs: list = field(default_factory=list)  # extra archs (dicts) to evaluate at the end
    seed: int = 0
    device: str = "auto"                        # "auto", "cpu", "cuda", "cuda:1", ...
    backend: str = "auto"                       # elastic_ops backend; auto: chosen per call (DESIGN.md section 4)
    cpu_threads: int | None = 1                 # torch threads on a CPU device (null: torch's default); at these
                                                # sizes more threads cost more than they give, on a busy machine 10x
    out_dir: str = "runs/supernet"
    log_every: int = 10
    ckpt_every: int = 500                       # 0: only at the end
    keep_checkpoints: int = 2
    eval_every: int = 0                         # 0: only at the end
    eval_batch_size: int = 256
    num_workers: int = 0
    progress: bool = True
    plot: bool = True

    def __post_init__(self):
        positive = ["epochs", "batch_size", "log_every", "keep_checkpoints", "eval_batch_size", "measure_images"]
        non_negative = ["warmup_steps", "ckpt_every", "eval_every", "num_workers"]
        problems = [f"{n}={getattr(self, n)} must be >= 1" for n in positive if getattr(self, n) < 1]
        problems += [f"{n}={getattr(self, n)} must be >= 0" for n in non_negative if getattr(self, n) < 0]
        for name in ("max_steps", "train_subset", "test_subset", "cpu_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1 or null")
        if not 0 <= self.seed < 2**32:  # the range every generator seeded from it takes (numpy's RandomState's)
            problems.append(f"seed={self.seed} must be in 0..{2**32 - 1}")
        if self.search_holdout is not None and self.search_holdout < 0:
            problems.append(f"search_holdout={self.search_holdout} must be >= 0 or null")
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            problems.append(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if not 0 <= self.label_smoothing < 1 or not 0 <= self.drop_path < 1:
            problems.append("label_smoothing and drop_path must be in [0, 1)")
        if self.weight_decay < 0 or (self.clip_grad is not None and self.clip_grad <= 0):
            problems.append("weight_decay must be >= 0 and clip_grad > 0 or null")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            problems.append(f"ema_decay={self.ema_decay} must be in (0, 1) or null")
        if self.amp_dtype not in ("bfloat16", "float16"):
            problems.append(f"amp_dtype={self.amp_dtype!r} must be 'bfloat16' or 'float16'")
        if self.dataset not in data_lib.DATASETS:
            problems.append(f"dataset={self.dataset!r} must be one of {', '.join(data_lib.DATASETS)}")
        if self.sampler not in SAMPLERS:
            problems.append(f"sampler={self.sampler!r} must be one of {', '.join(SAMPLERS)}")
        if self.backend not in ("auto",) + elastic_ops.BACKENDS:
            problems.append(f"backend={self.backend!r} must be 'auto' or one of {', '.join(elastic_ops.BACKENDS)}")
        if not isinstance(self.sampler_options, dict):
            problems.append(f"sampler_options must be a mapping, got {self.sampler_options!r}")
        if not isinstance(self.eval_archs, list) or not all(isinstance(a, dict) for a in self.eval_archs):
            problems.append("eval_archs must be a list of arch mappings (Arch.to_dict())")
        if problems:
            raise ConfigError("bad training config: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Check names and types (ints where ints belong, ...) and build the config."""
        if not isinstance(values, dict):
            raise ConfigError(f"a training config is a mapping of field: value, got {type(values).__name__}")
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(values) - set(hints))
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown}; valid keys: {', '.join(hints)}")
        return cls(**{name: _coerce(name, value, hints[name]) for name, value in values.items()})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise ConfigError(f"config {name}: null is not allowed")
    kinds = [a for a in args if a is not type(None)] or [hint]
    kind = typing.get_origin(kinds[0]) or kinds[0]
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        with contextlib.suppress(ValueError):
            return float(value)  # YAML 1.1 reads "2e-3" (no dot) as a string
    elif isinstance(value, kind):
        return value
    raise ConfigError(f"config {name}: expected {getattr(kind, '__name__', kind)}, got {value!r}")


# -- config from YAML and the command line ------------------------------------------------------------

def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """A YAML file (``yaml.safe_load``) of config fields, then ``key=value`` overrides (values parsed as YAML;
    ``sampler_options.name=value`` sets one sampler option)."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as err:
            raise ConfigError(f"cannot read config file {path!r}: {err}") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path!r} is not valid YAML: {err}") from err
        if not isinstance(loaded, (dict, type(None))):
            raise ConfigError(f"config file {path!r} must hold a mapping of field: value")
        values.update(loaded or {})
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {err}") from err
        head, _, option = key.partition(".")
        if option:
            if head != "sampler_options":
                raise ConfigError(f"override {item!r}: only sampler_options.<name> may be set by a dotted key")
            values["sampler_options"] = {**dict(values.get("sampler_options", TrainConfig().sampler_options)), option: value}
        else:
            values[key] = value
    return TrainConfig.from_dict(values)


FLAGS = {  # explicit flags: name -> (config field, type)
    "--space": ("space", str), "--dataset": ("dataset", str), "--data-dir": ("data_dir", str),
    "--sampler": ("sampler", str), "--epochs": ("epochs", int), "--steps": ("max_steps", int),
    "--batch-size": ("batch_size", int), "--lr": ("lr", float), "--seed": ("seed", int),
    "--device": ("device", str), "--out-dir": ("out_dir", str), "--ckpt-every": ("ckpt_every", int),
}


def parse_args(argv: Sequence[str] | None = None) -> tuple[TrainConfig, str | bool]:
    parser = argparse.ArgumentParser(prog="python -m nas.train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Config keys: " + ", ".join(f.name for f in dataclasses.fields(TrainConfig)))
    parser.add_argument("--config", help="YAML file of config fields")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (value parsed as YAML); repeatable")
    parser.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                        help="continue from a checkpoint (default: the latest in OUT_DIR/checkpoints)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    for flag, (name, kind) in FLAGS.items():
        parser.add_argument(flag, type=kind, dest=name, default=None, help=f"config {name}")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    overrides += [f"{name}={json.dumps(getattr(args, name))}" for name, _ in FLAGS.values() if getattr(args, name) is not None]
    if args.no_progress:
        overrides.append("progress=false")
    return load_config(args.config, overrides), args.resume


# -- distributed -------------------------------------------------------------------------------------

@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> Distributed:
    """From torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); one process when absent."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_reduce_gradients(params: Sequence[nn.Parameter], world_size: int, bucket_elements: int = 1 << 24) -> None:
    """Average ``param.grad`` over ranks: flattened buckets of one dtype, one all_reduce per bucket.
    Every rank trained the same archs, so the same parameters have gradients everywhere."""
    grads = [p.grad for p in params if p.grad is not None]
    buckets: dict[torch.dtype, list[list[Tensor]]] = {}
    for grad in grads:
        chain = buckets.setdefault(grad.dtype, [[]])
        if chain[-1] and sum(g.numel() for g in chain[-1]) + grad.numel() > bucket_elements:
            chain.append([])
        chain[-1].append(grad)
    for chain in buckets.values():
        for bucket in chain:
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat)
            flat /= world_size
            for grad, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                grad.copy_(synced)


def broadcast_parameters(module: nn.Module) -> None:
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=0)


# -- pieces of the run --------------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device={name!r}: {err}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available")
    return device


def resolve_backend(name: str) -> str | None:
    """The backend to force; None for elastic_ops' automatic choice (Triton on a GPU; on the CPU the
    reference for training steps and the native kernels for evaluation)."""
    return None if name == "auto" else name


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1 over ``warmup_steps``, then a cosine down to ``min_ratio``."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """timm's rule: no weight decay on biases, norms and the class/position tokens."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        skip = param.ndim <= 1 or name.startswith(("cls_token", "pos_embed"))
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """In-place distillation: cross-entropy against the teacher's (detached) probabilities."""
    return -(target_probs * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """Augmentation randomness of one step on one rank: a pure function of its indices."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]))


@dataclass
class Data:
    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    measure: tuple[Tensor, Tensor] | None   # held-out uint8 images and labels for measure(), the same on every rank
    search_split: dict                      # the held-out split, as checkpoints record it for nas.search
    mean: tuple[float, ...]
    std: tuple[float, ...]


def fixed_subset(dataset, count: int | None, seed: int = 0):
    """``count`` images of ``dataset`` picked by a fixed permutation (all when None or larger)."""
    if count is None or count >= len(dataset):
        return dataset
    return data_lib.subset(dataset, np.random.default_rng(seed).permutation(len(dataset))[:count])


def load_data(config: TrainConfig, space: SearchSpace, measures: bool) -> Data:
    """Training images less the held-out search split (then ``train_subset`` of them), the test split, and
    for a sampler that ``measures`` accuracy the first ``measure_images`` held-out images."""
    kwargs = dict(image_size=space.img_size, in_chans=space.in_chans)
    train = data_lib.load_dataset(config.dataset, config.data_dir, "train", **kwargs)
    test = data_lib.load_dataset(config.dataset, config.data_dir, "test", **kwargs)
    for split, dataset in (("train", train), ("test", test)):
        data_lib.check_matches(dataset, space.img_size, space.in_chans, space.num_classes, f"{config.dataset} {split}")
    mean, std = train.mean, train.std
    count = data_lib.default_holdout(len(train)) if config.search_holdout is None else config.search_holdout
    if count >= len(train):
        raise ConfigError(f"search_holdout={count} leaves no images to train on: the {config.dataset} training set "
                          f"has {len(train)}")
    held_out, kept = data_lib.holdout_split(len(train), count)
    measure = None
    if measures:
        if count == 0:
            raise ConfigError(f"sampler {config.sampler!r} measures accuracy on the held-out search images, but "
                              f"search_holdout=0 holds none out; set search_holdout >= 1")
        measure = train.__getitems__(held_out[:config.measure_images].tolist())
    split = {"images": count, "seed": data_lib.HOLDOUT_SEED, "of": len(train), "dataset": config.dataset}
    train = fixed_subset(data_lib.subset(train, kept), config.train_subset)
    return Data(train, fixed_subset(test, config.test_subset), measure, split, mean, std)


@torch.no_grad()
def accuracy(model: VisionTransformerSupernet, arch: Arch, batches, data: Data, device: torch.device,
             ranks: Distributed, autocast: Callable[[], contextlib.AbstractContextManager]) -> float:
    """Top-1 accuracy (0..1) of ``arch`` over ``batches`` (this rank's share), summed over ranks."""
    was_training = model.training
    model.eval()
    model.set_arch(arch)
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    for images, labels in batches:
        images = data_lib.normalize(images.to(device, non_blocking=True), data.mean, data.std)
        with autocast():
            logits = model(images)
        counts[0] += (logits.argmax(dim=-1) == labels.to(device)).sum()
        counts[1] += labels.numel()
    if ranks.enabled:
        dist.all_reduce(counts)
    model.train(was_training)
    return float(counts[0] / counts[1].clamp(min=1))


# -- checkpoints ----------------------------------------------------------------------------------------

def checkpoint_dir(out_dir: str) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir: str) -> list[tuple[int, Path]]:
    """``(step, path)`` of the checkpoints in ``out_dir``, by step."""
    found = (re.fullmatch(r"step_(\d+)\.pt", path.name) for path in checkpoint_dir(out_dir).glob("step_*.pt"))
    return sorted((int(match.group(1)), checkpoint_dir(out_dir) / match.group(0)) for match in found if match)


def latest_checkpoint(out_dir: str) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


def save_checkpoint(path: Path, state: dict) -> None:
    """A crash while saving never leaves a half-written checkpoint (nas.atomic)."""
    atomic_torch_save(state, path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint's state, checked: its format, the entries every reader needs, and only finite values."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {str(path)!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the file is unusable
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or not a nas.train checkpoint: "
                              f"{first_line(err)}") from err
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a {CHECKPOINT_FORMAT} checkpoint")
    problems = []
    if type(state.get("step")) is not int or state["step"] < 0:
        problems.append(f"its step is {state.get('step')!r}, not an integer >= 0")
    if not isinstance(state.get("config"), dict):
        problems.append(f"its config is {type(state.get('config')).__name__}, not a mapping")
    if not isinstance(state.get("model"), dict) or not all(isinstance(v, Tensor) for v in state["model"].values()):
        problems.append("it has no 'model' entry of weights")
    if problems:
        raise CheckpointError(f"checkpoint {str(path)!r} is malformed: {'; '.join(problems)}")
    non_finite = non_finite_entries(state)
    if non_finite:
        raise CheckpointError(f"checkpoint {str(path)!r} holds NaN or infinite values ({some(non_finite)}): its run "
                              "had diverged; use an earlier one")
    return state


def some(names: Sequence[str], shown: int = 3) -> str:
    """``names`` for a message: the first few, then "..."."""
    return ", ".join(list(names[:shown]) + (["..."] if len(names) > shown else []))


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every value of every tensor is finite, with one device synchronisation."""
    checks = [t.isfinite().all() for t in tensors]
    return bool(torch.stack(checks).all()) if checks else True


def non_finite_entries(state: Any, name: str = "") -> list[str]:
    """The names (``model.head.weight``, ``optimizer.state.3.exp_avg``) of the floating-point tensors in a nested
    state that hold NaN or infinite values."""
    if isinstance(state, Tensor):
        return [name] if state.is_floating_point() and not all_finite([state]) else []
    items = state.items() if isinstance(state, dict) else enumerate(state) if isinstance(state, (list, tuple)) else ()
    return [entry for key, value in items for entry in non_finite_entries(value, f"{name}.{key}" if name else str(key))]


def gather_rng_states(ranks: Distributed, device: torch.device) -> dict[str, list[Tensor]]:
    """The global torch RNG states (CPU, and CUDA where used) of every rank, on rank 0."""
    mine = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    if not ranks.enabled:
        return {kind: [state] for kind, state in mine.items()}
    everyone: list[dict] = [None] * ranks.world_size
    dist.all_gather_object(everyone, mine)
    return {kind: [states[kind] for states in everyone] for kind in mine}


# -- logging ----------------------------------------------------------------------------------------

class JsonLog:
    """JSON lines on rank 0, only ever appended to. A resumed run first cuts off a torn last line (what a killed
    run left of a record) and appends a ``resume`` record; :func:`read_log` drops the records it supersedes."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None:
            drop_torn_line(path)
            self.write({"event": "resume", "step": resume_step})

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def drop_torn_line(path: Path, chunk: int = 1 << 16) -> None:
    """Truncate ``path`` just after its last newline, if anything follows it."""
    if not path.exists():
        return
    with path.open("rb+") as f:
        end = position = f.seek(0, os.SEEK_END)
        keep = 0
        while position > 0:
            start = max(0, position - chunk)
            f.seek(start)
            newline = f.read(position - start).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            position = start
        if keep < end:
            f.truncate(keep)


def read_log(path: str | os.PathLike) -> list[dict]:
    """A run's records as they stand: without a torn last line (no newline), and without the records that a
    ``resume`` record supersedes (those before it and past its step, written before the run stopped)."""
    records: list[dict] = []
    for line in Path(path).read_text().split("\n")[:-1]:  # the last piece is empty or torn
        if not line:
            continue
        record = json.loads(line)
        if record.get("event") == "resume":
            records = [r for r in records if r.get("step", 0) <= record["step"]]
        records.append(record)
    return records


def plot_curves(log_path: Path, out_path: Path) -> None:
    """Loss and training accuracy per step, and the evaluated subnets' test accuracy, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_log(log_path)
    steps = [r for r in records if r.get("event") == "train"]
    evals = [r for r in records if r.get("event") in ("eval", "final")]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in steps], [r["loss"] for r in steps])
    ax_loss.set(xlabel="step", ylabel="training loss (mean over the step's subnets)", yscale="log")
    ax_acc.plot([r["step"] for r in steps], [r["acc"] for r in steps], label="train (first subnet of each step)", alpha=0.6)
    for key in ("smallest", "largest"):
        ax_acc.plot([r["step"] for r in evals], [r[key] for r in evals], "o-", label=f"test, {key} subnet")
    ax_acc.set(xlabel="step", ylabel="top-1 accuracy", ylim=(0, 1))
    ax_acc.legend()
    fig.tight_layout()
    with atomic_open(out_path) as handle:
        fig.savefig(handle, format="png", dpi=100)
    plt.close(fig)


# -- the run ------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    steps: int
    smallest: float          # test accuracy (0..1) of the smallest subnet
    largest: float           # test accuracy of the largest subnet
    eval_archs: list[float]  # test accuracy of config.eval_archs
    seconds: float
    checkpoint: str | None
    search_holdout: int      # training images held out for nas.search (never trained on)


class Trainer:
    """State of one run; :meth:`fit` trains to the end. Build with :func:`train` unless stepping by hand."""

    def __init__(self, config: TrainConfig, resume: str | bool = False):
        self.config = c = config
        self.started = time.perf_counter()
        self.device = resolve_device(c.device)
        self.ranks = init_distributed(self.device.type)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", self.ranks.local_rank)  # one GPU per rank unless a device is named
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        elif c.cpu_threads is not None:
            torch.set_num_threads(c.cpu_threads)
        self.backend = resolve_backend(c.backend)
        try:
            self.space = load_space(c.space)
        except ValueError as err:
            raise ConfigError(f"space={c.space!r}: {err}") from err
        self.eval_archs = []
        for i, values in enumerate(c.eval_archs):
            try:
                arch = Arch.from_dict(values)
                self.space.validate(arch)
            except (ValueError, TypeError) as err:
                raise ConfigError(f"eval_archs[{i}] is not an arch of space {self.space.name!r}: {err}") from err
            self.eval_archs.append(arch)
        sampler_cls = SAMPLERS[c.sampler]
        self.data = load_data(c, self.space, measures=sampler_cls.measures)
        self.steps_per_epoch = data_lib.steps_per_epoch(self.data.train, c.batch_size, self.ranks.world_size)
        self.total_steps = c.max_steps or c.epochs * self.steps_per_epoch
        augmentation = data_lib.default_augmentation(c.dataset, self.space.img_size)
        self.crop_padding, self.flip = augmentation if c.augment else (0, False)

        torch.manual_seed(c.seed)  # the same initial weights on every rank (then broadcast to be sure)
        self.model = VisionTransformerSupernet(SupernetConfig.from_space(self.space, drop_path_rate=c.drop_path)).to(self.device)
        if self.ranks.enabled:
            broadcast_parameters(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(parameter_groups(self.model, c.weight_decay), lr=c.lr, **fused)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(self.total_steps, c.warmup_steps, c.min_lr / c.lr))
        self.use_amp = c.amp and self.device.type == "cuda"
        self.amp_dtype = getattr(torch, c.amp_dtype)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.use_amp and self.amp_dtype == torch.float16)
        self.ema = None
        if c.ema_decay is not None:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(c.ema_decay), use_buffers=True)
        try:
            self.sampler: ArchSampler = build_sampler(c.sampler, self.space, seed=c.seed, total_steps=self.total_steps,
                                                      **c.sampler_options)
        except (ValueError, RuntimeError) as err:
            raise ConfigError(f"sampler {c.sampler!r}: {err}") from err
        torch.manual_seed(c.seed + 1 + self.ranks.rank)  # drop-path: independent across ranks
        if self.device.type == "cuda":
            torch.cuda.manual_seed(c.seed + 1 + self.ranks.rank)

        self.step = 0
        self.last_checkpoint: Path | None = None
        self.resumed_at: int | None = None
        # Rank 0 writes every file of the run: it owns the out_dir from here to close().
        self.out_dir = OwnedDirectory(c.out_dir, "out_dir", subdirs=("checkpoints",)) if self.ranks.main else None
        try:
            resume_path = self.resume_path(resume)
            if resume_path is not None:
                self.load(resume_path)
                self.resumed_at = self.step
            out = Path(c.out_dir)
            self.log = JsonLog(out / "log.jsonl", self.ranks.main, self.resumed_at)
            if self.ranks.main:
                atomic_write_text(out / "config.yaml", yaml.safe_dump(c.to_dict(), sort_keys=False))
        except BaseException:
            self.close()
            raise

    def resume_path(self, resume: str | bool) -> Path | None:
        """The checkpoint to resume from. An out_dir that holds files is continued only from its own checkpoints:
        a new run there would mix its log and checkpoints with the earlier run's."""
        c = self.config
        path = latest_checkpoint(c.out_dir) if resume is True else (Path(resume) if resume else None)
        if resume is True and path is None:
            raise CheckpointError(f"--resume: no checkpoint in {str(checkpoint_dir(c.out_dir))!r}")
        held = self.out_dir.contents() if self.out_dir is not None else []
        if held and path is None:
            raise OutputError(f"out_dir {c.out_dir!r} already holds a run ({some(held)}); continue it with --resume, "
                              "or choose another --out-dir")
        if held and path.resolve().parent != checkpoint_dir(c.out_dir).resolve():
            raise OutputError(f"out_dir {c.out_dir!r} already holds a run ({some(held)}); resume into it only from its "
                              f"own checkpoints, or choose another --out-dir to continue {str(path)!r}")
        return path

    def close(self) -> None:
        """Release the out_dir (the end of the process does too)."""
        if self.out_dir is not None:
            self.out_dir.release()

    # -- pieces --
    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp)

    def backend_scope(self):
        return elastic_ops.use_backend(self.backend) if self.backend else contextlib.nullcontext()

    def eval_model(self) -> VisionTransformerSupernet:
        return self.ema.module if self.ema is not None else self.model

    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT, "step": self.step, "config": self.config.to_dict(),
            "world_size": self.ranks.world_size, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else None,
            "sampler": self.sampler.state_dict(), "rng": gather_rng_states(self.ranks, self.device),
            "search_split": self.data.search_split,
        }

    def diverged(self, what: str) -> NonFiniteLossError:
        where = f"; the last good checkpoint is {str(self.last_checkpoint)!r}" if self.last_checkpoint else ""
        return NonFiniteLossError(f"{what}{where}. Lower lr or raise warmup_steps.")

    def save(self) -> None:
        state = self.state_dict()  # every rank takes part in gathering the RNG states
        # Checked on every rank (they hold the same weights), so that all stop together.
        non_finite = non_finite_entries(state)
        if non_finite:
            raise self.diverged(f"at step {self.step} the weights or optimizer state hold NaN or infinite values "
                                f"({some(non_finite)}); not saved")
        path = checkpoint_dir(self.config.out_dir) / f"step_{self.step:08d}.pt"
        if self.ranks.main:
            save_checkpoint(path, state)
            self.prune_checkpoints()
        if self.ranks.enabled:
            dist.barrier()
        # On every rank: fit() decides from it whether to save at the end, and save() is a collective.
        self.last_checkpoint = path

    def prune_checkpoints(self) -> None:
        """Keep the newest ``keep_checkpoints`` up to this step's. Those of later steps, left before this run
        resumed from an earlier checkpoint, stay: the run replaces each as it reaches its step."""
        earlier = [path for step, path in list_checkpoints(self.config.out_dir) if step < self.step]
        for path in earlier[:max(0, len(earlier) - (self.config.keep_checkpoints - 1))]:
            path.unlink()

    def load(self, path: Path) -> None:
        state = load_checkpoint(path)
        saved = state["config"]
        changed = sorted(k for k, v in self.config.to_dict().items() if k not in RESUMABLE_CHANGES and saved.get(k) != v)
        if changed:
            raise CheckpointError(f"checkpoint {str(path)!r} was written with a different config: "
                                  + ", ".join(f"{k}: {saved.get(k)!r} -> {getattr(self.config, k)!r}" for k in changed))
        if state.get("world_size") != self.ranks.world_size:
            raise CheckpointError(f"checkpoint {str(path)!r} was written by {state.get('world_size')} process(es); "
                                  f"resume with the same number (got {self.ranks.world_size}) to continue exactly")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            self.sampler.load_state_dict(state["sampler"])
            torch.set_rng_state(state["rng"]["cpu"][self.ranks.rank])
            if self.device.type == "cuda" and "cuda" in state["rng"]:
                torch.cuda.set_rng_state(state["rng"]["cuda"][self.ranks.rank], self.device)
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            raise CheckpointError(f"checkpoint {str(path)!r} does not fit this run: {err}") from err
        self.step = int(state["step"])
        self.last_checkpoint = path

    def measure(self, arch: Arch) -> float:
        """Accuracy of ``arch`` on the held-out training images (the same on every rank)."""
        images, labels = self.data.measure
        batches = [(images[i:i + self.config.eval_batch_size], labels[i:i + self.config.eval_batch_size])
                   for i in range(0, len(labels), self.config.eval_batch_size)]
        return accuracy(self.model, arch, batches, self.data, self.device, Distributed(), self.autocast)

    def test_accuracy(self, arch: Arch) -> float:
        batches = data_lib.eval_batches(self.data.test, self.config.eval_batch_size, self.ranks.rank,
                                        self.ranks.world_size, self.config.num_workers)
        return accuracy(self.eval_model(), arch, batches, self.data, self.device, self.ranks, self.autocast)

    def train_step(self, images: Tensor, labels: Tensor) -> dict[str, Any]:
        """One optimizer step on one batch; returns the step's record (losses averaged over ranks)."""
        c = self.config
        archs = self.sampler.sample()
        images = data_lib.normalize(images.to(self.device, non_blocking=True), self.data.mean, self.data.std)
        if self.crop_padding or self.flip:
            images = data_lib.augment(images, self.crop_padding, self.flip, step_generator(c.seed, self.step, self.ranks.rank))
        labels = labels.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        stats = torch.zeros(len(archs) + 1, dtype=torch.float64, device=self.device)
        teacher = None
        for i, arch in enumerate(archs):
            self.model.set_arch(arch)
            with self.autocast():
                logits = self.model(images).float()
            if teacher is not None:
                loss = soft_cross_entropy(logits, teacher)
            else:
                loss = F.cross_entropy(logits, labels, label_smoothing=c.label_smoothing)
            if self.sampler.distill and i == 0:
                teacher = logits.detach().softmax(dim=-1)
            if i == 0:
                stats[-1] = (logits.argmax(dim=-1) == labels).sum() / labels.numel()
            self.scaler.scale(loss).backward()
            stats[i] = loss.detach()
        if self.ranks.enabled:
            dist.all_reduce(stats)
            stats /= self.ranks.world_size
        losses = stats[:-1].tolist()
        if not all(math.isfinite(v) for v in losses):
            raise self.diverged(f"loss became {losses} at step {self.step + 1} (archs {[a.to_json() for a in archs]}); "
                                "stopped before updating the weights")
        if self.ranks.enabled:
            all_reduce_gradients(self.params, self.ranks.world_size)
        self.scaler.unscale_(self.optimizer)
        # A GradScaler skips steps with non-finite gradients itself (and lowers its scale); without one they would
        # turn the weights into NaN.
        if not self.scaler.is_enabled() and not all_finite(p.grad for p in self.params if p.grad is not None):
            raise self.diverged(f"gradients became non-finite at step {self.step + 1} with a finite loss {losses} "
                                f"(archs {[a.to_json() for a in archs]}); stopped before updating the weights")
        grad_norm = (torch.nn.utils.clip_grad_norm_(self.params, c.clip_grad) if c.clip_grad is not None else None)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        sampler_stats = self.sampler.update(archs, losses, self.measure if self.sampler.measures else None)
        self.step += 1
        record = {"event": "train", "step": self.step, "epoch": (self.step - 1) // self.steps_per_epoch, "lr": lr,
                  "loss": sum(losses) / len(losses), "losses": losses, "acc": float(stats[-1]),
                  "archs": [a.to_dict() for a in archs], **sampler_stats}
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        return record

    def batches_from(self, step: int):
        """The training batches from ``step`` on, epoch after epoch."""
        epoch, start = divmod(step, self.steps_per_epoch)
        while True:
            yield from data_lib.train_batches(self.data.train, self.config.batch_size, epoch=epoch, seed=self.config.seed,
                                              rank=self.ranks.rank, world_size=self.ranks.world_size, start=start,
                                              num_workers=self.config.num_workers)
            epoch, start = epoch + 1, 0

    def evaluate(self, event: str) -> dict[str, Any]:
        record = {"event": event, "step": self.step,
                  "smallest": self.test_accuracy(self.space.min_arch()), "largest": self.test_accuracy(self.space.max_arch())}
        if event == "final" and self.eval_archs:
            record["eval_archs"] = [self.test_accuracy(arch) for arch in self.eval_archs]
        self.log.write(record)
        return record

    def logged_final(self) -> dict | None:
        """The final record of this step in the log, where a finished run was resumed (read on rank 0, shared)."""
        found = [None]
        if self.ranks.main:
            found[0] = next((r for r in reversed(read_log(self.log.path))
                             if r.get("event") == "final" and r.get("step") == self.step), None)
        if self.ranks.enabled:
            dist.broadcast_object_list(found, src=0)
        return found[0]

    def fit(self) -> TrainResult:
        c = self.config
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (c.progress and self.ranks.main),
                   dynamic_ncols=True, desc=f"{self.space.name} {c.sampler}")
        window_images, window_start = 0, time.perf_counter()
        batches = self.batches_from(self.step)
        with self.backend_scope():
            while self.step < self.total_steps:
                images, labels = next(batches)
                record = self.train_step(images, labels)
                window_images += labels.numel() * self.ranks.world_size
                bar.update(1)
                if self.step % c.log_every == 0 or self.step == self.total_steps:
                    record["images_per_s"] = window_images / max(time.perf_counter() - window_start, 1e-9)
                    window_images, window_start = 0, time.perf_counter()
                    bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['acc']:.3f}",
                                    img_s=f"{record['images_per_s']:.0f}")
                self.log.write(record)
                if c.ckpt_every and self.step % c.ckpt_every == 0:
                    self.save()
                if c.eval_every and self.step % c.eval_every == 0:
                    self.evaluate("eval")
            bar.close()
            if self.last_checkpoint is None or self.last_checkpoint.name != f"step_{self.step:08d}.pt":
                self.save()
            final = (self.logged_final() if self.step == self.resumed_at else None) or self.evaluate("final")
        if self.ranks.main and c.plot:
            plot_curves(self.log.path, Path(c.out_dir) / "curves.png")
        return TrainResult(self.step, final["smallest"], final["largest"], final.get("eval_archs", []),
                           time.perf_counter() - self.started, str(self.last_checkpoint) if self.last_checkpoint else None,
                           self.data.search_split["images"])


def train(config: TrainConfig | None = None, resume: str | bool = False) -> TrainResult:
    """Train a supernet as ``config`` says (defaults: digits-tiny on the built-in digits) and evaluate its
    smallest and largest subnets on the test split."""
    trainer = Trainer(config or TrainConfig(), resume)
    try:
        return trainer.fit()
    finally:
        trainer.close()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config, resume = parse_args(argv)
        result = train(config, resume)
        if dist.is_initialized():
            # No rank tears down its connections while another is still finishing the last collective.
            dist.barrier()
    except UserError as err:
        print(f"nas.train: error: {err}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {result.steps} steps in {result.seconds:.1f} s; test accuracy: smallest subnet "
              f"{100 * result.smallest:.2f}%, largest subnet {100 * result.largest:.2f}%"
              + "".join(f"; eval_archs[{i}] {100 * a:.2f}%" for i, a in enumerate(result.eval_archs))
              + f"; {result.search_holdout} training images held out for nas.search"
              + (f"\ncheckpoint: {result.checkpoint}" if result.checkpoint else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

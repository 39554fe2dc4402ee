"""Supernet training: the config of a run (:class:`TrainConfig`), the :class:`Trainer`, and :func:`train`.

One step: the batch is augmented on the device (``nas.augment``: the data set's recipe, AutoFormer's for image
folders), the sampler (``nas.samplers``) picks the archs, each runs forward and backward on the step's batch
(gradients summed; with the sandwich rule the smaller subnets learn from the largest's outputs), then AdamW with
warmup + cosine (``nas.optim``; the learning rate optionally scaled by the total batch, as AutoFormer's by
batch / 512), label smoothing, drop-path, gradient clipping, mixed precision on GPU and an optional EMA of the
weights. Several processes (torchrun) all-reduce the gradients by hand (``nas.distributed``).

Held-out search split: ``search_holdout`` training images (by default 10,000, at most a fifth of the training set)
never enter a training batch (``nas.data.SearchSplit``); checkpoints record the split and ``nas.search`` ranks
archs on exactly those images. Samplers that measure accuracy measure it on the first ``measure_images`` of the
same split; ``train_subset`` picks from the images left for training.

Checkpoints (``nas.checkpoint``) hold the model, optimizer, scheduler, scaler, EMA, sampler, the RNG states of
every rank and the step; they are written atomically every ``ckpt_every`` steps and never hold NaN or infinite
values (a diverging run stops and names its last good checkpoint). Resuming continues exactly: data order and
augmentation are functions of ``(seed, step, rank)`` and everything else random is restored, so a resumed run logs
the same losses as an uninterrupted one.

The out_dir belongs to one run (``nas.rundir``): the run locks it while it lives, a new run refuses an out_dir that
holds files, and resuming continues the run there. ``log.jsonl`` (``nas.report``) is only ever appended to.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import Tensor

import elastic_ops

from . import augment as augment_lib
from . import data as data_lib
from .atomic import atomic_write_text
from .build import build_supernet
from .checkpoint import (
    CHECKPOINT_FORMAT,
    all_finite,
    checkpoint_dir,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    load_supernet,
    non_finite_entries,
    resume_checkpoint,
    save_checkpoint,
    some,
)
from .config import Config, changes_on_resume, setting
from .device import resolve_device
from .distributed import Distributed, all_reduce_gradients, broadcast_parameters, gather_rng_states, init_distributed
from .errors import CheckpointError, ConfigError, NonFiniteLossError, OutputError
from .evaluate import confusion_matrix, mean_iou
from .export import load_exported
from .family import Arch, Space, Supernet, family_of
from .imagefolder import RandomResizedCrop
from .memory import check_memory
from .optim import parameter_groups, warmup_cosine
from .pretrained import InitReport, init_from, read_weights
from .report import JsonLog, TensorBoardLog, plot_curves, progress_bar, read_log
from .rundir import OwnedDirectory
from .samplers import SAMPLERS, ArchSampler, build_sampler
from .spaces import load_space

WIDTH_SHARING = ("leading", "two_sided")


@dataclass
class TrainConfig(Config):
    """Everything that defines a training run; YAML keys, ``--set`` keys and flags have these names."""

    NAME = "training"

    space: str = setting("digits-tiny", "search space: a preset name (nas/spaces) or a space's YAML file (ViT or "
                                        "hybrid)")
    dataset: str = setting("digits", "data set", choices=data_lib.DATASETS)
    data_dir: str | None = setting(None, "data directory (every data set but digits needs one)")
    train_subset: int | None = setting(None, "train on this many images: a fixed random subset of those not held "
                                             "out for search")
    test_subset: int | None = setting(None, "evaluate on this many test images")
    search_holdout: int | None = setting(None, "training images kept out of training for nas.search (null: "
                                               "min(10000, a fifth of the training set); 0: none)")
    measure_images: int = setting(256, "samplers that measure accuracy use the first this many (at most all) of the "
                                       "held-out search images")
    bn_calibration_images: int = setting(512, "supernets with BatchNorm (hybrid spaces) re-estimate its statistics "
                                              "for each subnet they evaluate on the first this many training images")
    init_from: str | None = setting(None, "start from pretrained weights: a nas.train checkpoint or a state dict file "
                                          "(read with weights_only=True); tensors of other shapes fill, or are taken "
                                          "from, leading slices (nas.pretrained); the report goes to init_report.json")
    allow_partial_init: bool = setting(False, "accept an init_from that leaves pretrained tensors unused, or supernet "
                                              "tensors at their initialisation although the file has them (listed "
                                              "in init_report.json); otherwise that is an error naming them")
    init_reorder: str = setting("magnitude", "order a wider pretrained MLP's hidden units by importance before its "
                                             "leading slice is taken", choices=("magnitude", "none"))
    reorder_mlp: str | None = setting(None, "before training, put every layer's MLP hidden units in order of "
                                            "importance (SuperSAM): by outgoing weight magnitude or by activation on "
                                            "reorder_images training images", choices=(None, "magnitude", "activation"))
    reorder_images: int = setting(256, "training images that reorder_mlp=activation measures on")
    teacher: str = setting("largest", "in-place distillation: the other subnets learn from the largest subnet, from "
                                      "the pretrained model of init_from (a nas.train checkpoint), or from the model "
                                      "in teacher_file", choices=("largest", "pretrained", "file"))
    teacher_file: str | None = setting(None, "teacher=file: an exported model in any nas.export format (subnet.pt, "
                                             "subnet.pt2, subnet.onnx, a safetensors folder)")
    sampler: str = setting("sandwich", "which subnets each step trains (nas.samplers)", choices=tuple(SAMPLERS))
    width_sharing: str = setting("leading", "which channels of the super weights a width reads: the leading ones "
                                 "(leading), or, as ViTAS (BCNet), each step the leading and the trailing ones with "
                                 "their logits summed, and evaluation averaging both sides' accuracy (two_sided)",
                                 choices=WIDTH_SHARING)
    sampler_options: dict = setting({}, "keyword arguments of the sampler (sampler_options.NAME=VALUE sets one)")
    epochs: int = setting(80, "epochs to train (unless max_steps is set)")
    max_steps: int | None = setting(None, "steps to train; overrides epochs", flag="--steps")
    batch_size: int = setting(64, "images per step and process")
    max_memory_gb: float | None = setting(None, "refuse a space whose supernet would take more memory than this to "
                                                "train batch_size images a step (weights, gradients, AdamW state and "
                                                "activations, estimated from the space before anything is allocated; "
                                                "null: 80% of this machine's memory)", resumable=True)
    lr: float = setting(3e-3, "peak learning rate (for lr_reference_batch images a step where that is set)")
    lr_reference_batch: int | None = setting(None, "scale lr and min_lr by the total batch (all processes) over this "
                                                   "many images, as AutoFormer's lr is per 512 (null: use lr as set)")
    min_lr: float = setting(1e-5, "learning rate at the end of the cosine")
    warmup_steps: int = setting(50, "steps of linear warmup")
    weight_decay: float = setting(0.05, "AdamW weight decay (none on biases, norms and tokens)")
    label_smoothing: float = setting(0.1, "label smoothing of the cross-entropy")
    drop_path: float = setting(0.0, "drop-path rate of the last layer (rising linearly over the layers)")
    clip_grad: float | None = setting(5.0, "maximum global gradient norm (null: no clipping)")
    augment: bool = setting(True, "augment the training images as the settings below say (false: none of it)")
    crop: str | None = setting(None, "training crop (null: random-resized for imagefolder, as AutoFormer; pad for "
                                     "cifar and mnist; none for digits)", choices=(None,) + augment_lib.CROPS)
    flip: bool | None = setting(None, "random horizontal flip (null: on, but for mnist and digits)")
    rand_augment: str | None = setting(None, "RandAugment in timm's notation, or none (null: rand-m9-mstd0.5-inc1 for "
                                             "imagefolder, as AutoFormer; none for the others)")
    random_erasing: float | None = setting(None, "probability of erasing a random box (null: 0.25 for imagefolder, "
                                                 "0 for the others)")
    mixup: float | None = setting(None, "mixup alpha, 0 for none (null: 0.8 for imagefolder, 0 for the others)")
    cutmix: float | None = setting(None, "cutmix alpha, 0 for none (null: 1.0 for imagefolder, 0 for the others)")
    amp: bool = setting(True, "autocast on CUDA (ignored on the CPU)")
    amp_dtype: str = setting("bfloat16", "autocast dtype (float16 adds a GradScaler)", choices=("bfloat16", "float16"))
    ema_decay: float | None = setting(None, "evaluate an exponential moving average of the weights with this "
                                            "decay, e.g. 0.999")
    eval_archs: list = setting([], "extra archs (Arch.to_dict() mappings) to evaluate at the end", flag=False)
    seed: int = setting(0, "seed of every random choice of the run")
    device: str = setting("auto", "auto, cpu, cuda, cuda:1, ...")
    backend: str = setting("auto", "elastic_ops backend (auto: chosen per call, DESIGN.md section 4)",
                           choices=("auto",) + elastic_ops.BACKENDS)
    cpu_threads: int | None = setting(1, "torch threads on a CPU device (null: torch's default); at these sizes "
                                         "more threads cost more than they give", resumable=True)
    out_dir: str = setting("runs/supernet", "output directory of the run: log, checkpoints, plots",
                           resumable=True)
    log_every: int = setting(10, "steps between throughput measurements in the log", resumable=True)
    ckpt_every: int = setting(500, "steps between checkpoints (0: only at the end)", resumable=True)
    keep_checkpoints: int = setting(2, "checkpoints kept", resumable=True)
    eval_every: int = setting(0, "steps between test evaluations (0: only at the end)", resumable=True)
    eval_batch_size: int = setting(256, "images per evaluation batch", resumable=True)
    num_workers: int = setting(0, "data loader worker processes", resumable=True, at_most=data_lib.MAX_WORKERS)
    progress: bool = setting(True, "show a progress bar", resumable=True)
    plot: bool = setting(True, "write curves.png at the end", resumable=True)
    tensorboard: bool = setting(False, "also log to TensorBoard in <out_dir>/tensorboard (pip install "
                                       "'elastic-ops[tensorboard]')", resumable=True)

    def problems(self) -> list[str]:
        positive = ["epochs", "batch_size", "log_every", "keep_checkpoints", "eval_batch_size", "measure_images",
                    "bn_calibration_images", "reorder_images"]
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
        if self.max_memory_gb is not None and not 0 < self.max_memory_gb < math.inf:
            problems.append(f"max_memory_gb={self.max_memory_gb} must be a positive number or null")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            problems.append(f"ema_decay={self.ema_decay} must be in (0, 1) or null")
        if not all(isinstance(a, dict) for a in self.eval_archs):
            problems.append("eval_archs must be a list of arch mappings (Arch.to_dict())")
        if self.lr_reference_batch is not None and self.lr_reference_batch < 1:
            problems.append(f"lr_reference_batch={self.lr_reference_batch} must be >= 1 or null")
        if self.crop == "random-resized" and self.dataset != "imagefolder":
            problems.append(f"crop=random-resized reads every image anew, which only imagefolder does; {self.dataset} "
                            "images are held in memory (use crop=pad)")
        if self.random_erasing is not None and not 0 <= self.random_erasing <= 1:
            problems.append(f"random_erasing={self.random_erasing} must be a probability in [0, 1] or null")
        if min(self.mixup or 0, self.cutmix or 0) < 0:
            problems.append(f"mixup={self.mixup} and cutmix={self.cutmix} must be >= 0 (0: off) or null")
        if self.teacher == "pretrained" and self.init_from is None:
            problems.append("teacher=pretrained distils from the model of init_from; set init_from")
        if self.teacher == "file" and self.teacher_file is None:
            problems.append("teacher=file distils from the model in teacher_file; set teacher_file")
        sampler = SAMPLERS.get(self.sampler)
        if self.teacher != "largest" and sampler is not None and not (sampler.distill or sampler.learns_from_peers):
            problems.append(f"teacher={self.teacher} needs a sampler that distils (sandwich, elasticvit), not "
                            f"{self.sampler!r}")
        if self.dataset in data_lib.DENSE_DATASETS:
            moved = [f"{n}={getattr(self, n)!r}" for n in ("crop", "rand_augment") if getattr(self, n) not in
                     (None, "none")] + [f"{n}={getattr(self, n)!r}" for n in ("flip", "random_erasing", "mixup",
                                                                              "cutmix") if getattr(self, n)]
            if self.augment and moved:
                problems.append(f"{self.dataset} is labelled per pixel, and {', '.join(moved)} would change the images "
                                "without their label maps; leave them unset")
        if self.rand_augment not in (None, "none"):
            try:
                augment_lib.RandAugment.parse(self.rand_augment)
            except ValueError as err:
                problems.append(str(err))
        return problems


# -- pieces of a step ------------------------------------------------------------------------------------------

def soft_cross_entropy(logits: Tensor, target_probs: Tensor) -> Tensor:
    """In-place distillation: cross-entropy against the teacher's (detached) probabilities, over the classes (dim 1:
    logits ``[B, C]``, or ``[B, C, H, W]`` per pixel)."""
    return -(target_probs * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def alpha_divergence(logits: Tensor, target_probs: Tensor, alpha_min: float = -1.0, alpha_max: float = 1.0,
                     ratio_clip: float = 5.0) -> Tensor:
    """AlphaNet's adaptive alpha-divergence (ElasticViT's ``AdaptiveLossSoft``): per image, of D_alpha(p || q) at
    ``alpha_min`` and at ``alpha_max`` (q the student's probabilities from ``logits``, p the detached
    ``target_probs``), the larger one, through a surrogate whose gradient is that divergence's; away from alpha 0
    and 1 the importance ratio (p / q) ** alpha is clipped at ``ratio_clip``. Its value is the surrogate's."""
    log_q = F.log_softmax(logits, dim=1)
    q, p = log_q.exp().detach(), target_probs.detach()
    divergences, surrogates = [], []
    for alpha in (alpha_min, alpha_max):
        if abs(alpha - 1.0) < 1e-3:  # KL(p || q), whose gradient is the cross-entropy's
            divergence, weight = torch.xlogy(p, p) - p * log_q.detach(), p
        elif abs(alpha) < 1e-3:  # KL(q || p)
            ratio = (p / q).clamp(0, ratio_clip)
            divergence, weight = -q * ratio.log(), q * (ratio.log() - 1.0)
        else:
            ratio = (p / q).pow(alpha).clamp(0, ratio_clip)
            base = 1.0 / (alpha * (alpha - 1.0))
            divergence, weight = q * (ratio - 1.0) * base, q * (ratio / alpha + base)
        divergences.append(divergence.sum(dim=1))
        surrogates.append(-(weight * log_q).sum(dim=1))
    return torch.where(divergences[0] > divergences[1], surrogates[0], surrogates[1]).mean()


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """Augmentation randomness of one step on one rank: a pure function of its indices."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]))


@dataclass
class Data:
    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    measure: tuple[Tensor, Tensor] | None   # held-out uint8 images and labels for measure(), the same on every rank
    calibration: list[Tensor]               # uint8 training image batches for BatchNorm statistics (none without BN)
    search_split: data_lib.SearchSplit      # the held-out split, which checkpoints record for nas.search
    mean: tuple[float, ...]
    std: tuple[float, ...]


def load_data(config: TrainConfig, space: Space, measures: bool) -> Data:
    """Training images less the held-out search split (then ``train_subset`` of them, read with the training crop),
    the test split, for a sampler that ``measures`` accuracy the first ``measure_images`` held-out images, and for
    a supernet with BatchNorm (a hybrid space) the first ``bn_calibration_images`` training images."""
    kwargs = dict(image_size=space.img_size, in_chans=space.in_chans)
    train = data_lib.load_dataset(config.dataset, config.data_dir, "train", **kwargs)
    test = data_lib.load_dataset(config.dataset, config.data_dir, "test", **kwargs)
    for split, dataset in (("train", train), ("test", test)):
        data_lib.check_matches(dataset, space.img_size, space.in_chans, space.num_classes, f"{config.dataset} {split}")
    data_lib.check_task(config.dataset, getattr(space, "task", "classification"))
    search_split = data_lib.SearchSplit.hold_out(config.dataset, len(train), config.search_holdout)
    held_out, kept = search_split.indices()
    measure = None
    if measures:
        if search_split.images == 0:
            raise ConfigError(f"sampler {config.sampler!r} measures accuracy on the held-out search images, but "
                              f"search_holdout=0 holds none out; set search_holdout >= 1")
        measure = train.__getitems__(held_out[:config.measure_images].tolist())
    calibration = []
    if family_of(space).batch_norm:
        images = train.__getitems__(search_split.calibration_indices(config.bn_calibration_images).tolist())[0]
        calibration = list(images.split(config.eval_batch_size))
    mean, std = train.mean, train.std
    train = data_lib.fixed_subset(data_lib.subset(train, kept), config.train_subset)
    if config.augment and augment_lib.training_crop(config.dataset, config.crop) == "random-resized":
        train = train.with_crop(RandomResizedCrop(), seed=config.seed)
    return Data(train, data_lib.fixed_subset(test, config.test_subset), measure, calibration, search_split, mean, std)


@torch.no_grad()
def accuracy(model: Supernet, arch: Arch, batches, data: Data,
             device: torch.device, ranks: Distributed, autocast: Callable[[], contextlib.AbstractContextManager]
             ) -> float:
    """Top-1 accuracy (0..1) of ``arch`` over ``batches`` (this rank's share), summed over ranks; for a segmentation
    supernet the mean IoU (0..1) of the pixels' classes. A supernet with BatchNorm first re-estimates its statistics
    for ``arch`` on ``data.calibration`` (the same images on every rank, so every rank gets the same statistics)."""
    was_training = model.training
    model.eval()
    model.set_arch(arch)
    if data.calibration:
        with autocast():
            model.recalibrate_batch_norm(data_lib.normalize(images.to(device), data.mean, data.std)
                                         for images in data.calibration)
    dense = getattr(model.config, "global_pool", None) == "dense"
    classes = model.config.num_classes if dense else 0
    counts = torch.zeros(classes * classes if dense else 2, dtype=torch.float64, device=device)
    for images, labels in batches:
        images = data_lib.normalize(images.to(device, non_blocking=True), data.mean, data.std)
        with autocast():
            predictions = model(images).argmax(dim=1)
        labels = labels.to(device)
        if dense:
            counts += confusion_matrix(predictions, labels, classes).flatten()
        else:
            counts += torch.stack([(predictions == labels).sum(), torch.tensor(labels.numel(), device=device)])
    if ranks.enabled:
        dist.all_reduce(counts)
    model.train(was_training)
    if dense:
        return mean_iou(counts.view(classes, classes))
    return float(counts[0] / counts[1].clamp(min=1))


# -- the run -----------------------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    steps: int
    smallest: float          # test accuracy (0..1; segmentation: mIoU) of the smallest subnet
    largest: float           # test accuracy of the largest subnet
    eval_archs: list[float]  # test accuracy of config.eval_archs
    seconds: float
    checkpoint: str | None
    search_holdout: int      # training images held out for nas.search (never trained on)
    metric: str = "accuracy"  # what smallest, largest and eval_archs are: top-1 accuracy, or mIoU (segmentation)


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
        self.backend = None if c.backend == "auto" else c.backend  # None: elastic_ops' choice per call
        try:
            self.space = load_space(c.space)
        except ValueError as err:
            raise ConfigError(f"space={c.space!r}: {err}") from err
        # Before the data, sized by the space, is read.
        check_memory(self.space, c.batch_size, c.max_memory_gb, eval_batch_size=c.eval_batch_size)
        if c.width_sharing == "two_sided" and not family_of(self.space).two_sided:
            raise ConfigError(f"width_sharing=two_sided shares the widths of ViT layers; space {self.space.name!r} is "
                              f"of the {family_of(self.space).name} family, whose layers read leading channels only")
        self.eval_archs = []
        for i, values in enumerate(c.eval_archs):
            try:
                arch = self.space.arch_type.from_dict(values)
                self.space.validate(arch)
            except (ValueError, TypeError) as err:
                raise ConfigError(f"eval_archs[{i}] is not an arch of space {self.space.name!r}: {err}") from err
            self.eval_archs.append(arch)
        sampler_cls = SAMPLERS[c.sampler]
        self.data = load_data(c, self.space, measures=sampler_cls.measures_with(c.sampler_options))
        self.steps_per_epoch = data_lib.steps_per_epoch(self.data.train, c.batch_size, self.ranks.world_size)
        self.total_steps = c.max_steps or c.epochs * self.steps_per_epoch
        self.augmentation = augment_lib.Augmentation()
        if c.augment:
            self.augmentation = augment_lib.recipe(
                c.dataset, self.space.img_size, self.data.mean, crop=c.crop, flip=c.flip, rand_augment=c.rand_augment,
                random_erasing=c.random_erasing, mixup=c.mixup, cutmix=c.cutmix)
        lr_scale = 1.0 if c.lr_reference_batch is None else c.batch_size * self.ranks.world_size / c.lr_reference_batch

        torch.manual_seed(c.seed)  # the same initial weights on every rank (then broadcast to be sure)
        self.model = build_supernet(self.space, drop_path_rate=c.drop_path, batch_size=c.batch_size, training=True,
                                    max_memory_gb=c.max_memory_gb).to(self.device)
        # A resumed run does this again and then loads its checkpoint's weights over it (the EMA copies the model).
        self.init_report = self.initialise()
        self.teacher = self.pretrained_teacher()
        if self.ranks.enabled:
            broadcast_parameters(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(parameter_groups(self.model, c.weight_decay), lr=c.lr * lr_scale, **fused)
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
        self.sampler.set_epoch_length(self.steps_per_epoch)
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
            if self.out_dir is not None:
                self.out_dir.claim()
            if resume_path is not None:
                self.load(resume_path)
                self.resumed_at = self.step
            out = Path(c.out_dir)
            self.log = JsonLog(out / "log.jsonl", self.ranks.main, self.resumed_at)
            self.tensorboard = TensorBoardLog(out / "tensorboard") if c.tensorboard and self.ranks.main else None
            if self.ranks.main:
                atomic_write_text(out / "config.yaml", yaml.safe_dump(c.to_dict(), sort_keys=False))
            if self.init_report is not None and self.resumed_at is None:
                self.log.write({"event": "init", "init_from": c.init_from, **self.init_report.to_dict()})
                if self.ranks.main:
                    atomic_write_text(out / "init_report.json", json.dumps(self.init_report.to_dict(), indent=1))
                    print(f"[train] init_from {c.init_from!r}: {self.init_report.summary()} (init_report.json)")
        except BaseException:
            self.close()
            raise

    def resume_path(self, resume: str | bool) -> Path | None:
        """The checkpoint to resume from. An out_dir that holds files is continued only from its own checkpoints:
        a new run there would mix its log and checkpoints with the earlier run's."""
        c = self.config
        path = resume_checkpoint(c.out_dir, resume)
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
        """Release the out_dir (the end of the process does too) and close the TensorBoard log."""
        if getattr(self, "tensorboard", None) is not None:
            self.tensorboard.close()
        if self.out_dir is not None:
            self.out_dir.release()

    # -- pieces --
    def initialise(self) -> InitReport | None:
        """SuperSAM's start: the pretrained weights of ``init_from`` (``nas.pretrained``), then, with
        ``reorder_mlp``, every layer's MLP hidden units in order of importance. Returns the report of init_from."""
        c = self.config
        if (c.init_from or c.reorder_mlp) and not family_of(self.space).pretrained_init:
            raise ConfigError(f"init_from and reorder_mlp: space {self.space.name!r} is of the "
                              f"{family_of(self.space).name} family; pretrained weights of another size (leading "
                              "slices) and MLP reordering are for ViT supernets")
        report = None
        if c.init_from:
            weights, by_design = family_of(self.space).pretrained_weights(read_weights(c.init_from))
            report = init_from(self.model, weights, reorder=c.init_reorder, unused_by_design=by_design)
            if report.problems() and not c.allow_partial_init:
                raise CheckpointError(f"init_from {c.init_from!r} is partial: {report.problems()}; set "
                                      "allow_partial_init (--allow-partial-init) to accept it")
        if c.reorder_mlp is not None:
            batches = None
            if c.reorder_mlp == "activation":
                count = min(c.reorder_images, len(self.data.train))
                images = data_lib.eval_batches(data_lib.subset(self.data.train, range(count)), c.eval_batch_size)
                batches = [data_lib.normalize(x.to(self.device), self.data.mean, self.data.std) for x, _ in images]
            with self.backend_scope():
                self.model.reorder_mlp_importance(c.reorder_mlp, batches)
        return report

    def pretrained_teacher(self) -> Supernet | Callable[[Tensor], Tensor] | None:
        """With ``teacher=pretrained``: the largest subnet of the ``init_from`` checkpoint's supernet, frozen; with
        ``teacher=file``: the exported model in ``teacher_file``."""
        c = self.config
        if c.teacher == "file":
            return self.teacher_from_file()
        if c.teacher != "pretrained":
            return None
        teacher, space, _ = load_supernet(c.init_from, self.device)
        theirs, ours = ((s.in_chans, s.img_size, s.num_classes) for s in (space, self.space))
        if theirs != ours:
            raise ConfigError(f"teacher=pretrained: the model of {c.init_from!r} takes {theirs[0]}x{theirs[1]}x"
                              f"{theirs[1]} images into {theirs[2]} classes, this run {ours[0]}x{ours[1]}x{ours[1]} "
                              f"into {ours[2]}")
        teacher.set_arch(space.max_arch())
        return teacher.requires_grad_(False)

    def teacher_from_file(self) -> Callable[[Tensor], Tensor]:
        c = self.config
        try:
            teacher = load_exported(c.teacher_file)
        except (OSError, ValueError) as err:
            raise ConfigError(f"teacher_file: {err}") from err
        probe = torch.zeros(1, self.space.in_chans, self.space.img_size, self.space.img_size)
        with torch.no_grad():
            shape = tuple(teacher(probe).shape)
        if shape != (1, self.space.num_classes):
            raise ConfigError(f"teacher_file {c.teacher_file!r}: on a {tuple(probe.shape)} batch the model gives "
                              f"logits of shape {shape}, this run needs (1, {self.space.num_classes})")
        return teacher

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.use_amp)

    def backend_scope(self):
        return elastic_ops.use_backend(self.backend) if self.backend else contextlib.nullcontext()

    def eval_model(self) -> Supernet:
        return self.ema.module if self.ema is not None else self.model

    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT, "step": self.step, "config": self.config.to_dict(),
            "world_size": self.ranks.world_size, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else None,
            "sampler": self.sampler.state_dict(), "rng": gather_rng_states(self.ranks, self.device),
            "search_split": self.data.search_split.to_dict(),
        }

    def diverged(self, what: str) -> NonFiniteLossError:
        # A resumed run keeps its settings: a lower lr is a new run, which may start from the last good weights.
        resumable_weights = self.last_checkpoint and family_of(self.space).pretrained_init
        start = f" --init-from {str(self.last_checkpoint)!r}" if resumable_weights else ""
        where = f"; the last good checkpoint is {str(self.last_checkpoint)!r}" if self.last_checkpoint else ""
        return NonFiniteLossError(f"{what}{where}. Start a new run (another --out-dir{start}) with a lower lr or more "
                                  "warmup_steps: --resume keeps the settings the run was saved with")

    def save(self) -> None:
        state = self.state_dict()  # every rank takes part in gathering the RNG states
        # Checked on every rank (they hold the same weights), so that all stop together.
        non_finite = non_finite_entries(state)
        if non_finite:
            raise self.diverged(f"at step {self.step} the weights or optimizer state hold NaN or infinite values "
                                f"({some(non_finite)}); not saved")
        path = checkpoint_path(self.config.out_dir, self.step)
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
        changed = changes_on_resume(state["config"], self.config)
        if changed:
            raise CheckpointError(f"checkpoint {str(path)!r} was written with a different config: "
                                  + ", ".join(changed))
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

    def sides(self, arch: Arch) -> list[Arch]:
        """The arch as each step trains it and evaluation scores it: itself, or, with two-sided width sharing, read
        from the left and from the right."""
        if self.config.width_sharing == "two_sided":
            return [arch.on_side("left"), arch.on_side("right")]
        return [arch]

    def measure(self, arch: Arch) -> float:
        """Accuracy of ``arch`` on the held-out training images (the same on every rank); two-sided: the mean of
        both sides' (ViTAS's evaluation)."""
        images, labels = self.data.measure
        size = self.config.eval_batch_size
        batches = [(images[i:i + size], labels[i:i + size]) for i in range(0, len(labels), size)]
        scores = [accuracy(self.model, a, batches, self.data, self.device, Distributed(), self.autocast)
                  for a in self.sides(arch)]
        return sum(scores) / len(scores)

    def batch_score(self, images: Tensor, labels: Tensor, arch: Arch) -> float:
        """Minus the cross-entropy of ``arch`` on a training batch, in training mode and averaged over ranks
        (ElasticViT's bank score: ``bank_arch_update``)."""
        with torch.no_grad():
            loss = F.cross_entropy(self.logits(images, arch), labels).double()
        if self.ranks.enabled:
            dist.all_reduce(loss)
            loss /= self.ranks.world_size
        return -float(loss)

    def test_accuracy(self, arch: Arch) -> float:
        """Test accuracy of ``arch``; two-sided: the mean of both sides'."""
        scores = []
        for side in self.sides(arch):
            batches = data_lib.eval_batches(self.data.test, self.config.eval_batch_size, self.ranks.rank,
                                            self.ranks.world_size, self.config.num_workers)
            scores.append(accuracy(self.eval_model(), side, batches, self.data, self.device, self.ranks,
                                   self.autocast))
        return sum(scores) / len(scores)

    def logits(self, images: Tensor, arch: Arch) -> Tensor:
        """fp32 logits of ``arch`` in training; two-sided, the sum of the left and the right side's (ViTAS)."""
        total = None
        for side in self.sides(arch):
            self.model.set_arch(side)
            with self.autocast():
                logits = self.model(images).float()
            total = logits if total is None else total + logits
        return total

    def train_step(self, images: Tensor, labels: Tensor) -> dict[str, Any]:
        """One optimizer step on one batch; returns the step's record (losses averaged over ranks)."""
        c = self.config
        archs = self.sampler.sample()
        labels = labels.to(self.device, non_blocking=True)
        images, targets = self.augmentation(images.to(self.device, non_blocking=True), labels,
                                            step_generator(c.seed, self.step, self.ranks.rank), self.data.mean,
                                            self.data.std, self.space.num_classes)
        self.optimizer.zero_grad(set_to_none=True)
        stats = torch.zeros(len(archs) + 1, dtype=torch.float64, device=self.device)
        teacher = None  # the probabilities the subnets after the first learn from
        if self.teacher is not None:
            with torch.no_grad(), self.autocast():
                teacher = self.teacher(images).float().softmax(dim=1)
        peers = []  # learns_from_peers: the probabilities of the archs before the last
        for i, arch in enumerate(archs):
            logits = self.logits(images, arch)
            if self.sampler.learns_from_peers and i == len(archs) - 1:
                loss = alpha_divergence(logits, torch.stack(peers).mean(dim=0))
            elif self.sampler.learns_from_peers:  # ElasticViT's compute_dist_loss: half labels, half teacher
                loss = F.cross_entropy(logits, targets, label_smoothing=c.label_smoothing)
                if teacher is not None:
                    loss = (loss + soft_cross_entropy(logits, teacher)) / 2
                peers.append(logits.detach().softmax(dim=1))
            elif i > 0 and teacher is not None:
                loss = soft_cross_entropy(logits, teacher)
            else:
                loss = F.cross_entropy(logits, targets, label_smoothing=c.label_smoothing)
            if self.sampler.distill and i == 0 and teacher is None:
                teacher = logits.detach().softmax(dim=1)
            if i == 0:
                stats[-1] = (logits.argmax(dim=1) == labels).sum() / labels.numel()
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
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, c.clip_grad) if c.clip_grad is not None else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        measure = self.measure if self.sampler.measures else None
        if self.sampler.scores_batches:
            measure = functools.partial(self.batch_score, images, labels)
        sampler_stats = self.sampler.update(archs, losses, measure)
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
        c = self.config
        while True:
            yield from data_lib.train_batches(self.data.train, c.batch_size, epoch=epoch, seed=c.seed,
                                              rank=self.ranks.rank, world_size=self.ranks.world_size, start=start,
                                              num_workers=c.num_workers)
            epoch, start = epoch + 1, 0

    def evaluate(self, event: str) -> dict[str, Any]:
        record = {"event": event, "step": self.step, "smallest": self.test_accuracy(self.space.min_arch()),
                  "largest": self.test_accuracy(self.space.max_arch())}
        if event == "final" and self.eval_archs:
            record["eval_archs"] = [self.test_accuracy(arch) for arch in self.eval_archs]
        self.record(record)
        return record

    def record(self, record: dict[str, Any]) -> None:
        """Into the JSON-lines log and, where asked, TensorBoard."""
        self.log.write(record)
        if self.tensorboard is not None:
            self.tensorboard.write(record)

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
        bar = progress_bar(c.progress and self.ranks.main, total=self.total_steps, initial=self.step,
                           dynamic_ncols=True, desc=f"{self.space.name} {c.sampler}")
        window_images, window_start = 0, time.perf_counter()
        batches = self.batches_from(self.step)
        with self.backend_scope():
            while self.step < self.total_steps:
                images, labels = next(batches)
                record = self.train_step(images, labels)
                window_images += labels.shape[0] * self.ranks.world_size  # images, not pixels
                bar.update(1)
                if self.step % c.log_every == 0 or self.step == self.total_steps:
                    record["images_per_s"] = window_images / max(time.perf_counter() - window_start, 1e-9)
                    window_images, window_start = 0, time.perf_counter()
                    bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record['acc']:.3f}",
                                    img_s=f"{record['images_per_s']:.0f}")
                self.record(record)
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
        checkpoint = str(self.last_checkpoint) if self.last_checkpoint else None
        return TrainResult(self.step, final["smallest"], final["largest"], final.get("eval_archs", []),
                           time.perf_counter() - self.started, checkpoint, self.data.search_split.images,
                           "mIoU" if getattr(self.space, "task", "") == "segmentation" else "accuracy")


def train(config: TrainConfig | None = None, resume: str | bool = False) -> TrainResult:
    """Train a supernet as ``config`` says (defaults: digits-tiny on the built-in digits) and evaluate its
    smallest and largest subnets on the test split."""
    trainer = Trainer(config or TrainConfig(), resume)
    try:
        return trainer.fit()
    finally:
        trainer.close()

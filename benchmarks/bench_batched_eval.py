"""Evaluating many subnets: batched (K subnets per pass over the data, ``nas.vit.batched``) against one subnet after
another with the best single-subnet path, on the same random subnets and images, in one run.

Workloads:
- gpu-t: 50 random AutoFormer-T subnets (224 px, 197 tokens) on the same 2,560 images, batch 256, bf16
  autocast. Sequential: ``supernet(images, arch)`` per subnet (Triton ops). GPU only.
  Target: batched >= 3x faster than sequential on an H100.
- cpu-cifar: random AutoFormer-T subnets at CIFAR size (32 px, patch 4: 65 tokens), float32, batch 64.
  ``batched-native`` (grouped native kernels) against ``sequential-reference`` (the PyTorch reference, one
  subnet after another); ``batched-reference`` (the grouped PyTorch implementation) and ``sequential-native``
  are shown too. Target: batched-native >= 1.5x sequential-reference.
  ``BENCH_EVAL_SUBNETS`` / ``BENCH_EVAL_IMAGES`` (default 16 / 256) size the CPU workload.

Run: python -m pytest benchmarks/bench_batched_eval.py --benchmark-only --benchmark-group-by=param:workload
or:  python benchmarks/bench_batched_eval.py [cpu|gpu]   (prints the ratios)
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time

import numpy as np
import pytest
import torch

import elastic_ops
from nas.evaluate import evaluate_archs
from nas.spaces import load_space
from nas.vit.supernet import SupernetConfig, VisionTransformerSupernet

CPU_SUBNETS = int(os.environ.get("BENCH_EVAL_SUBNETS", 16))
CPU_IMAGES = int(os.environ.get("BENCH_EVAL_IMAGES", 256))

# workload -> implementation -> (batched, forced backend or None for automatic)
WORKLOADS = {
    "gpu-t": {"batched": (True, None), "sequential": (False, None)},
    "cpu-cifar": {"batched-native": (True, "native"), "sequential-reference": (False, "reference"),
                  "batched-reference": (True, "reference"), "sequential-native": (False, None)},
}


@dataclasses.dataclass
class Workload:
    supernet: VisionTransformerSupernet
    archs: list
    batches: list
    device: torch.device
    autocast: torch.dtype | None


def build(name: str) -> Workload:
    space = load_space("autoformer-t")
    if name == "gpu-t":
        device, subnets, images, batch, autocast = torch.device("cuda"), 50, 2560, 256, torch.bfloat16
    else:
        space = dataclasses.replace(space, img_size=32, patch_sizes=(4,), num_classes=10)
        device, subnets, images, batch, autocast = torch.device("cpu"), CPU_SUBNETS, CPU_IMAGES, 64, None
    torch.manual_seed(0)
    supernet = VisionTransformerSupernet(SupernetConfig.from_space(space)).to(device).eval()
    archs = space.sample_many(np.random.default_rng(0), subnets).archs()
    data = torch.randn(images, space.in_chans, space.img_size, space.img_size, device=device)
    labels = torch.randint(0, space.num_classes, (images,), device=device)
    batches = [(data[i:i + batch], labels[i:i + batch]) for i in range(0, images, batch)]
    return Workload(supernet, archs, batches, device, autocast)


def evaluation(work: Workload, batched: bool, backend: str | None):
    def run():
        scope = elastic_ops.use_backend(backend) if backend else contextlib.nullcontext()
        with scope:
            results = evaluate_archs(work.supernet, work.archs, work.batches, batched=batched, progress=False,
                                     autocast_dtype=work.autocast)
        if work.device.type == "cuda":
            torch.cuda.synchronize()
        return results
    return run


CASES = [(w, impl) for w, impls in WORKLOADS.items() for impl in impls]


@pytest.mark.parametrize("workload,impl", CASES)
def test_batched_evaluation(benchmark, workload, impl):
    if workload.startswith("gpu") and not torch.cuda.is_available():
        pytest.skip("GPU workload: needs a CUDA device")
    if "native" in impl and not elastic_ops.backends()["native"].available:
        pytest.skip(f"native backend: {elastic_ops.backends()['native']}")
    work = build(workload)
    batched, backend = WORKLOADS[workload][impl]
    fn = evaluation(work, batched, backend)
    fn()  # warm-up: kernel compilation, autotuning, allocator
    benchmark.extra_info.update(subnets=len(work.archs), images=sum(len(b[1]) for b in work.batches),
                                device=str(work.device), torch=torch.__version__)
    benchmark.pedantic(fn, rounds=2, iterations=1)


def main(which: str) -> None:
    workload = "gpu-t" if which == "gpu" else "cpu-cifar"
    work = build(workload)
    times, losses = {}, {}
    for impl, (batched, backend) in WORKLOADS[workload].items():
        if "native" in impl and not elastic_ops.backends()["native"].available:
            continue
        fn = evaluation(work, batched, backend)
        fn()
        start = time.perf_counter()
        results = fn()
        times[impl] = time.perf_counter() - start
        losses[impl] = np.array([r.loss for r in results])
        print(f"{workload} {impl:22s} {times[impl]:8.2f} s")
    first, *others = losses
    for impl in others:  # every implementation evaluates the same subnets: their losses must agree
        print(f"max |loss {impl} - loss {first}|: {np.abs(losses[impl] - losses[first]).max():.2e}")
    device = torch.cuda.get_device_name() if work.device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    images = sum(len(b[1]) for b in work.batches)
    print(f"{len(work.archs)} subnets x {images} images on {device}, torch {torch.__version__}")
    if workload == "gpu-t":
        print(f"batched speed-up over sequential: {times['sequential'] / times['batched']:.2f}x (target 3x)")
    else:
        print(f"batched-native speed-up over sequential-reference: "
              f"{times['sequential-reference'] / times['batched-native']:.2f}x (target 1.5x)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ("gpu" if torch.cuda.is_available() else "cpu"))

"""The supernet under ``torch.compile`` (``VisionTransformerSupernet.compile``: Inductor on the blocks) against eager,
side by side in one run: a training step (forward, cross-entropy, backward, AdamW) and an evaluation pass, over
the same ten random subnets. Reports the time per subnet after the warm-up, and the warm-up itself (compiles).

Workloads: ``cpu``: AutoFormer-T at CIFAR size (32 px, patch 4), batch 16, float32, the backends chosen as users get
them; ``gpu``: AutoFormer-S (224 px), batch 128, bf16 autocast.

Run: python benchmarks/bench_compile.py [cpu|gpu]
"""
from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from nas.spaces import load_space
from nas.vit.supernet import SupernetConfig, VisionTransformerSupernet

SUBNETS = 10


def build(which: str):
    if which == "gpu":
        space, device, batch, autocast = load_space("autoformer-s"), torch.device("cuda"), 128, torch.bfloat16
    else:
        space = dataclasses.replace(load_space("autoformer-t"), img_size=32, patch_sizes=(4,), num_classes=10)
        device, batch, autocast = torch.device("cpu"), 16, None
    images = torch.randn(batch, space.in_chans, space.img_size, space.img_size, device=device)
    labels = torch.randint(0, space.num_classes, (batch,), device=device)
    archs = [space.sample(np.random.default_rng(seed)) for seed in range(SUBNETS)]
    return space, device, images, labels, archs, autocast


def runner(compiled: bool, mode: str, which: str):
    space, device, images, labels, archs, autocast = build(which)
    torch.manual_seed(0)
    model = VisionTransformerSupernet(SupernetConfig.from_space(space)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    if compiled:
        torch._dynamo.reset()
        model.compile()

    def run():
        model.train(mode == "train")
        for arch in archs:
            with torch.set_grad_enabled(mode == "train"), \
                    torch.autocast(device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
                logits = model(images, arch)
            if mode == "train":
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(logits.float(), labels).backward()
                optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return run


def main(which: str) -> None:
    for mode in ("train", "eval"):
        times = {}
        for compiled in (False, True):
            run = runner(compiled, mode, which)
            start = time.perf_counter()
            run()
            warm_up = time.perf_counter() - start
            samples = []
            for _ in range(3):
                start = time.perf_counter()
                run()
                samples.append((time.perf_counter() - start) / SUBNETS)
            times[compiled] = float(np.median(samples))
            name = "compiled" if compiled else "eager"
            print(f"{which} {mode:5s} {name:8s}: {1e3 * times[compiled]:8.1f} ms per subnet, warm-up {warm_up:6.1f} s",
                  flush=True)
        print(f"{which} {mode}: compiled / eager speed = {times[False] / times[True]:.2f}x "
              f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ("gpu" if torch.cuda.is_available() else "cpu"))

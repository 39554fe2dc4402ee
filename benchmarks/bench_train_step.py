"""One supernet training step (uniform sampling, forward, cross-entropy, backward, AdamW): this project's
``VisionTransformerSupernet`` against an AutoFormer-style PyTorch supernet, eager and under ``torch.compile``, on the
same subnets and images. Targets on a GPU: 1.5x the eager AutoFormer-style step, 1.0x the compiled one, at most 75%
of its peak memory (``peak_memory_mb``).

The AutoFormer-style supernet (:class:`AutoFormerSupernet`) slices its super weights on every call, as
microsoft/Cream's AutoFormer does: interleaved qkv gathered with ``torch.cat`` (``baselines.AutoFormerAttention``),
sliced ``F.linear``/``F.layer_norm`` for the MLP and norms, sliced patch-embedding convolution and head.

Workloads:
- gpu-s: the AutoFormer-S space (224 px, 197 tokens), batch 128, bf16 autocast; this project runs its
  GPU path. GPU only. ``autoformer-compiled`` compiles the AutoFormer-style supernet with dynamic shapes; each
  subnet configuration is still a recompile (its sizes are Python ints), all done in the warm-up.
- cpu-tiny: a CIFAR-size version of AutoFormer-T (32 px, patch 4: 65 tokens), batch 16, float32; this
  project runs the path ``nas.train`` uses on a CPU (the PyTorch reference ops). ``BENCH_TRAIN_STEPS``
  (default 4) steps per timing round.

Run: python -m pytest benchmarks/bench_train_step.py --benchmark-only --benchmark-group-by=param:workload
or:  python benchmarks/bench_train_step.py [cpu|gpu]   (prints the time per step and the ratio)
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
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from baselines import AutoFormerAttention  # noqa: E402

import elastic_ops  # noqa: E402
from nas.spaces import load_space  # noqa: E402
from nas.vit.arch import Arch  # noqa: E402
from nas.vit.space import SearchSpace  # noqa: E402
from nas.vit.supernet import SupernetConfig, VisionTransformerSupernet  # noqa: E402

CPU_STEPS = int(os.environ.get("BENCH_TRAIN_STEPS", 4))


class AutoFormerBlock(nn.Module):
    """AutoFormer's ``TransformerEncoderLayer``: pre-norm attention and MLP on slices of the super weights."""

    def __init__(self, embed: int, heads: int, hidden: int, head_dim: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(embed, eps=1e-6), nn.LayerNorm(embed, eps=1e-6)
        self.attn = AutoFormerAttention(embed, heads, head_dim)
        self.fc1, self.fc2 = nn.Linear(embed, hidden), nn.Linear(hidden, embed)
        self.hidden = hidden

    def set_sample_config(self, heads: int, hidden: int) -> None:
        self.attn.set_sample_config(heads)
        self.hidden = hidden

    @staticmethod
    def norm(layer: nn.LayerNorm, x: Tensor) -> Tensor:
        e = x.shape[-1]
        return F.layer_norm(x, (e,), layer.weight[:e], layer.bias[:e], layer.eps)

    def forward(self, x: Tensor) -> Tensor:
        e, h = x.shape[-1], self.hidden
        x = x + self.attn(self.norm(self.norm1, x))
        y = F.gelu(F.linear(self.norm(self.norm2, x), self.fc1.weight[:h, :e], self.fc1.bias[:h]))
        return x + F.linear(y, self.fc2.weight[:e, :h], self.fc2.bias[:e])


class AutoFormerSupernet(nn.Module):
    """AutoFormer's ``Vision_TransformerSuper`` (no relative position, one patch size), for timing only."""

    def __init__(self, space: SearchSpace):
        super().__init__()
        embed, hidden = space.max_embed_dim, space.max_hidden
        patch = space.patch_sizes[0]
        self.patch_embed = nn.Conv2d(space.in_chans, embed, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, space.num_tokens(patch), embed) * 0.02)
        self.blocks = nn.ModuleList(AutoFormerBlock(embed, space.max_heads, hidden, space.head_dim)
                                    for _ in range(space.max_depth))
        self.norm = nn.LayerNorm(embed, eps=1e-6)
        self.head = nn.Linear(embed, space.num_classes)
        self.arch: Arch | None = None

    def set_arch(self, arch: Arch) -> None:
        self.arch = arch
        for i, block in enumerate(self.blocks):
            block.set_sample_config(arch.num_heads[i], arch.hidden_features(i))

    def forward(self, images: Tensor) -> Tensor:
        e = self.arch.embed_dim
        conv = self.patch_embed
        x = F.conv2d(images, conv.weight[:e], conv.bias[:e], stride=conv.stride).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token[..., :e].expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed[..., :e]
        for block, on in zip(self.blocks, self.arch.layer_on):
            if on:
                x = block(x)
        x = AutoFormerBlock.norm(self.norm, x)
        return F.linear(x[:, 0], self.head.weight[:, :e], self.head.bias)


@dataclasses.dataclass
class Workload:
    space: SearchSpace
    images: Tensor
    labels: Tensor
    archs: list[Arch]
    device: torch.device
    autocast: torch.dtype | None
    backend: str | None


def build(name: str, steps: int) -> Workload:
    if name == "gpu-s":
        space, device, batch = load_space("autoformer-s"), torch.device("cuda"), 128
        autocast, backend = torch.bfloat16, None
    else:
        space = dataclasses.replace(load_space("autoformer-t"), img_size=32, patch_sizes=(4,), num_classes=10)
        device, batch, autocast, backend = torch.device("cpu"), 16, None, "reference"
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, space.in_chans, space.img_size, space.img_size, generator=generator).to(device)
    labels = torch.randint(0, space.num_classes, (batch,), generator=generator).to(device)
    archs = [space.sample(np.random.default_rng(i)) for i in range(steps)]
    return Workload(space, images, labels, archs, device, autocast, backend)


IMPLEMENTATIONS = ("elastic", "autoformer", "autoformer-compiled")


def make_step(impl: str, work: Workload):
    """A function running ``len(work.archs)`` training steps of ``impl`` (one of IMPLEMENTATIONS)."""
    torch.manual_seed(0)
    if impl == "elastic":
        model = VisionTransformerSupernet(SupernetConfig.from_space(work.space)).to(work.device)
    else:
        model = AutoFormerSupernet(work.space).to(work.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    forward = model
    if impl == "autoformer-compiled":  # one graph per subnet configuration, all of them kept
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(work.archs))
        forward = torch.compile(model, dynamic=True)

    def run():
        with elastic_ops.use_backend(work.backend) if work.backend else contextlib.nullcontext():
            for arch in work.archs:
                model.set_arch(arch)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(work.device.type, dtype=work.autocast or torch.float32,
                                    enabled=work.autocast is not None):
                    logits = forward(work.images)
                F.cross_entropy(logits.float(), work.labels).backward()
                optimizer.step()
        if work.device.type == "cuda":
            torch.cuda.synchronize()

    return run


def peak_memory_mb(run, device: torch.device) -> float | None:
    """Peak GPU memory of ``run`` above what was live before it (parameters, optimizer state), in MB."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    live = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    return (torch.cuda.max_memory_allocated() - live) / 2**20


WORKLOADS = {"gpu-s": 10, "cpu-tiny": CPU_STEPS}


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_train_step(benchmark, workload, impl):
    if workload.startswith("gpu") and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if impl == "autoformer-compiled" and not workload.startswith("gpu"):
        pytest.skip("torch.compile baseline: a GPU target (compiling on the CPU takes minutes per subnet)")
    work = build(workload, WORKLOADS[workload])
    run = make_step(impl, work)
    run()  # warm-up: kernel compilation, torch.compile of every subnet, allocator
    benchmark.extra_info.update(steps_per_round=len(work.archs), batch=len(work.labels), torch=torch.__version__,
                                device=torch.cuda.get_device_name() if work.device.type == "cuda" else "cpu",
                                peak_memory_mb=peak_memory_mb(run, work.device))
    benchmark.pedantic(run, rounds=5 if workload.startswith("gpu") else 3, iterations=1, warmup_rounds=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["images_per_s"] = len(work.archs) * len(work.labels) / benchmark.stats.stats.median


def main(which: str, implementations: list[str]) -> None:
    workload = "gpu-s" if which == "gpu" else "cpu-tiny"
    work = build(workload, WORKLOADS[workload])
    times = {}
    for impl in implementations:
        run = make_step(impl, work)
        start = time.perf_counter()
        run()
        warm_up = time.perf_counter() - start
        memory = peak_memory_mb(run, work.device)
        samples = []
        for _ in range(3):
            start = time.perf_counter()
            run()
            samples.append((time.perf_counter() - start) / len(work.archs))
        times[impl] = float(np.median(samples))
        print(f"{workload} {impl:>20}: {1e3 * times[impl]:.1f} ms per step ({len(work.labels) / times[impl]:.0f} "
              f"images/s), warm-up {warm_up:.1f} s" + (f", peak {memory:.0f} MB" if memory is not None else ""),
              flush=True)
    for impl in implementations[1:]:
        print(f"{workload}: {impl} / {implementations[0]} = {times[impl] / times[implementations[0]]:.2f}x "
              f"(torch {torch.__version__}, {torch.cuda.get_device_name() if work.device.type == 'cuda' else 'cpu'})")


if __name__ == "__main__":
    which = sys.argv[1] if len(sys.argv) > 1 else ("gpu" if torch.cuda.is_available() else "cpu")
    main(which, sys.argv[2:] or ["elastic", "autoformer"])

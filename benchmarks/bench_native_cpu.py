"""Native CPU kernels against the PyTorch reference, on the same shapes, threads and CPU, in one run.

Run: python -m pytest benchmarks/bench_native_cpu.py --benchmark-only
Each benchmark group is one (op, workload, threads); compare the native and reference rows of a group
(the ratio native / reference is what to report, with the CPU, torch version and date). Both go
through the public op with the backend forced, so both pay the same validation. "threads1" runs both
on one thread (torch.set_num_threads(1)): on a shared machine, time those with
``--benchmark-timer=time.process_time -k threads1`` to count only this process's CPU time.
"threads-all" uses torch's default thread count, which the native kernels follow too.

Workloads (CPU inference, torch.no_grad()):
- cifar: 32x32 images in 4x4 patches -> 64 patches + class token = 65 tokens, embed 192, 3 heads,
  MLP ratio 4, batch 64, on a super weight of embed 256, 4 heads, hidden 1024.
- t-small / t-large: the smallest and largest AutoFormer-T subnets (embed 192, 3 heads, hidden 672;
  embed 240, 4 heads, hidden 960) at 224 px (197 tokens), batch 8, on the T supernet (256, 4, 1024).
"""
from __future__ import annotations

import pytest
import torch

import elastic_ops

_C = pytest.importorskip("elastic_ops._C")

SUPER = dict(embed=256, heads=4, hidden=1024, head_dim=64)
WORKLOADS = {
    # name: (batch, tokens, embed, heads, hidden)
    "cifar": (64, 65, 192, 3, 768),
    "t-small": (8, 197, 192, 3, 672),
    "t-large": (8, 197, 240, 4, 960),
}
OPS = ("linear", "linear-gelu", "layer_norm", "mlp", "attention")


def super_weights() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    e, h, hidden, dh = SUPER["embed"], SUPER["heads"], SUPER["hidden"], SUPER["head_dim"]

    def rand(*shape):
        return torch.randn(*shape, generator=g) * shape[-1] ** -0.5

    return dict(fc1_weight=rand(hidden, e), fc1_bias=rand(hidden), fc2_weight=rand(e, hidden), fc2_bias=rand(e),
                norm_weight=1 + rand(e), norm_bias=rand(e), qkv_weight=rand(3 * h * dh, e), qkv_bias=rand(3 * h * dh),
                proj_weight=rand(e, h * dh), proj_bias=rand(e))


def call(op: str, x: torch.Tensor, w: dict, heads: int, hidden: int):
    if op == "linear":
        return lambda: elastic_ops.elastic_linear(x, w["fc1_weight"], w["fc1_bias"], hidden)
    if op == "linear-gelu":
        return lambda: elastic_ops.elastic_linear(x, w["fc1_weight"], w["fc1_bias"], hidden, "gelu")
    if op == "layer_norm":
        return lambda: elastic_ops.elastic_layer_norm(x, w["norm_weight"], w["norm_bias"])
    if op == "mlp":
        return lambda: elastic_ops.elastic_mlp(x, w["fc1_weight"], w["fc1_bias"], w["fc2_weight"], w["fc2_bias"],
                                               hidden)
    return lambda: elastic_ops.elastic_attention(x, w["qkv_weight"], w["qkv_bias"], w["proj_weight"], w["proj_bias"],
                                                 heads, SUPER["head_dim"])


@pytest.fixture(params=["threads1", "threads-all"])
def threads(request):
    before = torch.get_num_threads()
    if request.param == "threads1":
        torch.set_num_threads(1)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("workload", WORKLOADS, ids=WORKLOADS.keys())
@pytest.mark.parametrize("op", OPS)
def test_native_vs_reference(benchmark, op, workload, backend, threads):
    batch, tokens, embed, heads, hidden = WORKLOADS[workload]
    x = torch.randn(batch, tokens, embed)
    run = call(op, x, super_weights(), heads, hidden)
    benchmark.group = f"{op} {workload} {threads}"
    benchmark.extra_info.update(threads=torch.get_num_threads(), torch=torch.__version__, isa=_C.isa())
    with elastic_ops.use_backend(backend), torch.no_grad():
        run()  # warm-up: thread pool, scratch buffers
        benchmark.pedantic(run, rounds=20, warmup_rounds=2)

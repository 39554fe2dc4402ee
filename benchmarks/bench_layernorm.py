"""Elastic LayerNorm over the first ``embed`` of ``super_embed`` channels: this project vs the reference on the
same slices vs F.layer_norm on contiguous parameters of the subnet's width vs ``torch.compile`` of F.layer_norm on
the slices. Target: forward+backward at least as fast as the reference on the slices. GPU only.

Run: python -m pytest benchmarks/bench_layernorm.py --benchmark-only \
    --benchmark-group-by=param:dtype,param:shape,param:mode
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from baselines import compiled
from shapes import BATCH, SHAPES, TOKENS

import elastic_ops
from elastic_ops import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="GPU benchmark: needs a CUDA device (interpreter timings would mean nothing)")

IMPLEMENTATIONS = ["elastic_triton", "reference_slices", "torch_contiguous", "compiled_slices"]


def _layer_norm_call(impl: str, weight, bias, d: int):
    if impl == "torch_contiguous":
        w = torch.nn.Parameter(weight.detach()[:d].clone())
        b = torch.nn.Parameter(bias.detach()[:d].clone())
        return lambda x: F.layer_norm(x, (d,), w, b)
    if impl == "reference_slices":
        return lambda x: reference.layer_norm(x, weight, bias)
    if impl == "compiled_slices":
        compiled_norm = compiled(reference.layer_norm)
        return lambda x: compiled_norm(x, weight, bias)

    def call(x):
        with elastic_ops.use_backend("triton"):
            return elastic_ops.elastic_layer_norm(x, weight, bias)
    return call


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_layer_norm(cuda_benchmark, dtype, shape, mode, impl):
    space = SHAPES[shape]
    device = torch.device("cuda")
    weight = torch.nn.Parameter(1 + 0.1 * torch.randn(space.super_embed, device=device, dtype=dtype))
    bias = torch.nn.Parameter(0.1 * torch.randn(space.super_embed, device=device, dtype=dtype))
    x = torch.randn(BATCH, TOKENS, space.embed, device=device, dtype=dtype, requires_grad=mode == "forward_backward")
    dy = torch.randn_like(x)
    call = _layer_norm_call(impl, weight, bias, space.embed)
    element_bytes = x.element_size() * x.numel()
    if mode == "forward":
        def step():
            with torch.no_grad():
                call(x)
        moved = 2 * element_bytes  # read x, write y
    else:
        def step():
            x.grad = None
            call(x).backward(dy)
        moved = 5 * element_bytes  # forward: x, y; backward: x, dy, dx
    cuda_benchmark(step, bytes_moved=moved)

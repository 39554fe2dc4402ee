"""Elastic linear on AutoFormer subnet slices: this project vs the reference on the same slices vs F.linear on a
contiguous weight of the subnet's shape (targets: at least 0.95x of it without activation; with GELU, 1.2x forward
and 1.1x forward+backward of ``F.gelu(F.linear(...))``) vs ``torch.compile`` of F.linear (+ F.gelu) on the slices.
GPU only.

Run: python -m pytest benchmarks/bench_linear.py --benchmark-only \
    --benchmark-group-by=param:dtype,param:shape,param:layer,param:mode
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
# layer -> (in, out, super in, super out, activation) of the supernet shape
LAYERS = {
    "fc1_gelu": lambda s: (s.embed, s.hidden, s.super_embed, s.super_hidden, "gelu"),
    "fc2": lambda s: (s.hidden, s.embed, s.super_hidden, s.super_embed, None),
}


def _linear_call(impl: str, x, weight, bias, out_features: int, activation: str | None):
    """The call to time, with its weights (super weights, or a contiguous copy of the slice for torch)."""
    in_features = x.shape[-1]
    if impl == "torch_contiguous":
        w = torch.nn.Parameter(weight.detach()[:out_features, :in_features].clone())
        b = torch.nn.Parameter(bias.detach()[:out_features].clone())

        def call(x):
            y = F.linear(x, w, b)
            return F.gelu(y) if activation else y
        return call
    if impl == "reference_slices":
        return lambda x: reference.linear(x, weight, bias, out_features, activation)
    if impl == "compiled_slices":
        compiled_linear = compiled(reference.linear)
        return lambda x: compiled_linear(x, weight, bias, out_features, activation)

    def call(x):
        with elastic_ops.use_backend("triton"):
            return elastic_ops.elastic_linear(x, weight, bias, out_features, activation)
    return call


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_linear(cuda_benchmark, dtype, shape, layer, mode, impl):
    in_features, out_features, super_in, super_out, activation = LAYERS[layer](SHAPES[shape])
    device = torch.device("cuda")
    weight = torch.nn.Parameter(torch.randn(super_out, super_in, device=device, dtype=dtype) * super_in ** -0.5)
    bias = torch.nn.Parameter(torch.randn(super_out, device=device, dtype=dtype))
    x = torch.randn(BATCH, TOKENS, in_features, device=device, dtype=dtype, requires_grad=mode == "forward_backward")
    dy = torch.randn(BATCH, TOKENS, out_features, device=device, dtype=dtype)
    call = _linear_call(impl, x, weight, bias, out_features, activation)
    flops = 2 * BATCH * TOKENS * in_features * out_features

    if mode == "forward":
        def step():
            with torch.no_grad():
                call(x)
    else:
        flops *= 3  # dx and dW cost one forward GEMM each

        def step():
            x.grad = None  # weight gradients accumulate, as over micro-batches; x's would only grow
            call(x).backward(dy)

    cuda_benchmark(step, flops=flops)

"""Elastic MLP (fc1, exact GELU, fc2) on AutoFormer subnet slices (batch 128, 197 tokens). GPU only.

Compared in one run, on the same shapes:
- elastic_triton: this project (fc1 writes only the pre-activation; fc2 and the backward apply GELU on load);
- reference_slices: ``elastic_ops.reference.mlp`` on the same super weights (F.linear on slice views, F.gelu),
  which keeps both the pre-activation and the activation for backward;
- autoformer: AutoFormer's ``LinearSuper`` way, the active slices copied with ``.contiguous()`` on every call,
  then ``F.linear`` (under autocast when the weights are fp32 masters);
- autoformer_compiled: the same under ``torch.compile``.
Targets: forward+backward at least 1.3x reference_slices, with at least 30% less activation memory.
``extra_info``: peak_memory_mb (the step's peak above what was live), activation_memory_mb (what one forward keeps
alive for backward, output excluded), tflops.

Precision: ``fp16``/``bf16`` keep weights and activations in that dtype; ``bf16_master`` keeps fp32 master
weights with bf16 activations (the Triton kernels and the reference cast the active slice, AutoFormer autocasts).

Run: python -m pytest benchmarks/bench_mlp.py --benchmark-only \
    --benchmark-group-by=param:precision,param:shape,param:mode
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from baselines import compiled
from shapes import BATCH, SHAPES, TOKENS

import elastic_ops
from elastic_ops import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="GPU benchmark: needs a CUDA device (interpreter timings would mean nothing)")

IMPLEMENTATIONS = ["elastic_triton", "reference_slices", "autoformer", "autoformer_compiled"]
PRECISIONS = {  # name -> (activation dtype, weight dtype)
    "fp16": (torch.float16, torch.float16),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "bf16_master": (torch.bfloat16, torch.float32),
}


def autoformer_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden: int):
    """AutoFormer's ``LinearSuper.sample_parameters``: contiguous copies of the active slices, every call."""
    embed = x.shape[-1]
    fc1 = F.linear(x, fc1_weight[:hidden, :embed].contiguous(), fc1_bias[:hidden].contiguous())
    return F.linear(F.gelu(fc1), fc2_weight[:embed, :hidden].contiguous(), fc2_bias[:embed].contiguous())


def _mlp_call(impl: str, activation_dtype, weight_dtype):
    if impl == "elastic_triton":
        def call(*args):
            with elastic_ops.use_backend("triton"):
                return elastic_ops.elastic_mlp(*args)
        return call
    if impl == "reference_slices":
        return reference.mlp
    mlp = compiled(autoformer_mlp) if impl == "autoformer_compiled" else autoformer_mlp

    def call(*args):
        mixed = weight_dtype != activation_dtype
        with torch.autocast("cuda", dtype=activation_dtype) if mixed else contextlib.nullcontext():
            return mlp(*args)
    return call


def _activation_memory_mb(call, args) -> float:
    """Memory one forward keeps alive for backward, its output excluded."""
    torch.cuda.synchronize()
    live = torch.cuda.memory_allocated()
    y = call(*args)
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - live - y.numel() * y.element_size()
    del y
    return kept / 2**20


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_mlp(cuda_benchmark, benchmark, precision, shape, mode, impl):
    activation_dtype, weight_dtype = PRECISIONS[precision]
    s = SHAPES[shape]
    device = torch.device("cuda")

    def super_param(*size):
        return torch.nn.Parameter(torch.randn(*size, device=device, dtype=weight_dtype) * size[-1] ** -0.5)

    fc1_weight, fc1_bias = super_param(s.super_hidden, s.super_embed), super_param(s.super_hidden)
    fc2_weight, fc2_bias = super_param(s.super_embed, s.super_hidden), super_param(s.super_embed)
    x = torch.randn(BATCH, TOKENS, s.embed, device=device, dtype=activation_dtype,
                    requires_grad=mode == "forward_backward")
    dy = torch.randn_like(x)
    args = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, s.hidden)
    call = _mlp_call(impl, activation_dtype, weight_dtype)
    flops = 2 * 2 * BATCH * TOKENS * s.embed * s.hidden

    if mode == "forward":
        def step():
            with torch.no_grad():
                call(*args)
    else:
        flops *= 3  # the input and weight gradients cost one forward GEMM each
        call(*args).backward(dy)  # compile and autotune before measuring what the forward keeps
        benchmark.extra_info["activation_memory_mb"] = _activation_memory_mb(call, args)

        def step():
            x.grad = None  # weight gradients accumulate, as over micro-batches; x's would only grow
            call(*args).backward(dy)

    cuda_benchmark(step, flops=flops)

"""Elastic attention on AutoFormer subnet slices (batch 128, 197 tokens, head dim 64). GPU only.

Compared in one run, on the same shapes:
- elastic_triton: this project (fused qkv GEMM into one buffer, flash attention, Triton output projection);
- reference_slices: ``elastic_ops.reference.attention`` on the same block-layout super weights;
- autoformer: ``baselines.AutoFormerAttention`` (stride-3 qkv rows gathered with torch.cat every call,
  explicit softmax attention);
- autoformer_compiled: the same module under ``torch.compile``;
- sdpa_slices: ``F.scaled_dot_product_attention`` on q, k, v made from the same slices, with the copies it
  needs (the three active qkv row blocks gathered into one weight, the context transposed back).
Targets: forward+backward at least as fast as sdpa_slices, and at least 3x autoformer.

Precision: ``fp16``/``bf16`` keep weights and activations in that dtype; ``bf16_master`` keeps fp32 master
weights with bf16 activations (the Triton kernels cast on load; the others run under autocast).

Run: python -m pytest benchmarks/bench_attention.py --benchmark-only \
    --benchmark-group-by=param:precision,param:shape,param:mode
"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from baselines import AutoFormerAttention, compiled
from shapes import BATCH, HEAD_DIM, SHAPES, TOKENS

import elastic_ops
from elastic_ops import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="GPU benchmark: needs a CUDA device (interpreter timings would mean nothing)")

IMPLEMENTATIONS = ["elastic_triton", "reference_slices", "autoformer", "autoformer_compiled", "sdpa_slices"]
PRECISIONS = {  # name -> (activation dtype, weight dtype)
    "fp16": (torch.float16, torch.float16),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "bf16_master": (torch.bfloat16, torch.float32),
}


def sdpa_attention(x, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads: int, head_dim: int):
    """The same op through ``F.scaled_dot_product_attention``: a copy gathers the three active row blocks of the
    qkv weight, q, k, v are strided views of the projection, and the context is transposed back with a copy."""
    batch, tokens, embed = x.shape
    width = num_heads * head_dim
    weight = qkv_weight.view(3, -1, qkv_weight.shape[1])[:, :width, :embed].reshape(3 * width, embed)
    bias = qkv_bias.view(3, -1)[:, :width].reshape(3 * width)
    q, k, v = F.linear(x, weight, bias).view(batch, tokens, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    context = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, width)
    return F.linear(context, proj_weight[:embed, :width], proj_bias[:embed])


def _attention_call(impl: str, shape, weights: tuple, device, weight_dtype):
    """The call to time on the block-layout super weights (or, for autoformer, on its own super module)."""
    if impl.startswith("autoformer"):
        module = AutoFormerAttention(shape.super_embed, shape.super_heads, HEAD_DIM).to(device, weight_dtype)
        module.set_sample_config(shape.heads)
        return compiled(module) if impl == "autoformer_compiled" else module
    if impl == "reference_slices":
        return lambda x: reference.attention(x, *weights, shape.heads, HEAD_DIM)
    if impl == "sdpa_slices":
        return lambda x: sdpa_attention(x, *weights, shape.heads, HEAD_DIM)

    def call(x):
        with elastic_ops.use_backend("triton"):
            return elastic_ops.elastic_attention(x, *weights, shape.heads, HEAD_DIM)
    return call


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_attention(cuda_benchmark, precision, shape, mode, impl):
    dtype, weight_dtype = PRECISIONS[precision]
    s = SHAPES[shape]
    device = torch.device("cuda")
    super_width = s.super_heads * HEAD_DIM
    weights = tuple(torch.nn.Parameter(t.to(weight_dtype)) for t in (
        torch.randn(3 * super_width, s.super_embed, device=device) * s.super_embed ** -0.5,
        torch.randn(3 * super_width, device=device) * 0.1,
        torch.randn(s.super_embed, super_width, device=device) * super_width ** -0.5,
        torch.randn(s.super_embed, device=device) * 0.1,
    ))
    x = torch.randn(BATCH, TOKENS, s.embed, device=device, dtype=dtype, requires_grad=mode == "forward_backward")
    dy = torch.randn(BATCH, TOKENS, s.embed, device=device, dtype=dtype)
    call = _attention_call(impl, s, weights, device, weight_dtype)
    # Mixed precision for the PyTorch paths is autocast; the Triton kernels cast the fp32 weights on load.
    autocast = (torch.autocast("cuda", dtype=dtype) if weight_dtype != dtype and impl != "elastic_triton"
                else contextlib.nullcontext())
    width = s.heads * HEAD_DIM
    rows = BATCH * TOKENS
    flops = 2 * rows * s.embed * 3 * width + 4 * BATCH * s.heads * TOKENS ** 2 * HEAD_DIM + 2 * rows * width * s.embed

    if mode == "forward":
        def step():
            with torch.no_grad(), autocast:
                call(x)
    else:
        flops *= 3  # backward: two GEMMs per forward GEMM (attention backward recomputes scores on top)

        def step():
            x.grad = None  # weight gradients accumulate, as over micro-batches; x's would only grow
            with autocast:
                out = call(x)
            out.backward(dy)

    cuda_benchmark(step, flops=flops)

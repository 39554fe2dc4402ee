"""Elastic MLP: ``fc2(gelu(fc1(x)))`` on the leading blocks ``W1[:hidden, :e]`` and ``W2[:e, :hidden]``.

Forward: fc1 writes the pre-activation ``z = x @ W1^T + b1`` (``linear.linear_forward``), the only
hidden-sized tensor kept for backward; the fc2 GEMM applies the exact GELU to ``z`` as it loads it, so the
activation never reaches memory. Backward recomputes GELU from ``z`` the same way:

- ``dW2 += gelu(z)^T @ dy`` (transposed into ``W2.grad``) and ``db2 += sum(dy)``: the GELU-on-load GEMM;
- ``dh = dy @ W2``: ``linear_forward`` on the transposed weight view;
- ``dx``, ``dW1``, ``db1`` from ``dz = dh * gelu'(z)``: ``linear.linear_backward``, whose kernels apply
  ``gelu'(z)`` as they load ``dh``.

Weight and bias gradients are added straight into ``param.grad[:rows, :cols]`` (``_common.weight_grad_buffer``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (add_accumulated, atomic_accumulator, backward_grad_mode, interpreter, record_grad_mode,
                      weight_grad_buffer)
from .linear import dot_precision, matmul_configs, as_rows, gelu, grouped_tile, linear_backward, linear_forward

# The reduction length each split of the split-K weight-gradient GEMM gets at least.
MIN_K_PER_SPLIT = 256


@triton.autotune(
    configs=matmul_configs(),
    key=["M", "N", "K", "HAS_BIAS", "ACCUMULATE", "BIAS_GRAD", "SPLIT_K"],
    # Accumulating launches add into gradients: every tuning run must start from the same values.
    restore_value=["out_ptr", "bias_grad_ptr"],
)
@triton.jit
def _gelu_matmul_kernel(
    pre_ptr, b_ptr, out_ptr, bias_ptr, bias_grad_ptr,
    M, N, K,
    stride_pre_m, stride_pre_k, stride_b_k, stride_b_n, stride_out_m, stride_out_n,
    HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr, BIAS_GRAD: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``out (+)= gelu(P) @ B + bias``: the GELU is applied to the pre-activations P as they are loaded.

    pre_ptr: P ``[M, K]``, the activation dtype (strided; a transposed view for the weight gradient).
    b_ptr: B ``[K, N]``, any float dtype, cast to P's dtype on load (fp32 master weights, fp16 activations).
    out_ptr: ``[M, N]``; ACCUMULATE adds into it (a weight-gradient view), atomically when SPLIT_K > 1
    programs share an output tile, each reducing its own range of K.
    bias_ptr: ``[N]``, added (HAS_BIAS). bias_grad_ptr: ``[N]``; with BIAS_GRAD the column sums of B over
    this program's K range are added to it (the fc2 bias gradient, B being dy) by the first tile row.
    Operands are the active slices, read through their strides: nothing outside them is touched.
    """
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_span = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_begin = tl.program_id(1) * k_span
    k_end = tl.minimum(k_begin + k_span, K)

    dot_dtype = pre_ptr.dtype.element_ty
    acc_dtype = tl.float64 if dot_dtype == tl.float64 else tl.float32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=acc_dtype)
    for k in range(k_begin, k_end, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        pre = tl.load(pre_ptr + offs_m[:, None] * stride_pre_m + offs_k[None, :] * stride_pre_k,
                      mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + offs_k[:, None] * stride_b_k + offs_n[None, :] * stride_b_n,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        # gelu(0) = 0 keeps the masked padding neutral.
        acc = tl.dot(gelu(pre.to(acc_dtype)).to(dot_dtype), b.to(dot_dtype), acc, input_precision=DOT_PRECISION,
                     out_dtype=acc_dtype)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(acc_dtype)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_out_m + offs_n[None, :] * stride_out_n
    mask_out = mask_m[:, None] & mask_n[None, :]
    if ACCUMULATE and SPLIT_K > 1:
        tl.atomic_add(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_out)
    else:
        if ACCUMULATE:
            acc += tl.load(out_ptrs, mask=mask_out, other=0.0).to(acc_dtype)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_out)

    # A second, GEMM-free pass over B by the first tile row keeps reductions out of the main loop.
    if BIAS_GRAD:
        if pid_m == 0:
            column_sums = tl.zeros((BLOCK_N,), dtype=acc_dtype)
            for k in range(k_begin, k_end, BLOCK_K):
                offs_k = k + tl.arange(0, BLOCK_K)
                b = tl.load(b_ptr + offs_k[:, None] * stride_b_k + offs_n[None, :] * stride_b_n,
                            mask=(offs_k[:, None] < k_end) & mask_n[None, :], other=0.0)
                column_sums += tl.sum(b.to(acc_dtype), axis=0)
            if SPLIT_K > 1:
                tl.atomic_add(bias_grad_ptr + offs_n, column_sums.to(bias_grad_ptr.dtype.element_ty), mask=mask_n)
            else:
                column_sums += tl.load(bias_grad_ptr + offs_n, mask=mask_n, other=0.0).to(acc_dtype)
                tl.store(bias_grad_ptr + offs_n, column_sums.to(bias_grad_ptr.dtype.element_ty), mask=mask_n)


def _split_k(pre_t: Tensor, out: Tensor) -> int:
    """How many ranges the weight-gradient GEMM splits its long token reduction into, so that its few
    output tiles still fill the GPU. Splits add atomically (``_common.atomic_accumulator``)."""
    tile = 64 if interpreter() else 128
    tiles = triton.cdiv(out.shape[0], tile) * triton.cdiv(out.shape[1], tile)
    target = 8 if interpreter() else 2 * torch.cuda.get_device_properties(out.device).multi_processor_count
    return max(1, min(8, target // tiles, pre_t.shape[1] // MIN_K_PER_SPLIT))


def _gelu_matmul(pre: Tensor, b: Tensor, out: Tensor, *, bias: Tensor | None = None, accumulate: bool = False,
                 bias_grad: Tensor | None = None) -> None:
    """``out (+)= gelu(pre) @ b + bias`` for 2-D strided views ``pre [M, K]``, ``b [K, N]``, ``out [M, N]``;
    ``bias_grad += b.sum(0)`` if given (accumulating launches only)."""
    (m, k), n = pre.shape, b.shape[1]
    if out.numel() == 0 or k == 0:
        return  # no tokens: nothing to write, and an empty reduction adds zero
    split_k = _split_k(pre, out) if accumulate else 1
    out_acc, bias_grad_acc = (atomic_accumulator(t) for t in (out, bias_grad)) if split_k > 1 else (out, bias_grad)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), split_k)

    _gelu_matmul_kernel[grid](
        pre, b, out_acc, bias if bias is not None else out, bias_grad_acc if bias_grad is not None else out,
        m, n, k, *pre.stride(), *b.stride(), *out_acc.stride(),
        HAS_BIAS=bias is not None, ACCUMULATE=accumulate, BIAS_GRAD=bias_grad is not None, SPLIT_K=split_k,
        DOT_PRECISION=dot_precision(pre),
    )
    add_accumulated(out, out_acc)
    add_accumulated(bias_grad, bias_grad_acc)


def mlp_forward(x2d: Tensor, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor,
                fc2_bias: Tensor | None, hidden: int) -> tuple[Tensor, Tensor]:
    """``(y, z)`` for tokens ``x2d [M, e]``: the output ``[M, e]`` and the pre-activation ``z [M, hidden]``."""
    e = x2d.shape[1]
    pre, _ = linear_forward(x2d, fc1_weight, fc1_bias, hidden, None, keep_pre_activation=False)
    y = torch.empty(x2d.shape, device=x2d.device, dtype=x2d.dtype)
    _gelu_matmul(pre, fc2_weight[:e, :hidden].t(), y, bias=None if fc2_bias is None else fc2_bias[:e])
    return y, pre


def mlp_backward(dy: Tensor, x2d: Tensor, pre: Tensor, fc1_weight: Tensor, fc1_bias: Tensor | None,
                 fc2_weight: Tensor, fc2_bias: Tensor | None, needs: tuple[bool, ...]):
    """Gradients of ``mlp_forward`` for ``dy [M, e]``; ``needs`` flags (x, W1, b1, W2, b2).

    Returns ``(dx, dW1, db1, dW2, db2)``: dx ``[M, e]`` or None; for the parameters what autograd must
    receive (None where the gradient went into ``param.grad`` in place, see ``weight_grad_buffer``).
    """
    need_x, need_w1, need_b1, need_w2, need_b2 = needs
    e, hidden = x2d.shape[1], pre.shape[1]
    db2_view, db2 = weight_grad_buffer(fc2_bias, e) if need_b2 else (None, None)
    dw2 = None
    if need_w2:
        dw2_view, dw2 = weight_grad_buffer(fc2_weight, e, hidden)
        _gelu_matmul(pre.t(), dy, dw2_view.t(), accumulate=True, bias_grad=db2_view)
    elif need_b2:  # a trainable bias on a frozen weight: no GEMM to fuse the sum into
        db2_view += dy.sum(0, dtype=torch.float64 if dy.dtype == torch.float64 else torch.float32).to(db2_view.dtype)

    dx = dw1 = db1 = None
    if need_x or need_w1 or need_b1:
        dh, _ = linear_forward(dy, fc2_weight.t(), None, hidden, None, keep_pre_activation=False)
        dx, dw1, db1 = linear_backward(dh, pre, x2d, fc1_weight, fc1_bias, need_x, need_w1, need_b1)
    return dx, dw1, db1, dw2, db2


class ElasticMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden_features):
        record_grad_mode(ctx)
        x2d = as_rows(x)
        y, pre = mlp_forward(x2d, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden_features)
        ctx.save_for_backward(x2d, pre, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad_y):
        with backward_grad_mode(ctx):
            x2d, pre, fc1_weight, fc1_bias, fc2_weight, fc2_bias = ctx.saved_tensors
            dx, dw1, db1, dw2, db2 = mlp_backward(
                as_rows(grad_y), x2d, pre, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                tuple(ctx.needs_input_grad[:5]))
            return None if dx is None else dx.view(ctx.x_shape), dw1, db1, dw2, db2, None


def elastic_mlp(x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor, fc2_bias: Tensor | None,
                hidden_features: int) -> Tensor:
    """``fc2(gelu(fc1(x)))`` with ``W1[:hidden, :e]``, ``W2[:e, :hidden]``, ``e = x.shape[-1]``, on the Triton kernels.

    Inputs are validated by ``elastic_ops.functional.elastic_mlp``; call that.
    """
    return ElasticMLPFunction.apply(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden_features)

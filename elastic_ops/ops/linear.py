"""Elastic linear: ``act(x @ W[:out, :in].T + b[:out])`` on the super weight, forward and backward.

Without an activation every product is one cuBLAS call on the strided view of the active block
(``_common.linear_gemm``, ``add_weight_grad``): nothing is copied, and weight gradients land in
``W.grad[:out, :in]`` in place. With the exact GELU, two Triton kernels remove what torch cannot:

- ``_linear_gelu_kernel``: the GEMM with bias and GELU in its epilogue, persistent over output tiles, operands
  read through tensor descriptors whose shape is the active block and whose strides are the super weight's (zero
  fill covers the slice edges and the token tail, so the main loop has no masks). It stores the pre-activation
  only when a backward will run. Where descriptors cannot run (before Hopper, unaligned strides, fp64), cuBLAS
  and ``F.gelu`` do the same.
- ``_gelu_backward_kernel``: ``dz = dy * gelu'(pre)`` computed once per element, the bias gradient's column sums
  reduced in the same pass; optionally ``gelu(pre)`` from the same erf (the MLP backward needs it). The GEMMs of
  the backward are cuBLAS on ``dz``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from .._weight_grads import backward_grad_mode, record_grad_mode, weight_grad_buffer
from ._common import (
    TMA_ALIGNMENT,
    active_block,
    active_vector,
    add_bias_grad,
    add_weight_grad,
    as_rows,
    cdiv,
    descriptor,
    descriptor_compatible,
    descriptors_supported,
    dot_precision,
    gelu,
    gelu_and_grad,
    grouped_tile,
    interpreter,
    linear_gemm,
    needs_backward,
    sm_count,
    unit_stride,
)

# ---------------------------------------------------------------------------------------------- forward epilogue


@triton.jit
def _linear_gelu_kernel(
    x_desc, w_desc, b_ptr, y_desc, pre_desc,
    M, N, K,
    HAS_BIAS: tl.constexpr, STORE_PRE_ACTIVATION: tl.constexpr, DOT_PRECISION: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``y = gelu(x @ w[:N, :K].T + b[:N])``; each of NUM_PROGRAMS programs loops over output tiles.

    x_desc: x ``[M, K]``, blocks ``[BLOCK_M, BLOCK_K]``. w_desc: the active block ``[N, K]`` of the super weight,
    its row stride, blocks ``[BLOCK_N, BLOCK_K]``. b_ptr: super bias, active ``[:N]``.
    y_desc: y ``[M, N]``; pre_desc: the pre-activation ``[M, N]`` (STORE_PRE_ACTIVATION), blocks ``[BLOCK_M, BLOCK_N]``.
    Loads past the descriptors' shapes read zero and stores past them are dropped.
    """
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), tiles, NUM_PROGRAMS, flatten=True):
        pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k_steps):
            x = x_desc.load([off_m, k * BLOCK_K])
            w = w_desc.load([off_n, k * BLOCK_K])
            acc = tl.dot(x, w.T, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            cols = off_n + tl.arange(0, BLOCK_N)
            acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        if STORE_PRE_ACTIVATION:
            pre_desc.store([off_m, off_n], acc.to(pre_desc.dtype))
        y_desc.store([off_m, off_n], gelu(acc).to(y_desc.dtype))


def _gelu_gemm_config(dtype: torch.dtype) -> dict:
    """Tiles of ``_linear_gelu_kernel``: 128 x 128 outputs per tile, four 64-deep (32 for 4-byte elements) stages of
    operands in shared memory, 8 warps (two warpgroups of ``wgmma``). The interpreter takes one large tile."""
    if interpreter():
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=1)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64 if dtype.itemsize <= 2 else 32, GROUP_M=8, num_warps=8,
                num_stages=4 if dtype.itemsize <= 2 else 3)


@dataclass(frozen=True)
class _GeluGemmLaunch:
    """What a launch of ``_linear_gelu_kernel`` takes that depends on the problem alone: made once per problem, so
    that a call builds only what depends on its tensors (outputs and descriptors)."""
    grid: tuple[int]
    x_block: list[int]
    weight_block: list[int]
    out_block: list[int]
    options: dict  # tiles, program count and compile options


@lru_cache(maxsize=4096)
def _gelu_gemm_launch(device: torch.device, dtype: torch.dtype, M: int, N: int, K: int,
                      precision: str) -> _GeluGemmLaunch | None:
    """The launch of ``_linear_gelu_kernel`` for ``[M, K] x [N, K]^T`` in ``dtype`` with ``tl.dot`` precision
    ``precision``, or None where cuBLAS with ``F.gelu`` after it is the way: no tensor descriptors on this device,
    a dtype whose products do not use tensor cores (fp16 and bf16 do; fp32 only as TF32, or in the interpreter), an
    output row a descriptor cannot address, or an empty product. The operands' own strides and addresses are
    checked per call (``descriptor_compatible``)."""
    if dtype in (torch.float16, torch.bfloat16):
        tensor_cores = True
    else:
        tensor_cores = dtype == torch.float32 and (interpreter() or precision == "tf32")
    if not (tensor_cores and descriptors_supported(device) and min(M, N, K) > 0
            and (N * dtype.itemsize) % TMA_ALIGNMENT == 0):
        return None
    config = _gelu_gemm_config(dtype)
    block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    programs = min(sm_count(device), cdiv(M, block_m) * cdiv(N, block_n))
    return _GeluGemmLaunch(grid=(programs,), x_block=[block_m, block_k], weight_block=[block_n, block_k],
                           out_block=[block_m, block_n],
                           options=dict(config, NUM_PROGRAMS=programs))


def linear_gelu_forward(x2d: Tensor, weight: Tensor, bias: Tensor | None, out_features: int,
                        keep_pre_activation: bool) -> tuple[Tensor, Tensor | None]:
    """``(gelu(x2d @ weight[:N, :K].T + bias[:N]), pre-activation or None)`` in x's dtype, ``N = out_features``,
    ``K = x2d.shape[1]``, on the super weight and bias. The fused kernel reads the active block through a
    descriptor of the super weight and the bias with a mask, so the call makes no view of either."""
    M, K = x2d.shape
    N, dtype = out_features, x2d.dtype
    if weight.dtype != dtype:  # fp32 master weights: the cast active block is the operand
        weight = active_block(weight, N, K, dtype)
    if bias is not None and bias.dtype != dtype:
        bias = active_vector(bias, N, dtype)
    bias = unit_stride(bias)  # the kernel reads it with a mask, elements adjacent
    precision = dot_precision(x2d)
    launch = _gelu_gemm_launch(x2d.device, dtype, M, N, K, precision)
    if launch is None or not (descriptor_compatible(x2d) and descriptor_compatible(weight)):
        pre = linear_gemm(x2d, active_block(weight, N, K, dtype), active_vector(bias, N, dtype))
        return F.gelu(pre), (pre if keep_pre_activation else None)
    y = x2d.new_empty((M, N))
    y_desc = descriptor(y, (M, N), (N, 1), launch.out_block)
    pre = x2d.new_empty((M, N)) if keep_pre_activation else None
    _linear_gelu_kernel[launch.grid](
        descriptor(x2d, (M, K), x2d.stride(), launch.x_block),
        descriptor(weight, (N, K), weight.stride(), launch.weight_block),
        bias if bias is not None else y, y_desc,
        descriptor(pre, (M, N), (N, 1), launch.out_block) if pre is not None else y_desc,
        M, N, K, HAS_BIAS=bias is not None, STORE_PRE_ACTIVATION=pre is not None, DOT_PRECISION=precision,
        **launch.options,
    )
    return y, pre


# ---------------------------------------------------------------------------------------------- backward elementwise

@triton.jit
def _gelu_backward_kernel(
    dy_ptr, pre_ptr, dz_ptr, act_ptr, bias_partial_ptr,
    M, N, rows_per_program,
    stride_dy_m, stride_dy_n, stride_pre_m, stride_dz_m, stride_act_m,
    STORE_ACTIVATION: tl.constexpr, BIAS_GRAD: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``dz = dy * gelu'(pre)``, optionally ``act = gelu(pre)``, and per-program column sums of dz.

    dy_ptr: dy ``[M, N]`` (strided). pre_ptr: the pre-activation ``[M, N]``, unit column stride.
    dz_ptr: dz ``[M, N]``, unit column stride (may be dy itself: each element is read before it is written).
    act_ptr: ``gelu(pre)`` ``[M, N]`` (STORE_ACTIVATION). bias_partial_ptr: fp32 ``[programs along M, N]``; program
    (i, j) writes row i, columns of tile j: the sum of dz over its ``rows_per_program`` rows (BIAS_GRAD).
    """
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    column_sums = tl.zeros((BLOCK_N,), dtype=COMPUTE_DTYPE)
    first_row = tl.program_id(0) * rows_per_program
    for row_start in range(first_row, first_row + rows_per_program, BLOCK_M):  # rows past M: masked
        rows = (row_start + tl.arange(0, BLOCK_M)).to(tl.int64)
        mask = (rows[:, None] < M) & col_mask[None, :]
        pre = tl.load(pre_ptr + rows[:, None] * stride_pre_m + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy_m + cols[None, :] * stride_dy_n, mask=mask, other=0.0)
        act, slope = gelu_and_grad(pre.to(COMPUTE_DTYPE))
        dz = dy.to(COMPUTE_DTYPE) * slope
        tl.store(dz_ptr + rows[:, None] * stride_dz_m + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)
        if STORE_ACTIVATION:
            tl.store(act_ptr + rows[:, None] * stride_act_m + cols[None, :], act.to(act_ptr.dtype.element_ty),
                     mask=mask)
        if BIAS_GRAD:
            column_sums += tl.sum(dz, axis=0)
    if BIAS_GRAD:
        tl.store(bias_partial_ptr + tl.program_id(0) * N + cols, column_sums, mask=col_mask)


def gelu_backward(dy: Tensor, pre: Tensor, *, out: Tensor | None = None, want_activation: bool = False,
                  want_bias_grad: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(dz, gelu(pre) or None, dz.sum(0) in fp32 or None)`` for ``dy, pre: [M, N]``; dz goes into ``out`` if given
    (dy itself is allowed)."""
    M, N = pre.shape
    dz = torch.empty_like(pre) if out is None else out
    act = torch.empty_like(pre) if want_activation else None
    compute = torch.float64 if pre.dtype == torch.float64 else torch.float32
    block_n = 64 if interpreter() else 128
    block_m = 64 if interpreter() else 32
    tiles_n = cdiv(N, block_n)
    # Enough programs along the rows to fill the device, each reducing a long run of rows into one partial row.
    row_programs = max(1, min(cdiv(M, block_m), 4 * sm_count(pre.device) // tiles_n))
    rows_per_program = cdiv(cdiv(M, row_programs), block_m) * block_m
    row_programs = max(1, cdiv(M, rows_per_program))
    partial = torch.empty((row_programs, N), device=pre.device, dtype=compute) if want_bias_grad else None
    if M > 0:
        _gelu_backward_kernel[(row_programs, tiles_n)](
            dy, pre, dz, act if act is not None else dz, partial if partial is not None else dz,
            M, N, rows_per_program,
            dy.stride(0), dy.stride(1), pre.stride(0), dz.stride(0), act.stride(0) if act is not None else 0,
            STORE_ACTIVATION=want_activation, BIAS_GRAD=want_bias_grad,
            COMPUTE_DTYPE=tl.float64 if compute == torch.float64 else tl.float32,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
        )
    bias_grad = None
    if want_bias_grad:
        bias_grad = partial.sum(0) if M > 0 else torch.zeros(N, device=pre.device, dtype=compute)
    return dz, act, bias_grad


# ---------------------------------------------------------------------------------------------- host side
# ``linear_forward`` and ``linear_backward`` are the op for every caller: the autograd Function below (eager) and the
# custom op of ``elastic_ops.library`` (torch.compile). The forward's residuals are what its backward needs.

def linear_forward(x: Tensor, weight: Tensor, bias: Tensor | None, out_features: int, activation: str | None,
                   keep_residuals: bool) -> tuple[Tensor, Tensor | None]:
    """``(y, pre-activation or None)`` for ``x [..., K]``: the pre-activation is kept only with GELU and
    ``keep_residuals`` (a backward will run). Storing it costs what F.linear followed by F.gelu keeps too; recomputing
    it would cost a third GEMM (+50% backward FLOPs)."""
    if activation is None and x.is_contiguous():
        # torch's own linear folds a contiguous x into the same GEMM on the same strided views, with less host work.
        return F.linear(x, active_block(weight, out_features, x.shape[-1], x.dtype),
                        active_vector(bias, out_features, x.dtype)), None
    x2d = as_rows(x)
    if activation == "gelu":
        y, pre = linear_gelu_forward(x2d, weight, bias, out_features, keep_residuals)
    else:
        y = linear_gemm(x2d, active_block(weight, out_features, x2d.shape[1], x2d.dtype),
                        active_vector(bias, out_features, x2d.dtype))
        pre = None
    return y.view(*x.shape[:-1], out_features), pre


def linear_backward(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, pre: Tensor | None,
                    needs: tuple[bool, bool, bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, dW, db)`` for ``needs`` = (x, weight, bias): dx shaped like x; dW and db go into ``weight_grad_buffer``
    views, and the full-size tensors are returned only where that buffer says autograd must receive them."""
    need_dx, need_dw, need_db = needs[0], needs[1], needs[2] and bias is not None
    x2d, dy = as_rows(x), as_rows(dy)
    N, K = dy.shape[1], x2d.shape[1]
    db_view, db_returned = weight_grad_buffer(bias, N) if need_db else (None, None)
    if pre is not None:
        dz, _, bias_sum = gelu_backward(dy, pre, want_bias_grad=need_db)
        if need_db:
            db_view += bias_sum
    else:
        dz = dy
        if need_db:
            add_bias_grad(db_view, dz)
    dw_returned = None
    if need_dw:
        dw_view, dw_returned = weight_grad_buffer(weight, N, K)
        add_weight_grad(dw_view, dz, x2d)
    dx = torch.mm(dz, active_block(weight, N, K, x2d.dtype)).view(x.shape) if need_dx else None
    return dx, dw_returned, db_returned


class ElasticLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, out_features: int, activation: str | None):
        record_grad_mode(ctx)
        y, pre = linear_forward(x, weight, bias, out_features, activation, keep_residuals=True)
        ctx.save_for_backward(x, weight, bias, pre)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        with backward_grad_mode(ctx):
            return *linear_backward(dy, *ctx.saved_tensors, tuple(ctx.needs_input_grad[:3])), None, None


def elastic_linear(x: Tensor, weight: Tensor, bias: Tensor | None, out_features: int,
                   activation: str | None = None) -> Tensor:
    """``act(x @ weight[:out_features, :in].T + bias[:out_features])`` on the GPU path; inputs validated by
    ``elastic_ops.functional``."""
    if needs_backward(x, weight, bias):
        return ElasticLinearFunction.apply(x, weight, bias, out_features, activation)
    # No backward will run: no autograd node to build and nothing to keep.
    return linear_forward(x, weight, bias, out_features, activation, keep_residuals=False)[0]

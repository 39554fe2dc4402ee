"""Elastic linear: ``act(x @ W[:out, :in].T + b[:out])`` on the super weight, forward and backward.

The active block of the super weight is read in place through ``stride_w_out, stride_w_in``; a weight of
another float dtype than ``x`` (fp32 master weights, fp16 activations) is cast tile by tile after the load.
Weight and bias gradients are added straight into ``W.grad[:out, :in]`` and ``b.grad[:out]``
(``_common.weight_grad_buffer``). The ``@triton.jit`` helpers ``gelu``, ``gelu_grad``, ``grouped_tile`` and
``matmul_tile`` are shared with the other op modules.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (add_accumulated, atomic_accumulator, autotuning, backward_grad_mode, interpreter,
                      record_grad_mode, weight_grad_buffer)


@triton.jit
def gelu(x):
    """Exact (erf) GELU of an fp32 tile: ``x * Phi(x)``; 0.7071... is 1/sqrt(2). Literals, not globals:
    compiled Triton rejects non-constexpr globals inside @jit functions."""
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def gelu_grad(x):
    """d gelu / dx of an fp32 tile: ``Phi(x) + x * phi(x)``."""
    cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
    pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327  # 1/sqrt(2*pi)
    return cdf + x * pdf


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(tile row, tile column) of program ``pid`` over an ``M x N`` output, GROUP_M tile rows at a time so that
    neighbouring programs share operand tiles in L2."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    programs_per_group = GROUP_M * tiles_n
    first_m = (pid // programs_per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % programs_per_group) % group_rows
    pid_n = (pid % programs_per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def matmul_tile(a_ptr, b_ptr, pre_ptr, offs_m, offs_n, M, N, K,
                stride_a_m, stride_a_k, stride_b_k, stride_b_n, stride_pre_m, stride_pre_k,
                GELU_GRAD_A: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """ACC_DTYPE (fp32; fp64 for fp64 inputs) tile ``A[offs_m, :K] @ B[:K, offs_n]`` of strided operands, the
    products in DOT_PRECISION (``dot_precision``).

    B is cast to A's dtype for ``tl.dot`` (an fp32 master weight under fp16 activations).

    a_ptr: A ``[M, K]``. b_ptr: B ``[K, N]`` (a transposed weight slice is B with the weight's strides swapped).
    pre_ptr: with GELU_GRAD_A, a pre-activation ``[M, K]``: A is the gradient of a GELU output and is
    multiplied by ``gelu_grad(pre)`` as it is loaded (otherwise pre_ptr is unused).
    offs_m, offs_n: the BLOCK_M rows of A and BLOCK_N columns of B of this tile.
    Rows of A past M, columns of B past N and the K tail are masked to zero.
    """
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k_start in range(0, K, BLOCK_K):
        k = k_start + offs_k
        a_mask = (offs_m[:, None] < M) & (k[None, :] < K)
        a = tl.load(a_ptr + offs_m[:, None] * stride_a_m + k[None, :] * stride_a_k, mask=a_mask, other=0.0)
        if GELU_GRAD_A:
            pre = tl.load(pre_ptr + offs_m[:, None] * stride_pre_m + k[None, :] * stride_pre_k, mask=a_mask, other=0.0)
            a = (a.to(ACC_DTYPE) * gelu_grad(pre.to(ACC_DTYPE))).to(a_ptr.dtype.element_ty)
        b = tl.load(b_ptr + k[:, None] * stride_b_k + offs_n[None, :] * stride_b_n,
                    mask=(k[:, None] < K) & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    return acc


def matmul_configs() -> list[triton.Config]:
    if interpreter():  # several configs crash the interpreter; one large tile keeps the grid small
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8})]
    # The autotuner skips a config that needs more shared memory than the GPU has; the last, small one fits every
    # kernel in fp64 (gradcheck), whose tiles take twice fp32's bytes. Without autotuning: the first and the last.
    shapes = [(128, 128, 64, 3, 8), (128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 64, 64, 4, 4),
              (64, 128, 64, 4, 4), (128, 128, 32, 4, 4), (64, 64, 64, 4, 4), (128, 64, 32, 4, 4), (64, 64, 32, 2, 4)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for bm, bn, bk, s, w in (shapes if autotuning() else shapes[::len(shapes) - 1])]


@triton.autotune(configs=matmul_configs(), key=["M", "N", "K"])
@triton.jit
def _linear_forward_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, pre_ptr,
    M, N, K,
    stride_x_m, stride_x_k, stride_w_out, stride_w_in, stride_y_m, stride_y_n,
    HAS_BIAS: tl.constexpr, GELU: tl.constexpr, STORE_PRE_ACTIVATION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y = act(x @ w[:N, :K].T + b[:N]).

    x_ptr: x ``[M, K]`` (strided). w_ptr: super weight, active ``[:N, :K]``. b_ptr: super bias, active ``[:N]``.
    y_ptr: y ``[M, N]``. pre_ptr: with STORE_PRE_ACTIVATION, the pre-GELU values ``[M, N]`` (strides of y).
    """
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = matmul_tile(x_ptr, w_ptr, x_ptr, offs_m, offs_n, M, N, K,
                      stride_x_m, stride_x_k, stride_w_in, stride_w_out, 0, 0, False, ACC_DTYPE, DOT_PRECISION,
                      BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(ACC_DTYPE)[None, :]
    out_offsets = offs_m[:, None] * stride_y_m + offs_n[None, :] * stride_y_n
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if STORE_PRE_ACTIVATION:
        tl.store(pre_ptr + out_offsets, acc.to(pre_ptr.dtype.element_ty), mask=out_mask)
    if GELU:
        acc = gelu(acc)
    tl.store(y_ptr + out_offsets, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.autotune(configs=matmul_configs(), key=["M", "N", "K"])
@triton.jit
def _linear_grad_input_kernel(
    dy_ptr, pre_ptr, w_ptr, dx_ptr,
    M, N, K,
    stride_dy_m, stride_dy_n, stride_pre_m, stride_pre_n, stride_w_out, stride_w_in, stride_dx_m, stride_dx_k,
    GELU: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dx = dz @ w[:N, :K] with dz = dy (or dy * gelu'(pre) with GELU).

    dy_ptr: dy ``[M, N]`` (strided). pre_ptr: pre-activation ``[M, N]`` (GELU only).
    w_ptr: super weight, active ``[:N, :K]``. dx_ptr: dx ``[M, K]``.
    The output tile is BLOCK_M x BLOCK_N over dx's ``M x K``; the reduction runs over N in BLOCK_K steps.
    """
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = matmul_tile(dy_ptr, w_ptr, pre_ptr, offs_m, offs_k, M, K, N,
                      stride_dy_m, stride_dy_n, stride_w_out, stride_w_in, stride_pre_m, stride_pre_n, GELU, ACC_DTYPE,
                      DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    tl.store(dx_ptr + offs_m[:, None] * stride_dx_m + offs_k[None, :] * stride_dx_k, acc.to(dx_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


@triton.jit
def linear_grad_weight_kernel(
    dy_ptr, pre_ptr, x_ptr, dw_ptr, db_ptr,
    M, N, K, tiles_k, m_blocks_per_split,
    stride_dy_m, stride_dy_n, stride_pre_m, stride_pre_n, stride_x_m, stride_x_k, stride_dw_out, stride_dw_in,
    GELU: tl.constexpr, WEIGHT_GRAD: tl.constexpr, BIAS_GRAD: tl.constexpr, ATOMIC: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """dw[:N, :K] += dz.T @ x and db[:N] += dz.sum(0), with dz = dy (or dy * gelu'(pre) with GELU).

    dy_ptr: dy ``[M, N]``. pre_ptr: pre-activation ``[M, N]`` (GELU only). x_ptr: x ``[M, K]``.
    dw_ptr: the gradient view of the active block ``[:N, :K]`` (strides of the full gradient).
    db_ptr: the gradient view of the active bias ``[:N]``.
    Grid: (n tile * tiles_k + k tile, split); split s reduces row blocks ``s * m_blocks_per_split`` onwards.
    With one split each output tile has one owner, which loads, adds and stores; with several (few output
    tiles, many rows) the splits add with fp32 atomics. Tiles in k column 0 also reduce the bias gradient.
    """
    pid_n = tl.program_id(0) // tiles_k
    pid_k = tl.program_id(0) % tiles_k
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    dw = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC_DTYPE)
    db = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    m_block_start = split * m_blocks_per_split
    m_block_end = tl.minimum(m_block_start + m_blocks_per_split, tl.cdiv(M, BLOCK_M))
    for m_block in range(m_block_start, m_block_end):
        m = m_block * BLOCK_M + offs_m
        dz_mask = (offs_n[:, None] < N) & (m[None, :] < M)
        dz_t = tl.load(dy_ptr + offs_n[:, None] * stride_dy_n + m[None, :] * stride_dy_m, mask=dz_mask, other=0.0)
        if GELU:
            pre_t = tl.load(pre_ptr + offs_n[:, None] * stride_pre_n + m[None, :] * stride_pre_m, mask=dz_mask,
                            other=0.0)
            dz_t = (dz_t.to(ACC_DTYPE) * gelu_grad(pre_t.to(ACC_DTYPE))).to(dy_ptr.dtype.element_ty)
        if WEIGHT_GRAD:
            x = tl.load(x_ptr + m[:, None] * stride_x_m + offs_k[None, :] * stride_x_k,
                        mask=(m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
            dw = tl.dot(dz_t, x, dw, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        if BIAS_GRAD:
            db += tl.sum(dz_t.to(ACC_DTYPE), axis=1)
    if WEIGHT_GRAD:
        dw_ptrs = dw_ptr + offs_n[:, None] * stride_dw_out + offs_k[None, :] * stride_dw_in
        dw_mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        if ATOMIC:
            tl.atomic_add(dw_ptrs, dw, mask=dw_mask)
        else:
            dw += tl.load(dw_ptrs, mask=dw_mask, other=0.0).to(ACC_DTYPE)
            tl.store(dw_ptrs, dw.to(dw_ptr.dtype.element_ty), mask=dw_mask)
    if BIAS_GRAD:
        if pid_k == 0:
            db_mask = offs_n < N
            if ATOMIC:
                tl.atomic_add(db_ptr + offs_n, db, mask=db_mask)
            else:
                db += tl.load(db_ptr + offs_n, mask=db_mask, other=0.0).to(ACC_DTYPE)
                tl.store(db_ptr + offs_n, db.to(db_ptr.dtype.element_ty), mask=db_mask)


def grad_weight_launch(M: int, N: int, K: int, weight_grad: bool, x_dtype: torch.dtype, device: torch.device):
    """(config, k tiles, row splits, row blocks per split) of the weight-gradient kernel.

    Not autotuned: the kernel adds into the gradient, so every benchmark run of an autotuner would add again.
    """
    if interpreter():
        block_n, block_k, block_m, warps, stages, target_programs = 64, 64, 64, 4, 1, 8
    else:
        block_m = 64 if x_dtype.itemsize <= 2 else 32  # wider elements take more shared memory per stage
        block_n, block_k, warps, stages = 128, 128, 8, 3
        target_programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    tiles_k = triton.cdiv(K, block_k) if weight_grad else 1
    tiles = triton.cdiv(N, block_n) * tiles_k
    m_blocks = triton.cdiv(M, block_m)
    # Few output tiles and many rows: split the rows, the splits adding atomically (see accumulate_weight_grad).
    splits = min(m_blocks, max(1, target_programs // tiles))
    m_blocks_per_split = triton.cdiv(m_blocks, splits)
    splits = triton.cdiv(m_blocks, m_blocks_per_split)
    config = dict(BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_M=block_m, num_warps=warps, num_stages=stages)
    return config, tiles_k, splits, m_blocks_per_split


def accumulate_weight_grad(dy: Tensor, pre: Tensor | None, x2d: Tensor, dw: Tensor | None, db: Tensor | None) -> None:
    """``dw += dz.T @ x2d`` and ``db += dz.sum(0)`` with ``dz = dy`` (or ``dy * gelu'(pre)``), for the gradient
    views ``dw [N, K]`` and ``db [N]`` (either may be None; strided). Split reductions add atomically, into the
    views themselves when they are fp32 or fp64 and through an fp32 scratch otherwise."""
    M, K = x2d.shape
    N = dy.shape[1]
    if M == 0 or (dw is None and db is None):
        return
    config, tiles_k, splits, m_blocks_per_split = grad_weight_launch(M, N, K, dw is not None, x2d.dtype, x2d.device)
    dw_acc, db_acc = (atomic_accumulator(g) for g in (dw, db)) if splits > 1 else (dw, db)
    pre_arg, pre_strides = (pre, pre.stride()) if pre is not None else (dy, (0, 0))
    dw_arg = dw_acc if dw is not None else x2d  # never touched without WEIGHT_GRAD / BIAS_GRAD
    linear_grad_weight_kernel[(triton.cdiv(N, config["BLOCK_N"]) * tiles_k, splits)](
        dy, pre_arg, x2d, dw_arg, db_acc if db is not None else x2d,
        M, N, K, tiles_k, m_blocks_per_split,
        dy.stride(0), dy.stride(1), *pre_strides, x2d.stride(0), x2d.stride(1), dw_arg.stride(0), dw_arg.stride(1),
        GELU=pre is not None, WEIGHT_GRAD=dw is not None, BIAS_GRAD=db is not None, ATOMIC=splits > 1,
        ACC_DTYPE=acc_dtype(x2d), DOT_PRECISION=dot_precision(x2d), **config,
    )
    add_accumulated(dw, dw_acc)
    add_accumulated(db, db_acc)


def acc_dtype(x: Tensor):
    """fp32 accumulation for fp32/fp16/bf16; fp64 inputs (gradcheck) keep fp64 throughout."""
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def dot_precision(x: Tensor) -> str:
    """``input_precision`` of ``tl.dot`` on operands of x's dtype. fp32 products use TF32 only where torch's own
    fp32 matmuls may (``torch.backends.cuda.matmul.allow_tf32``, set by ``torch.set_float32_matmul_precision``),
    so that an fp32 model computes what ``F.linear`` computes; fp64 is exact; fp16 and bf16 keep the default."""
    if x.dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "ieee" if x.dtype == torch.float64 else "tf32"


def as_rows(t: Tensor) -> Tensor:
    """``t`` as ``[rows, features]``: a view where the strides allow it (no copy of a sliced x)."""
    return t.reshape(-1, t.shape[-1])


def linear_forward(x2d: Tensor, weight: Tensor, bias: Tensor | None, out_features: int, activation: str | None,
                   keep_pre_activation: bool) -> tuple[Tensor, Tensor | None]:
    """``(y, pre)`` for ``x2d: [M, K]``; ``pre`` (the values before GELU) only if asked for, else None."""
    M, K = x2d.shape
    N = out_features
    y = torch.empty((M, N), device=x2d.device, dtype=x2d.dtype)
    gelu_on = activation == "gelu"
    pre = torch.empty_like(y) if gelu_on and keep_pre_activation else None
    if M == 0:
        return y, pre
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _linear_forward_kernel[grid](
        x2d, weight, bias if bias is not None else weight, y, pre if pre is not None else y,
        M, N, K,
        x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, GELU=gelu_on, STORE_PRE_ACTIVATION=pre is not None, ACC_DTYPE=acc_dtype(x2d),
        DOT_PRECISION=dot_precision(x2d),
    )
    return y, pre


def linear_backward(dy: Tensor, pre: Tensor | None, x2d: Tensor, weight: Tensor, bias: Tensor | None,
                    need_dx: bool, need_dw: bool, need_db: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, returned dW, returned db)``; dW and db go into ``weight_grad_buffer`` views, and the full-size
    tensors are returned only where that buffer says autograd must receive them."""
    M, K = x2d.shape
    N = dy.shape[1]
    gelu_on = pre is not None
    pre_arg, pre_strides = (pre, pre.stride()) if gelu_on else (dy, (0, 0))
    dx = None
    if need_dx:
        dx = torch.empty((M, K), device=x2d.device, dtype=x2d.dtype)
        if M > 0:
            grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),)
            _linear_grad_input_kernel[grid](
                dy, pre_arg, weight, dx, M, N, K,
                dy.stride(0), dy.stride(1), *pre_strides, weight.stride(0), weight.stride(1),
                dx.stride(0), dx.stride(1),
                GELU=gelu_on, ACC_DTYPE=acc_dtype(x2d), DOT_PRECISION=dot_precision(x2d),
            )
    dw_view = dw_returned = db_view = db_returned = None
    if need_dw:
        dw_view, dw_returned = weight_grad_buffer(weight, N, K)
    if need_db:
        db_view, db_returned = weight_grad_buffer(bias, N)
    accumulate_weight_grad(dy, pre, x2d, dw_view, db_view)
    return dx, dw_returned, db_returned


class ElasticLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, out_features: int, activation: str | None):
        record_grad_mode(ctx)
        x2d = as_rows(x)
        # GELU backward needs the pre-activation. It is stored by the forward epilogue rather than recomputed:
        # recomputing costs a third GEMM (+50% backward FLOPs), while storing costs the same memory as
        # F.linear followed by F.gelu, which keeps that tensor for its backward too.
        keep_pre = activation == "gelu" and any(ctx.needs_input_grad[:3])
        y, pre = linear_forward(x2d, weight, bias, out_features, activation, keep_pre)
        ctx.save_for_backward(x2d, weight, bias, pre)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, dy: Tensor):
        with backward_grad_mode(ctx):
            x2d, weight, bias, pre = ctx.saved_tensors
            need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
            dx, dw, db = linear_backward(as_rows(dy), pre, x2d, weight, bias, need_dx, need_dw,
                                         need_db and bias is not None)
            return (dx.view(ctx.x_shape) if dx is not None else None), dw, db, None, None


def elastic_linear(x: Tensor, weight: Tensor, bias: Tensor | None, out_features: int,
                   activation: str | None = None) -> Tensor:
    """Triton ``act(x @ weight[:out_features, :in].T + bias[:out_features])``; inputs validated by
    ``elastic_ops.functional``."""
    return ElasticLinearFunction.apply(x, weight, bias, out_features, activation)

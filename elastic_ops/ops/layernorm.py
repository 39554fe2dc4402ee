"""Elastic LayerNorm over the first ``d`` of ``D`` channels with ``gamma[:d]``, ``beta[:d]``, forward and backward.

Forward: one launch; each program normalises BLOCK_ROWS rows at a time in fp32 (fp64 for fp64 inputs) and keeps
the row statistics only when a backward will run. Backward: two launches. The first gives dx per row and sums
each program's rows of ``dy * x_hat`` and ``dy`` into one partial row; the second adds the column sums of those
few partial rows into ``gamma.grad[:d]`` and ``beta.grad[:d]`` in place (no atomics per element).
"""
from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._weight_grads import backward_grad_mode, record_grad_mode, weight_grad_buffer
from ._common import as_rows, cdiv, interpreter, needs_backward, next_power_of_2, sm_count, unit_stride


@triton.jit
def _layer_norm_forward_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,
    M, D, eps,
    stride_x_row, stride_x_col, stride_y_row,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_STATS: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """y = (x - mean) * rstd * w[:D] + b[:D] over BLOCK_ROWS rows per program.

    x_ptr: x ``[M, D]`` (strided). w_ptr, b_ptr: super gamma/beta, active ``[:D]``. y_ptr: y ``[M, D]``.
    mean_ptr, rstd_ptr: ``[M]`` statistics for the backward (STORE_STATS).
    All arithmetic is in COMPUTE_DTYPE: fp32, or fp64 for fp64 inputs (gradcheck).
    """
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < M
    mask = row_mask[:, None] & (cols[None, :] < D)
    x = tl.load(x_ptr + rows[:, None] * stride_x_row + cols[None, :] * stride_x_col, mask=mask, other=0.0)
    x = x.to(COMPUTE_DTYPE)
    mean = tl.sum(x, axis=1) / D
    centered = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / D + eps)
    y = centered * rstd[:, None]
    if HAS_WEIGHT:
        y *= tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(COMPUTE_DTYPE)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=cols < D, other=0.0).to(COMPUTE_DTYPE)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_y_row + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    if STORE_STATS:
        tl.store(mean_ptr + rows, mean, mask=row_mask)
        tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _layer_norm_backward_kernel(
    dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, db_partial_ptr,
    M, D,
    stride_dy_row, stride_dy_col, stride_x_row, stride_x_col, stride_dx_row,
    HAS_WEIGHT: tl.constexpr, INPUT_GRAD: tl.constexpr, WEIGHT_GRAD: tl.constexpr, BIAS_GRAD: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dx of every row (INPUT_GRAD), and per-program partial sums of dgamma and dbeta.

    dy_ptr: dy ``[M, D]`` (strided). x_ptr: x ``[M, D]`` (strided). w_ptr: super gamma, active ``[:D]``.
    mean_ptr, rstd_ptr: ``[M]`` from the forward. dx_ptr: dx ``[M, D]``.
    dw_partial_ptr, db_partial_ptr: ``[programs, D]``; program p writes row p, the sum over the row
    tiles p, p + programs, p + 2 * programs, ...
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(COMPUTE_DTYPE)
    dw_sum = tl.zeros((BLOCK_D,), dtype=COMPUTE_DTYPE)
    db_sum = tl.zeros((BLOCK_D,), dtype=COMPUTE_DTYPE)
    for row_tile in range(pid, tl.cdiv(M, BLOCK_ROWS), tl.num_programs(0)):
        rows = row_tile * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x_row + cols[None, :] * stride_x_col, mask=mask, other=0.0)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy_row + cols[None, :] * stride_dy_col, mask=mask, other=0.0)
        dy = dy.to(COMPUTE_DTYPE)
        mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        x_hat = tl.where(mask, (x.to(COMPUTE_DTYPE) - mean[:, None]) * rstd[:, None], 0.0)
        if INPUT_GRAD:
            w_dy = dy
            if HAS_WEIGHT:
                w_dy = dy * w[None, :]
            # dx = rstd * (w*dy - mean(w*dy) - x_hat * mean(w*dy * x_hat)), means over the D active channels.
            c_hat = tl.sum(w_dy * x_hat, axis=1) / D
            c_one = tl.sum(w_dy, axis=1) / D
            dx = (w_dy - x_hat * c_hat[:, None] - c_one[:, None]) * rstd[:, None]
            tl.store(dx_ptr + rows[:, None] * stride_dx_row + cols[None, :], dx.to(dx_ptr.dtype.element_ty),
                     mask=mask)
        if WEIGHT_GRAD:
            dw_sum += tl.sum(dy * x_hat, axis=0)
        if BIAS_GRAD:
            db_sum += tl.sum(dy, axis=0)
    if WEIGHT_GRAD:
        tl.store(dw_partial_ptr + pid * D + cols, dw_sum, mask=col_mask)
    if BIAS_GRAD:
        tl.store(db_partial_ptr + pid * D + cols, db_sum, mask=col_mask)


@triton.jit
def _add_partial_sums_kernel(
    dw_partial_ptr, db_partial_ptr, dw_ptr, db_ptr,
    programs, D, stride_dw, stride_db,
    WEIGHT_GRAD: tl.constexpr, BIAS_GRAD: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
    BLOCK_PROGRAMS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``dw[:D] += dw_partial.sum(0)`` and ``db[:D] += db_partial.sum(0)`` for BLOCK_D columns per program.

    dw_partial_ptr, db_partial_ptr: ``[programs, D]`` from the backward kernel. dw_ptr, db_ptr: the gradient views of
    gamma and beta ``[:D]``, added to in place.
    """
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    dw = tl.zeros((BLOCK_D,), dtype=COMPUTE_DTYPE)
    db = tl.zeros((BLOCK_D,), dtype=COMPUTE_DTYPE)
    for start in range(0, programs, BLOCK_PROGRAMS):
        rows = start + tl.arange(0, BLOCK_PROGRAMS)
        mask = (rows[:, None] < programs) & col_mask[None, :]
        offsets = rows[:, None] * D + cols[None, :]
        if WEIGHT_GRAD:
            dw += tl.sum(tl.load(dw_partial_ptr + offsets, mask=mask, other=0.0), axis=0)
        if BIAS_GRAD:
            db += tl.sum(tl.load(db_partial_ptr + offsets, mask=mask, other=0.0), axis=0)
    if WEIGHT_GRAD:
        dw += tl.load(dw_ptr + cols * stride_dw, mask=col_mask, other=0.0).to(COMPUTE_DTYPE)
        tl.store(dw_ptr + cols * stride_dw, dw.to(dw_ptr.dtype.element_ty), mask=col_mask)
    if BIAS_GRAD:
        db += tl.load(db_ptr + cols * stride_db, mask=col_mask, other=0.0).to(COMPUTE_DTYPE)
        tl.store(db_ptr + cols * stride_db, db.to(db_ptr.dtype.element_ty), mask=col_mask)


def compute_dtype(x: Tensor):
    """(torch, triton) dtype of statistics and arithmetic: fp32, or fp64 for fp64 inputs (gradcheck)."""
    return (torch.float64, tl.float64) if x.dtype == torch.float64 else (torch.float32, tl.float32)


@lru_cache(maxsize=None)
def layer_norm_tiles(d: int) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_ROWS, num_warps): about 4K elements per tile (16K in the interpreter, fewer programs)."""
    block_d = next_power_of_2(d)
    elements = 16384 if interpreter() else 4096
    block_rows = max(1, min(64, elements // block_d))
    return block_d, block_rows, 4 if block_d * block_rows <= 4096 else 8


def layer_norm_forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                       keep_residuals: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(y, mean, rstd)`` for ``x [..., d]``; the row statistics ``[rows]`` only with ``keep_residuals`` (else
    None)."""
    x2d = as_rows(x)
    M, d = x2d.shape
    weight, bias = unit_stride(weight), unit_stride(bias)
    y = x.new_empty(x.shape)  # contiguous: rows d apart
    stats_dtype, compute = compute_dtype(x2d)
    mean = x.new_empty((M,), dtype=stats_dtype) if keep_residuals else None
    rstd = torch.empty_like(mean) if keep_residuals else None
    block_d, block_rows, warps = layer_norm_tiles(d)
    if M > 0:
        _layer_norm_forward_kernel[(cdiv(M, block_rows),)](
            x2d, weight if weight is not None else x2d, bias if bias is not None else x2d, y,
            mean if keep_residuals else y, rstd if keep_residuals else y,
            M, d, eps, x2d.stride(0), x2d.stride(1), d,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, STORE_STATS=keep_residuals,
            COMPUTE_DTYPE=compute, BLOCK_ROWS=block_rows, BLOCK_D=block_d, num_warps=warps,
        )
    return y, mean, rstd


def layer_norm_backward(dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
                        rstd: Tensor, needs: tuple[bool, bool, bool]) -> tuple[Tensor | None, Tensor | None,
                                                                             Tensor | None]:
    """``(dx, dgamma, dbeta)`` for ``needs`` = (x, weight, bias); the parameter gradients go into
    ``weight_grad_buffer`` views (returned only where autograd must receive them)."""
    x2d, dy2d = as_rows(x), as_rows(dy)
    M, d = x2d.shape
    need_dx, need_dw, need_db = needs[0], needs[1] and weight is not None, needs[2] and bias is not None
    dx = torch.empty((M, d), device=x2d.device, dtype=x2d.dtype) if need_dx else None
    dw_view, dw_returned = weight_grad_buffer(weight, d) if need_dw else (None, None)
    db_view, db_returned = weight_grad_buffer(bias, d) if need_db else (None, None)
    block_d, block_rows, warps = layer_norm_tiles(d)
    # Enough programs to fill the device, each reducing several row tiles into one partial row.
    programs = max(1, min(cdiv(M, block_rows), 4 * sm_count(x2d.device)))
    partial = torch.empty((2, programs, d), device=x2d.device, dtype=mean.dtype)
    if M > 0:
        _layer_norm_backward_kernel[(programs,)](
            dy2d, x2d, unit_stride(weight) if weight is not None else x2d, mean, rstd, dx if need_dx else x2d,
            partial[0], partial[1],
            M, d, dy2d.stride(0), dy2d.stride(1), x2d.stride(0), x2d.stride(1), d,
            HAS_WEIGHT=weight is not None, INPUT_GRAD=need_dx, WEIGHT_GRAD=need_dw, BIAS_GRAD=need_db,
            COMPUTE_DTYPE=compute_dtype(x2d)[1], BLOCK_ROWS=block_rows, BLOCK_D=block_d, num_warps=warps,
        )
        if need_dw or need_db:
            block = 64 if interpreter() else 256
            _add_partial_sums_kernel[(cdiv(d, block),)](
                partial[0], partial[1], dw_view if need_dw else partial, db_view if need_db else partial,
                programs, d, dw_view.stride(0) if need_dw else 0, db_view.stride(0) if need_db else 0,
                WEIGHT_GRAD=need_dw, BIAS_GRAD=need_db, COMPUTE_DTYPE=compute_dtype(x2d)[1],
                BLOCK_PROGRAMS=16, BLOCK_D=block,
            )
    return None if dx is None else dx.view(x.shape), dw_returned, db_returned


class ElasticLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
        record_grad_mode(ctx)
        y, mean, rstd = layer_norm_forward(x, weight, bias, eps, keep_residuals=True)
        ctx.save_for_backward(x, weight, bias, mean, rstd)  # bias only locates its gradient buffer
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        with backward_grad_mode(ctx):
            return *layer_norm_backward(dy, *ctx.saved_tensors, tuple(ctx.needs_input_grad[:3])), None


def elastic_layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    """Triton LayerNorm over the ``d = x.shape[-1]`` active channels; inputs validated by ``elastic_ops.functional``."""
    if needs_backward(x, weight, bias):
        return ElasticLayerNormFunction.apply(x, weight, bias, eps)
    # No backward will run: no autograd node, no statistics kept.
    return layer_norm_forward(x, weight, bias, eps, keep_residuals=False)[0]

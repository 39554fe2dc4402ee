"""Fused elastic multi-head self-attention on the block-layout qkv super weight, forward and backward.

``x: [B, N, e]``, ``h`` active heads of head dim ``Dh`` (a power of two from 16 to 128), ``width = h * Dh``:

1. qkv projection (``_qkv_forward_kernel``): one GEMM over the three active row blocks of the qkv weight
   (DESIGN.md section 2) writes q, k and v side by side into one buffer ``[B*N, 3*width]``, i.e.
   ``[B, N, 3, h, Dh]``. The attention kernels read it with strides: no permute, no cat.
2. flash attention (``_attention_forward_kernel``): online softmax over key blocks, so the ``N x N`` scores
   never reach memory; masks the last partial block (197 tokens). It writes the context ``[B*N, width]`` in the
   layout the output projection reads, and the log-sum-exp of each query row for backward.
3. output projection: the elastic linear op on ``W_o[:e, :width]``.

Backward: the linear op's backward gives d(context) and adds ``dW_o``, ``db_o``; ``_attention_backward_dq_kernel``
stores ``delta = rowsum(dO * O)`` and dq, ``_attention_backward_dkdv_kernel`` dk and dv, both recomputing the
probabilities from the log-sum-exp; ``_qkv_grad_input_kernel`` gives dx and the linear op's weight-gradient
kernel adds ``dW_qkv``, ``db_qkv`` block by block into the gradient slices (``_common.weight_grad_buffer``).

Scores are kept in base 2 (scaled by ``Dh**-0.5 * log2(e)``) so that ``exp2`` does the softmax; the stored
log-sum-exp is in those units too. Accumulation is fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import autotuning, backward_grad_mode, interpreter, record_grad_mode, weight_grad_buffer
from .linear import (acc_dtype, accumulate_weight_grad, dot_precision, grouped_tile, linear_backward,
                     linear_forward, matmul_configs, matmul_tile)

MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128


# ---------------------------------------------------------------------------------------------- qkv projection

@triton.autotune(configs=matmul_configs(), key=["M", "width", "K"])
@triton.jit
def _qkv_forward_kernel(
    x_ptr, w_ptr, b_ptr, qkv_ptr,
    M, width, K, max_width,
    stride_x_m, stride_x_k, stride_w_out, stride_w_in,
    HAS_BIAS: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``qkv[:, j*width:(j+1)*width] = x @ W_j[:width, :K].T + b_j[:width]`` for block ``j = program_id(1)`` (q, k, v).

    x_ptr: x ``[M, K]`` (strided), M = B*N token rows, K = e.
    w_ptr: qkv super weight ``[3*max_width, E_max]``; block j starts at row ``j*max_width``, active ``[:width, :K]``.
    b_ptr: qkv super bias ``[3*max_width]``; block j active ``[j*max_width : j*max_width + width]``.
    qkv_ptr: output ``[M, 3*width]`` contiguous, i.e. ``[B, N, 3, h, Dh]``.
    """
    block = tl.program_id(1)
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, width, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = matmul_tile(x_ptr, w_ptr + block * max_width * stride_w_out, x_ptr, offs_m, offs_n, M, width, K,
                      stride_x_m, stride_x_k, stride_w_in, stride_w_out, 0, 0,
                      False, ACC_DTYPE, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    if HAS_BIAS:
        bias = tl.load(b_ptr + block * max_width + offs_n, mask=offs_n < width, other=0.0)
        acc += bias.to(acc.dtype)[None, :]
    out_ptrs = qkv_ptr + offs_m[:, None] * (3 * width) + block * width + offs_n[None, :]
    tl.store(out_ptrs, acc.to(qkv_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < width))


@triton.autotune(configs=matmul_configs(), key=["M", "width", "K"])
@triton.jit
def _qkv_grad_input_kernel(
    d_qkv_ptr, w_ptr, dx_ptr,
    M, width, K, max_width,
    stride_w_out, stride_w_in,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``dx = sum_j d_qkv[:, j*width:(j+1)*width] @ W_j[:width, :K]`` over the blocks j = q, k, v.

    d_qkv_ptr: ``[M, 3*width]`` contiguous (layout of the qkv buffer). w_ptr: qkv super weight as in
    ``_qkv_forward_kernel``. dx_ptr: ``[M, K]`` contiguous. The output tile is BLOCK_M x BLOCK_N over dx.
    """
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = matmul_tile(d_qkv_ptr, w_ptr, d_qkv_ptr, offs_m, offs_k, M, K, width,
                      3 * width, 1, stride_w_out, stride_w_in, 0, 0,
                      False, ACC_DTYPE, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    for block in tl.static_range(1, 3):
        acc += matmul_tile(d_qkv_ptr + block * width, w_ptr + block * max_width * stride_w_out, d_qkv_ptr,
                           offs_m, offs_k, M, K, width, 3 * width, 1, stride_w_out, stride_w_in, 0, 0,
                           False, ACC_DTYPE, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    tl.store(dx_ptr + offs_m[:, None] * K + offs_k[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


# ---------------------------------------------------------------------------------------------- flash attention

def attention_configs(outer: str, inner: str) -> list[triton.Config]:
    """Tiles of ``outer`` rows per program against ``inner`` rows per loop step."""
    if interpreter():  # several configs crash the interpreter; large tiles keep its grids small
        return [triton.Config({outer: 64, inner: 64})]
    # As in matmul_configs: the last, small config fits fp64 at head dim 128; without autotuning, first and last.
    shapes = [(128, 64, 3, 8), (128, 64, 3, 4), (64, 64, 3, 4), (128, 128, 2, 8), (64, 32, 4, 4), (128, 32, 3, 8),
              (32, 32, 2, 4)]
    return [triton.Config({outer: o, inner: i}, num_stages=s, num_warps=w)
            for o, i, s, w in (shapes if autotuning() else shapes[::len(shapes) - 1])]


@triton.jit
def head_rows(base_ptr, rows, row_stride, tokens, HEAD_DIM: tl.constexpr):
    """Tile ``[len(rows), HEAD_DIM]`` of one head; rows past ``tokens`` read as zero."""
    cols = tl.arange(0, HEAD_DIM)
    return tl.load(base_ptr + rows[:, None] * row_stride + cols[None, :], mask=rows[:, None] < tokens, other=0.0)


@triton.jit
def store_head_rows(base_ptr, rows, row_stride, tokens, tile, HEAD_DIM: tl.constexpr):
    cols = tl.arange(0, HEAD_DIM)
    tl.store(base_ptr + rows[:, None] * row_stride + cols[None, :], tile.to(base_ptr.dtype.element_ty),
             mask=rows[:, None] < tokens)


@triton.jit
def head_program(tokens, num_heads, width, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """(row block, batch * h + head, offset in the qkv buffer ``[B*N, 3*width]``, offset in a ``[B*N, width]``
    context) of this program. One flat grid axis, row blocks fastest so that neighbours share a head's k and v;
    the second grid axis would cap B*h at 65535. Offsets are int64: large batches overflow int32."""
    row_blocks = tl.cdiv(tokens, BLOCK)
    pid_bh = tl.program_id(0) // row_blocks
    first_row = (pid_bh // num_heads).to(tl.int64) * tokens
    head_col = (pid_bh % num_heads) * HEAD_DIM
    return tl.program_id(0) % row_blocks, pid_bh, first_row * (3 * width) + head_col, first_row * width + head_col


@triton.jit
def flash_attention_rows(q, k_base, v_base, row_stride, tokens, qk_scale,
                         HEAD_DIM: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``(softmax(q k^T * scale) v, base-2 log-sum-exp)`` of a ``[BLOCK_M, HEAD_DIM]`` query tile against one head's
    keys and values ``[tokens, HEAD_DIM]`` at k_base, v_base (rows ``row_stride`` apart), BLOCK_N keys at a time with
    an online softmax; keys past ``tokens`` are masked. qk_scale: ``Dh**-0.5 * log2(e)`` (scores in base 2)."""
    row_max = tl.full((BLOCK_M,), float("-inf"), dtype=ACC_DTYPE)
    row_sum = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=ACC_DTYPE)
    for key_start in range(0, tokens, BLOCK_N):
        keys = key_start + tl.arange(0, BLOCK_N)
        k = head_rows(k_base, keys, row_stride, tokens, HEAD_DIM)
        v = head_rows(v_base, keys, row_stride, tokens, HEAD_DIM)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE) * qk_scale
        scores = tl.where(keys[None, :] < tokens, scores, float("-inf"))
        # Every block holds at least one real key, so the new maximum is finite.
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        rescale = tl.exp2(row_max - new_max)
        p = tl.exp2(scores - new_max[:, None])
        row_sum = row_sum * rescale + tl.sum(p, axis=1)
        acc = tl.dot(p.to(v.dtype), v, acc * rescale[:, None], input_precision=DOT_PRECISION,
                     out_dtype=ACC_DTYPE)
        row_max = new_max
    return acc / row_sum[:, None], row_max + tl.log2(row_sum)


@triton.autotune(configs=attention_configs("BLOCK_M", "BLOCK_N"), key=["tokens", "HEAD_DIM"])
@triton.jit
def _attention_forward_kernel(
    qkv_ptr, context_ptr, lse_ptr,
    tokens, num_heads, width, qk_scale,
    HEAD_DIM: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Flash attention of one query block of one (batch, head).

    qkv_ptr: ``[B*N, 3*width]`` = ``[B, N, 3, h, Dh]``; q, k, v of a head are its columns at ``j*width + head*Dh``.
    context_ptr: ``[B*N, width]`` = ``[B, N, h, Dh]``, ``softmax(q k^T * Dh**-0.5) v`` per head.
    lse_ptr: ``[B*h, N]``, base-2 log-sum-exp of each query's scaled scores.
    qk_scale: ``Dh**-0.5 * log2(e)``.
    """
    pid_m, pid_bh, qkv_offset, context_offset = head_program(tokens, num_heads, width, HEAD_DIM, BLOCK_M)
    q_base = qkv_ptr + qkv_offset
    qkv_stride = 3 * width
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = head_rows(q_base, rows, qkv_stride, tokens, HEAD_DIM)
    context, lse = flash_attention_rows(q, q_base + width, q_base + 2 * width, qkv_stride, tokens, qk_scale,
                                        HEAD_DIM, ACC_DTYPE, DOT_PRECISION, BLOCK_M, BLOCK_N)
    store_head_rows(context_ptr + context_offset, rows, width, tokens, context, HEAD_DIM)
    tl.store(lse_ptr + pid_bh.to(tl.int64) * tokens + rows, lse, mask=rows < tokens)


@triton.autotune(configs=attention_configs("BLOCK_M", "BLOCK_N"), key=["tokens", "HEAD_DIM"])
@triton.jit
def _attention_backward_dq_kernel(
    qkv_ptr, context_ptr, d_context_ptr, lse_ptr, delta_ptr, d_qkv_ptr,
    tokens, num_heads, width, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dq of one query block of one (batch, head), and ``delta = rowsum(dO * O)``
    of those queries, which the dk/dv kernel needs for every query.

    qkv_ptr, context_ptr, lse_ptr: as in the forward. d_context_ptr: dO ``[B*N, width]``.
    delta_ptr: ``[B*h, N]`` written here. d_qkv_ptr: gradient ``[B*N, 3*width]``; dq goes to the q columns.
    sm_scale: ``Dh**-0.5``.
    """
    pid_m, pid_bh, qkv_offset, context_offset = head_program(tokens, num_heads, width, HEAD_DIM, BLOCK_M)
    q_base = qkv_ptr + qkv_offset
    qkv_stride = 3 * width
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < tokens
    q = head_rows(q_base, rows, qkv_stride, tokens, HEAD_DIM)
    d_out = head_rows(d_context_ptr + context_offset, rows, width, tokens, HEAD_DIM)
    out = head_rows(context_ptr + context_offset, rows, width, tokens, HEAD_DIM)
    delta = tl.sum(d_out.to(ACC_DTYPE) * out.to(ACC_DTYPE), axis=1)
    stats_offset = pid_bh.to(tl.int64) * tokens + rows
    tl.store(delta_ptr + stats_offset, delta, mask=row_ok)
    lse = tl.load(lse_ptr + stats_offset, mask=row_ok, other=0.0)
    dq = tl.zeros((BLOCK_M, HEAD_DIM), dtype=ACC_DTYPE)
    for key_start in range(0, tokens, BLOCK_N):
        keys = key_start + tl.arange(0, BLOCK_N)
        k = head_rows(q_base + width, keys, qkv_stride, tokens, HEAD_DIM)
        v = head_rows(q_base + 2 * width, keys, qkv_stride, tokens, HEAD_DIM)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE) * qk_scale
        # Keys past N load as zeros, but exp2(0 - lse) overflows when every real score is far below zero: mask them.
        p = tl.exp2(tl.where(keys[None, :] < tokens, scores, float("-inf")) - lse[:, None])
        dp = tl.dot(d_out, tl.trans(v), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    store_head_rows(d_qkv_ptr + qkv_offset, rows, qkv_stride, tokens, dq * sm_scale, HEAD_DIM)


@triton.autotune(configs=attention_configs("BLOCK_N", "BLOCK_M"), key=["tokens", "HEAD_DIM"])
@triton.jit
def _attention_backward_dkdv_kernel(
    qkv_ptr, d_context_ptr, lse_ptr, delta_ptr, d_qkv_ptr,
    tokens, num_heads, width, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """dk and dv of one key block of one (batch, head), looping over all queries.

    Pointers as in ``_attention_backward_dq_kernel``; delta_ptr is read here. dk and dv go to the k and v
    columns of d_qkv. The probabilities are recomputed transposed (keys x queries) so that no tile is transposed
    for the dv and dk products.
    """
    pid_n, pid_bh, qkv_offset, context_offset = head_program(tokens, num_heads, width, HEAD_DIM, BLOCK_N)
    q_base = qkv_ptr + qkv_offset
    qkv_stride = 3 * width
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k = head_rows(q_base + width, keys, qkv_stride, tokens, HEAD_DIM)
    v = head_rows(q_base + 2 * width, keys, qkv_stride, tokens, HEAD_DIM)
    dk = tl.zeros((BLOCK_N, HEAD_DIM), dtype=ACC_DTYPE)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), dtype=ACC_DTYPE)
    stats_base = pid_bh.to(tl.int64) * tokens
    for query_start in range(0, tokens, BLOCK_M):
        rows = query_start + tl.arange(0, BLOCK_M)
        row_ok = rows < tokens
        q = head_rows(q_base, rows, qkv_stride, tokens, HEAD_DIM)
        d_out = head_rows(d_context_ptr + context_offset, rows, width, tokens, HEAD_DIM)
        lse = tl.load(lse_ptr + stats_base + rows, mask=row_ok, other=0.0)
        delta = tl.load(delta_ptr + stats_base + rows, mask=row_ok, other=0.0)
        # Query rows past N load as zeros (q, dO, lse, delta), so their probabilities are exp2(0) = 1 times a zero
        # dO: they add nothing, and need no mask.
        scores_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        p_t = tl.exp2(scores_t * qk_scale - lse[None, :])
        dv = tl.dot(p_t.to(d_out.dtype), d_out, dv, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        dp_t = tl.dot(v, tl.trans(d_out), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    store_head_rows(d_qkv_ptr + qkv_offset + width, keys, qkv_stride, tokens, dk * sm_scale, HEAD_DIM)
    store_head_rows(d_qkv_ptr + qkv_offset + 2 * width, keys, qkv_stride, tokens, dv, HEAD_DIM)


# ---------------------------------------------------------------------------------------------- host side

def qkv_forward(x2d: Tensor, qkv_weight: Tensor, qkv_bias: Tensor | None, width: int) -> Tensor:
    """q, k, v of ``x2d: [B*N, e]`` side by side in one ``[B*N, 3*width]`` buffer (``[B, N, 3, h, Dh]``)."""
    M, K = x2d.shape
    max_width = qkv_weight.shape[0] // 3
    qkv = torch.empty((M, 3 * width), device=x2d.device, dtype=x2d.dtype)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(width, meta["BLOCK_N"]), 3)
    _qkv_forward_kernel[grid](
        x2d, qkv_weight, qkv_bias if qkv_bias is not None else qkv_weight, qkv,
        M, width, K, max_width,
        x2d.stride(0), x2d.stride(1), qkv_weight.stride(0), qkv_weight.stride(1),
        HAS_BIAS=qkv_bias is not None, ACC_DTYPE=acc_dtype(x2d), DOT_PRECISION=dot_precision(x2d),
    )
    return qkv


def attention_forward(qkv: Tensor, batch: int, tokens: int, num_heads: int, head_dim: int) -> tuple[Tensor, Tensor]:
    """``(context [B*N, h*Dh], lse [B*h, N])`` of the qkv buffer."""
    width = num_heads * head_dim
    context = torch.empty((batch * tokens, width), device=qkv.device, dtype=qkv.dtype)
    lse = torch.empty((batch * num_heads, tokens), device=qkv.device,
                      dtype=torch.float64 if qkv.dtype == torch.float64 else torch.float32)
    grid = lambda meta: (triton.cdiv(tokens, meta["BLOCK_M"]) * batch * num_heads,)
    _attention_forward_kernel[grid](
        qkv, context, lse, tokens, num_heads, width, head_dim ** -0.5 * math.log2(math.e),
        HEAD_DIM=head_dim, ACC_DTYPE=acc_dtype(qkv), DOT_PRECISION=dot_precision(qkv),
    )
    return context, lse


def attention_backward(qkv: Tensor, context: Tensor, lse: Tensor, d_context: Tensor, batch: int, tokens: int,
                       num_heads: int, head_dim: int) -> Tensor:
    """Gradient of the qkv buffer, in its layout ``[B*N, 3*width]``, from ``d_context: [B*N, width]``."""
    width = num_heads * head_dim
    d_context = d_context.contiguous()
    d_qkv = torch.empty_like(qkv)
    delta = torch.empty_like(lse)
    scales = (head_dim ** -0.5 * math.log2(math.e), head_dim ** -0.5)
    dq_grid = lambda meta: (triton.cdiv(tokens, meta["BLOCK_M"]) * batch * num_heads,)
    _attention_backward_dq_kernel[dq_grid](
        qkv, context, d_context, lse, delta, d_qkv, tokens, num_heads, width, *scales,
        HEAD_DIM=head_dim, ACC_DTYPE=acc_dtype(qkv), DOT_PRECISION=dot_precision(qkv),
    )
    dkdv_grid = lambda meta: (triton.cdiv(tokens, meta["BLOCK_N"]) * batch * num_heads,)
    _attention_backward_dkdv_kernel[dkdv_grid](
        qkv, d_context, lse, delta, d_qkv, tokens, num_heads, width, *scales,
        HEAD_DIM=head_dim, ACC_DTYPE=acc_dtype(qkv), DOT_PRECISION=dot_precision(qkv),
    )
    return d_qkv


def qkv_backward(d_qkv: Tensor, x2d: Tensor, qkv_weight: Tensor, qkv_bias: Tensor | None, width: int,
                 need_dx: bool, need_dw: bool, need_db: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, returned dW, returned db)`` of the qkv projection. dW and db are added block by block into the
    ``weight_grad_buffer`` views of the three active row blocks; rows between the blocks are never touched."""
    M, K = x2d.shape
    max_width = qkv_weight.shape[0] // 3
    dx = None
    if need_dx:
        dx = torch.empty((M, K), device=x2d.device, dtype=x2d.dtype)
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),)
        _qkv_grad_input_kernel[grid](d_qkv, qkv_weight, dx, M, width, K, max_width,
                                     qkv_weight.stride(0), qkv_weight.stride(1), ACC_DTYPE=acc_dtype(x2d),
                                     DOT_PRECISION=dot_precision(x2d))
    dw_view = dw_returned = db_view = db_returned = None
    if need_dw:
        dw_view, dw_returned = weight_grad_buffer(qkv_weight, 3 * max_width, K)
        dw_view = dw_view.view(3, max_width, K)
    if need_db:
        db_view, db_returned = weight_grad_buffer(qkv_bias, 3 * max_width)
        db_view = db_view.view(3, max_width)
    for block in range(3):
        accumulate_weight_grad(d_qkv[:, block * width:(block + 1) * width], None, x2d,
                               dw_view[block, :width] if need_dw else None, db_view[block, :width] if need_db else None)
    return dx, dw_returned, db_returned


class ElasticAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, qkv_weight: Tensor, qkv_bias: Tensor | None, proj_weight: Tensor,
                proj_bias: Tensor | None, num_heads: int, head_dim: int):
        record_grad_mode(ctx)
        batch, tokens, embed = x.shape
        x2d = x.reshape(-1, embed)  # a view wherever x's strides allow
        qkv = qkv_forward(x2d, qkv_weight, qkv_bias, num_heads * head_dim)
        context, lse = attention_forward(qkv, batch, tokens, num_heads, head_dim)
        out, _ = linear_forward(context, proj_weight, proj_bias, embed, None, False)
        ctx.save_for_backward(x2d, qkv_weight, qkv_bias, proj_weight, proj_bias, qkv, context, lse)
        ctx.dims = (batch, tokens, num_heads, head_dim)
        return out.view(batch, tokens, embed)

    @staticmethod
    def backward(ctx, d_out: Tensor):
        with backward_grad_mode(ctx):
            x2d, qkv_weight, qkv_bias, proj_weight, proj_bias, qkv, context, lse = ctx.saved_tensors
            batch, tokens, num_heads, head_dim = ctx.dims
            need_dx, need_dw_qkv, need_db_qkv, need_dw_proj, need_db_proj = ctx.needs_input_grad[:5]
            need_qkv_side = need_dx or need_dw_qkv or need_db_qkv
            d_context, d_proj_weight, d_proj_bias = linear_backward(
                d_out.reshape(-1, d_out.shape[-1]), None, context, proj_weight, proj_bias,
                need_qkv_side, need_dw_proj, need_db_proj)
            dx = d_qkv_weight = d_qkv_bias = None
            if need_qkv_side:
                d_qkv = attention_backward(qkv, context, lse, d_context, batch, tokens, num_heads, head_dim)
                dx, d_qkv_weight, d_qkv_bias = qkv_backward(d_qkv, x2d, qkv_weight, qkv_bias, num_heads * head_dim,
                                                            need_dx, need_dw_qkv, need_db_qkv)
            if dx is not None:
                dx = dx.view(batch, tokens, x2d.shape[1])
            return dx, d_qkv_weight, d_qkv_bias, d_proj_weight, d_proj_bias, None, None


def elastic_attention(x: Tensor, qkv_weight: Tensor, qkv_bias: Tensor | None, proj_weight: Tensor,
                      proj_bias: Tensor | None, num_heads: int, head_dim: int = 64) -> Tensor:
    """Triton self-attention with ``num_heads`` active heads on the block-layout qkv weight, then
    ``proj_weight[:e, :num_heads*head_dim]``; the rest of the inputs are validated by ``elastic_ops.functional``."""
    if not (MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM and head_dim & (head_dim - 1) == 0):
        raise ValueError(f"elastic_attention (triton): head_dim must be a power of two from {MIN_HEAD_DIM} to "
                         f"{MAX_HEAD_DIM}, got {head_dim}; the reference backend takes any head_dim")
    return ElasticAttentionFunction.apply(x, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads, head_dim)

"""Fused elastic multi-head self-attention on the block-layout qkv super weight, forward and backward.

``x: [B, N, e]``, ``h`` active heads of head dim ``Dh`` (a power of two from 16 to 128), ``width = h * Dh``:

1. q, k and v projections: one batched cuBLAS GEMM over the active rows of the three blocks of the qkv weight
   (DESIGN.md section 2), read in place through one strided view, into one buffer ``[3, B*N, width]``: each of
   q, k, v is ``[B, N, h, Dh]``. The attention kernels read it with strides: no permute, no cat, no copy.
2. flash attention (``_attention_forward_kernel``): online softmax over key blocks, so the ``N x N`` scores
   never reach memory. Only the last key block, past which the 197-token tail ends, is masked; the others load
   without masks. It writes the context ``[B*N, width]`` in the layout the output projection reads, and the
   log-sum-exp of each query row for backward.
3. output projection: cuBLAS on ``W_o[:e, :width]``.

Backward: cuBLAS gives d(context) and adds ``dW_o``, ``db_o`` in place; ``_attention_backward_dq_kernel`` stores
``delta = rowsum(dO * O)`` and dq, ``_attention_backward_dkdv_kernel`` dk and dv, both recomputing the
probabilities from the log-sum-exp; cuBLAS then gives dx and adds ``dW_qkv``, ``db_qkv`` block by block into the
gradient slices (``_common.weight_grad_buffer``).

Scores are kept in base 2 (scaled by ``Dh**-0.5 * log2(e)``) so that ``exp2`` does the softmax; the stored
log-sum-exp is in those units too. Accumulation is fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._backend import triton_head_dim_problem
from .._weight_grads import backward_grad_mode, record_grad_mode, weight_grad_buffer
from ._common import (
    acc_dtype,
    active_block,
    active_vector,
    add_bias_grad,
    add_weight_grad,
    cdiv,
    dot_precision,
    interpreter,
    linear_gemm,
    needs_backward,
)

# ---------------------------------------------------------------------------------------------- jit helpers

@triton.jit
def head_program(tokens, num_heads, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """(row block, batch * h + head, first token row of the batch (int64), first column of the head) of this
    program. One flat grid axis, row blocks fastest so that neighbours share a head's k and v; a second grid axis
    would cap B*h at 65535. Row offsets are int64: large batches overflow int32."""
    row_blocks = tl.cdiv(tokens, BLOCK)
    pid_bh = tl.program_id(0) // row_blocks
    first_row = (pid_bh // num_heads).to(tl.int64) * tokens
    return tl.program_id(0) % row_blocks, pid_bh, first_row, (pid_bh % num_heads) * HEAD_DIM


@triton.jit
def head_rows(base_ptr, rows, row_stride, tokens, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr):
    """Tile ``[len(rows), HEAD_DIM]`` of one head. MASKED: rows past ``tokens`` read as zero; otherwise every row is
    known to be inside, and the load has no mask (vectorised and pipelined as it is)."""
    cols = tl.arange(0, HEAD_DIM)
    ptrs = base_ptr + rows[:, None] * row_stride + cols[None, :]
    if MASKED:
        return tl.load(ptrs, mask=rows[:, None] < tokens, other=0.0)
    return tl.load(ptrs)


@triton.jit
def store_head_rows(base_ptr, rows, row_stride, tokens, tile, HEAD_DIM: tl.constexpr):
    cols = tl.arange(0, HEAD_DIM)
    tl.store(base_ptr + rows[:, None] * row_stride + cols[None, :], tile.to(base_ptr.dtype.element_ty),
             mask=rows[:, None] < tokens)


@triton.jit
def row_stats(ptr, rows, tokens, MASKED: tl.constexpr):
    """Per-query statistics (log-sum-exp, delta) of ``rows``; past ``tokens`` zero when MASKED."""
    if MASKED:
        return tl.load(ptr + rows, mask=rows < tokens, other=0.0)
    return tl.load(ptr + rows)


@triton.jit
def key_block(q, k_base, v_base, key_start, row_stride, tokens, qk_scale,
              HEAD_DIM: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
              MASKED: tl.constexpr):
    """``(k, v, scaled scores q k^T)`` of the BLOCK_N keys from ``key_start``. MASKED (the last block): keys past
    ``tokens`` load as zeros and score -inf, so that they weigh nothing (a zero score would: exp2(0 - lse)
    overflows when every real score is far below zero)."""
    keys = key_start + tl.arange(0, BLOCK_N)
    k = head_rows(k_base, keys, row_stride, tokens, HEAD_DIM, MASKED)
    v = head_rows(v_base, keys, row_stride, tokens, HEAD_DIM, MASKED)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE) * qk_scale
    if MASKED:
        scores = tl.where(keys[None, :] < tokens, scores, float("-inf"))
    return k, v, scores


@triton.jit
def _attend_key_block(q, k_base, v_base, key_start, row_stride, tokens, qk_scale, acc, row_max, row_sum,
                      HEAD_DIM: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """One online-softmax step of a query tile over the BLOCK_N keys from ``key_start``; MASKED for the last block."""
    k, v, scores = key_block(q, k_base, v_base, key_start, row_stride, tokens, qk_scale, HEAD_DIM, ACC_DTYPE,
                             DOT_PRECISION, BLOCK_N, MASKED)
    # Every block holds at least one real key, so the new maximum is finite.
    new_max = tl.maximum(row_max, tl.max(scores, axis=1))
    rescale = tl.exp2(row_max - new_max)
    p = tl.exp2(scores - new_max[:, None])
    row_sum = row_sum * rescale + tl.sum(p, axis=1)
    acc = tl.dot(p.to(v.dtype), v, acc * rescale[:, None], input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    return acc, new_max, row_sum


@triton.jit
def flash_attention_rows(q, k_base, v_base, row_stride, tokens, qk_scale,
                         HEAD_DIM: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``(softmax(q k^T * scale) v, base-2 log-sum-exp)`` of a ``[BLOCK_M, HEAD_DIM]`` query tile against one head's
    keys and values ``[tokens, HEAD_DIM]`` at k_base, v_base (rows ``row_stride`` apart), BLOCK_N keys at a time with
    an online softmax; only the last, partial key block is masked. qk_scale: ``Dh**-0.5 * log2(e)``."""
    row_max = tl.full((BLOCK_M,), float("-inf"), dtype=ACC_DTYPE)
    row_sum = tl.zeros((BLOCK_M,), dtype=ACC_DTYPE)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=ACC_DTYPE)
    full_end = tokens - tokens % BLOCK_N
    for key_start in range(0, full_end, BLOCK_N):
        acc, row_max, row_sum = _attend_key_block(q, k_base, v_base, key_start, row_stride, tokens, qk_scale, acc,
                                                  row_max, row_sum, HEAD_DIM, ACC_DTYPE, DOT_PRECISION, BLOCK_N, False)
    if full_end < tokens:
        acc, row_max, row_sum = _attend_key_block(q, k_base, v_base, full_end, row_stride, tokens, qk_scale, acc,
                                                  row_max, row_sum, HEAD_DIM, ACC_DTYPE, DOT_PRECISION, BLOCK_N, True)
    return acc / row_sum[:, None], row_max + tl.log2(row_sum)


@triton.jit
def _dq_key_block(q, d_out, lse, delta, k_base, v_base, key_start, row_stride, tokens, qk_scale, dq,
                  HEAD_DIM: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  BLOCK_N: tl.constexpr, MASKED: tl.constexpr):
    """dq of a query tile from the BLOCK_N keys from ``key_start``; MASKED for the last block."""
    k, v, scores = key_block(q, k_base, v_base, key_start, row_stride, tokens, qk_scale, HEAD_DIM, ACC_DTYPE,
                             DOT_PRECISION, BLOCK_N, MASKED)
    p = tl.exp2(scores - lse[:, None])
    dp = tl.dot(d_out, tl.trans(v), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)


@triton.jit
def _dkdv_query_block(k, v, q_base, d_out_base, lse_base, delta_base, query_start, row_stride, tokens, qk_scale,
                      dk, dv, HEAD_DIM: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, MASKED: tl.constexpr):
    """dk and dv of a key tile from the BLOCK_M queries from ``query_start``; MASKED for the last block, whose rows
    past N load as zeros (q, dO, lse, delta): their probabilities are exp2(0) = 1 times a zero dO, so they add
    nothing. The probabilities are recomputed transposed (keys x queries) so that no tile is transposed for the
    dv and dk products."""
    rows = query_start + tl.arange(0, BLOCK_M)
    q = head_rows(q_base, rows, row_stride, tokens, HEAD_DIM, MASKED)
    d_out = head_rows(d_out_base, rows, row_stride, tokens, HEAD_DIM, MASKED)
    lse = row_stats(lse_base, rows, tokens, MASKED)
    delta = row_stats(delta_base, rows, tokens, MASKED)
    scores_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    p_t = tl.exp2(scores_t * qk_scale - lse[None, :])
    dv = tl.dot(p_t.to(d_out.dtype), d_out, dv, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    dp_t = tl.dot(v, tl.trans(d_out), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    return dk, dv


# ---------------------------------------------------------------------------------------------- kernels

@triton.jit
def _attention_forward_kernel(
    qkv_ptr, context_ptr, lse_ptr,
    tokens, num_heads, width, block_stride, qk_scale,
    HEAD_DIM: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Flash attention of one query block of one (batch, head).

    qkv_ptr: ``[3, B*N, width]``; q, k, v are ``block_stride = B*N*width`` elements apart, each ``[B, N, h, Dh]``.
    context_ptr: ``[B*N, width]`` = ``[B, N, h, Dh]``, ``softmax(q k^T * Dh**-0.5) v`` per head.
    lse_ptr: ``[B*h, N]``, base-2 log-sum-exp of each query's scaled scores. qk_scale: ``Dh**-0.5 * log2(e)``.
    """
    pid_m, pid_bh, first_row, head_col = head_program(tokens, num_heads, HEAD_DIM, BLOCK_M)
    offset = first_row * width + head_col
    q_base = qkv_ptr + offset
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = head_rows(q_base, rows, width, tokens, HEAD_DIM, True)
    context, lse = flash_attention_rows(q, q_base + block_stride, q_base + 2 * block_stride, width, tokens, qk_scale,
                                        HEAD_DIM, ACC_DTYPE, DOT_PRECISION, BLOCK_M, BLOCK_N)
    store_head_rows(context_ptr + offset, rows, width, tokens, context, HEAD_DIM)
    tl.store(lse_ptr + pid_bh.to(tl.int64) * tokens + rows, lse, mask=rows < tokens)


@triton.jit
def _attention_backward_dq_kernel(
    qkv_ptr, context_ptr, d_context_ptr, lse_ptr, delta_ptr, d_qkv_ptr,
    tokens, num_heads, width, block_stride, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dq of one query block of one (batch, head), and ``delta = rowsum(dO * O)`` of those queries, which the
    dk/dv kernel needs for every query.

    qkv_ptr, context_ptr, lse_ptr: as in the forward. d_context_ptr: dO ``[B*N, width]``.
    delta_ptr: ``[B*h, N]``, written here. d_qkv_ptr: gradient ``[3, B*N, width]``; dq goes to block 0.
    sm_scale: ``Dh**-0.5``.
    """
    pid_m, pid_bh, first_row, head_col = head_program(tokens, num_heads, HEAD_DIM, BLOCK_M)
    offset = first_row * width + head_col
    q_base = qkv_ptr + offset
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < tokens
    q = head_rows(q_base, rows, width, tokens, HEAD_DIM, True)
    d_out = head_rows(d_context_ptr + offset, rows, width, tokens, HEAD_DIM, True)
    out = head_rows(context_ptr + offset, rows, width, tokens, HEAD_DIM, True)
    delta = tl.sum(d_out.to(ACC_DTYPE) * out.to(ACC_DTYPE), axis=1)
    stats_offset = pid_bh.to(tl.int64) * tokens + rows
    tl.store(delta_ptr + stats_offset, delta, mask=row_ok)
    lse = tl.load(lse_ptr + stats_offset, mask=row_ok, other=0.0)
    dq = tl.zeros((BLOCK_M, HEAD_DIM), dtype=ACC_DTYPE)
    k_base, v_base = q_base + block_stride, q_base + 2 * block_stride
    full_end = tokens - tokens % BLOCK_N
    for key_start in range(0, full_end, BLOCK_N):
        dq = _dq_key_block(q, d_out, lse, delta, k_base, v_base, key_start, width, tokens, qk_scale, dq,
                           HEAD_DIM, ACC_DTYPE, DOT_PRECISION, BLOCK_N, False)
    if full_end < tokens:
        dq = _dq_key_block(q, d_out, lse, delta, k_base, v_base, full_end, width, tokens, qk_scale, dq,
                           HEAD_DIM, ACC_DTYPE, DOT_PRECISION, BLOCK_N, True)
    store_head_rows(d_qkv_ptr + offset, rows, width, tokens, dq * sm_scale, HEAD_DIM)


@triton.jit
def _attention_backward_dkdv_kernel(
    qkv_ptr, d_context_ptr, lse_ptr, delta_ptr, d_qkv_ptr,
    tokens, num_heads, width, block_stride, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """dk and dv of one key block of one (batch, head), looping over all queries.

    Pointers as in ``_attention_backward_dq_kernel``; delta_ptr is read here. dk and dv go to blocks 1 and 2 of
    d_qkv.
    """
    pid_n, pid_bh, first_row, head_col = head_program(tokens, num_heads, HEAD_DIM, BLOCK_N)
    offset = first_row * width + head_col
    q_base = qkv_ptr + offset
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k = head_rows(q_base + block_stride, keys, width, tokens, HEAD_DIM, True)
    v = head_rows(q_base + 2 * block_stride, keys, width, tokens, HEAD_DIM, True)
    dk = tl.zeros((BLOCK_N, HEAD_DIM), dtype=ACC_DTYPE)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), dtype=ACC_DTYPE)
    stats_base = pid_bh.to(tl.int64) * tokens
    full_end = tokens - tokens % BLOCK_M
    for query_start in range(0, full_end, BLOCK_M):
        dk, dv = _dkdv_query_block(k, v, q_base, d_context_ptr + offset, lse_ptr + stats_base, delta_ptr + stats_base,
                                   query_start, width, tokens, qk_scale, dk, dv, HEAD_DIM, ACC_DTYPE, DOT_PRECISION,
                                   BLOCK_M, False)
    if full_end < tokens:
        dk, dv = _dkdv_query_block(k, v, q_base, d_context_ptr + offset, lse_ptr + stats_base, delta_ptr + stats_base,
                                   full_end, width, tokens, qk_scale, dk, dv, HEAD_DIM, ACC_DTYPE, DOT_PRECISION,
                                   BLOCK_M, True)
    store_head_rows(d_qkv_ptr + offset + block_stride, keys, width, tokens, dk * sm_scale, HEAD_DIM)
    store_head_rows(d_qkv_ptr + offset + 2 * block_stride, keys, width, tokens, dv, HEAD_DIM)


def attention_config(kernel: str, head_dim: int, dtype: torch.dtype) -> dict:
    """Fixed tiles per kernel ("forward", "dq", "dkdv"), head dim and element size: (rows per program, rows per loop
    step, warps, stages). Not autotuned: the same launch for every subnet, nothing to tune on a first call. Wider
    elements (fp32, fp64 for gradcheck) take smaller tiles to stay in shared memory and registers."""
    if interpreter():  # the interpreter's cost is per program: large tiles keep its grids small
        return dict(outer=64, inner=64, num_warps=4, num_stages=1)
    if dtype.itemsize >= 8:
        return dict(outer=32, inner=32, num_warps=4, num_stages=2)
    # dk/dv hold two fp32 accumulators of 128 rows: 8 warps keep them in registers (4 spilled at head dim 64).
    warps = 4 if head_dim <= 64 and kernel != "dkdv" else 8
    if dtype.itemsize == 4:
        return dict(outer=64, inner=32, num_warps=warps, num_stages=2)
    # FlashAttention-2's shapes: 128 rows per program (queries; keys for dk/dv), 64-row steps forward and 32-row steps
    # in the backward kernels, which hold two accumulators (dk and dv) or three operand tiles (q, dO, k).
    outer, inner = (128, 64) if kernel == "forward" else (128, 32)
    return dict(outer=outer, inner=inner, num_warps=warps, num_stages=3)


@lru_cache(maxsize=None)
def _launch_options(kind: str, head_dim: int, dtype: torch.dtype) -> tuple[int, dict]:
    """(rows per program, tiles and compile options) of an attention kernel ("forward", "dq", "dkdv") with its fixed
    tiles: BLOCK_M x BLOCK_N for "forward" and "dq" (query rows per program), BLOCK_N x BLOCK_M for "dkdv" (key rows
    per program). Made once per kind of launch."""
    config = attention_config(kind, head_dim, dtype)
    outer_name, inner_name = ("BLOCK_N", "BLOCK_M") if kind == "dkdv" else ("BLOCK_M", "BLOCK_N")
    return config["outer"], {outer_name: config["outer"], inner_name: config["inner"], "HEAD_DIM": head_dim,
                             "num_warps": config["num_warps"], "num_stages": config["num_stages"]}


def _launch(kernel, kind: str, tokens: int, batch_heads: int, head_dim: int, qkv: Tensor, *args):
    """Launch an attention kernel on the qkv buffer with its fixed tiles (``_launch_options``)."""
    rows_per_program, options = _launch_options(kind, head_dim, qkv.dtype)
    kernel[(cdiv(tokens, rows_per_program) * batch_heads,)](
        qkv, *args, ACC_DTYPE=acc_dtype(qkv), DOT_PRECISION=dot_precision(qkv), **options)


# ---------------------------------------------------------------------------------------------- host side

def qkv_weight_blocks(qkv_weight: Tensor, width: int, embed: int, dtype: torch.dtype) -> Tensor:
    """The active blocks ``W_j[:width, :embed]`` of q, k and v as one strided view ``[3, width, embed]`` of the
    block-layout weight (one ``as_strided``: nothing copied), or, for a weight in another dtype, a cast copy of them."""
    row_stride, col_stride = qkv_weight.stride()
    blocks = qkv_weight.as_strided((3, width, embed), (qkv_weight.shape[0] // 3 * row_stride, row_stride, col_stride))
    return blocks if blocks.dtype == dtype else blocks.to(dtype)


def qkv_forward(x2d: Tensor, qkv_weight: Tensor, qkv_bias: Tensor | None, width: int) -> Tensor:
    """q, k, v of ``x2d: [B*N, e]`` in one buffer ``[3, B*N, width]``: one batched cuBLAS GEMM over the three active
    blocks, read in place, with x as every batch's left operand (batch stride 0) and the bias blocks broadcast over
    the rows (batch stride ``H_max*Dh``, row stride 0)."""
    embed, dtype = x2d.shape[1], x2d.dtype
    weights_t = qkv_weight_blocks(qkv_weight, width, embed, dtype).transpose(1, 2)
    rows = x2d.expand(3, -1, -1)
    if qkv_bias is None:
        return torch.bmm(rows, weights_t)
    bias_stride = qkv_bias.stride(0)
    biases = qkv_bias.as_strided((3, 1, width), (qkv_bias.shape[0] // 3 * bias_stride, 0, bias_stride))
    return torch.baddbmm(biases if biases.dtype == dtype else biases.to(dtype), rows, weights_t)


def _scales(head_dim: int) -> tuple[float, float]:
    """(base-2 score scale ``Dh**-0.5 * log2(e)``, softmax scale ``Dh**-0.5``)."""
    return head_dim ** -0.5 * math.log2(math.e), head_dim ** -0.5


def flash_forward(qkv: Tensor, batch: int, tokens: int, num_heads: int, head_dim: int) -> tuple[Tensor, Tensor]:
    """``(context [B*N, h*Dh], lse [B*h, N])`` of the qkv buffer ``[3, B*N, h*Dh]``."""
    width = num_heads * head_dim
    context = qkv.new_empty((batch * tokens, width))
    lse = qkv.new_empty((batch * num_heads, tokens),
                        dtype=torch.float64 if qkv.dtype == torch.float64 else torch.float32)
    if batch * tokens > 0:
        _launch(_attention_forward_kernel, "forward", tokens, batch * num_heads, head_dim,
                qkv, context, lse, tokens, num_heads, width, qkv.stride(0), _scales(head_dim)[0])
    return context, lse


def flash_backward(qkv: Tensor, context: Tensor, lse: Tensor, d_context: Tensor, batch: int, tokens: int,
                   num_heads: int, head_dim: int) -> Tensor:
    """Gradient of the qkv buffer, in its layout ``[3, B*N, width]``, from ``d_context: [B*N, width]`` (contiguous)."""
    width = num_heads * head_dim
    d_qkv = torch.empty_like(qkv)
    delta = torch.empty_like(lse)
    if batch * tokens > 0:
        _launch(_attention_backward_dq_kernel, "dq", tokens, batch * num_heads, head_dim,
                qkv, context, d_context, lse, delta, d_qkv, tokens, num_heads, width, qkv.stride(0), *_scales(head_dim))
        _launch(_attention_backward_dkdv_kernel, "dkdv", tokens, batch * num_heads, head_dim,
                qkv, d_context, lse, delta, d_qkv, tokens, num_heads, width, qkv.stride(0), *_scales(head_dim))
    return d_qkv


def qkv_backward(d_qkv: Tensor, x2d: Tensor, qkv_weight: Tensor, qkv_bias: Tensor | None, weight_blocks: Tensor,
                 need_dx: bool, need_dw: bool, need_db: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(dx, returned dW, returned db)`` of the q, k, v projections: cuBLAS GEMMs per block, dW and db added into
    the ``weight_grad_buffer`` views of the three active row blocks; rows between the blocks are never touched."""
    embed = x2d.shape[1]
    width = weight_blocks[0].shape[0]
    max_width = qkv_weight.shape[0] // 3
    dx = None
    if need_dx:
        dx = torch.mm(d_qkv[0], weight_blocks[0])
        for j in (1, 2):
            dx.addmm_(d_qkv[j], weight_blocks[j])
    dw_returned = db_returned = None
    if need_dw:
        dw_view, dw_returned = weight_grad_buffer(qkv_weight, 3 * max_width, embed)
        for j in range(3):
            add_weight_grad(dw_view.view(3, max_width, embed)[j, :width], d_qkv[j], x2d)
    if need_db:
        db_view, db_returned = weight_grad_buffer(qkv_bias, 3 * max_width)
        for j in range(3):
            add_bias_grad(db_view.view(3, max_width)[j, :width], d_qkv[j])
    return dx, dw_returned, db_returned


def self_attention_forward(x: Tensor, qkv_weight: Tensor, qkv_bias: Tensor | None, proj_weight: Tensor,
                           proj_bias: Tensor | None, num_heads: int, head_dim: int,
                           keep_residuals: bool) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor] | None]:
    """``(out [B, N, e], residuals)``: what the backward needs besides the inputs, the qkv buffer, the context and
    the log-sum-exp (None without ``keep_residuals``)."""
    batch, tokens, embed = x.shape
    width = num_heads * head_dim
    qkv = qkv_forward(x.reshape(-1, embed), qkv_weight, qkv_bias, width)  # x2d: a view wherever x's strides allow
    context, lse = flash_forward(qkv, batch, tokens, num_heads, head_dim)
    proj_block = active_block(proj_weight, embed, width, x.dtype)
    out = linear_gemm(context, proj_block, active_vector(proj_bias, embed, x.dtype))
    return out.view(batch, tokens, embed), ((qkv, context, lse) if keep_residuals else None)


def self_attention_backward(d_out: Tensor, x: Tensor, qkv_weight: Tensor, qkv_bias: Tensor | None, proj_weight: Tensor,
                            proj_bias: Tensor | None, qkv: Tensor, context: Tensor, lse: Tensor, num_heads: int,
                            head_dim: int, needs: tuple[bool, ...]):
    """``(dx, dW_qkv, db_qkv, dW_o, db_o)`` for ``needs`` flags of (x, qkv weight, qkv bias, proj weight, proj bias);
    parameter gradients go into ``weight_grad_buffer`` views (returned only where autograd must receive them)."""
    need_dx, need_dw_qkv, need_db_qkv, need_dw_proj, need_db_proj = needs
    need_db_qkv, need_db_proj = need_db_qkv and qkv_bias is not None, need_db_proj and proj_bias is not None
    batch, tokens, embed = x.shape
    width = num_heads * head_dim
    d_out2d = d_out.reshape(-1, embed)
    d_proj_weight = d_proj_bias = None
    if need_dw_proj:
        view, d_proj_weight = weight_grad_buffer(proj_weight, embed, width)
        add_weight_grad(view, d_out2d, context)
    if need_db_proj:
        view, d_proj_bias = weight_grad_buffer(proj_bias, embed)
        add_bias_grad(view, d_out2d)
    dx = d_qkv_weight = d_qkv_bias = None
    if need_dx or need_dw_qkv or need_db_qkv:
        d_context = torch.mm(d_out2d, active_block(proj_weight, embed, width, x.dtype))
        d_qkv = flash_backward(qkv, context, lse, d_context, batch, tokens, num_heads, head_dim)
        weight_blocks = qkv_weight_blocks(qkv_weight, width, embed, x.dtype)
        dx, d_qkv_weight, d_qkv_bias = qkv_backward(d_qkv, x.reshape(-1, embed), qkv_weight, qkv_bias, weight_blocks,
                                                    need_dx, need_dw_qkv, need_db_qkv)
    return (None if dx is None else dx.view(x.shape)), d_qkv_weight, d_qkv_bias, d_proj_weight, d_proj_bias


class ElasticAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, qkv_weight: Tensor, qkv_bias: Tensor | None, proj_weight: Tensor,
                proj_bias: Tensor | None, num_heads: int, head_dim: int):
        record_grad_mode(ctx)
        params = (qkv_weight, qkv_bias, proj_weight, proj_bias)
        out, residuals = self_attention_forward(x, *params, num_heads, head_dim, keep_residuals=True)
        ctx.save_for_backward(x, *params, *residuals)
        ctx.heads = (num_heads, head_dim)
        return out

    @staticmethod
    def backward(ctx, d_out: Tensor):
        with backward_grad_mode(ctx):
            grads = self_attention_backward(d_out, *ctx.saved_tensors, *ctx.heads, tuple(ctx.needs_input_grad[:5]))
            return *grads, None, None


def elastic_attention(x: Tensor, qkv_weight: Tensor, qkv_bias: Tensor | None, proj_weight: Tensor,
                      proj_bias: Tensor | None, num_heads: int, head_dim: int = 64) -> Tensor:
    """Self-attention with ``num_heads`` active heads on the block-layout qkv weight, then
    ``proj_weight[:e, :num_heads*head_dim]``, on the GPU path; the rest of the inputs are validated by
    ``elastic_ops.functional``."""
    problem = triton_head_dim_problem(head_dim)
    if problem is not None:
        raise ValueError(f"elastic_attention (triton): {problem}; the reference backend takes any head_dim")
    if needs_backward(x, qkv_weight, qkv_bias, proj_weight, proj_bias):
        return ElasticAttentionFunction.apply(x, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads, head_dim)
    return self_attention_forward(x, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads, head_dim,
                                  keep_residuals=False)[0]

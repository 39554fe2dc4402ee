"""Grouped inference kernels: K subnets of one supernet in one launch per op (DESIGN.md section 3, batched mode).

Activations of the K subnets are stacked as ``[K, ..., E]``, ``E`` the group's widest active size; subnet k's
channels past its own size are padding. An int32 size table ``[K]`` per elastic dimension (``.table`` of an
``elastic_ops.GroupSizes``) tells each program what
is active: the subnet index is a grid axis, output tiles past a subnet's active size only store zeros (or nothing,
for buffers no later kernel reads there) and return, and reductions stop at the subnet's active input size, so
inputs past it are never read. The super weights are shared by all subnets and read in place through their strides.

Every function has the signature of the grouped reference op of the same name in ``elastic_ops.reference``
and is the "triton" backend of ``elastic_ops.grouped_*``, which validates the inputs; they run forward only:

- ``grouped_linear``: one GEMM kernel, optional fused exact GELU. It has no input size table, so its reduction runs
  over the full input width and relies on the input padding being zero, as the PyTorch op does.
- ``grouped_layer_norm``: statistics of each subnet over its own active channels.
- ``grouped_mlp``: the GEMM kernel twice (fc1 + GELU into a hidden buffer sized by the hidden table, then fc2).
- ``grouped_attention``: the GEMM kernel over the three row blocks of the qkv weight, a flash-attention kernel over
  each subnet's active heads (online softmax, masked partial key blocks), and the GEMM kernel for the output projection.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._backend import triton_head_dim_problem
from .._validate import require
from ._common import acc_dtype, cdiv, dot_precision, gelu, grouped_tile, interpreter, unit_stride
from .attention import (
    attention_config,
    flash_attention_rows,
    head_program,
    head_rows,
    store_head_rows,
)
from .layernorm import compute_dtype, layer_norm_tiles

# ---------------------------------------------------------------------------------------------- kernels

@triton.jit
def matmul_tile(a_ptr, b_ptr, offs_m, offs_n, M, N, K, stride_a_m, stride_a_k, stride_b_k, stride_b_n,
                ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """ACC_DTYPE tile ``A[offs_m, :K] @ B[:K, offs_n]`` of strided operands, the products in DOT_PRECISION; B is cast
    to A's dtype for ``tl.dot`` (an fp32 master weight under fp16 activations).

    a_ptr: A ``[M, K]``. b_ptr: B ``[K, N]`` (a transposed weight slice is B with the weight's strides swapped).
    Rows of the tile past M and columns past N read rows and columns inside (their results are garbage for the
    caller to drop), so that only the last, partial step over K (each subnet's own input size) needs a mask and the
    main loop's loads are vectorised and pipelined.
    """
    rows = offs_m % M
    cols = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_a_m + offs_k[None, :] * stride_a_k
    b_ptrs = b_ptr + offs_k[:, None] * stride_b_k + cols[None, :] * stride_b_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    full_end = K - K % BLOCK_K
    for _ in range(0, full_end, BLOCK_K):
        acc = tl.dot(tl.load(a_ptrs), tl.load(b_ptrs).to(a_ptr.dtype.element_ty), acc, input_precision=DOT_PRECISION,
                     out_dtype=ACC_DTYPE)
        a_ptrs += BLOCK_K * stride_a_k
        b_ptrs += BLOCK_K * stride_b_k
    if full_end < K:
        a = tl.load(a_ptrs, mask=offs_k[None, :] < K - full_end, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < K - full_end, other=0.0)
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    return acc


@triton.jit
def _grouped_linear_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, in_sizes_ptr, out_sizes_ptr,
    M, N, K, weight_block_rows,
    stride_x_group, stride_x_m, stride_x_k, stride_w_out, stride_w_in, stride_y_group, stride_y_m,
    HAS_BIAS: tl.constexpr, HAS_IN_SIZES: tl.constexpr, GELU: tl.constexpr, ZERO_PADDING: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``y[g, :, j*N : j*N + out_g] = act(x[g, :, :in_g] @ W_j[:out_g, :in_g].T + b_j[:out_g])`` for subnet
    ``g = program_id(2)`` and weight row block ``j = program_id(1)`` (one block for a linear layer; q, k, v for qkv).

    x_ptr: x ``[G, M, K]`` (strided); subnet g's active input is ``[:, :in_g]``, ``in_g = in_sizes[g]``, or all K
    without HAS_IN_SIZES (then its padding must be zero).
    w_ptr: super weight; block j starts at row ``j * weight_block_rows``, active ``[:out_g, :in_g]``.
    b_ptr: super bias; block j starts at ``j * weight_block_rows``, active ``[:out_g]``.
    y_ptr: y ``[G, M, blocks * N]``, unit column stride; columns ``out_g:`` of each block are subnet g's padding:
    set to zero with ZERO_PADDING, else never written.
    in_sizes_ptr, out_sizes_ptr: int32 ``[G]`` size tables (``out_g <= N``, ``in_g <= K``).
    """
    group = tl.program_id(2).to(tl.int64)
    block = tl.program_id(1)
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    y_ptrs = y_ptr + group * stride_y_group + offs_m[:, None] * stride_y_m + block * N + offs_n[None, :]
    out_size = tl.load(out_sizes_ptr + group)
    if pid_n * BLOCK_N >= out_size:  # a tile of padding only: no GEMM
        if ZERO_PADDING:
            tl.store(y_ptrs, tl.zeros((BLOCK_M, BLOCK_N), dtype=y_ptr.dtype.element_ty),
                     mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))
        return
    in_size = K
    if HAS_IN_SIZES:
        in_size = tl.load(in_sizes_ptr + group)
    w_block_ptr = w_ptr + block * weight_block_rows * stride_w_out
    acc = matmul_tile(x_ptr + group * stride_x_group, w_block_ptr, offs_m, offs_n, M, out_size, in_size,
                      stride_x_m, stride_x_k, stride_w_in, stride_w_out, ACC_DTYPE, DOT_PRECISION,
                      BLOCK_M, BLOCK_N, BLOCK_K)
    # Columns past out_size of a straddling tile are exactly zero (the padding), and stay so: the bias loads as zero
    # there, and gelu(0) = 0.
    acc = tl.where(offs_n[None, :] < out_size, acc, 0.0)
    if HAS_BIAS:
        bias = tl.load(b_ptr + block * weight_block_rows + offs_n, mask=offs_n < out_size, other=0.0)
        acc += bias.to(ACC_DTYPE)[None, :]
    if GELU:
        acc = gelu(acc)
    store_width = out_size
    if ZERO_PADDING:
        store_width = N
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < store_width))


@triton.jit
def _grouped_layer_norm_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, sizes_ptr,
    M, D, eps,
    stride_x_group, stride_x_row, stride_x_col, stride_y_group, stride_y_row,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """LayerNorm of BLOCK_ROWS rows of subnet ``g = program_id(1)`` over its ``d_g = sizes[g]`` active channels.

    x_ptr: x ``[G, M, D]`` (strided); its padding ``[:, :, d_g:]`` is loaded with the row (a vectorised load: masks by
    ``d_g`` would not be) and discarded, whatever it holds. w_ptr, b_ptr: super gamma/beta ``[>= D]``, active
    ``[:d_g]``.
    y_ptr: y ``[G, M, D]``, unit column stride; columns ``d_g:`` are set to zero. sizes_ptr: int32 ``[G]``.
    """
    group = tl.program_id(1).to(tl.int64)
    active_size = tl.load(sizes_ptr + group)
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < M
    in_row = cols < D
    active = row_mask[:, None] & (cols < active_size)[None, :]
    x = tl.load(x_ptr + group * stride_x_group + rows[:, None] * stride_x_row + cols[None, :] * stride_x_col,
                mask=row_mask[:, None] & in_row[None, :], other=0.0).to(COMPUTE_DTYPE)
    x = tl.where(active, x, 0.0)
    mean = tl.sum(x, axis=1) / active_size
    centered = tl.where(active, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / active_size + eps)
    y = centered * rstd[:, None]
    if HAS_WEIGHT:
        y *= tl.load(w_ptr + cols, mask=in_row, other=0.0).to(COMPUTE_DTYPE)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=in_row, other=0.0).to(COMPUTE_DTYPE)[None, :]
    y = tl.where(active, y, 0.0)
    tl.store(y_ptr + group * stride_y_group + rows[:, None] * stride_y_row + cols[None, :],
             y.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & (cols[None, :] < D))


@triton.jit
def _grouped_attention_kernel(
    qkv_ptr, context_ptr, head_counts_ptr,
    tokens, num_heads, width, stride_qkv_group, stride_context_group, qk_scale,
    HEAD_DIM: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Flash attention of one query block of one (batch, head) of subnet ``g = program_id(1)``; programs of heads
    past the subnet's ``h_g = head_counts[g]`` return at once.

    qkv_ptr: ``[G, B*N, 3*width]`` = ``[G, B, N, 3, H, Dh]``, ``width = H * Dh`` for the group's widest head count H.
    context_ptr: ``[G, B*N, width]``; heads ``h_g:`` of subnet g are never written.
    head_counts_ptr: int32 ``[G]``. qk_scale: ``Dh**-0.5 * log2(e)``.
    """
    group = tl.program_id(1).to(tl.int64)
    pid_m, pid_bh, first_row, head_col = head_program(tokens, num_heads, HEAD_DIM, BLOCK_M)
    if pid_bh % num_heads >= tl.load(head_counts_ptr + group):
        return
    q_base = qkv_ptr + group * stride_qkv_group + first_row * (3 * width) + head_col
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q = head_rows(q_base, rows, 3 * width, tokens, HEAD_DIM, True)
    context, _ = flash_attention_rows(q, q_base + width, q_base + 2 * width, 3 * width, tokens, qk_scale,
                                      HEAD_DIM, ACC_DTYPE, DOT_PRECISION, BLOCK_M, BLOCK_N)
    store_head_rows(context_ptr + group * stride_context_group + first_row * width + head_col, rows, width, tokens,
                    context, HEAD_DIM)


# ---------------------------------------------------------------------------------------------- host side

def _group_rows(x: Tensor, groups: int) -> Tensor:
    """``x [K, ..., E]`` as ``[K, rows, E]``: a view wherever the strides allow."""
    return x.reshape(groups, -1, x.shape[-1])


def _linear_launch(x3d: Tensor, weight: Tensor, bias: Tensor | None, in_table: Tensor | None, out_table: Tensor,
                   out_width: int, *, gelu_on: bool = False, zero_padding: bool, blocks: int = 1,
                   weight_block_rows: int = 0) -> Tensor:
    """``[K, M, blocks * out_width]`` from ``x3d [K, M, in]`` with the grouped GEMM kernel."""
    groups, M, K = x3d.shape
    y = torch.empty((groups, M, blocks * out_width), device=x3d.device, dtype=x3d.dtype)
    if M == 0:
        return y
    config = _grouped_gemm_config(x3d.dtype)
    grid = (cdiv(M, config["BLOCK_M"]) * cdiv(out_width, config["BLOCK_N"]), blocks, groups)
    _grouped_linear_kernel[grid](
        x3d, weight, unit_stride(bias) if bias is not None else weight, y,
        in_table if in_table is not None else out_table, out_table,
        M, out_width, K, weight_block_rows,
        *x3d.stride(), *weight.stride(), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, HAS_IN_SIZES=in_table is not None, GELU=gelu_on, ZERO_PADDING=zero_padding,
        ACC_DTYPE=acc_dtype(x3d), DOT_PRECISION=dot_precision(x3d), **config,
    )
    return y


def _grouped_gemm_config(dtype: torch.dtype) -> dict:
    """Fixed tiles of the grouped GEMM: the same launch for every composition of subnets, so a new search generation
    compiles nothing and tunes nothing. 128 x 128 output tiles, 64-deep (32 for fp32, 16 for fp64) steps in 3 stages."""
    if interpreter():  # one large tile keeps the interpreter's grid small
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=1)
    block_k = {2: 64, 4: 32}.get(dtype.itemsize, 16)
    return dict(BLOCK_M=128, BLOCK_N=128 if dtype.itemsize <= 4 else 64, BLOCK_K=block_k, GROUP_M=8, num_warps=8,
                num_stages=3)


def grouped_linear(x: Tensor, weight: Tensor, bias: Tensor | None, out_sizes, activation: str | None = None) -> Tensor:
    """``act(x[k] @ weight[:out_k, :in].T + bias[:out_k])`` for each subnet k, zero past ``out_k``.

    x: ``[K, ..., in]`` with each subnet's input padding zero; out: ``[K, ..., out_sizes.width]``.
    """
    y = _linear_launch(_group_rows(x, x.shape[0]), weight, bias, None, out_sizes.table, out_sizes.width,
                       gelu_on=activation == "gelu", zero_padding=True)
    return y.view(*x.shape[:-1], out_sizes.width)


def grouped_layer_norm(x: Tensor, sizes, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    """LayerNorm of each subnet over ITS active channels ``:e_k`` (``weight[:e_k]``, ``bias[:e_k]``); padding is zero.

    x: ``[K, ..., sizes.width]``; its padding is never read.
    """
    x3d = _group_rows(x, x.shape[0])
    groups, M, D = x3d.shape
    weight, bias = unit_stride(weight), unit_stride(bias)
    y = torch.empty((groups, M, D), device=x.device, dtype=x.dtype)
    if M > 0:
        block_d, block_rows, warps = layer_norm_tiles(D)
        _grouped_layer_norm_kernel[(cdiv(M, block_rows), groups)](
            x3d, weight if weight is not None else x3d, bias if bias is not None else x3d, y, sizes.table,
            M, D, eps, *x3d.stride(), y.stride(0), y.stride(1),
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, COMPUTE_DTYPE=compute_dtype(x)[1],
            BLOCK_ROWS=block_rows, BLOCK_D=block_d, num_warps=warps,
        )
    return y.view(x.shape)


def grouped_mlp(x: Tensor, sizes, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor,
                fc2_bias: Tensor | None, hidden_sizes) -> Tensor:
    """``fc2(gelu(fc1(x)))`` of each subnet with ``W1[:hidden_k, :e_k]``, ``W2[:e_k, :hidden_k]``; padding is zero.

    x: ``[K, ..., sizes.width]``; its padding is never read.
    """
    x3d = _group_rows(x, x.shape[0])
    # fc2 reads each subnet's hidden units only up to its own hidden size: the buffer's padding stays unwritten.
    hidden = _linear_launch(x3d, fc1_weight, fc1_bias, sizes.table, hidden_sizes.table, hidden_sizes.width,
                            gelu_on=True, zero_padding=False)
    y = _linear_launch(hidden, fc2_weight, fc2_bias, hidden_sizes.table, sizes.table, sizes.width, zero_padding=True)
    return y.view(x.shape)


def grouped_attention(x: Tensor, sizes, qkv_weight: Tensor, qkv_bias: Tensor | None, proj_weight: Tensor,
                      proj_bias: Tensor | None, head_counts, head_dim: int = 64) -> Tensor:
    """Self-attention of each subnet with its ``h_k`` heads (block qkv layout ``[3*H_max*Dh, E_max]``), then
    ``W_o[:e_k, :h_k*Dh]``; padding is zero. Heads past ``h_k`` are neither projected nor attended.

    x: ``[K, B, N, sizes.width]``; its padding is never read.
    """
    problem = triton_head_dim_problem(head_dim)
    require(problem is None, f"grouped_attention (triton): {problem}; the reference backend takes any head_dim")
    max_width = qkv_weight.shape[0] // 3
    width = head_counts.width * head_dim
    groups, batch, tokens, _ = x.shape
    head_widths = head_counts.table * head_dim
    qkv = _linear_launch(_group_rows(x, groups), qkv_weight, qkv_bias, sizes.table, head_widths, width,
                         zero_padding=False, blocks=3, weight_block_rows=max_width)
    context = torch.empty((groups, batch * tokens, width), device=x.device, dtype=x.dtype)
    if batch * tokens > 0:
        config = attention_config("forward", head_dim, x.dtype)
        _grouped_attention_kernel[(cdiv(tokens, config["outer"]) * batch * head_counts.width, groups)](
            qkv, context, head_counts.table, tokens, head_counts.width, width, qkv.stride(0), context.stride(0),
            head_dim ** -0.5 * math.log2(math.e), HEAD_DIM=head_dim, ACC_DTYPE=acc_dtype(x),
            DOT_PRECISION=dot_precision(x), BLOCK_M=config["outer"], BLOCK_N=config["inner"],
            num_warps=config["num_warps"], num_stages=config["num_stages"],
        )
    y = _linear_launch(context, proj_weight, proj_bias, head_widths, sizes.table, sizes.width, zero_padding=True)
    return y.view(x.shape)

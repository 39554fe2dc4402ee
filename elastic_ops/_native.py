"""Host side of the native CPU kernels (``elastic_ops._C``): the checked entry points.

``_C`` is internal. It takes each tensor as ``(data_ptr, shape, element strides)`` and can check the
specs' form and that their shapes agree, not that a pointer addresses that much memory or holds
float32 CPU data. So the functions here build every spec from a live tensor, check what C++ cannot
see (float32, CPU, dense strided layout, no autograd) and raise a ``ValueError`` or ``TypeError``
naming the problem; shapes and active sizes are checked by ``_validate`` on the dispatched path
(``elastic_ops.functional``) and, on every path, by ``_C`` against the tensors' own shapes before any
kernel reads memory. Outputs are allocated here, so they never overlap an input.

The kernels run on any strides (a batch, token or channel stride of ``x`` is read in place), use
``torch.get_num_threads()`` threads, and are forward-only. Every kernel is written for K subnets at once
(``[K, rows, width]`` activations with per-subnet size tables, DESIGN.md section 3): the single-subnet
ops are K = 1, the ``*_grouped`` functions are the batched mode (``elastic_ops.grouped_*``).

Every op, plain linear included, runs its own C++ kernel: on this project's shapes the register-blocked
GEMM of csrc/kernels_impl.h measured at or below torch's oneDNN/MKL sgemm time on the same CPU (see
benchmarks/bench_native_cpu.py), so no op is handed back to torch. The fused ops gain more: GELU in the
GEMM epilogue, the MLP's hidden activation kept in cache per block of rows, attention per (batch entry,
head) with its scores never leaving the thread.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import _C


def _check(op: str, **tensors: Tensor | None) -> None:
    """What the C++ side cannot see for itself: each tensor is a dense float32 CPU tensor, not in autograd.

    Shapes and active sizes are checked twice before a kernel runs: by ``_validate`` (here, or in
    ``functional`` on the dispatched path) and by ``_C`` against the other tensors' shapes.
    """
    grad = torch.is_grad_enabled()
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.float32:
            raise ValueError(f"{op}: the native kernels take float32, {name} is {t.dtype}")
        if t.device.type != "cpu":
            raise ValueError(f"{op}: the native kernels run on the CPU, {name} is on {t.device}")
        if t.layout != torch.strided:
            raise ValueError(f"{op}: {name} must be a dense strided tensor, got layout {t.layout}")
        if grad and t.requires_grad:
            raise ValueError(f"{op}: the native kernels are forward-only and {name} requires grad "
                             "(run under torch.no_grad(), or use another backend)")


def _ndim(op: str, name: str, t: Tensor | None, ndim: int) -> None:
    if t is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(t.shape)}")


def _spec(t: Tensor | None) -> tuple | None:
    """(pointer, shape, element strides) of a tensor or view; None stays None. (A ``torch.Size`` is a tuple.)"""
    return None if t is None else (t.data_ptr(), t.shape, t.stride())


def _rows3(x: Tensor) -> Tensor:
    """``x [..., features]`` as ``[K, rows, features]`` for K subnets of equal sizes, without a copy where
    possible: one block of rows if the leading dims merge, else one block per leading index (a 3-D x of
    any strides), else a reshaped copy."""
    if x.dim() <= 2:
        return x.reshape(1, -1, x.shape[-1])
    try:
        return x.view(1, -1, x.shape[-1])
    except RuntimeError:
        pass
    return x if x.dim() == 3 else x.reshape(-1, x.shape[-2], x.shape[-1])


def _blocks(x: Tensor) -> tuple[tuple, int, int]:
    """``(spec, K, rows)``: ``x [..., features]`` as the spec of ``[K, rows, features]`` (see :func:`_rows3`), read
    from x's shape and strides where they allow it (a 2-D x, or a 3-D x whose leading dims merge or not), so that the
    common call makes no view."""
    shape = x.shape
    if len(shape) == 3:
        strides = x.stride()
        blocks, rows, width = shape
        if blocks == 1 or strides[0] == rows * strides[1]:  # the rows of all blocks are evenly spaced
            return (x.data_ptr(), (1, blocks * rows, width), (0, strides[1], strides[2])), 1, blocks * rows
        if rows == 1:
            return (x.data_ptr(), (1, blocks, width), (0, strides[0], strides[2])), 1, blocks
        return (x.data_ptr(), shape, strides), blocks, rows
    if len(shape) == 2:
        strides = x.stride()
        return (x.data_ptr(), (1, shape[0], shape[1]), (0, strides[0], strides[1])), 1, shape[0]
    x3 = _rows3(x)
    return _spec(x3), x3.shape[0], x3.shape[1]


def _out(x: Tensor, width: int, blocks: int, rows: int) -> tuple[Tensor, tuple]:
    """A new ``[..., width]`` output shaped like x but for its last dim, and its spec as ``[blocks, rows, width]``."""
    out = torch.empty(*x.shape[:-1], width, dtype=x.dtype)
    return out, (out.data_ptr(), (blocks, rows, width), (rows * width, width, 1))


def _threads() -> int:
    return max(1, torch.get_num_threads())


# --- single subnet ---------------------------------------------------------------------------------
# Each op checks what C++ cannot see (``_check``), then runs its kernel (``_linear`` etc.). Shapes and active sizes:
# functional._validate checks them on the dispatched path; _C checks them again against the tensors' own shapes on
# every path, so a direct call here with a bad size raises there. ``op.signature_checked`` is the kernel alone: the
# dispatch calls it for a call whose signature (dtype, device, layout, autograd state: all that ``_check`` reads) has
# passed the checks before (``elastic_ops.functional``).

def linear(x: Tensor, weight: Tensor, bias: Tensor | None, out_features: int, activation: str | None = None) -> Tensor:
    """``act(x @ weight[:out_features, :in].T + bias[:out_features])``, ``in = x.shape[-1]``."""
    op = "native linear"
    _check(op, x=x, weight=weight, bias=bias)
    _ndim(op, "weight", weight, 2)
    _ndim(op, "bias", bias, 1)
    if activation not in (None, "gelu"):
        raise ValueError(f"{op}: activation must be None or 'gelu', got {activation!r}")
    return _linear(x, weight, bias, out_features, activation)


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, out_features: int, activation: str | None) -> Tensor:
    x_spec, blocks, rows = _blocks(x)
    out, out_spec = _out(x, out_features, blocks, rows)
    # The kernel reads the active block of the super weight and bias in place: W[:out_features, :in], b[:out_features].
    _C.linear_forward(x_spec, _spec(weight), _spec(bias), [out_features] * blocks, out_spec, activation == "gelu",
                      _threads())
    return out


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    """LayerNorm over the ``d = x.shape[-1]`` active channels with ``weight[:d]``, ``bias[:d]``."""
    op = "native layer_norm"
    _check(op, x=x, weight=weight, bias=bias)
    _ndim(op, "weight", weight, 1)
    _ndim(op, "bias", bias, 1)
    return _layer_norm(x, weight, bias, eps)


def _layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    x_spec, blocks, rows = _blocks(x)
    d = x.shape[-1]
    out, out_spec = _out(x, d, blocks, rows)
    _C.layer_norm_forward(x_spec, _spec(weight), _spec(bias), [d] * blocks, float(eps), out_spec, _threads())
    return out


def mlp(x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor, fc2_bias: Tensor | None,
        hidden_features: int) -> Tensor:
    """``fc2(gelu(fc1(x)))`` with ``W1[:hidden, :e]``, ``W2[:e, :hidden]``, fused per block of rows."""
    op = "native mlp"
    _check(op, x=x, fc1_weight=fc1_weight, fc1_bias=fc1_bias, fc2_weight=fc2_weight, fc2_bias=fc2_bias)
    for name, t, ndim in (("fc1_weight", fc1_weight, 2), ("fc1_bias", fc1_bias, 1), ("fc2_weight", fc2_weight, 2),
                          ("fc2_bias", fc2_bias, 1)):
        _ndim(op, name, t, ndim)
    return _mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden_features)


def _mlp(x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor, fc2_bias: Tensor | None,
         hidden_features: int) -> Tensor:
    x_spec, blocks, rows = _blocks(x)
    e = x.shape[-1]
    out, out_spec = _out(x, e, blocks, rows)
    _C.mlp_forward(x_spec, _spec(fc1_weight), _spec(fc1_bias), _spec(fc2_weight), _spec(fc2_bias), [e] * blocks,
                   [hidden_features] * blocks, out_spec, _threads())
    return out


def attention(x: Tensor, qkv_weight: Tensor, qkv_bias: Tensor | None, proj_weight: Tensor, proj_bias: Tensor | None,
              num_heads: int, head_dim: int = 64) -> Tensor:
    """Self-attention of ``x [B, N, e]`` with ``num_heads`` heads (block qkv layout), then ``W_o[:e, :h*Dh]``."""
    op = "native attention"
    _check(op, x=x, qkv_weight=qkv_weight, qkv_bias=qkv_bias, proj_weight=proj_weight, proj_bias=proj_bias)
    for name, t, ndim in (("x", x, 3), ("qkv_weight", qkv_weight, 2), ("qkv_bias", qkv_bias, 1),
                          ("proj_weight", proj_weight, 2), ("proj_bias", proj_bias, 1)):
        _ndim(op, name, t, ndim)
    _check_head_dim(op, qkv_weight, head_dim)
    return _attention(x, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads, head_dim)


def _attention(x: Tensor, qkv_weight: Tensor, qkv_bias: Tensor | None, proj_weight: Tensor, proj_bias: Tensor | None,
               num_heads: int, head_dim: int) -> Tensor:
    batch, tokens, width = shape = x.shape
    out = torch.empty(shape, dtype=x.dtype)
    _C.attention_forward(_spec(x), batch, _spec(qkv_weight), _spec(qkv_bias), _spec(proj_weight), _spec(proj_bias),
                         qkv_weight.shape[0] // (3 * head_dim), head_dim, [width], [num_heads],
                         (out.data_ptr(), shape, (tokens * width, width, 1)), _threads())
    return out


linear.signature_checked = _linear
layer_norm.signature_checked = _layer_norm
mlp.signature_checked = _mlp
attention.signature_checked = _attention


def _check_head_dim(op: str, qkv_weight: Tensor, head_dim: int) -> None:
    if not isinstance(head_dim, int) or head_dim < 1 or qkv_weight.shape[0] % (3 * head_dim):
        raise ValueError(f"{op}: qkv_weight has {qkv_weight.shape[0]} rows, not a multiple of 3 * head_dim "
                         f"(head_dim={head_dim!r}); expected the block layout [3 * H_max * head_dim, E_max]")


# --- K subnets in one pass (elastic_ops.grouped_*) ----------------------------------------------

def _sizes(op: str, what: str, sizes, groups: int) -> list[int]:
    """The host size table of a ``elastic_ops.GroupSizes`` (or a sequence of ints), one entry per subnet."""
    values = getattr(sizes, "values", sizes)
    if not isinstance(values, Sequence) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise TypeError(f"{op}: {what} must be a GroupSizes or a sequence of ints, got {sizes!r}")
    if len(values) != groups:
        raise ValueError(f"{op}: {what} has {len(values)} entries for {groups} subnets")
    return list(values)


def _grouped_x(op: str, x: Tensor, ndim: int | None = None) -> Tensor:
    _check(op, x=x)
    if (ndim is not None and x.dim() != ndim) or x.dim() < 2:
        raise ValueError(f"{op}: x must be [K, ..., width] ({ndim or 'at least 2'} dims), got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], -1, x.shape[-1])


def linear_grouped(x: Tensor, weight: Tensor, bias: Tensor | None, out_sizes, activation: str | None = None) -> Tensor:
    """Subnet k: ``act(x[k] @ weight[:out_k, :in].T + bias[:out_k])``, zero past ``out_k``; x ``[K, ..., in]``."""
    op = "native linear_grouped"
    x3 = _grouped_x(op, x)
    _check(op, weight=weight, bias=bias)
    _ndim(op, "weight", weight, 2)
    _ndim(op, "bias", bias, 1)
    if activation not in (None, "gelu"):
        raise ValueError(f"{op}: activation must be None or 'gelu', got {activation!r}")
    out = _sizes(op, "out_sizes", out_sizes, x.shape[0])
    width = max(out)
    y = torch.empty(*x3.shape[:2], width, dtype=x.dtype)
    _C.linear_forward(_spec(x3), _spec(weight), _spec(bias), out, _spec(y), activation == "gelu", _threads())
    return y.view(*x.shape[:-1], width)


def layer_norm_grouped(x: Tensor, sizes, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    """Subnet k: LayerNorm of ``x[k, ..., :e_k]`` with ``weight[:e_k]``, ``bias[:e_k]``; zero past ``e_k``."""
    op = "native layer_norm_grouped"
    x3 = _grouped_x(op, x)
    _check(op, weight=weight, bias=bias)
    _ndim(op, "weight", weight, 1)
    _ndim(op, "bias", bias, 1)
    y = torch.empty(x3.shape, dtype=x.dtype)
    _C.layer_norm_forward(_spec(x3), _spec(weight), _spec(bias), _sizes(op, "sizes", sizes, x.shape[0]), float(eps),
                          _spec(y), _threads())
    return y.view(x.shape)


def mlp_grouped(x: Tensor, sizes, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor,
                fc2_bias: Tensor | None, hidden_sizes) -> Tensor:
    """Subnet k: ``fc2(gelu(fc1(x[k, ..., :e_k])))`` with ``W1[:h_k, :e_k]``, ``W2[:e_k, :h_k]``; zero past ``e_k``."""
    op = "native mlp_grouped"
    x3 = _grouped_x(op, x)
    _check(op, fc1_weight=fc1_weight, fc1_bias=fc1_bias, fc2_weight=fc2_weight, fc2_bias=fc2_bias)
    for name, t, ndim in (("fc1_weight", fc1_weight, 2), ("fc1_bias", fc1_bias, 1), ("fc2_weight", fc2_weight, 2),
                          ("fc2_bias", fc2_bias, 1)):
        _ndim(op, name, t, ndim)
    y = torch.empty(x3.shape, dtype=x.dtype)
    _C.mlp_forward(_spec(x3), _spec(fc1_weight), _spec(fc1_bias), _spec(fc2_weight), _spec(fc2_bias),
                   _sizes(op, "sizes", sizes, x.shape[0]), _sizes(op, "hidden_sizes", hidden_sizes, x.shape[0]),
                   _spec(y), _threads())
    return y.view(x.shape)


def attention_grouped(x: Tensor, sizes, qkv_weight: Tensor, qkv_bias: Tensor | None, proj_weight: Tensor,
                      proj_bias: Tensor | None, head_counts, head_dim: int = 64) -> Tensor:
    """Subnet k: self-attention of ``x[k] [B, N, :e_k]`` with ``h_k`` heads, then ``W_o[:e_k, :h_k*Dh]``; zero past
    ``e_k``."""
    op = "native attention_grouped"
    x3 = _grouped_x(op, x, 4)
    _check(op, qkv_weight=qkv_weight, qkv_bias=qkv_bias, proj_weight=proj_weight, proj_bias=proj_bias)
    for name, t, ndim in (("qkv_weight", qkv_weight, 2), ("qkv_bias", qkv_bias, 1), ("proj_weight", proj_weight, 2),
                          ("proj_bias", proj_bias, 1)):
        _ndim(op, name, t, ndim)
    _check_head_dim(op, qkv_weight, head_dim)
    groups, batch, tokens, width = x.shape
    x3 = x.reshape(groups * batch, tokens, width)
    y = torch.empty(x3.shape, dtype=x.dtype)
    _C.attention_forward(_spec(x3), batch, _spec(qkv_weight), _spec(qkv_bias), _spec(proj_weight), _spec(proj_bias),
                         qkv_weight.shape[0] // (3 * head_dim), head_dim, _sizes(op, "sizes", sizes, groups),
                         _sizes(op, "head_counts", head_counts, groups), _spec(y), _threads())
    return y.view(x.shape)

"""Input checks shared by every backend: a bad call fails here, with a message naming the problem,
before any kernel launches or any pointer reaches C++."""
from __future__ import annotations

import math

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def require(condition: bool, message: str, error: type[Exception] = ValueError) -> None:
    if not condition:
        raise error(message)


# The checks below run on every op call: they test first and build a message only on failure.

def check_tensor(op: str, name: str, tensor, ndim: int | None = None, min_ndim: int | None = None) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {tensor.dtype}")
    if ndim is not None and tensor.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    if min_ndim is not None and tensor.dim() < min_ndim:
        raise ValueError(f"{op}: {name} must have at least {min_ndim} dimensions, got shape {tuple(tensor.shape)}")


def check_same_device(op: str, x: Tensor, **others: Tensor | None) -> None:
    for name, tensor in others.items():
        if tensor is not None and tensor.device != x.device:
            raise ValueError(f"{op}: {name} is on {tensor.device} but x is on {x.device}")


def check_active(op: str, what: str, active: int, maximum: int) -> None:
    # A SymInt is an active size that torch.compile traces as a symbol (elastic_ops.library).
    if not isinstance(active, (int, torch.SymInt)) or isinstance(active, bool):
        raise TypeError(f"{op}: {what} must be an int, got {active!r}")
    if not 1 <= active <= maximum:
        raise ValueError(f"{op}: {what}={active} is outside 1..{maximum} (the super weight's size)")


def check_bias(op: str, name: str, bias: Tensor | None, rows: int) -> None:
    if bias is None:
        return
    check_tensor(op, name, bias, ndim=1)
    if bias.shape[0] != rows:
        raise ValueError(f"{op}: {name} has {bias.shape[0]} entries but its weight has {rows} rows")


def check_linear(x, weight, bias, out_features: int, op: str = "elastic_linear") -> None:
    check_tensor(op, "x", x, min_ndim=1)
    check_tensor(op, "weight", weight, ndim=2)
    check_bias(op, "bias", bias, weight.shape[0])
    check_same_device(op, x, weight=weight, bias=bias)
    check_active(op, "in_features (x.shape[-1])", x.shape[-1], weight.shape[1])
    check_active(op, "out_features", out_features, weight.shape[0])


def check_eps(op: str, eps) -> None:
    """LayerNorm's ``eps`` divides by ``sqrt(var + eps)``: it must be a finite number > 0 (NaN would pass ``eps > 0``'s
    negation)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise ValueError(f"{op}: eps must be a finite number > 0, got {eps!r}")


def check_layer_norm(x, weight, bias, op: str = "elastic_layer_norm") -> None:
    check_tensor(op, "x", x, min_ndim=1)
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None:
            check_tensor(op, name, param, ndim=1)
            check_active(op, "x.shape[-1] against " + name, x.shape[-1], param.shape[0])
    check_same_device(op, x, weight=weight, bias=bias)


def check_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden_features: int, op: str = "elastic_mlp") -> None:
    check_tensor(op, "x", x, min_ndim=1)
    check_tensor(op, "fc1_weight", fc1_weight, ndim=2)
    check_tensor(op, "fc2_weight", fc2_weight, ndim=2)
    check_bias(op, "fc1_bias", fc1_bias, fc1_weight.shape[0])
    check_bias(op, "fc2_bias", fc2_bias, fc2_weight.shape[0])
    check_same_device(op, x, fc1_weight=fc1_weight, fc1_bias=fc1_bias, fc2_weight=fc2_weight, fc2_bias=fc2_bias)
    check_active(op, "hidden_features", hidden_features, min(fc1_weight.shape[0], fc2_weight.shape[1]))
    check_active(op, "embed dim (x.shape[-1])", x.shape[-1], min(fc1_weight.shape[1], fc2_weight.shape[0]))


def check_attention(x, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads: int, head_dim: int,
                    op: str = "elastic_attention") -> None:
    check_tensor(op, "x", x, ndim=3)
    check_tensor(op, "qkv_weight", qkv_weight, ndim=2)
    check_tensor(op, "proj_weight", proj_weight, ndim=2)
    if not isinstance(head_dim, int) or head_dim <= 0:
        raise ValueError(f"{op}: head_dim must be a positive int, got {head_dim!r}")
    if qkv_weight.shape[0] % (3 * head_dim):
        raise ValueError(f"{op}: qkv_weight has {qkv_weight.shape[0]} rows, not a multiple of 3 * head_dim = "
                         f"{3 * head_dim} (expected the block layout [3 * H_max * head_dim, E_max])")
    max_heads = qkv_weight.shape[0] // (3 * head_dim)
    check_bias(op, "qkv_bias", qkv_bias, qkv_weight.shape[0])
    check_bias(op, "proj_bias", proj_bias, proj_weight.shape[0])
    check_same_device(op, x, qkv_weight=qkv_weight, qkv_bias=qkv_bias, proj_weight=proj_weight, proj_bias=proj_bias)
    check_active(op, "num_heads", num_heads, max_heads)
    if proj_weight.shape[1] < num_heads * head_dim:
        raise ValueError(f"{op}: proj_weight has {proj_weight.shape[1]} input columns, "
                         f"fewer than num_heads * head_dim = {num_heads * head_dim}")
    check_active(op, "embed dim (x.shape[-1])", x.shape[-1], min(qkv_weight.shape[1], proj_weight.shape[0]))


# --- K subnets in one call: a stack [K, ..., width] and a GroupSizes per elastic dimension ------------------

def check_group(op: str, x: Tensor, sizes, what: str) -> None:
    """``sizes`` is a size table with one entry per subnet of ``x [K, ...]``, on x's device."""
    require(all(hasattr(sizes, a) for a in ("values", "width", "table", "uniform")),
            f"{op}: {what} must be a GroupSizes (values, width, table, uniform), got {type(sizes).__name__}", TypeError)
    require(len(sizes.values) == x.shape[0],
            f"{op}: {what} has {len(sizes.values)} subnets but x stacks {x.shape[0]} (shape {tuple(x.shape)})")
    require(sizes.table.dtype == torch.int32 and sizes.table.device == x.device,
            f"{op}: {what}.table must be int32 on {x.device}, got {sizes.table.dtype} on {sizes.table.device}")


def check_block(op: str, name: str, weight: Tensor, rows: int, cols: int, x: Tensor) -> None:
    """``weight`` holds an active block ``[rows, cols]``."""
    check_tensor(op, name, weight, ndim=2)
    check_same_device(op, x, **{name: weight})
    require(weight.shape[0] >= rows and weight.shape[1] >= cols,
            f"{op}: {name} of shape {tuple(weight.shape)} is smaller than the active block [{rows}, {cols}]")


def check_stack(op: str, x: Tensor, sizes, what: str, ndim: int | None = None) -> None:
    """x is a ``[K, ..., sizes.width]`` stack of activations."""
    check_tensor(op, "x", x, ndim=ndim, min_ndim=None if ndim is not None else 2)
    check_group(op, x, sizes, what)
    require(x.shape[-1] == sizes.width,
            f"{op}: x has {x.shape[-1]} channels but the widest subnet of {what} has {sizes.width}")


def check_grouped_linear(x, weight, bias, out_sizes, activation, op: str = "grouped_linear") -> None:
    check_tensor(op, "x", x, min_ndim=2)
    check_group(op, x, out_sizes, "out_sizes")
    check_block(op, "weight", weight, out_sizes.width, x.shape[-1], x)
    check_bias(op, "bias", bias, weight.shape[0])
    check_same_device(op, x, bias=bias)
    require(activation in (None, "gelu"), f"{op}: activation must be None or 'gelu', got {activation!r}")


def check_grouped_layer_norm(x, sizes, weight, bias, op: str = "grouped_layer_norm") -> None:
    check_stack(op, x, sizes, "sizes")
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None:
            check_tensor(op, name, param, ndim=1)
            check_same_device(op, x, **{name: param})
            require(param.shape[0] >= sizes.width,
                    f"{op}: {name} has {param.shape[0]} entries, fewer than the widest subnet's {sizes.width} channels")


def check_grouped_mlp(x, sizes, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden_sizes,
                      op: str = "grouped_mlp") -> None:
    check_stack(op, x, sizes, "sizes")
    check_group(op, x, hidden_sizes, "hidden_sizes")
    check_block(op, "fc1_weight", fc1_weight, hidden_sizes.width, sizes.width, x)
    check_block(op, "fc2_weight", fc2_weight, sizes.width, hidden_sizes.width, x)
    check_bias(op, "fc1_bias", fc1_bias, fc1_weight.shape[0])
    check_bias(op, "fc2_bias", fc2_bias, fc2_weight.shape[0])
    check_same_device(op, x, fc1_bias=fc1_bias, fc2_bias=fc2_bias)


def check_grouped_attention(x, sizes, qkv_weight, qkv_bias, proj_weight, proj_bias, head_counts, head_dim: int,
                            op: str = "grouped_attention") -> None:
    check_stack(op, x, sizes, "sizes", ndim=4)
    check_group(op, x, head_counts, "head_counts")
    require(isinstance(head_dim, int) and head_dim > 0, f"{op}: head_dim must be a positive int, got {head_dim!r}")
    check_tensor(op, "qkv_weight", qkv_weight, ndim=2)
    require(qkv_weight.shape[0] % (3 * head_dim) == 0,
            f"{op}: qkv_weight has {qkv_weight.shape[0]} rows, not a multiple of 3 * head_dim = {3 * head_dim} "
            "(expected the block layout [3 * H_max * head_dim, E_max])")
    max_width = qkv_weight.shape[0] // 3
    width = head_counts.width * head_dim
    check_block(op, "qkv_weight", qkv_weight, width, sizes.width, x)
    require(width <= max_width,
            f"{op}: the widest subnet has {head_counts.width} heads but qkv_weight holds {max_width // head_dim}")
    check_block(op, "proj_weight", proj_weight, sizes.width, width, x)
    check_bias(op, "qkv_bias", qkv_bias, qkv_weight.shape[0])
    check_bias(op, "proj_bias", proj_bias, proj_weight.shape[0])
    check_same_device(op, x, qkv_bias=qkv_bias, proj_bias=proj_bias)

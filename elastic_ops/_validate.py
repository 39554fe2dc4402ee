"""Input checks shared by every backend: a bad call fails here, with a message naming the problem,
before any kernel launches or any pointer reaches C++."""
from __future__ import annotations

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
    if not isinstance(active, int) or isinstance(active, bool):
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

"""The elastic ops: validate (``_validate``, every op in this one place), choose a backend (``_backend.select``), run.

Every backend implements an op with the same signature; the Triton and native implementations are
imported only when first chosen, so that importing the package never needs triton or a GPU.
Under ``torch.compile`` the backend is chosen once per kind of call while dynamo traces, outside the graph, and the
op runs through its custom op (``elastic_ops.library``).
"""
from __future__ import annotations

import importlib
from collections.abc import Callable

import torch
from torch import Tensor

from . import _validate
from ._backend import select, triton_head_dim_problem
from .group_sizes import GroupSizes

# op -> backend -> "module:function" of its implementation
IMPLEMENTATIONS: dict[str, dict[str, str]] = {
    "linear": {
        "triton": "elastic_ops.ops.linear:elastic_linear",
        "native": "elastic_ops._native:linear",
        "reference": "elastic_ops.reference:linear",
    },
    "layer_norm": {
        "triton": "elastic_ops.ops.layernorm:elastic_layer_norm",
        "native": "elastic_ops._native:layer_norm",
        "reference": "elastic_ops.reference:layer_norm",
    },
    "mlp": {
        "triton": "elastic_ops.ops.mlp:elastic_mlp",
        "native": "elastic_ops._native:mlp",
        "reference": "elastic_ops.reference:mlp",
    },
    "attention": {
        "triton": "elastic_ops.ops.attention:elastic_attention",
        "native": "elastic_ops._native:attention",
        "reference": "elastic_ops.reference:attention",
    },
}
# K subnets in one call (forward-only kernels; the reference also has a backward).
IMPLEMENTATIONS.update({
    f"grouped_{op}": {
        "triton": f"elastic_ops.ops.grouped:grouped_{op}",
        "native": f"elastic_ops._native:{op}_grouped",
        "reference": f"elastic_ops.reference:grouped_{op}",
    }
    for op in ("linear", "layer_norm", "mlp", "attention")
})


_loaded: dict[tuple[str, str], Callable] = {}


def implementation(op: str, backend: str) -> Callable:
    """The function of ``op`` in ``backend``, imported on its first use and kept."""
    function = _loaded.get((op, backend))
    if function is None:
        module, name = IMPLEMENTATIONS[op][backend].split(":")
        function = _loaded[op, backend] = getattr(importlib.import_module(module), name)
    return function


def _run(op: str, tensors: tuple[Tensor | None, ...], *args, triton_backward: bool = True,
         triton_shape_problem: str | None = None):
    x = tensors[0]
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if torch.compiler.is_compiling():
        from . import library  # imports torch._dynamo: only once something compiles

        backend = library.traced_choice(op, x.device, x.dtype, needs_grad, triton_backward, triton_shape_problem)
        # The grouped ops' custom ops are forward-only: a gradient through them (the reference) is traced inline.
        if not needs_grad or triton_backward:
            return library.call(op, backend, needs_grad, *args)
        return implementation(op, backend)(*args)
    return implementation(op, select(op, x.device, x.dtype, needs_grad, triton_backward, triton_shape_problem))(*args)


def elastic_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, out_features: int | None = None,
                   activation: str | None = None) -> Tensor:
    """``act(x @ weight[:out_features, :x.shape[-1]].T + bias[:out_features])`` on the super weight in place.

    activation: None or ``"gelu"`` (exact, erf). ``out_features`` defaults to all rows of ``weight``.
    """
    out_features = weight.shape[0] if out_features is None else out_features
    _validate.check_linear(x, weight, bias, out_features)
    if activation not in (None, "gelu"):
        raise ValueError(f"elastic_linear: activation must be None or 'gelu', got {activation!r}")
    return _run("linear", (x, weight, bias), x, weight, bias, out_features, activation)


def elastic_layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    """LayerNorm over the active ``d = x.shape[-1]`` channels with ``weight[:d]``, ``bias[:d]``."""
    _validate.check_layer_norm(x, weight, bias)
    _validate.check_eps("elastic_layer_norm", eps)
    return _run("layer_norm", (x, weight, bias), x, weight, bias, eps)


def elastic_mlp(x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor, fc2_bias: Tensor | None,
                hidden_features: int) -> Tensor:
    """``fc2(gelu(fc1(x)))`` with ``W1[:hidden, :e]``, ``W2[:e, :hidden]`` and ``e = x.shape[-1]``."""
    _validate.check_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden_features)
    tensors = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    return _run("mlp", tensors, *tensors, hidden_features)


def elastic_attention(x: Tensor, qkv_weight: Tensor, qkv_bias: Tensor | None, proj_weight: Tensor,
                      proj_bias: Tensor | None, num_heads: int, head_dim: int = 64) -> Tensor:
    """Self-attention of ``x: [B, N, e]`` with ``num_heads`` active heads (block qkv layout), then
    ``W_o[:e, :h*Dh]``."""
    _validate.check_attention(x, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads, head_dim)
    tensors = (x, qkv_weight, qkv_bias, proj_weight, proj_bias)
    if x.shape[0] == 0:  # nothing to attend over, on any backend: the reference's empty result (and gradients)
        return implementation("attention", "reference")(*tensors, num_heads, head_dim)
    return _run("attention", tensors, *tensors, num_heads, head_dim,
                triton_shape_problem=triton_head_dim_problem(head_dim))


# --- K subnets in one call: activations [K, ..., E] whose padding past each subnet's size is zero ---------
# See elastic_ops.reference for what each computes.

def grouped_linear(x: Tensor, weight: Tensor, bias: Tensor | None, out_sizes: GroupSizes,
                   activation: str | None = None) -> Tensor:
    """``act(x[k] @ weight[:out_k, :in].T + bias[:out_k])`` for each subnet k, zero past ``out_k``."""
    _validate.check_grouped_linear(x, weight, bias, out_sizes, activation)
    return _run("grouped_linear", (x, weight, bias), x, weight, bias, out_sizes, activation, triton_backward=False)


def grouped_layer_norm(x: Tensor, sizes: GroupSizes, weight: Tensor | None, bias: Tensor | None,
                       eps: float = 1e-5) -> Tensor:
    """LayerNorm of each subnet over its own active channels; padding stays zero."""
    _validate.check_grouped_layer_norm(x, sizes, weight, bias)
    _validate.check_eps("grouped_layer_norm", eps)
    return _run("grouped_layer_norm", (x, weight, bias), x, sizes, weight, bias, eps, triton_backward=False)


def grouped_mlp(x: Tensor, sizes: GroupSizes, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor,
                fc2_bias: Tensor | None, hidden_sizes: GroupSizes) -> Tensor:
    """``fc2(gelu(fc1(x)))`` of each subnet with ``W1[:hidden_k, :e_k]``, ``W2[:e_k, :hidden_k]``."""
    _validate.check_grouped_mlp(x, sizes, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden_sizes)
    tensors = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    return _run("grouped_mlp", tensors, x, sizes, *tensors[1:], hidden_sizes, triton_backward=False)


def grouped_attention(x: Tensor, sizes: GroupSizes, qkv_weight: Tensor, qkv_bias: Tensor | None, proj_weight: Tensor,
                      proj_bias: Tensor | None, head_counts: GroupSizes, head_dim: int = 64) -> Tensor:
    """Self-attention of each subnet ``x[k]: [B, N, e_k]`` with its ``h_k`` heads, then ``W_o[:e_k, :h_k*Dh]``."""
    _validate.check_grouped_attention(x, sizes, qkv_weight, qkv_bias, proj_weight, proj_bias, head_counts, head_dim)
    tensors = (x, qkv_weight, qkv_bias, proj_weight, proj_bias)
    return _run("grouped_attention", tensors, x, sizes, *tensors[1:], head_counts, head_dim, triton_backward=False,
                triton_shape_problem=triton_head_dim_problem(head_dim))

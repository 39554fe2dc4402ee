"""The elastic ops: validate (``_validate``, every op in this one place), choose a backend (``_backend.select``), run.
The single-subnet ops validate and choose once per call signature (below): a repeated call is one dictionary lookup.

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
from ._backend import forced_setting, select, triton_head_dim_problem
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


# --- the single-subnet ops: checked once per signature ------------------------------------------------------
# What the checks and the backend choice read of a call is its signature: each tensor's type, dtype, device, layout
# and shape, the active sizes and options, whether a gradient will be needed and the forced backend. A call whose
# signature has passed the checks before passes them again and takes the same backend, so the first call of a
# signature checks, chooses, runs and stores what ran it (its plan); the next calls build the signature (a tuple of
# attributes the tensors already hold) and make one dictionary lookup before the kernel. DESIGN.md section 4.

_plans: dict[tuple, Callable] = {}
_MAX_PLANS = 4096  # distinct signatures kept; a process that makes more (e.g. every batch size) starts over


def _meta(t: Tensor | None) -> tuple | None:
    """A tensor argument's part of a signature (an exception for what is not a tensor: the full checks report it)."""
    return None if t is None else (type(t), t.dtype, t.device, t.layout, t.shape)


def _needs_grad(*tensors: Tensor | None) -> bool:
    if torch.is_grad_enabled():
        for t in tensors:
            if t is not None and t.requires_grad:
                return True
    return False


def _first_call(key: tuple | None, op: str, tensor_count: int, *args, triton_shape_problem: str | None = None):
    """A call of a signature not seen before, its checks passed: choose the backend, run its implementation and,
    once that succeeded, store the plan under ``key`` (None: a signature that could not be built). The native
    kernels check the tensors' dtype, device, layout and autograd state themselves, all part of the signature: the
    stored plan is their entry without those checks, and this first call goes through the checked one."""
    x = args[0]
    needs_grad = _needs_grad(*args[:tensor_count])
    function = implementation(op, select(op, x.device, x.dtype, needs_grad, True, triton_shape_problem))
    result = function(*args)
    if key is not None:
        if len(_plans) >= _MAX_PLANS:
            _plans.clear()
        _plans[key] = getattr(function, "signature_checked", function)
    return result


def elastic_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, out_features: int | None = None,
                   activation: str | None = None) -> Tensor:
    """``act(x @ weight[:out_features, :x.shape[-1]].T + bias[:out_features])`` on the super weight in place.

    activation: None or ``"gelu"`` (exact, erf). ``out_features`` defaults to all rows of ``weight``.
    """
    out_features = weight.shape[0] if out_features is None else out_features
    if torch.compiler.is_compiling():
        _check_linear(x, weight, bias, out_features, activation)
        return _run("linear", (x, weight, bias), x, weight, bias, out_features, activation)
    try:
        needs_grad = _needs_grad(x, weight, bias)
        key = ("linear", _meta(x), _meta(weight), _meta(bias), out_features, type(out_features), activation,
               needs_grad, forced_setting())
        run = _plans.get(key)
    except (AttributeError, TypeError):  # not a tensor, or an unhashable size: the checks below say which
        key = run = None
    if run is not None:
        return run(x, weight, bias, out_features, activation)
    _check_linear(x, weight, bias, out_features, activation)
    return _first_call(key, "linear", 3, x, weight, bias, out_features, activation)


def _check_linear(x, weight, bias, out_features, activation) -> None:
    _validate.check_linear(x, weight, bias, out_features)
    if activation not in (None, "gelu"):
        raise ValueError(f"elastic_linear: activation must be None or 'gelu', got {activation!r}")


def elastic_layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float = 1e-5) -> Tensor:
    """LayerNorm over the active ``d = x.shape[-1]`` channels with ``weight[:d]``, ``bias[:d]``."""
    if torch.compiler.is_compiling():
        _validate.check_eps("elastic_layer_norm", eps)
        _validate.check_layer_norm(x, weight, bias)
        return _run("layer_norm", (x, weight, bias), x, weight, bias, eps)
    try:
        needs_grad = _needs_grad(x, weight, bias)
        # eps is part of the signature (a model uses one or two): a plan is stored only once its eps passed the check.
        key = ("layer_norm", _meta(x), _meta(weight), _meta(bias), eps, type(eps), needs_grad, forced_setting())
        run = _plans.get(key)
    except (AttributeError, TypeError):
        key = run = None
    if run is not None:
        return run(x, weight, bias, eps)
    _validate.check_eps("elastic_layer_norm", eps)
    _validate.check_layer_norm(x, weight, bias)
    return _first_call(key, "layer_norm", 3, x, weight, bias, eps)


def elastic_mlp(x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor, fc2_bias: Tensor | None,
                hidden_features: int) -> Tensor:
    """``fc2(gelu(fc1(x)))`` with ``W1[:hidden, :e]``, ``W2[:e, :hidden]`` and ``e = x.shape[-1]``."""
    tensors = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    if torch.compiler.is_compiling():
        _validate.check_mlp(*tensors, hidden_features)
        return _run("mlp", tensors, *tensors, hidden_features)
    try:
        needs_grad = _needs_grad(*tensors)
        key = ("mlp", _meta(x), _meta(fc1_weight), _meta(fc1_bias), _meta(fc2_weight), _meta(fc2_bias),
               hidden_features, type(hidden_features), needs_grad, forced_setting())
        run = _plans.get(key)
    except (AttributeError, TypeError):
        key = run = None
    if run is not None:
        return run(*tensors, hidden_features)
    _validate.check_mlp(*tensors, hidden_features)
    return _first_call(key, "mlp", 5, *tensors, hidden_features)


def elastic_attention(x: Tensor, qkv_weight: Tensor, qkv_bias: Tensor | None, proj_weight: Tensor,
                      proj_bias: Tensor | None, num_heads: int, head_dim: int = 64) -> Tensor:
    """Self-attention of ``x: [B, N, e]`` with ``num_heads`` active heads (block qkv layout), then
    ``W_o[:e, :h*Dh]``."""
    tensors = (x, qkv_weight, qkv_bias, proj_weight, proj_bias)
    if torch.compiler.is_compiling():
        _validate.check_attention(*tensors, num_heads, head_dim)
        return _run("attention", tensors, *tensors, num_heads, head_dim,
                    triton_shape_problem=triton_head_dim_problem(head_dim))
    try:
        needs_grad = _needs_grad(*tensors)
        key = ("attention", _meta(x), _meta(qkv_weight), _meta(qkv_bias), _meta(proj_weight), _meta(proj_bias),
               num_heads, type(num_heads), head_dim, type(head_dim), needs_grad, forced_setting())
        run = _plans.get(key)
    except (AttributeError, TypeError):
        key = run = None
    if run is not None:
        return run(*tensors, num_heads, head_dim)
    _validate.check_attention(*tensors, num_heads, head_dim)
    if x.shape[0] == 0:  # nothing to attend over, on any backend: the reference's empty result (and gradients)
        return implementation("attention", "reference")(*tensors, num_heads, head_dim)
    return _first_call(key, "attention", 5, *tensors, num_heads, head_dim,
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

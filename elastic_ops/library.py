"""The elastic ops as PyTorch custom ops (``torch.library``), which is how they run under ``torch.compile``.

Eager calls go straight to the backends (``elastic_ops.functional``): a custom op's dispatch costs host time per call
that eager code need not pay. While dynamo traces, ``functional`` picks the backend once per kind of call, outside
the graph, and calls the op's custom op below with that backend: the GPU path (``"triton"``: Triton kernels and
cuBLAS; the interpreter on CPU tensors), the native kernels (``"native"``, CPU inference) or the PyTorch reference.
Each op is opaque to the compiler, with a fake implementation for shapes. The reference goes through its custom op
too: traced inline, every weight slice would make the compiler specialise on whether the slice is the whole weight
(a contiguity check), one graph per combination of full and partial sizes.

The single-subnet ops return their residuals (what the backward needs) as extra outputs, and ``register_autograd``
pairs each with a backward op (the reference's, which also serves the forward-only native kernels, recomputes its
forward under autograd: it is the fallback, not the fast path). On this path weight gradients are returned through
autograd, full size and zero outside the active slice (``weight_grads_in_place(False)``): a compiled graph owns its
outputs, and the copy is one weight-sized add per step beside activation-sized work.

The GPU path is registered with ``torch.library.custom_op``, not ``triton_op``: its launches take host-side tensor
descriptors and interleave cuBLAS calls, and an opaque op keeps exactly the launches eager mode makes.

Active sizes are ``SymInt``: a region compiled with dynamic sizes sees them as symbols, so a new subnet does not
recompile it (``VisionTransformerSupernet.compile``). Size tables of the grouped ops travel as the device table and
the host list of sizes.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._backend import select
from ._weight_grads import weight_grads_in_place
from .group_sizes import GroupSizes


def _none(t: Tensor | None, like: Tensor) -> Tensor:
    """A custom op's output cannot be None: an empty tensor stands for it."""
    return like.new_empty(0) if t is None else t


def _given(t: Tensor) -> Tensor | None:
    return t if t.numel() else None


def _implementation(op: str, backend: str) -> Callable:
    from .functional import implementation  # functional imports this module for the compiled path

    return implementation(op, backend)


def _grads(grads: Sequence[Tensor | None], inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """A backward op's outputs: each input's gradient, or the empty stand-in made from that input (from x if None)."""
    return tuple(_none(g, t if t is not None else inputs[0]) for g, t in zip(grads, inputs))


def _fake_grads(needs: Sequence[bool], inputs: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
    """What :func:`_grads` returns, as shapes: each needed gradient like its input, the rest empty."""
    return _grads([torch.empty_like(t) if n and t is not None else None for n, t in zip(needs, inputs)], inputs)


def _reference_backward(op: str, grad: Tensor, tensors: Sequence[Tensor | None], args: Sequence,
                        needs: Sequence[bool]) -> tuple[Tensor | None, ...]:
    """Gradients of the reference ``op`` on ``tensors`` (then ``args``) for ``needs``: its forward again, under
    autograd. A custom op runs below autograd (its dispatch keys excluded), so they are let back in for this
    (``torch.func.vjp`` would do it too, but its wrapped tensors fail opcheck's schema test)."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.ADInplaceOrView):
        exclude = exclude.remove(key)
    leaves = [None if t is None else t.detach().requires_grad_(bool(n)) for t, n in zip(tensors, needs)]
    wanted = [leaf for leaf in leaves if leaf is not None and leaf.requires_grad]
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        found = iter(torch.autograd.grad(_implementation(op, "reference")(*leaves, *args), wanted, grad))
    return tuple(next(found) if leaf is not None and leaf.requires_grad else None for leaf in leaves)


def _lse_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------- linear

@torch.library.custom_op("elastic_ops::linear", mutates_args=())
def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, out_features: int, activation: str | None, backend: str,
            keep_residuals: bool) -> tuple[Tensor, Tensor]:
    if backend != "triton":
        return _implementation("linear", backend)(x, weight, bias, out_features, activation), x.new_empty(0)
    from .ops.linear import linear_forward

    y, pre = linear_forward(x, weight, bias, out_features, activation, keep_residuals)
    return y, _none(pre, x)


@_linear.register_fake
def _(x, weight, bias, out_features, activation, backend, keep_residuals):
    y = x.new_empty(*x.shape[:-1], out_features)
    kept = backend == "triton" and keep_residuals and activation == "gelu"
    return y, (x.new_empty(x.numel() // x.shape[-1], out_features) if kept else x.new_empty(0))


@torch.library.custom_op("elastic_ops::linear_backward", mutates_args=())
def _linear_backward(dy: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, pre: Tensor, out_features: int,
                     activation: str | None, backend: str, needs: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    if backend != "triton":  # the native kernels are forward-only; the reference's autograd serves them
        grads = _reference_backward("linear", dy, (x, weight, bias), (out_features, activation), needs)
    else:
        from .ops.linear import linear_backward

        with weight_grads_in_place(False):
            grads = linear_backward(dy, x, weight, bias, _given(pre), tuple(needs))
    return _grads(grads, (x, weight, bias))


@_linear_backward.register_fake
def _(dy, x, weight, bias, pre, out_features, activation, backend, needs):
    return _fake_grads(needs, (x, weight, bias))


def _linear_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3], output[1])
    ctx.args = inputs[3:6]  # out_features, activation, backend


def _linear_grad(ctx, dy, _):
    needs = list(ctx.needs_input_grad[:3])
    grads = torch.ops.elastic_ops.linear_backward(dy, *ctx.saved_tensors, *ctx.args, needs)
    return *(g if n else None for g, n in zip(grads, needs)), None, None, None, None


torch.library.register_autograd("elastic_ops::linear", _linear_grad, setup_context=_linear_setup)


# ---------------------------------------------------------------------------------------------- layer norm

@torch.library.custom_op("elastic_ops::layer_norm", mutates_args=())
def _layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, backend: str,
                keep_residuals: bool) -> tuple[Tensor, Tensor, Tensor]:
    if backend != "triton":
        y, mean, rstd = _implementation("layer_norm", backend)(x, weight, bias, eps), None, None
    else:
        from .ops.layernorm import layer_norm_forward

        y, mean, rstd = layer_norm_forward(x, weight, bias, eps, keep_residuals)
    if mean is None:
        mean = x.new_empty(0, dtype=_lse_dtype(x))
        rstd = torch.empty_like(mean)
    return y, mean, rstd


@_layer_norm.register_fake
def _(x, weight, bias, eps, backend, keep_residuals):
    rows = x.numel() // x.shape[-1] if backend == "triton" and keep_residuals else 0
    stats = x.new_empty(rows, dtype=_lse_dtype(x))
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("elastic_ops::layer_norm_backward", mutates_args=())
def _layer_norm_backward(dy: Tensor, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor,
                         rstd: Tensor, eps: float, backend: str, needs: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    if backend != "triton":  # the native kernels are forward-only; the reference's autograd serves them
        grads = _reference_backward("layer_norm", dy, (x, weight, bias), (eps,), needs)
    else:
        from .ops.layernorm import layer_norm_backward

        with weight_grads_in_place(False):
            grads = layer_norm_backward(dy, x, weight, bias, mean, rstd, tuple(needs))
    return _grads(grads, (x, weight, bias))


@_layer_norm_backward.register_fake
def _(dy, x, weight, bias, mean, rstd, eps, backend, needs):
    return _fake_grads(needs, (x, weight, bias))


def _layer_norm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3], output[1], output[2])
    ctx.args = inputs[3:5]  # eps, backend


def _layer_norm_grad(ctx, dy, *_):
    needs = list(ctx.needs_input_grad[:3])
    grads = torch.ops.elastic_ops.layer_norm_backward(dy, *ctx.saved_tensors, *ctx.args, needs)
    return *(g if n else None for g, n in zip(grads, needs)), None, None, None


torch.library.register_autograd("elastic_ops::layer_norm", _layer_norm_grad, setup_context=_layer_norm_setup)


# ---------------------------------------------------------------------------------------------- MLP

@torch.library.custom_op("elastic_ops::mlp", mutates_args=())
def _mlp(x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor, fc2_bias: Tensor | None,
         hidden_features: int, backend: str, keep_residuals: bool) -> tuple[Tensor, Tensor]:
    params = (fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    if backend != "triton":
        return _implementation("mlp", backend)(x, *params, hidden_features), x.new_empty(0)
    from .ops.mlp import mlp_forward

    y, pre = mlp_forward(x, *params, hidden_features, keep_residuals)
    return y, _none(pre, x)


@_mlp.register_fake
def _(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden_features, backend, keep_residuals):
    kept = backend == "triton" and keep_residuals
    return torch.empty_like(x), (x.new_empty(x.numel() // x.shape[-1], hidden_features) if kept else x.new_empty(0))


@torch.library.custom_op("elastic_ops::mlp_backward", mutates_args=())
def _mlp_backward(dy: Tensor, x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor,
                  fc2_bias: Tensor | None, pre: Tensor, hidden_features: int, backend: str,
                  needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    inputs = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    if backend != "triton":  # the native kernels are forward-only; the reference's autograd serves them
        grads = _reference_backward("mlp", dy, inputs, (hidden_features,), needs)
    else:
        from .ops.mlp import mlp_backward

        with weight_grads_in_place(False):
            grads = mlp_backward(dy, *inputs, pre, tuple(needs))
    return _grads(grads, inputs)


@_mlp_backward.register_fake
def _(dy, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pre, hidden_features, backend, needs):
    return _fake_grads(needs, (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias))


def _mlp_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5], output[1])
    ctx.args = inputs[5:7]  # hidden_features, backend


def _mlp_grad(ctx, dy, _):
    needs = list(ctx.needs_input_grad[:5])
    grads = torch.ops.elastic_ops.mlp_backward(dy, *ctx.saved_tensors, *ctx.args, needs)
    return *(g if n else None for g, n in zip(grads, needs)), None, None, None


torch.library.register_autograd("elastic_ops::mlp", _mlp_grad, setup_context=_mlp_setup)


# ---------------------------------------------------------------------------------------------- attention

@torch.library.custom_op("elastic_ops::attention", mutates_args=())
def _attention(x: Tensor, qkv_weight: Tensor, qkv_bias: Tensor | None, proj_weight: Tensor, proj_bias: Tensor | None,
               num_heads: int, head_dim: int, backend: str,
               keep_residuals: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    params = (qkv_weight, qkv_bias, proj_weight, proj_bias)
    if backend != "triton":
        out = _implementation("attention", backend)(x, *params, num_heads, head_dim)
        return out, x.new_empty(0), x.new_empty(0), x.new_empty(0, dtype=_lse_dtype(x))
    from .ops.attention import self_attention_forward

    out, residuals = self_attention_forward(x, *params, num_heads, head_dim, keep_residuals)
    if residuals is None:
        return out, x.new_empty(0), x.new_empty(0), x.new_empty(0, dtype=_lse_dtype(x))
    return (out, *residuals)


@_attention.register_fake
def _(x, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads, head_dim, backend, keep_residuals):
    out = torch.empty_like(x)
    if backend != "triton" or not keep_residuals:
        return out, x.new_empty(0), x.new_empty(0), x.new_empty(0, dtype=_lse_dtype(x))
    batch, tokens, _ = x.shape
    width = num_heads * head_dim
    return (out, x.new_empty(3, batch * tokens, width), x.new_empty(batch * tokens, width),
            x.new_empty(batch * num_heads, tokens, dtype=_lse_dtype(x)))


@torch.library.custom_op("elastic_ops::attention_backward", mutates_args=())
def _attention_backward(d_out: Tensor, x: Tensor, qkv_weight: Tensor, qkv_bias: Tensor | None, proj_weight: Tensor,
                        proj_bias: Tensor | None, qkv: Tensor, context: Tensor, lse: Tensor, num_heads: int,
                        head_dim: int, backend: str,
                        needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    inputs = (x, qkv_weight, qkv_bias, proj_weight, proj_bias)
    if backend != "triton":  # the native kernels are forward-only; the reference's autograd serves them
        grads = _reference_backward("attention", d_out, inputs, (num_heads, head_dim), needs)
    else:
        from .ops.attention import self_attention_backward

        with weight_grads_in_place(False):
            grads = self_attention_backward(d_out, *inputs, qkv, context, lse, num_heads, head_dim, tuple(needs))
    return _grads(grads, inputs)


@_attention_backward.register_fake
def _(d_out, x, qkv_weight, qkv_bias, proj_weight, proj_bias, qkv, context, lse, num_heads, head_dim, backend, needs):
    return _fake_grads(needs, (x, qkv_weight, qkv_bias, proj_weight, proj_bias))


def _attention_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5], *output[1:])
    ctx.args = inputs[5:8]  # num_heads, head_dim, backend


def _attention_grad(ctx, d_out, *_):
    needs = list(ctx.needs_input_grad[:5])
    grads = torch.ops.elastic_ops.attention_backward(d_out, *ctx.saved_tensors, *ctx.args, needs)
    return *(g if n else None for g, n in zip(grads, needs)), None, None, None, None


torch.library.register_autograd("elastic_ops::attention", _attention_grad, setup_context=_attention_setup)


# ---------------------------------------------------------------------------------------------- grouped (forward)

def _sizes(table: Tensor, values: list[int]) -> GroupSizes:
    return GroupSizes.with_table(values, table)


@torch.library.custom_op("elastic_ops::grouped_linear", mutates_args=())
def _grouped_linear(x: Tensor, weight: Tensor, bias: Tensor | None, out_table: Tensor, out_sizes: list[int],
                    activation: str | None, backend: str) -> Tensor:
    return _implementation("grouped_linear", backend)(x, weight, bias, _sizes(out_table, out_sizes), activation)


@_grouped_linear.register_fake
def _(x, weight, bias, out_table, out_sizes, activation, backend):
    return x.new_empty(*x.shape[:-1], max(out_sizes))


@torch.library.custom_op("elastic_ops::grouped_layer_norm", mutates_args=())
def _grouped_layer_norm(x: Tensor, table: Tensor, sizes: list[int], weight: Tensor | None, bias: Tensor | None,
                        eps: float, backend: str) -> Tensor:
    return _implementation("grouped_layer_norm", backend)(x, _sizes(table, sizes), weight, bias, eps)


@_grouped_layer_norm.register_fake
def _(x, table, sizes, weight, bias, eps, backend):
    return torch.empty_like(x)


@torch.library.custom_op("elastic_ops::grouped_mlp", mutates_args=())
def _grouped_mlp(x: Tensor, table: Tensor, sizes: list[int], fc1_weight: Tensor, fc1_bias: Tensor | None,
                 fc2_weight: Tensor, fc2_bias: Tensor | None, hidden_table: Tensor, hidden_sizes: list[int],
                 backend: str) -> Tensor:
    return _implementation("grouped_mlp", backend)(x, _sizes(table, sizes), fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                                   _sizes(hidden_table, hidden_sizes))


@_grouped_mlp.register_fake
def _(x, table, sizes, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden_table, hidden_sizes, backend):
    return torch.empty_like(x)


@torch.library.custom_op("elastic_ops::grouped_attention", mutates_args=())
def _grouped_attention(x: Tensor, table: Tensor, sizes: list[int], qkv_weight: Tensor, qkv_bias: Tensor | None,
                       proj_weight: Tensor, proj_bias: Tensor | None, heads_table: Tensor, heads: list[int],
                       head_dim: int, backend: str) -> Tensor:
    return _implementation("grouped_attention", backend)(x, _sizes(table, sizes), qkv_weight, qkv_bias, proj_weight,
                                                         proj_bias, _sizes(heads_table, heads), head_dim)


@_grouped_attention.register_fake
def _(x, table, sizes, qkv_weight, qkv_bias, proj_weight, proj_bias, heads_table, heads, head_dim, backend):
    return torch.empty_like(x)


# ---------------------------------------------------------------------------------------------- calls

@torch.compiler.assume_constant_result
def traced_choice(op: str, device: torch.device, dtype: torch.dtype, needs_grad: bool, triton_backward: bool,
                  triton_shape_problem: str | None = None) -> str:
    """``_backend.select`` run while dynamo traces, as Python (not traced: it reads the forced backend from a context
    variable), its answer a constant of the graph. A compiled graph keeps the backend it was traced with."""
    return select(op, device, dtype, needs_grad, triton_backward, triton_shape_problem)


def call(op: str, backend: str, backward_follows: bool, *args):
    """``op`` of ``elastic_ops.functional`` (its arguments as there) through its custom op on ``backend``."""
    ops = torch.ops.elastic_ops
    if op == "linear":
        return ops.linear(*args, backend, backward_follows)[0]
    if op == "layer_norm":
        return ops.layer_norm(*args, backend, backward_follows)[0]
    if op == "mlp":
        return ops.mlp(*args, backend, backward_follows)[0]
    if op == "attention":
        return ops.attention(*args, backend, backward_follows)[0]
    if op == "grouped_linear":
        x, weight, bias, out_sizes, activation = args
        return ops.grouped_linear(x, weight, bias, out_sizes.table, list(out_sizes.values), activation, backend)
    if op == "grouped_layer_norm":
        x, sizes, weight, bias, eps = args
        return ops.grouped_layer_norm(x, sizes.table, list(sizes.values), weight, bias, eps, backend)
    if op == "grouped_mlp":
        x, sizes, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden = args
        return ops.grouped_mlp(x, sizes.table, list(sizes.values), fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                               hidden.table, list(hidden.values), backend)
    x, sizes, qkv_weight, qkv_bias, proj_weight, proj_bias, heads, head_dim = args
    return ops.grouped_attention(x, sizes.table, list(sizes.values), qkv_weight, qkv_bias, proj_weight, proj_bias,
                                 heads.table, list(heads.values), head_dim, backend)

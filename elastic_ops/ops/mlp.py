"""Elastic MLP: ``fc2(gelu(fc1(x)))`` on the leading blocks ``W1[:hidden, :e]`` and ``W2[:e, :hidden]``.

Forward: fc1 with bias and GELU in one GEMM epilogue (``linear.linear_gelu_forward``), which also writes the
pre-activation ``z`` when a backward will run; fc2 is cuBLAS on the activation. Only ``z`` is kept for backward
(the reference keeps ``z`` and ``gelu(z)``: half the hidden-sized memory). Backward:

- ``dh = dy @ W2`` (cuBLAS);
- one elementwise pass (``linear.gelu_backward``) over ``z`` and ``dh`` writes ``dz = dh * gelu'(z)`` over ``dh``,
  recomputes ``gelu(z)`` from the same erf, and reduces the fc1 bias gradient;
- ``dW2 += dy^T @ gelu(z)``, ``dx = dz @ W1``, ``dW1 += dz^T @ x`` (cuBLAS, into the gradient slices in place).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._weight_grads import backward_grad_mode, record_grad_mode, weight_grad_buffer
from ._common import active_block, active_vector, add_bias_grad, add_weight_grad, as_rows, linear_gemm, needs_backward
from .linear import gelu_backward, linear_gelu_forward


def mlp_forward(x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor, fc2_bias: Tensor | None,
                hidden: int, keep_residuals: bool) -> tuple[Tensor, Tensor | None]:
    """``(y, z or None)`` for ``x [..., e]``: the output and, if a backward will run, the pre-activation
    ``z [tokens, hidden]``, the one tensor the backward needs besides the inputs."""
    x2d = as_rows(x)
    e, dtype = x2d.shape[1], x2d.dtype
    act, pre = linear_gelu_forward(x2d, fc1_weight, fc1_bias, hidden, keep_residuals)
    y = linear_gemm(act, active_block(fc2_weight, e, hidden, dtype), active_vector(fc2_bias, e, dtype))
    return y.view(x.shape), pre


def mlp_backward(dy: Tensor, x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor,
                 fc2_bias: Tensor | None, pre: Tensor, needs: tuple[bool, ...]):
    """Gradients of ``mlp_forward`` for ``dy`` shaped like x; ``needs`` flags (x, W1, b1, W2, b2).

    Returns ``(dx, dW1, db1, dW2, db2)``: dx or None; for the parameters what autograd must receive (None where the
    gradient went into ``param.grad`` in place, see ``weight_grad_buffer``).
    """
    need_x, need_w1, need_b1, need_w2, need_b2 = needs
    need_b1, need_b2 = need_b1 and fc1_bias is not None, need_b2 and fc2_bias is not None
    x2d, dy2d = as_rows(x), as_rows(dy)
    e, hidden, dtype = x2d.shape[1], pre.shape[1], x2d.dtype
    returned = {}
    dz = act = None
    if need_x or need_w1 or need_b1:
        dh = torch.mm(dy2d, active_block(fc2_weight, e, hidden, dtype))
        db1_view, returned["b1"] = weight_grad_buffer(fc1_bias, hidden) if need_b1 else (None, None)
        dz, act, db1 = gelu_backward(dh, pre, out=dh, want_activation=need_w2, want_bias_grad=need_b1)
        if need_b1:
            db1_view += db1
    elif need_w2:  # only fc2 learns: no dz to fuse with
        act = F.gelu(pre)
    if need_w2:
        dw2_view, returned["w2"] = weight_grad_buffer(fc2_weight, e, hidden)
        add_weight_grad(dw2_view, dy2d, act)
        del act
    if need_b2:
        db2_view, returned["b2"] = weight_grad_buffer(fc2_bias, e)
        add_bias_grad(db2_view, dy2d)
    if need_w1:
        dw1_view, returned["w1"] = weight_grad_buffer(fc1_weight, hidden, e)
        add_weight_grad(dw1_view, dz, x2d)
    dx = torch.mm(dz, active_block(fc1_weight, hidden, e, dtype)).view(x.shape) if need_x else None
    return dx, returned.get("w1"), returned.get("b1"), returned.get("w2"), returned.get("b2")


class ElasticMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden_features):
        record_grad_mode(ctx)
        y, pre = mlp_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, hidden_features, keep_residuals=True)
        ctx.save_for_backward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, pre)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        with backward_grad_mode(ctx):
            return *mlp_backward(grad_y, *ctx.saved_tensors, tuple(ctx.needs_input_grad[:5])), None


def elastic_mlp(x: Tensor, fc1_weight: Tensor, fc1_bias: Tensor | None, fc2_weight: Tensor, fc2_bias: Tensor | None,
                hidden_features: int) -> Tensor:
    """``fc2(gelu(fc1(x)))`` with ``W1[:hidden, :e]``, ``W2[:e, :hidden]``, ``e = x.shape[-1]``, on the GPU path.

    Inputs are validated by ``elastic_ops.functional.elastic_mlp``; call that.
    """
    tensors = (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    if needs_backward(*tensors):
        return ElasticMLPFunction.apply(*tensors, hidden_features)
    # No backward will run: no autograd node, no pre-activation kept.
    return mlp_forward(*tensors, hidden_features, keep_residuals=False)[0]

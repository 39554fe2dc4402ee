"""Where the elastic ops put weight gradients: added into the active slice of ``param.grad`` in place, or, inside
``weight_grads_in_place(False)``, returned to autograd. Imports only torch (the package imports without triton)."""
from __future__ import annotations

import contextlib
import contextvars

import torch
from torch import Tensor

_in_place = contextvars.ContextVar("elastic_ops_weight_grads_in_place", default=True)


@contextlib.contextmanager
def weight_grads_in_place(enabled: bool):
    """Turn in-place weight gradients off for code that needs autograd to return them
    (``torch.autograd.grad`` on a weight, gradient hooks on parameters). It applies to the ops whose forward
    runs inside it (and to a backward run inside it on the caller's thread)."""
    token = _in_place.set(enabled)
    try:
        yield
    finally:
        _in_place.reset(token)


def record_grad_mode(ctx) -> None:
    """Called by each op's forward: autograd runs a CUDA backward on a thread of its own, where the caller's
    ``weight_grads_in_place`` context is not visible, so the choice travels with ``ctx``."""
    ctx.weight_grads_in_place = _in_place.get()


def backward_grad_mode(ctx):
    """The context of an op's backward: gradients in place only if they were on around its forward and are on here."""
    return weight_grads_in_place(ctx.weight_grads_in_place and _in_place.get())


def weight_grad_buffer(weight: Tensor, *sizes: int) -> tuple[Tensor, Tensor | None]:
    """Where a backward accumulates the gradient of ``weight``'s active leading block ``[:sizes[0], :sizes[1], ...]``.

    Returns ``(view, returned)``. For a leaf parameter (the normal case) the view is
    ``weight.grad[:sizes]``, allocated once at full size the first time, and ``returned`` is None: the
    backward adds into the slice and autograd never sees a full-size temporary, so outside the slice the
    gradient stays exactly as it was (DESIGN.md section 3). For a non-leaf weight, or with in-place
    gradients turned off, the view is into a fresh zero tensor of full size that backward returns.
    The backward must *add* into the view, never overwrite it.
    """
    block = tuple(slice(0, s) for s in sizes)
    if _in_place.get() and weight.is_leaf and weight.requires_grad:
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        return weight.grad[block], None
    full = torch.zeros_like(weight)
    return full[block], full

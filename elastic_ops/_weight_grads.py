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


def _parameter_of(weight: Tensor) -> Tensor | None:
    """The leaf that ``weight`` is (a parameter) or is a view of (a trailing slice of one, ``W[-rows:, -cols:]``,
    or a row block of it), if that leaf wants a gradient; else None."""
    if weight.is_leaf:
        return weight if weight.requires_grad else None
    base = weight._base
    return base if base is not None and base.is_leaf and base.requires_grad else None


def weight_grad_buffer(weight: Tensor, *sizes: int) -> tuple[Tensor, Tensor | None]:
    """Where a backward accumulates the gradient of ``weight``'s active leading block ``[:sizes[0], :sizes[1], ...]``.

    Returns ``(view, returned)``. For a leaf parameter (the normal case) the view is
    ``weight.grad[:sizes]``, allocated once at full size the first time, and ``returned`` is None: the
    backward adds into the slice and autograd never sees a full-size temporary, so outside the slice the
    gradient stays exactly as it was (DESIGN.md section 3). ``weight`` may also be a strided view of such a
    parameter (a trailing block, two-sided width sharing): the gradient view is then the same view of
    ``param.grad``, in place too. For any other non-leaf weight, or with in-place gradients turned off, the view
    is into a fresh zero tensor of ``weight``'s size that backward returns.
    The backward must *add* into the view, never overwrite it.
    """
    block = tuple(slice(0, s) for s in sizes)
    param = _parameter_of(weight) if _in_place.get() else None
    if param is not None:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        if param is weight:
            return param.grad[block], None
        if param.grad.stride() == param.stride():
            offset = param.grad.storage_offset() + weight.storage_offset() - param.storage_offset()
            return param.grad.as_strided(weight.shape, weight.stride(), offset)[block], None
    full = torch.zeros_like(weight)
    return full[block], full

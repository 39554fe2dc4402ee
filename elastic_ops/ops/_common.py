"""Helpers shared by the Triton op modules."""
from __future__ import annotations

import contextlib
import contextvars
import os

import torch
from torch import Tensor

from .._backend import triton_interpreting

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
    kernel adds into the slice and autograd never sees a full-size temporary, so outside the slice the
    gradient stays exactly as it was (DESIGN.md section 3). For a non-leaf weight, or with in-place
    gradients turned off, the view is into a fresh zero tensor of full size that backward returns.
    The kernel must *add* into the view, never overwrite it.
    """
    block = tuple(slice(0, s) for s in sizes)
    if _in_place.get() and weight.is_leaf and weight.requires_grad:
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        return weight.grad[block], None
    full = torch.zeros_like(weight)
    return full[block], full


def atomic_accumulator(grad: Tensor | None) -> Tensor | None:
    """Where a split reduction adds atomically into the gradient view ``grad``: ``grad`` itself when it is fp32 or
    fp64 (or None), else an fp32 zero scratch of its shape (fp16/bf16 atomics would round every partial sum), to be
    added back with :func:`add_accumulated`."""
    if grad is None or grad.dtype in (torch.float32, torch.float64):
        return grad
    return torch.zeros(grad.shape, device=grad.device, dtype=torch.float32)


def add_accumulated(grad: Tensor | None, accumulator: Tensor | None) -> None:
    """Add an :func:`atomic_accumulator` scratch into its gradient view (nothing to do when it was the view)."""
    if accumulator is not grad:
        grad += accumulator.to(grad.dtype)


def interpreter() -> bool:
    """True when Triton kernels run in the CPU interpreter (small grids, one autotune config)."""
    return triton_interpreting()


def autotuning() -> bool:
    """Whether kernels try every tile config. Not in the interpreter, nor with ``ELASTIC_OPS_AUTOTUNE=0``: compiled
    tests that check results rather than speed then compile two configs per kernel (the default tile and a small
    one that fits fp64 in shared memory) instead of all of them."""
    return not interpreter() and os.environ.get("ELASTIC_OPS_AUTOTUNE", "1") != "0"

"""Host side of the native CPU kernels: turns tensors into (pointer, shape, strides) for ``elastic_ops._C``.

Callers go through ``elastic_ops.functional``, which has validated shapes, dtypes and devices; the
wrappers here only reshape to the 2-D views the kernels take.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _C


def matrix_spec(t: Tensor) -> tuple:
    """(pointer, shape, element strides) of a 2-D float32 CPU tensor or view."""
    return t.data_ptr(), tuple(t.shape), tuple(t.stride())


def vector_spec(t: Tensor | None) -> tuple | None:
    return None if t is None else (t.data_ptr(), tuple(t.shape), tuple(t.stride()))


def rows_of(x: Tensor) -> Tensor:
    """``x`` as a 2-D ``[rows, features]`` view where its layout allows, else a contiguous copy."""
    if x.dim() == 2:
        return x
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return x.reshape(-1, x.shape[-1])


def linear(x: Tensor, weight: Tensor, bias: Tensor | None, out_features: int, activation: str | None = None) -> Tensor:
    rows = rows_of(x)
    out = torch.empty(rows.shape[0], out_features, dtype=x.dtype, device=x.device)
    _C.linear_forward(matrix_spec(rows), matrix_spec(weight[:out_features, : x.shape[-1]]),
                      vector_spec(None if bias is None else bias[:out_features]), matrix_spec(out),
                      activation == "gelu")
    return out.view(*x.shape[:-1], out_features)

"""Elastic linear: ``act(x @ W[:out, :in].T + b[:out])`` on the super weight, forward and backward."""
from __future__ import annotations

import triton
import triton.language as tl

@triton.jit
def gelu(x):
    """Exact (erf) GELU of an fp32 tile: ``x * Phi(x)``; 0.7071... is 1/sqrt(2). Literals, not globals:
    compiled Triton rejects non-constexpr globals inside @jit functions."""
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def gelu_grad(x):
    """d gelu / dx of an fp32 tile: ``Phi(x) + x * phi(x)``."""
    cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
    pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327  # 1/sqrt(2*pi)
    return cdf + x * pdf

"""Checks shared by the kernel tests (Triton and native) (DESIGN.md section 5). A plain module, not conftest, so that
test files import it by a name no other test directory uses."""
from __future__ import annotations

from dataclasses import dataclass

import torch

# fp32: the kernels multiply in IEEE fp32 on a GPU too (TF32 only where torch's own matmuls may, which is off by
# default), so only the order of summation differs from the reference; compiled, split reductions with atomics and
# the hardware exp2 add a little.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5) if not torch.cuda.is_available() else dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}


def kernel_dtypes():
    """fp32 and fp16 everywhere; bf16 only compiled (it is broken in the interpreter)."""
    return [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def super_tensor(*shape: int, active: tuple[int, ...], device="cpu", dtype=torch.float32) -> torch.Tensor:
    """A super weight: random in the active leading block, NaN outside it, so that any read past the
    active slice poisons the result."""
    data = torch.full(shape, float("nan"), device=device, dtype=dtype)
    block = tuple(slice(0, a) for a in active)
    data[block] = torch.randn(*active, device=device, dtype=dtype) * shape[-1] ** -0.5
    return data


def super_param(*shape: int, active: tuple[int, ...], device, dtype=torch.float32) -> torch.nn.Parameter:
    """:func:`super_tensor` as a parameter (for the tests of gradients)."""
    return torch.nn.Parameter(super_tensor(*shape, active=active, device=device, dtype=dtype))


@dataclass(frozen=True)
class AttentionCase:
    """Attention shapes: ``heads`` of ``max_heads`` heads, ``embed`` of ``max_embed`` channels."""

    batch: int
    tokens: int
    embed: int
    max_embed: int
    heads: int
    max_heads: int
    head_dim: int

    @property
    def width(self) -> int:
        return self.heads * self.head_dim

    @property
    def max_width(self) -> int:
        return self.max_heads * self.head_dim


def seed_grad(param: torch.Tensor) -> torch.Tensor:
    """Give ``param`` an existing random gradient (as after an earlier step) and return a copy of it."""
    param.grad = torch.randn_like(param)
    return param.grad.clone()


def assert_grad_accumulated(param: torch.Tensor, before: torch.Tensor, block_grad: torch.Tensor, **tol) -> None:
    """Inside the active block the gradient is ``before + block_grad``; outside it is bit-for-bit ``before``."""
    block = tuple(slice(0, s) for s in block_grad.shape)
    inside = torch.zeros_like(param.grad, dtype=torch.bool)
    inside[block] = True
    torch.testing.assert_close(param.grad[block].float(), (before[block] + block_grad.to(before.dtype)).float(), **tol)
    assert torch.equal(param.grad[~inside], before[~inside]), "gradient outside the active slice changed"


def reference_copy(param: torch.Tensor, active: tuple[int, ...]) -> torch.Tensor:
    """An fp32 leaf holding the active block of ``param``, for computing reference gradients with autograd."""
    block = tuple(slice(0, a) for a in active)
    return param.detach()[block].float().clone().requires_grad_(True)

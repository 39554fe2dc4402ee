"""Helpers shared by the op modules: plain GEMMs on weight slices (cuBLAS through torch), devices and tiles, tensor
descriptors, and the ``@triton.jit`` functions more than one kernel uses.

The GPU path (DESIGN.md section 4): a plain GEMM on the active block of a super weight is cuBLAS itself, on the
strided view ``W[:rows, :cols]`` (the row stride is cuBLAS's leading dimension, so nothing is copied), and a weight
gradient lands in ``param.grad[:rows, :cols]`` with an in-place ``addmm_`` on the same kind of view. Triton kernels
do only what cuBLAS cannot: epilogues, fused elementwise work, attention, LayerNorm, K subnets per launch.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._backend import triton_interpreting


def needs_backward(*tensors: Tensor | None) -> bool:
    """Whether autograd will call the backward of an op on these inputs; ask before ``Function.apply`` (grad mode is
    off inside ``forward``). ``ctx.needs_input_grad`` cannot tell: it is true for a parameter even under
    ``torch.no_grad()``, where keeping tensors for a backward only wastes memory."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# ---------------------------------------------------------------------------------------------- GEMMs on slices

def active_block(weight: Tensor, rows: int, cols: int, dtype: torch.dtype) -> Tensor:
    """``weight[:rows, :cols]`` for products with ``dtype`` activations: the strided view itself, or, for a weight
    kept in another dtype (fp32 master weights), a cast copy of the active block only, as autocast would make.
    The view is made by one ``as_strided`` (same sizes, strides and offset as the two slices, a third of their host
    time)."""
    block = weight.as_strided((rows, cols), weight.stride())
    return block if block.dtype == dtype else block.to(dtype)


def active_vector(bias: Tensor | None, size: int, dtype: torch.dtype) -> Tensor | None:
    if bias is None:
        return None
    return bias[:size] if bias.dtype == dtype else bias[:size].to(dtype)


def unit_stride(vector: Tensor | None) -> Tensor | None:
    """A 1-D parameter (bias, LayerNorm's gamma and beta) as the kernels read it, elements adjacent: itself, or a
    contiguous copy where it is a strided view such as ``b[::2]`` (rare, and small)."""
    return vector if vector is None or vector.stride(0) == 1 else vector.contiguous()


def linear_gemm(x2d: Tensor, weight_block: Tensor, bias_block: Tensor | None) -> Tensor:
    """``x2d @ weight_block.T + bias_block``: one cuBLAS call on the strided views, the bias added by its epilogue."""
    if bias_block is None:
        return torch.mm(x2d, weight_block.t())
    return torch.addmm(bias_block, x2d, weight_block.t())


def add_weight_grad(grad_view: Tensor, dz: Tensor, x2d: Tensor) -> None:
    """``grad_view += dz.T @ x2d`` into the strided gradient view, in place. A gradient kept in another dtype than
    the activations (fp32 master weights) receives the product rounded once to the activation dtype, as the
    gradient of autocast's cast of the weight would."""
    if grad_view.dtype == dz.dtype:
        grad_view.addmm_(dz.t(), x2d)
    else:
        grad_view += torch.mm(dz.t(), x2d)


def add_bias_grad(grad_view: Tensor, dz: Tensor) -> None:
    """``grad_view += dz.sum(0)``, the sum kept in fp32 (fp64 for fp64) until it is added."""
    grad_view += dz.sum(0, dtype=torch.promote_types(dz.dtype, torch.float32))


def as_rows(t: Tensor) -> Tensor:
    """``t`` as ``[rows, features]``: a view where the strides allow it (no copy of a sliced x)."""
    return t.reshape(-1, t.shape[-1])


# ---------------------------------------------------------------------------------------------- devices and tiles

# triton.jit chose interpreted or compiled kernels when these modules were imported: the answer for their lifetime.
_INTERPRETER = triton_interpreting()


def interpreter() -> bool:
    """True when Triton kernels run in the CPU interpreter (small grids, interpreter-sized tiles)."""
    return _INTERPRETER


# Grid and tile arithmetic of the host code. triton.cdiv and triton.next_power_of_2 are constexpr functions that cost
# microseconds per host call; these are plain integer arithmetic.

def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 0 else 0


@lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the property query costs microseconds per call); the
    interpreter runs programs one after another, so a few stand in for them there."""
    if device.type != "cuda":
        return 4
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


def acc_dtype(x: Tensor):
    """fp32 accumulation for fp32/fp16/bf16; fp64 inputs (gradcheck) keep fp64 throughout."""
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def dot_precision(x: Tensor) -> str:
    """``input_precision`` of ``tl.dot`` on operands of x's dtype. fp32 products use TF32 only where torch's own
    fp32 matmuls may (``torch.backends.cuda.matmul.allow_tf32``, set by ``torch.set_float32_matmul_precision``),
    so that an fp32 model computes what ``F.linear`` computes; fp64 is exact; fp16 and bf16 keep the default."""
    if x.dtype == torch.float32:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "ieee" if x.dtype == torch.float64 else "tf32"


# ---------------------------------------------------------------------------------------------- tensor descriptors

TMA_ALIGNMENT = 16  # bytes: base address and every stride but the last of a tensor descriptor (Hopper's TMA)


@lru_cache(maxsize=None)
def _descriptor_class():
    """Triton's host-side tensor descriptor, or None where this triton has none (before 3.4)."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:
        return None
    return TensorDescriptor


@lru_cache(maxsize=None)
def _cuda_has_tma(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def descriptors_supported(device: torch.device) -> bool:
    """Tensor descriptors run on Hopper and newer (TMA copies) and in the interpreter."""
    if _descriptor_class() is None:
        return False
    if device.type == "cuda":
        return _cuda_has_tma(device.index if device.index is not None else torch.cuda.current_device())
    return interpreter()


def descriptor_compatible(t: Tensor) -> bool:
    """A 2-D view a tensor descriptor can address: unit last stride, 16-byte aligned base and row stride."""
    return (t.dim() == 2 and t.stride(1) == 1 and (t.stride(0) * t.element_size()) % TMA_ALIGNMENT == 0
            and t.data_ptr() % TMA_ALIGNMENT == 0)


@lru_cache(maxsize=None)
def _prechecked_descriptor_class():
    """Triton's descriptor without its constructor's checks (alignment, unit last stride, positive shape, power-of-two
    blocks), which cost about a microsecond per descriptor: the callers of ``descriptor`` make them, once per call
    signature where they depend only on it. Still a ``TensorDescriptor`` to the launcher and the interpreter."""
    class PrecheckedTensorDescriptor(_descriptor_class()):
        def __post_init__(self):
            pass

    return PrecheckedTensorDescriptor


def descriptor(base: Tensor, shape: tuple[int, int], strides: tuple[int, int], block_shape: list[int]):
    """Descriptor of the 2-D block ``shape`` of ``base`` with ``strides`` (those of the super tensor), so that loads
    past the block's edges read zeros and stores past them are dropped, with no masks. The caller has checked what
    triton's own constructor would: ``descriptor_compatible`` (alignment, unit last stride), a positive shape and a
    power-of-two block."""
    return _prechecked_descriptor_class()(base, shape, strides, block_shape)


# ---------------------------------------------------------------------------------------------- @triton.jit helpers

@triton.jit
def gelu(x):
    """Exact (erf) GELU of an fp32 tile: ``x * Phi(x)``; 0.7071... is 1/sqrt(2). Literals, not globals:
    compiled Triton rejects non-constexpr globals inside @jit functions."""
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def gelu_and_grad(x):
    """``(gelu(x), gelu'(x))`` of an fp32 tile from one erf: ``x * Phi(x)`` and ``Phi(x) + x * phi(x)``."""
    cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
    pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327  # 1/sqrt(2*pi)
    return x * cdf, cdf + x * pdf


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(tile row, tile column) of tile ``pid`` over an ``M x N`` output, GROUP_M tile rows at a time so that
    neighbouring programs share operand tiles in L2."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    programs_per_group = GROUP_M * tiles_n
    first_m = (pid // programs_per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % programs_per_group) % group_rows
    pid_n = (pid % programs_per_group) // group_rows
    return pid_m, pid_n

"""Backend choice (DESIGN.md section 4).

Per call, from the tensors' device:
- CUDA tensors: the Triton kernels, compiled.
- CPU tensors with ``TRITON_INTERPRET=1`` set before triton was imported: the Triton kernels in the interpreter.
- CPU tensors otherwise: the native kernels of ``elastic_ops._C`` where the op has one and it applies
  (float32, no gradient needed), else the PyTorch reference.

``ELASTIC_OPS_BACKEND`` or :func:`use_backend` forces one backend; a forced backend that cannot run
raises :class:`BackendUnavailableError` saying why, while the automatic choice falls back silently.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from dataclasses import dataclass
from functools import lru_cache

import torch

BACKENDS = ("triton", "native", "reference")
_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("elastic_ops_backend", default=None)


class BackendUnavailableError(RuntimeError):
    """A backend was forced that cannot run this call."""


@dataclass(frozen=True)
class BackendStatus:
    available: bool
    reason: str

    def __str__(self) -> str:
        return ("available: " if self.available else "unavailable: ") + self.reason


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@lru_cache(maxsize=None)
def triton_status() -> BackendStatus:
    try:
        import triton
    except ImportError as err:
        return BackendStatus(False, f"triton is not installed ({err}); it exists for Linux x86-64 only")
    if triton_interpreting():
        return BackendStatus(True, f"triton {triton.__version__} in the interpreter (TRITON_INTERPRET=1), CPU tensors")
    # torch.cuda.is_available() is safe without a GPU, unlike triton.runtime.driver.active.
    if torch.cuda.is_available():
        return BackendStatus(True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}")
    return BackendStatus(False, f"triton {triton.__version__} is installed but there is no CUDA GPU "
                                "(set TRITON_INTERPRET=1 before importing to run it on the CPU)")


@lru_cache(maxsize=None)
def native_status() -> BackendStatus:
    try:
        importlib.import_module("elastic_ops._C")
    except ImportError as err:
        return BackendStatus(False, f"the native extension elastic_ops._C is not built ({err}); reinstall with a "
                                    "C++17 compiler")
    return BackendStatus(True, "native C++ kernels (float32 CPU inference)")


def backends() -> dict[str, BackendStatus]:
    """What each backend can do on this machine, and why not where it cannot."""
    return {
        "triton": triton_status(),
        "native": native_status(),
        "reference": BackendStatus(True, f"PyTorch {torch.__version__} reference, every device and dtype"),
    }


def _check_name(name: str, origin: str) -> str:
    if name not in BACKENDS and name != "auto":
        raise ValueError(f"{origin}: unknown backend {name!r}; choose one of {', '.join(BACKENDS)} or 'auto'")
    return name


@lru_cache(maxsize=None)
def _environment_choice() -> str | None:
    """``ELASTIC_OPS_BACKEND``, read once: a setting for the whole process, like ``TRITON_INTERPRET``."""
    name = _check_name(os.environ.get("ELASTIC_OPS_BACKEND", "").strip().lower() or "auto", "ELASTIC_OPS_BACKEND")
    return None if name == "auto" else name


# The innermost use_backend() name, or None: with ELASTIC_OPS_BACKEND (read once), what decides the forced backend.
forced_setting = _forced.get


def forced_backend() -> str | None:
    """The backend forced by :func:`use_backend` (innermost wins) or by ``ELASTIC_OPS_BACKEND``; None for automatic."""
    name = _forced.get()
    if name is None:
        return _environment_choice()
    return None if name == "auto" else name


@contextlib.contextmanager
def use_backend(name: str):
    """Force a backend (``"triton"``, ``"native"``, ``"reference"`` or ``"auto"``) inside a ``with`` block."""
    token = _forced.set(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        _forced.reset(token)


def _why_not(backend: str, op: str, device: torch.device, dtype: torch.dtype, needs_grad: bool,
             triton_backward: bool, triton_shape_problem: str | None = None) -> str | None:
    """None if ``backend`` can run this call, else the reason it cannot. Every op has all three backends; the
    native kernels are forward-only, and so are the Triton kernels of the grouped ops (``triton_backward``)."""
    if backend == "reference":
        return None
    if backend == "triton":
        status = triton_status()
        if not status.available:
            return status.reason
        if needs_grad and not triton_backward:
            return f"the Triton kernels of {op} are forward-only; this call needs gradients"
        if triton_shape_problem is not None:
            return triton_shape_problem
        if device.type == "cpu" and not triton_interpreting():
            return "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 before importing triton)"
        if device.type not in ("cpu", "cuda"):
            return f"tensors on {device.type} are not supported by the Triton kernels"
        if device.type == "cpu" and dtype == torch.bfloat16:
            return "bfloat16 is broken in the Triton interpreter; use float32 or float16 on the CPU"
        return None
    status = native_status()
    if not status.available:
        return status.reason
    if device.type != "cpu":
        return f"the native kernels run on the CPU, the tensors are on {device}"
    if dtype != torch.float32:
        return f"the native kernels take float32, got {dtype}"
    if needs_grad:
        return "the native kernels are forward-only; this call needs gradients"
    return None


# (op, device, dtype, needs_grad, triton_backward, forced backend) -> backend: the choice is made once per kind of
# call, so that an op call spends well under a microsecond on it (DESIGN.md section 4).
_choices: dict[tuple, str] = {}


def triton_head_dim_problem(head_dim: int) -> str | None:
    """Why the Triton attention kernels cannot take ``head_dim`` (they tile a head in one block of a power-of-two
    width), None if they can. An automatic choice then falls back to another backend."""
    low, high = 16, 128
    if low <= head_dim <= high and head_dim & (head_dim - 1) == 0:
        return None
    return f"the Triton attention kernels take a head_dim that is a power of two from {low} to {high}, got {head_dim}"


def select(op: str, device: torch.device, dtype: torch.dtype, needs_grad: bool, triton_backward: bool = True,
           triton_shape_problem: str | None = None) -> str:
    """The backend that runs ``op`` for tensors on ``device`` of ``dtype``; ``triton_backward``: the op's Triton
    kernels have a backward; ``triton_shape_problem``: why the op's Triton kernels cannot take this call's shapes
    (None: they can). Raises :class:`BackendUnavailableError` if a forced backend cannot run the call."""
    forced = forced_backend()
    key = (op, device, dtype, needs_grad, triton_backward, triton_shape_problem, forced)
    choice = _choices.get(key)
    if choice is None:
        choice = _choices[key] = _choose(op, device, dtype, needs_grad, triton_backward, triton_shape_problem, forced)
    return choice


def _choose(op: str, device: torch.device, dtype: torch.dtype, needs_grad: bool, triton_backward: bool,
            triton_shape_problem: str | None, forced: str | None) -> str:
    if forced is not None:
        reason = _why_not(forced, op, device, dtype, needs_grad, triton_backward, triton_shape_problem)
        if reason is not None:
            raise BackendUnavailableError(f"backend {forced!r} was forced for {op} but cannot run: {reason}")
        return forced
    if device.type == "cuda":
        order = ("triton", "reference")
    elif triton_interpreting():
        order = ("triton", "native", "reference")
    else:
        order = ("native", "reference")
    for backend in order:
        if _why_not(backend, op, device, dtype, needs_grad, triton_backward, triton_shape_problem) is None:
            return backend
    return "reference"

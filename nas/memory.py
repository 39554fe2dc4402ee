"""Memory a supernet will take, checked before anything is allocated: a space file declares its sizes, and a few
edited numbers (``num_heads: [1, 100000]``) would otherwise ask for terabytes, or grow until the kernel kills the run.

Each family estimates its supernets (``Family.memory_estimate(space)``, with the cost model's counts: the
parameters of its supernet, the activations one training step keeps for the backward pass and those an evaluation
holds at its peak). ``check_memory`` turns that into bytes and refuses, in one line naming the space's field that the
estimate owes most to, anything past the limit: ``max_memory_gb`` of a config, by default
:data:`DEFAULT_MEMORY_FRACTION` of the machine's physical memory.
"""
from __future__ import annotations

import os

from .errors import ConfigError
from .family import MemoryEstimate, Space, family_of

DEFAULT_MEMORY_FRACTION = 0.8
# Training holds per parameter the fp32 weight, its gradient and AdamW's two moments; evaluation only the weight.
TRAINING_BYTES_PER_PARAMETER = 16
BYTES_PER_VALUE = 4


def physical_memory_bytes() -> int | None:
    """The machine's physical memory, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def memory_limit_bytes(max_memory_gb: float | None) -> float:
    """``max_memory_gb`` in bytes; None: :data:`DEFAULT_MEMORY_FRACTION` of physical memory (no limit where the
    system does not say)."""
    if max_memory_gb is not None:
        return max_memory_gb * 1e9
    physical = physical_memory_bytes()
    return DEFAULT_MEMORY_FRACTION * physical if physical else float("inf")


def estimate_bytes(estimate: MemoryEstimate, batch_size: int, training: bool = True, eval_batch_size: int = 0) -> int:
    """Bytes of the weights (with gradients and optimizer state when ``training``) and of the activations at their
    peak: when ``training``, those a step of ``batch_size`` images keeps for the backward pass or those an evaluation
    of ``eval_batch_size`` images in between holds, whichever is more; else those of an evaluation of ``batch_size``
    images."""
    if training:
        values = max(batch_size * estimate.activations, eval_batch_size * estimate.inference)
        return estimate.parameters * TRAINING_BYTES_PER_PARAMETER + values * BYTES_PER_VALUE
    return (estimate.parameters + batch_size * estimate.inference) * BYTES_PER_VALUE


def check_memory(space: Space, batch_size: int = 1, max_memory_gb: float | None = None, training: bool = True,
                 eval_batch_size: int = 0) -> None:
    """Refuse, with a one-line ConfigError, a supernet of ``space`` that would take more than the limit at
    ``batch_size`` images a step, and when ``training`` ``eval_batch_size`` images an evaluation (``max_memory_gb``;
    None: :func:`memory_limit_bytes`'s default). Called before the supernet is built, so nothing has been allocated
    yet."""
    limit = memory_limit_bytes(max_memory_gb)
    estimate = family_of(space).memory_estimate(space)
    needed = estimate_bytes(estimate, batch_size, training, eval_batch_size)
    if needed <= limit:
        return
    setting = f"max_memory_gb={max_memory_gb:g}" if max_memory_gb is not None else (
        f"max_memory_gb (default: {DEFAULT_MEMORY_FRACTION:.0%} of this machine's memory)")
    steps = f"training {batch_size} images a step" if training else f"evaluating {batch_size} images a batch"
    if training and eval_batch_size:
        steps += f", evaluating {eval_batch_size} a batch"
    if estimate_bytes(estimate, 1, training, min(eval_batch_size, 1)) <= limit:  # the batches are what is too large
        cause = "; ".join(f"{name}={size} is too large: at most {fits} fit" for name, size, fits in
                          batches_that_fit(estimate, limit, batch_size, training, eval_batch_size) if size > fits)
    else:
        cause = f"the estimate owes most to {culprit(space, batch_size, training, eval_batch_size)}"
    raise ConfigError(f"space {space.name!r}: its supernet would take about {gigabytes(needed)} GB ({steps}), more "
                      f"than {limit / 1e9:.3g} GB allowed by {setting}; {cause}")


def batches_that_fit(estimate: MemoryEstimate, limit: float, batch_size: int, training: bool, eval_batch_size: int
                     ) -> list[tuple[str, int, int]]:
    """``(setting, its value, the most images that fit in limit)`` of the batch sizes a run has: a training step's
    (``batch_size``) and an evaluation's (``eval_batch_size``), or an evaluation's (``batch_size``)."""
    weights = estimate_bytes(estimate, 0, training)
    if not training:
        return [("batch_size", batch_size, int((limit - weights) // (estimate.inference * BYTES_PER_VALUE)))]
    return [("batch_size", batch_size, int((limit - weights) // (estimate.activations * BYTES_PER_VALUE))),
            ("eval_batch_size", eval_batch_size, int((limit - weights) // (estimate.inference * BYTES_PER_VALUE)))]


def gigabytes(count: int) -> str:
    """``count`` bytes in GB, for a message: also counts past a float's range, which a space file may declare."""
    billions = count // 10**9
    if billions < 10**15:
        return f"{count / 1e9:.3g}"
    return f"10^{len(str(billions)) - 1}"


def culprit(space: Space, batch_size: int, training: bool, eval_batch_size: int = 0) -> str:
    """The field of ``space`` whose choices cost the most: the one that, cut to its smallest choice, shrinks the
    estimate the most (``space.narrowed_fields()`` names each field with its largest value, and the space cut)."""
    def cost(item: tuple[str, Space]) -> int:
        return estimate_bytes(family_of(item[1]).memory_estimate(item[1]), batch_size, training, eval_batch_size)

    return min(space.narrowed_fields(), key=cost)[0]


__all__ = ["DEFAULT_MEMORY_FRACTION", "MemoryEstimate", "check_memory", "culprit", "estimate_bytes",
           "memory_limit_bytes", "physical_memory_bytes"]

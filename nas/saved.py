"""Checks of the values a saved file holds (a search state, a latency model): a file may have been edited by hand, so
each number is checked for its type and range as a config's is, and refused in one line (``CheckpointError``)."""
from __future__ import annotations

import math
from numbers import Real
from typing import Any

from .errors import CheckpointError


def saved_number(value: Any, where: str, low: float = -math.inf, high: float = math.inf,
                 integer: bool = False) -> float | int:
    """A number a saved state holds: an int (``integer``) or a finite real, in ``[low, high]``; never a bool."""
    try:
        ok = (not isinstance(value, bool) and isinstance(value, int if integer else Real) and low <= value <= high
              and (integer or math.isfinite(value)))
    except OverflowError:  # math.isfinite of an int past a float's range
        ok = False
    if not ok:
        wanted = "an integer" if integer else "a finite number"
        raise CheckpointError(f"{where} is {value!r}, not {wanted} in [{low:g}, {high:g}]")
    return value if integer else float(value)


def saved_flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise CheckpointError(f"{where} is {value!r}, not true or false")
    return value


__all__ = ["saved_flag", "saved_number"]

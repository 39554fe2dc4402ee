"""The user-error family (DESIGN.md section 10): a problem with what the user handed us (a config, data, a
checkpoint or other saved file, an output directory, a budget, a missing optional dependency).

``python -m nas.train`` and ``python -m nas.search`` run through :func:`run_command`: a :class:`UserError` is
printed as one line and the exit status is 2; any other exception is a bug and keeps its traceback. Library code
raises these where the fault lies with the input; each class also derives from the built-in exception its callers
caught before (``ValueError``, ``RuntimeError``, ``OSError``, ``ImportError``).
"""
from __future__ import annotations

import importlib
import re
import sys
from collections.abc import Callable


class UserError(Exception):
    """Base class of every error that the command lines report as one line (exit status 2)."""


class ConfigError(UserError, ValueError):
    """A config (file, ``--set`` item, flag or field value) that cannot be used."""


class DataError(UserError, RuntimeError):
    """A data set that is missing, incomplete or malformed."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint or other saved file (training checkpoint, search state, evaluation cache, latency model) that
    is missing, unreadable or malformed."""


class CheckpointMismatchError(CheckpointError, ValueError):
    """A checkpoint, latency model or saved search that belongs to another space, run or config."""


class OutputError(UserError, OSError):
    """An output directory or file that cannot be written (read-only, a file where a directory belongs, disk
    full) or that holds another run."""


class BudgetError(UserError, ValueError):
    """A resource budget that cannot be read or that the space cannot meet."""


class InfeasibleBudgetError(BudgetError):
    """No arch of the space meets a budget (or none that a search algorithm could find)."""


class NonFiniteLossError(UserError, RuntimeError):
    """The loss or its gradients became NaN or infinite (training stopped before the bad step changed any weight),
    or the weights or optimizer state did (training stopped before writing them to a checkpoint)."""


class ExportCheckError(UserError, RuntimeError):
    """An exported model that, loaded back, computes other logits than the supernet's subnet (past the tolerance)."""


class MissingDependencyError(UserError, ImportError):
    """An optional dependency that this feature needs is not installed (or not in a version it supports)."""


def require(module: str, extra: str, needed_for: str):
    """``module`` imported, or a :class:`MissingDependencyError` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingDependencyError(f"{needed_for} needs {module.split('.')[0]}, which is not installed: "
                                     f"pip install 'elastic-ops[{extra}]' ({error})") from error


def first_line(error: BaseException) -> str:
    """What an error says, on one line: torch.load's refusals with ``weights_only=True`` span a dozen lines (and
    advise ``weights_only=False``, which would run the file's code); their cause follows "WeightsUnpickler error:"."""
    text = str(error)
    cause = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)
    if cause:
        return cause.group(1).strip()
    if text.startswith("Weights only load failed"):  # newer torch: the cause is the paragraph that gives no advice
        causes = [p.strip() for p in text.split("\n\n") if p.strip() and "weights_only" not in p
                  and not p.strip().startswith("Check the documentation")]
        if causes:
            return causes[0].splitlines()[0]
    return (text.strip().splitlines() or [type(error).__name__])[0]


def run_command(prog: str, body: Callable[[], int]) -> int:
    """The error policy of the command lines: ``body()``'s exit status, or for a :class:`UserError` the message on
    one line of stderr (``<prog>: error: ...``) and status 2. Any other exception propagates with its traceback."""
    try:
        return body()
    except UserError as error:
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2

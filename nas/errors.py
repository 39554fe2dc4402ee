"""The user-error family (DESIGN.md section 10): a problem with what the user handed us (a config, data, a
checkpoint, an output directory, a budget). ``python -m nas.train`` and ``python -m nas.search`` print a
:class:`UserError` as one line and exit with status 2; any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import re


class UserError(Exception):
    """Base class of every error that the command lines report as one line (exit status 2)."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint or saved state (training checkpoint, search state, evaluation cache) that is missing,
    unreadable, malformed, or does not belong to this run."""


class OutputError(UserError, OSError):
    """An output directory or file that cannot be written (read-only, a file where a directory belongs, disk
    full) or that holds another run."""


def first_line(error: BaseException) -> str:
    """What an error says, on one line: torch.load's refusals with ``weights_only=True`` span a dozen lines (and
    advise ``weights_only=False``, which would run the file's code); their cause follows "WeightsUnpickler error:"."""
    text = str(error)
    cause = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)
    return cause.group(1).strip() if cause else (text.strip().splitlines() or [type(error).__name__])[0]

"""Output directories that belong to one run at a time (``nas.train``'s ``--out-dir``, ``nas.search``'s
``--output``).

A run locks its directory (``filelock``: ``flock`` on ``.lock`` inside it, ``msvcrt.locking`` on Windows) for as
long as it lives; the operating system drops the lock when the process ends, also when it is killed, so a stale
lock never blocks a resume. Holding the lock, the run removes the temporaries that atomic writes killed midway
left behind (``nas.atomic``).
"""
from __future__ import annotations

import os
from pathlib import Path

from filelock import FileLock, Timeout

from .atomic import remove_stale_temporaries
from .errors import OutputError

LOCK_NAME = ".lock"


class OwnedDirectory:
    """``path`` (created if missing) locked by this process until :meth:`release`; ``what`` names it in errors
    (``"out_dir"``, ``"output"``). Stale temporaries are removed from it and from ``subdirs``."""

    def __init__(self, path: str | os.PathLike, what: str, subdirs: tuple[str, ...] = ()):
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"{what} {str(self.path)!r} is a file, not a directory")
        lock = self.path / LOCK_NAME
        self._lock = FileLock(lock, timeout=0)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()
        except Timeout:
            raise OutputError(f"{what} {str(self.path)!r} is in use by another run (it holds {str(lock)!r}); wait "
                              f"for that run to end or choose another {what}") from None
        except OSError as err:
            raise OutputError(f"cannot write to {what} {str(self.path)!r}: {err.strerror or err}") from err
        for directory in (self.path, *(self.path / sub for sub in subdirs)):
            remove_stale_temporaries(directory)

    def contents(self) -> list[str]:
        """The names in the directory besides the lock."""
        return sorted(name for name in os.listdir(self.path) if name != LOCK_NAME)

    def release(self) -> None:
        self._lock.release()

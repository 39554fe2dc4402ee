"""Output directories that belong to one run at a time (``nas.train``'s ``--out-dir``, ``nas.search``'s
``--output``).

A run locks its directory (``filelock``: ``flock`` on ``.lock`` inside it, ``msvcrt.locking`` on Windows) for as
long as it lives; the operating system drops the lock when the process ends, also when it is killed, so a stale
lock never blocks a resume. Holding the lock, and only once it has found the directory to be its own (empty, or its
run's to resume) and said so (:meth:`OwnedDirectory.claim`), the run removes the temporaries that atomic writes killed
midway left behind (``nas.atomic``): a run that refuses the directory deletes nothing in it.
"""
from __future__ import annotations

import os
from pathlib import Path

from filelock import FileLock, Timeout

from .atomic import TEMPORARY_NAME, remove_stale_temporaries
from .errors import OutputError

LOCK_NAME = ".lock"


class OwnedDirectory:
    """``path`` (created if missing) locked by this process until :meth:`release`; ``what`` names it in errors
    (``"out_dir"``, ``"output"``). :meth:`claim` removes stale temporaries from it and from ``subdirs``."""

    def __init__(self, path: str | os.PathLike, what: str, subdirs: tuple[str, ...] = ()):
        self.path, self.subdirs = Path(path), subdirs
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

    def contents(self) -> list[str]:
        """The names in the directory besides the lock and the temporaries of killed atomic writes."""
        return sorted(name for name in os.listdir(self.path)
                      if name != LOCK_NAME and not TEMPORARY_NAME.fullmatch(name))

    def claim(self) -> None:
        """The run has found the directory to be its own: remove the temporaries killed writes left in it."""
        for directory in (self.path, *(self.path / sub for sub in self.subdirs)):
            remove_stale_temporaries(directory)

    def release(self) -> None:
        self._lock.release()

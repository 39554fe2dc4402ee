"""Atomic writes: a reader (or a run that resumes after a crash) sees the old file or the new one, never half
of one. Everything the NAS layer saves (checkpoints, search state, caches, results, plots) goes through here.

A write that fails (disk full, read-only directory, a file where a directory belongs) raises
:class:`~nas.errors.OutputError` naming the file. Files get the permissions of any new file (``0o666`` less the
umask). A process killed while writing leaves a temporary ``.<name>.nas-<8 characters>.tmp`` beside the file, which
:func:`remove_stale_temporaries` deletes once nothing else can be writing there (the ``nas-`` tag tells them from a
user's ``.<name>.<8 characters>.tmp``).
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from typing import IO

import torch

from .errors import OutputError

# The names tempfile.mkstemp(prefix=".<name>.nas-", suffix=".tmp") gives: 8 characters of [a-z0-9_] after the tag.
TEMPORARY_NAME = re.compile(r"\..+\.nas-[a-z0-9_]{8}\.tmp")


def current_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it back at once
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on success it replaces ``path`` in one rename."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.nas-", suffix=".tmp")
    except OSError as err:
        raise OutputError(f"cannot write {path!r}: {err.strerror or err}") from err
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0o600
        with open(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError) and not isinstance(err, OutputError):
            raise OutputError(f"cannot write {path!r}: {err.strerror or err}") from err
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


class _WriteErrorKeeper:
    """The file object torch.save writes to, keeping the OSError of a failed write: torch reports it only as
    "unexpected pos"."""

    def __init__(self, handle: IO[bytes]):
        self.handle, self.error = handle, None

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.handle.flush()


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    with atomic_open(path, "wb") as handle:
        writer = _WriteErrorKeeper(handle)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise


def remove_stale_temporaries(directory: str | os.PathLike) -> list[str]:
    """Delete the temporary files that atomic writes killed midway left in ``directory`` (names of
    :func:`atomic_open`'s pattern only) and return their names. Only for a directory this process owns (holds
    the lock of, and has found to be its run's: ``nas.rundir.OwnedDirectory.claim``): a running writer's temporary
    has the same kind of name."""
    try:
        names = [entry.name for entry in os.scandir(directory)
                 if entry.is_file() and TEMPORARY_NAME.fullmatch(entry.name)]
    except FileNotFoundError:
        return []
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(directory, name))
    return names

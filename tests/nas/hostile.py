"""Files a hostile user might hand us, and a hostile machine."""
from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import nas.atomic


class RunsCode:
    """Unpickled by a plain unpickler, it runs ``touch MARKER``: the marker's absence shows that nothing ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class FullDisk:
    """A file on a disk with ``room`` bytes left: the write that needs more raises ENOSPC, as a full disk does."""

    def __init__(self, handle, room: int):
        self.handle, self.room = handle, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.handle.close()


def fill_disk(monkeypatch, room: int) -> None:
    """Every file nas.atomic opens from now on is on a disk with ``room`` bytes left."""
    monkeypatch.setattr(nas.atomic, "open", lambda fd, mode: FullDisk(open(fd, mode), room), raising=False)


def capped(module: str, args: list[str], cap_bytes: int = 3 << 30) -> list[str]:
    """A command running ``python -m module args`` with at most ``cap_bytes`` of address space (RLIMIT_AS): past it
    an allocation fails instead of taking the machine's memory, so that a run that would exhaust it ends in a traceback
    the test sees."""
    script = ("import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap})); "
              "sys.argv = [{module!r}] + sys.argv[1:]; runpy.run_module({module!r}, run_name='__main__', "
              "alter_sys=True)").format(cap=cap_bytes, module=module)
    return [sys.executable, "-c", script, *args]

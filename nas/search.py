"""Architecture search from the command line: ``python -m nas.search --checkpoint CKPT --budget macs=1.3G ...``.

Searches the supernet of a ``python -m nas.train`` checkpoint for the best subnet under each budget
(``nas.searching``) and writes ``search.json``, ``pareto.png`` and the resumable state to ``--out-dir``. Every
setting of :class:`nas.searching.SearchConfig` is a flag, a ``--set`` key and a key of the ``--config`` file
(``nas.config``); ``--resume`` continues the search in ``--out-dir`` with the settings it was saved with.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch.distributed as dist

from .config import parse_command_line
from .errors import run_command
from .searchers import SEARCHERS
from .searching import STATE_FILE, SearchConfig, read_state, run_search


def saved_settings(out_dir: str, resume: bool | str) -> Mapping[str, Any] | None:
    """The settings of the search saved in ``out_dir`` (None where there is none: the search reports that)."""
    path = os.path.join(out_dir, STATE_FILE)
    if not os.path.exists(path):
        return None
    saved = read_state(path).get("config")
    return saved if isinstance(saved, dict) else None


def algorithms() -> str:
    """One line per search algorithm: its name and the first line of its module's description."""
    return "\n".join(f"  {name:10s} {(sys.modules[cls.__module__].__doc__ or '').strip().splitlines()[0]}"
                     for name, cls in SEARCHERS.items())


def parse_args(argv: Sequence[str] | None = None) -> tuple[SearchConfig, bool]:
    return parse_command_line(
        SearchConfig, argv, prog="python -m nas.search",
        description="Search the supernet of a nas.train checkpoint for the best subnet under each budget.\n\n"
                    "algorithms:\n" + algorithms(),
        resume_help="continue the search saved in --out-dir with the settings it was saved with",
        resume_takes_path=False, saved=saved_settings)


def run(argv: Sequence[str] | None) -> int:
    try:
        run_search(*parse_args(argv))
        if dist.is_initialized():
            dist.barrier()  # no rank tears down its connections while another still finishes
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("nas.search", lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())

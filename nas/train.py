"""Supernet training from the command line: ``python -m nas.train [--config FILE] [--set KEY=VALUE] [--resume [PATH]]``.

With no arguments it trains a small supernet of the ``digits-tiny`` space on scikit-learn's 8x8 digits (no files
needed, a few minutes on a laptop CPU) and reports the test accuracy of its smallest and largest subnets. Every
setting of :class:`nas.trainer.TrainConfig` is a flag, a ``--set`` key and a key of the ``--config`` file
(``nas.config``); ``--resume`` continues the run in ``--out-dir`` from its latest checkpoint (or from PATH) with the
settings it was saved with. Under ``torchrun --nproc_per_node N -m nas.train`` every process trains its shard.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch.distributed as dist

from .checkpoint import resume_checkpoint, saved_config
from .config import parse_command_line
from .errors import run_command
from .trainer import TrainConfig, TrainResult, train


def saved_settings(out_dir: str, resume: bool | str) -> Mapping[str, Any] | None:
    """The settings of the checkpoint ``--resume`` names (None where there is none: the run reports that)."""
    path = resume_checkpoint(out_dir, resume)
    return saved_config(path) if path is not None and path.exists() else None


def parse_args(argv: Sequence[str] | None = None) -> tuple[TrainConfig, bool | str]:
    return parse_command_line(
        TrainConfig, argv, prog="python -m nas.train",
        description="Train a weight-sharing ViT supernet; with no arguments, digits-tiny on scikit-learn's digits.",
        resume_help="continue the run in --out-dir from its latest checkpoint, or from the checkpoint PATH, with "
                    "the settings it was saved with", resume_takes_path=True, saved=saved_settings)


def report(result: TrainResult) -> str:
    return (f"trained {result.steps} steps in {result.seconds:.1f} s; test {result.metric}: smallest subnet "
            f"{100 * result.smallest:.2f}%, largest subnet {100 * result.largest:.2f}%"
            + "".join(f"; eval_archs[{i}] {100 * a:.2f}%" for i, a in enumerate(result.eval_archs))
            + f"; {result.search_holdout} training images held out for nas.search"
            + (f"\ncheckpoint: {result.checkpoint}" if result.checkpoint else ""))


def run(argv: Sequence[str] | None) -> int:
    try:
        result = train(*parse_args(argv))
        if dist.is_initialized():
            # No rank tears down its connections while another is still finishing the last collective.
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(report(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("nas.train", lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())

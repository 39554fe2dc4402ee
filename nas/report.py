"""What runs report: progress bars, the JSON-lines log of training and reading it back, the optional TensorBoard log
beside it, and the plots (training curves, the Pareto front of a search). Progress bars need tqdm and plots
matplotlib (``pip install 'elastic-ops[nas]'``), TensorBoard its package (``'elastic-ops[tensorboard]'``), only where
one is shown, drawn or written; all files but TensorBoard's event files are written atomically."""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .atomic import atomic_open
from .budget import Budget
from .errors import require


class _Hidden:
    """A progress bar that is not shown."""

    def update(self, count: int = 1) -> None:
        pass

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(shown: bool, **options):
    """A tqdm progress bar made with ``options`` where ``shown``, else one that shows nothing."""
    if not shown:
        return _Hidden()
    return require("tqdm.auto", "nas", "the progress bar (or set progress to false)").tqdm(**options)


class JsonLog:
    """JSON lines, only ever appended to, written where ``enabled`` (rank 0). A resumed run first cuts off a torn
    last line (what a killed run left of a record) and appends a ``resume`` record; :func:`read_log` drops the
    records it supersedes."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None:
            drop_torn_line(path)
            self.write({"event": "resume", "step": resume_step})

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


class TensorBoardLog:
    """The numbers of the log's records as TensorBoard scalars at their step, under ``<event>/<key>`` (``train/loss``,
    ``train/lr``, ``final/largest``; a list such as the losses of a step's subnets as ``train/losses/<i>``). TensorBoard
    appends event files of its own; a resumed run writes a new one, and TensorBoard shows the latest value of a step."""

    def __init__(self, log_dir: Path):
        writer = require("torch.utils.tensorboard", "tensorboard", "logging to TensorBoard (or set tensorboard to "
                                                                   "false)").SummaryWriter
        self.writer = writer(log_dir=str(log_dir))

    def write(self, record: dict) -> None:
        event, step = record.get("event", "record"), record.get("step", 0)
        for key, value in record.items():
            values = value if isinstance(value, list) else [value]
            for i, number in enumerate(values):
                if isinstance(number, (int, float)) and not isinstance(number, bool) and key != "step":
                    name = f"{event}/{key}" + (f"/{i}" if isinstance(value, list) else "")
                    self.writer.add_scalar(name, number, global_step=step)

    def close(self) -> None:
        self.writer.close()


def drop_torn_line(path: Path, chunk: int = 1 << 16) -> None:
    """Truncate ``path`` just after its last newline, if anything follows it."""
    if not path.exists():
        return
    with path.open("rb+") as f:
        end = position = f.seek(0, os.SEEK_END)
        keep = 0
        while position > 0:
            start = max(0, position - chunk)
            f.seek(start)
            newline = f.read(position - start).rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            position = start
        if keep < end:
            f.truncate(keep)


def read_log(path: str | os.PathLike) -> list[dict]:
    """A run's records as they stand: without a torn last line (no newline), and without the records that a
    ``resume`` record supersedes (those before it and past its step, written before the run stopped)."""
    records: list[dict] = []
    for line in Path(path).read_text().split("\n")[:-1]:  # the last piece is empty or torn
        if not line:
            continue
        record = json.loads(line)
        if record.get("event") == "resume":
            records = [r for r in records if r.get("step", 0) <= record["step"]]
        records.append(record)
    return records


def _pyplot():
    matplotlib = require("matplotlib", "nas", "plotting")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: str | os.PathLike, dpi: int) -> None:
    with atomic_open(path) as handle:
        figure.savefig(handle, format="png", dpi=dpi)


def plot_curves(log_path: str | os.PathLike, out_path: str | os.PathLike) -> None:
    """Loss and training accuracy per step, and the evaluated subnets' test accuracy, as a PNG."""
    plt = _pyplot()
    records = read_log(log_path)
    steps = [r for r in records if r.get("event") == "train"]
    evals = [r for r in records if r.get("event") in ("eval", "final")]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in steps], [r["loss"] for r in steps])
    ax_loss.set(xlabel="step", ylabel="training loss (mean over the step's subnets)", yscale="log")
    ax_acc.plot([r["step"] for r in steps], [r["acc"] for r in steps], label="train (first subnet of each step)",
                alpha=0.6)
    for key in ("smallest", "largest"):
        ax_acc.plot([r["step"] for r in evals], [r[key] for r in evals], "o-", label=f"test, {key} subnet")
    ax_acc.set(xlabel="step", ylabel="top-1 accuracy", ylim=(0, 1))
    ax_acc.legend()
    fig.tight_layout()
    _save(fig, out_path, dpi=100)
    plt.close(fig)


def plot_front(summary: dict[str, Any], path: str | os.PathLike, budgets: Sequence[Budget]) -> None:
    """A search summary (``search.json``) as a PNG: every evaluated arch (score against cost), the Pareto front, the
    best arch per budget, and the limits of the budgets on the first budget's metric."""
    plt = _pyplot()
    metric = budgets[0].metric if budgets else "macs"
    score = summary["score"]
    figure, axes = plt.subplots(figsize=(6.4, 4.4))
    axes.scatter([c[metric] for c in summary["candidates"]], [c[score] for c in summary["candidates"]],
                 s=8, alpha=0.4, label=f"evaluated ({len(summary['candidates'])})")
    front = summary["pareto_front"].get(metric, [])
    axes.plot([c[metric] for c in front], [c[score] for c in front], "o-", color="C3", markersize=4,
              label="Pareto front")
    for budget in budgets:
        if budget.metric == metric:
            axes.axvline(budget.high, color="grey", linestyle="--", linewidth=0.8)
    for label, best in summary["best"].items():
        if best is not None:
            axes.scatter([best[metric]], [best[score]], marker="*", s=120, zorder=3, label=f"best {label}")
    axes.set_xlabel({"macs": "MACs", "params": "parameters", "latency": "latency (ms)"}[metric])
    axes.set_ylabel(f"{score} (%)")
    axes.set_title(f"{summary['algorithm']} on {summary['space']}")
    axes.legend(fontsize=7)
    figure.tight_layout()
    _save(figure, path, dpi=120)
    plt.close(figure)

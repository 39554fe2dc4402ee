"""SuperSAM end to end on the digit canvases (``mnist-seg``) through the command lines, as benchmarks/RESULTS.md shows.

1. Pretrain one encoder with a dense head (the largest arch of ``mnist-seg-tiny``, sampler ``fixed``).
2. Turn it into a supernet and train it with the pipeline: ``--init-from`` the pretrained checkpoint, MLP units
   reordered by activation, the sandwich rule with a linear layer-drop profile, distillation from the pretrained model.
3. Search it with the program autotuner under MAC budgets 30%, 50% and 70% below the pretrained model's.
4. Train each searched subnet alone from scratch (by default for as many steps as the supernet trained).

A step whose output is there already (a final checkpoint, search.json) is not run again. Prints every command, then a
table of test mIoU; writes ``<out>/results.json``. Usage::

    nice -n 10 python benchmarks/supersam_pipeline.py --out runs/supersam --pretrain-steps 1200 --supernet-steps 600
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from nas.budget import Budget
from nas.costs import macs
from nas.spaces import load_space

SPACE = "mnist-seg-tiny"


def run(command: list[str], done: Path) -> float:
    print("$ " + " ".join(shlex.quote(c) for c in command), flush=True)
    if done.exists():
        print(f"(done already: {done})", flush=True)
        return 0.0
    start = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - start


def final_record(out_dir: Path) -> dict:
    records = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return next(r for r in reversed(records) if r.get("event") == "final")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/supersam")
    parser.add_argument("--data-dir", default="../shared/data/mnist")
    parser.add_argument("--pretrain-steps", type=int, default=1200)
    parser.add_argument("--supernet-steps", type=int, default=600)
    parser.add_argument("--scratch-steps", type=int, default=None, help="default: --supernet-steps")
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--holdout-images", type=int, default=800)
    args = parser.parse_args()
    out = Path(args.out)
    train = [sys.executable, "-m", "nas.train", "--space", SPACE, "--dataset", "mnist-seg", "--data-dir",
             args.data_dir, "--batch-size", "32", "--eval-batch-size", "250", "--no-progress", "--no-plot",
             "--ckpt-every", "0"]
    seconds = {}

    pretrained = out / "pretrain" / "checkpoints" / f"step_{args.pretrain_steps:08d}.pt"
    seconds["pretrain"] = run(train + ["--sampler", "fixed", "--steps", str(args.pretrain_steps),
                                       "--out-dir", str(out / "pretrain")], pretrained)
    supernet = out / "supernet" / "checkpoints" / f"step_{args.supernet_steps:08d}.pt"
    seconds["supernet"] = run(train + [
        "--steps", str(args.supernet_steps), "--init-from", str(pretrained), "--reorder-mlp", "activation",
        "--teacher", "pretrained", "--set", "sampler_options.drop_profile=linear", "--lr", "1e-3",
        "--out-dir", str(out / "supernet")], supernet)

    space = load_space(SPACE)
    pretrained_macs = macs(space.max_arch(), space)
    cuts = (0.3, 0.5, 0.7)  # each budget: between cut and cut + 5% fewer MACs than the pretrained model
    windows = [((0.95 - cut) * pretrained_macs / 1e6, (1 - cut) * pretrained_macs / 1e6) for cut in cuts]
    budgets = [Budget.parse(f"macs={low:.3f}M:{high:.3f}M").label for low, high in windows]
    seconds["search"] = run([
        sys.executable, "-m", "nas.search", "--checkpoint", str(supernet), "--algorithm", "autotuner",
        *[arg for b in budgets for arg in ("--budget", b)], "--generations", str(args.generations),
        "--population", str(args.population), "--holdout-images", str(args.holdout_images), "--batch-size", "250",
        "--no-progress", "--out-dir", str(out / "search")], out / "search" / "search.json")
    search = json.loads((out / "search" / "search.json").read_text())

    rows = [{"model": f"pretrained ({SPACE} largest)", "macs": pretrained_macs,
             "miou": 100 * final_record(out / "pretrain")["largest"], "arch": space.max_arch().to_dict()}]
    scratch_steps = args.scratch_steps or args.supernet_steps
    for cut, label in zip(cuts, budgets):
        best = search["best"].get(label)
        if best is None:
            continue
        arch = json.dumps(best["arch"])
        name = f"scratch-{int(100 * cut)}"
        seconds[name] = run(train + ["--sampler", "fixed", "--set", f"sampler_options.arch={arch}", "--set",
                                     f"eval_archs=[{arch}]", "--steps", str(scratch_steps),
                                     "--out-dir", str(out / name)],
                           out / name / "checkpoints" / f"step_{scratch_steps:08d}.pt")
        rows.append({"model": f"SuperSAM subnet, {int(100 * cut)}% fewer MACs budget", "macs": best["macs"],
                     "miou": search["test"][label]["miou"], "arch": best["arch"]})
        rows.append({"model": f"same subnet from scratch, {scratch_steps} steps", "macs": best["macs"],
                     "miou": 100 * final_record(out / name)["eval_archs"][0], "arch": best["arch"]})

    print("\n| model | MACs | MACs vs pretrained | test mIoU (%) |\n| --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['model']} | {row['macs'] / 1e6:.2f}M | {100 * (1 - row['macs'] / pretrained_macs):+.0f}% "
              f"smaller | {row['miou']:.2f} |".replace("+", ""))
    (out / "results.json").write_text(json.dumps({"rows": rows, "seconds": seconds, "budgets": budgets,
                                                  "args": vars(args)}, indent=1))
    print(f"\nseconds: {json.dumps({k: round(v) for k, v in seconds.items()})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

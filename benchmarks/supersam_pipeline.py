"""SuperSAM end to end on the digit canvases (``mnist-seg``) through the command lines, as benchmarks/RESULTS.md shows.

1. Pretrain one encoder with a dense head (the largest arch of ``--space``, sampler ``fixed``): ``mnist-seg-tiny``'s
   plain ViT, or ``sam-seg-tiny``'s SAM image encoder.
2. Turn it into a supernet and train it with the pipeline: ``--init-from`` the pretrained weights, MLP units
   reordered by activation, the sandwich rule with a linear layer-drop profile. The plain ViT starts from the
   pretrained checkpoint and distils from the pretrained model; SAM's encoder is first converted to a SAM state dict
   (``nas.sam.supernet.to_sam_state_dict``: SAM's names and layout, the dense head beside it), which ``--init-from``
   maps back, and distils from the largest subnet (the pretrained teacher reads ``nas.train`` checkpoints only).
3. Search it with the program autotuner under MAC budgets 30%, 50% and 70% below the pretrained model's, and export
   each subnet found (``nas.export``, pytorch and safetensors, checked against the supernet).
4. Train each searched subnet alone from scratch (by default for as many steps as the supernet trained; 0: not).

A step whose output is there already (a final checkpoint, search.json) is not run again. Prints every command, then a
table of test mIoU; writes ``<out>/results.json``. Usage::

    nice -n 10 python benchmarks/supersam_pipeline.py --out runs/supersam --pretrain-steps 1200 --supernet-steps 600
    nice -n 10 python benchmarks/supersam_pipeline.py --space sam-seg-tiny --out runs/supersam-sam --scratch-steps 0
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from nas.budget import Budget
from nas.checkpoint import load_supernet
from nas.costs import macs
from nas.family import family_of
from nas.spaces import load_space


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


def sam_weights(checkpoint: Path, path: Path) -> float:
    """The pretrained SAM encoder of a ``nas.train`` checkpoint as a SAM state dict (SAM's names and layout) with its
    dense head beside it (its own names), for ``--init-from``."""
    from nas.sam.supernet import to_sam_state_dict

    print(f"$ convert {checkpoint} -> {path} (SAM's names)", flush=True)
    if not path.exists():
        supernet, _, _ = load_supernet(checkpoint)
        head = {name: t for name, t in supernet.state_dict().items() if name.startswith("head.")}
        torch.save(to_sam_state_dict(supernet) | head, path)
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default="mnist-seg-tiny", help="mnist-seg-tiny (plain ViT) or sam-seg-tiny")
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
    space = load_space(args.space)
    sam = family_of(space).name == "sam"
    train = [sys.executable, "-m", "nas.train", "--space", args.space, "--dataset", "mnist-seg", "--data-dir",
             args.data_dir, "--batch-size", "32", "--eval-batch-size", "250", "--no-progress", "--no-plot",
             "--ckpt-every", "0"]
    seconds = {}

    pretrained = out / "pretrain" / "checkpoints" / f"step_{args.pretrain_steps:08d}.pt"
    seconds["pretrain"] = run(train + ["--sampler", "fixed", "--steps", str(args.pretrain_steps),
                                       "--out-dir", str(out / "pretrain")], pretrained)
    initial, teacher = pretrained, ["--teacher", "pretrained"]
    if sam:
        initial, teacher = out / "pretrain" / "sam_encoder.pth", []
        seconds["convert"] = sam_weights(pretrained, initial)
    supernet = out / "supernet" / "checkpoints" / f"step_{args.supernet_steps:08d}.pt"
    seconds["supernet"] = run(train + [
        "--steps", str(args.supernet_steps), "--init-from", str(initial), "--reorder-mlp", "activation", *teacher,
        "--set", "sampler_options.drop_profile=linear", "--lr", "1e-3", "--out-dir", str(out / "supernet")], supernet)

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

    rows = [{"model": f"pretrained ({args.space} largest)", "macs": pretrained_macs,
             "miou": 100 * final_record(out / "pretrain")["largest"], "arch": space.max_arch().to_dict()},
            {"model": "supernet's largest subnet after the SuperSAM training", "macs": pretrained_macs,
             "miou": 100 * final_record(out / "supernet")["largest"], "arch": space.max_arch().to_dict()}]
    scratch_steps = args.supernet_steps if args.scratch_steps is None else args.scratch_steps
    for cut, label in zip(cuts, budgets):
        best = search["best"].get(label)
        if best is None:
            continue
        arch = json.dumps(best["arch"])
        exported = out / f"export-{int(100 * cut)}"
        seconds[exported.name] = run([sys.executable, "-m", "nas.export", "--checkpoint", str(supernet), "--arch", arch,
                                      "--format", "pytorch", "--format", "safetensors", "--out-dir", str(exported)],
                                     exported / "subnet.pt")
        rows.append({"model": f"SuperSAM subnet, {int(100 * cut)}% fewer MACs budget", "macs": best["macs"],
                     "miou": search["test"][label]["miou"], "arch": best["arch"]})
        if not scratch_steps:
            continue
        name = f"scratch-{int(100 * cut)}"
        seconds[name] = run(train + ["--sampler", "fixed", "--set", f"sampler_options.arch={arch}", "--set",
                                     f"eval_archs=[{arch}]", "--steps", str(scratch_steps),
                                     "--out-dir", str(out / name)],
                           out / name / "checkpoints" / f"step_{scratch_steps:08d}.pt")
        rows.append({"model": f"same subnet from scratch, {scratch_steps} steps", "macs": best["macs"],
                     "miou": 100 * final_record(out / name)["eval_archs"][0], "arch": best["arch"]})

    print("\n| model | MACs | MACs vs pretrained | test mIoU (%) |\n| --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['model']} | {row['macs'] / 1e6:.2f}M | {100 * (1 - row['macs'] / pretrained_macs):+.0f}% "
              f"smaller | {row['miou']:.2f} |".replace("+", ""))
    report = json.loads((out / "supernet" / "init_report.json").read_text())
    (out / "results.json").write_text(json.dumps({"rows": rows, "seconds": seconds, "budgets": budgets,
                                                  "init_report": {k: len(v) for k, v in report.items()},
                                                  "args": vars(args)}, indent=1))
    print(f"\nseconds: {json.dumps({k: round(v) for k, v in seconds.items()})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

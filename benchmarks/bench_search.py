"""A whole search, timed side by side in one run, and what racing decides against full evaluation.

Schedule: AutoFormer's evolution (population 50, 10 parents, 25 mutations + 25 crossovers) for ``--generations``
steps under ``--budget`` on the first ``--images`` held-out images of ``--checkpoint`` (a supernet trained by
``nas.train``; without one, a randomly initialised cifar-tiny supernet on random images, for timing only). Every
variant evaluates the candidates of the same seeded search:

- ``racing``: ``nas.search --race`` (``nas.searching.make_evaluate``: K subnets per pass, shared prefixes, racing);
- ``full``: the same, racing off, as ``nas.search`` runs by default (every candidate on every image);
- ``sequential``: every candidate on every image, one subnet after another (``evaluate_archs(batched=False)``);
- ``autoformer``: AutoFormer's own loop: per candidate, ``set_arch`` and a pass of a DataLoader over the data set
  (its ``evaluate`` in ``lib/evolution.py``), here over the images already normalised (its transforms would
  normalise each image again on every pass: the baseline is given that for free).
Targets: racing >= 3x sequential and >= 5x autoformer, with the same best arch.

Agreement (``--seeds``): for each seed, the search with racing and with full evaluation; the best arch and the 10
kept archs (the parents) compared, and the fraction of image-forwards racing saved. The full run evaluates every
candidate slice by slice (racing's slices, nobody stopped), filling the evaluation cache that the racing run then
reads: its decisions are exactly those of a fresh racing run, at the cost of one search per seed.

Run: python benchmarks/bench_search.py --checkpoint CKPT [--images 10000] [--generations 20] [--budget macs=30M]
        [--seeds 3] [--variants racing full sequential autoformer]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from nas.budget import Costs
from nas.checkpoint import load_supernet
from nas.distributed import Distributed
from nas.evaluate import EvalCache, TensorBatches, evaluate_archs
from nas.searching import Search, SearchConfig, make_evaluate, search_data
from nas.spaces import load_space
from nas.vit.supernet import SupernetConfig, VisionTransformerSupernet


def autoformer_evaluate(supernet, dataset: TensorDataset, batch_size: int):
    """AutoFormer's evaluation of a candidate: a DataLoader pass per arch, the supernet set to the arch."""
    @torch.no_grad()
    def evaluate(archs, contenders=None):
        supernet.eval()
        results = []
        for arch in archs:
            correct = total = 0
            for images, labels in DataLoader(dataset, batch_size=batch_size, shuffle=False):
                logits = supernet(images, arch)
                correct += (logits.argmax(-1) == labels).sum().item()
                total += labels.shape[0]
            results.append({"top1": 100.0 * correct / total, "top5": 0.0, "loss": 0.0, "samples": total})
        return results
    return evaluate


def forwards(search: Search) -> int:
    return sum(int(c.metrics["samples"]) for c in search.evaluated.values())


def run(config: SearchConfig, space, evaluate) -> tuple[float, Search]:
    search = Search(config, space, evaluate, Costs(space), log=lambda _: None)
    start = time.perf_counter()
    search.run()
    return time.perf_counter() - start, search


def kept(search: Search, count: int = 10) -> list:
    """The ``count`` best complete candidates (evolution's parents), best first."""
    ranked = sorted(search.complete_candidates(), key=lambda c: -c.metrics["top1"])
    return [c.arch for c in ranked[:count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint")
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--generations", type=int, default=20)
    parser.add_argument("--budget", default="macs=30M")
    parser.add_argument("--seeds", type=int, default=0, help="agreement of racing with full evaluation, per seed")
    parser.add_argument("--variants", nargs="*", default=["racing", "full", "sequential", "autoformer"])
    parser.add_argument("--json", help="write the figures there too")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = dict(budgets=[args.budget], generations=args.generations, holdout_images=args.images, batch_size=256,
                checkpoint=args.checkpoint, progress=False)
    if args.checkpoint:
        supernet, space, state = load_supernet(args.checkpoint, device)
        batches, _, described = search_data(SearchConfig(**base), state, space, device)
    else:
        space = load_space("cifar-tiny")
        torch.manual_seed(0)
        supernet = VisionTransformerSupernet(SupernetConfig.from_space(space)).to(device).eval()
        images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8)
        batches = TensorBatches(images, torch.randint(0, 10, (args.images,)), (0.5,) * 3, (0.25,) * 3, 256, device,
                                torch.float32)
        described = f"{args.images} random images (untrained supernet: timing only)"
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"space {space.name}, {described}, budget {args.budget}, {args.generations} generations, {name}, "
          f"torch {torch.__version__}", flush=True)
    data_key = f"bench|{batches.fingerprint}"
    one = Distributed()
    figures: dict = {"setting": {**vars(args), "device": name, "torch": torch.__version__}}

    def variant(name: str, seed: int = 0, cache: EvalCache | None = None) -> tuple[float, Search]:
        """``name``'s search; ``full-sliced``: every candidate on every slice of racing (the agreement's reference)."""
        config = SearchConfig(**base, seed=seed, race=name in ("racing", "full-sliced"))
        if name in ("racing", "full", "full-sliced"):
            evaluate = make_evaluate(config, supernet, batches, cache or EvalCache(), data_key, one)
            if name == "full-sliced":
                raced = evaluate

                def evaluate(archs, contenders=None):
                    return raced(archs, None)  # None: nobody stops
        elif name == "sequential":
            def evaluate(archs, contenders=None):
                return [r.to_dict() for r in evaluate_archs(supernet, archs, batches, batched=False, progress=False)]
        else:
            evaluate = autoformer_evaluate(supernet, TensorDataset(batches.images, batches.labels), 256)
        return run(config, space, evaluate)

    times = {}
    for name_ in args.variants:
        seconds, search = variant(name_)
        times[name_] = seconds
        best = next(iter(search.best_per_budget().values()))
        print(f"{name_:10s}: {seconds:8.1f} s, {len(search.evaluated)} candidates, {forwards(search)} image-forwards, "
              f"best top-1 {best.metrics['top1']:.2f}: {best.arch.to_json()}", flush=True)
        figures[name_] = {"seconds": seconds, "candidates": len(search.evaluated), "forwards": forwards(search),
                          "best": best.arch.to_dict(), "best_top1": best.metrics["top1"]}
    if "racing" in times:
        for other in ("full", "sequential", "autoformer"):
            if other in times:
                print(f"racing vs {other}: {times[other] / times['racing']:.2f}x")

    for seed in range(args.seeds):
        cache = EvalCache()
        _, full = variant("full-sliced", seed, cache)
        _, racing = variant("racing", seed, cache)
        overlap = len(set(kept(full)) & set(kept(racing)))
        same_best = kept(full)[0] == kept(racing)[0]
        saved = 1 - forwards(racing) / forwards(full)
        print(f"seed {seed}: same best arch {same_best}, {overlap}/10 of the kept archs shared, racing saved "
              f"{saved:.1%} of the image-forwards", flush=True)
        figures.setdefault("agreement", []).append({"seed": seed, "same_best": same_best, "kept_overlap": overlap,
                                                    "saved": saved})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    main()

"""The search schedule, candidates evaluated batched (K per pass over the data) vs one after another, and the
quality of evolution against random search at the same budget and number of evaluations.

Speed: AutoFormer's evolution schedule (population 50, 10 parents, 25 mutations + 25 crossovers, 20
generations: about 1,050 candidates) on ``--images`` held-out images (default 10,000 as in the target),
``nas.search.Search`` with the evaluator of ``nas.evaluate`` batched and with ``batched=False``, on the same
supernet and data. Target: batched >= 3x faster, on GPU and on CPU. ``--generations`` shortens the schedule
(both runs evaluate exactly the same candidates: the search is seeded and the scores are identical).

Quality (``--checkpoint`` of a supernet trained by ``nas.train``, CIFAR-10 from ../shared/data): evolution and
random search under the same budget and evaluation count; the best arch of each is scored on the test split.

Run: python benchmarks/bench_search.py [--checkpoint CKPT] [--images 10000] [--generations 20] [--budget macs=30M]
Without a checkpoint a randomly initialised cifar-tiny supernet is timed (quality needs a trained one).
"""
from __future__ import annotations

import argparse
import time

import torch

from nas.budget import Costs
from nas.checkpoint import load_supernet
from nas.evaluate import TensorBatches, evaluate_archs
from nas.searching import Search, SearchConfig, search_data
from nas.space import load_space
from nas.supernet import SupernetConfig, VisionTransformerSupernet


def timed_search(supernet, space, batches, config: SearchConfig, batched: bool) -> tuple[float, Search]:
    def evaluate(archs, contenders=None):
        return [r.to_dict() for r in evaluate_archs(supernet, archs, batches, batched=batched, progress=False)]

    search = Search(config, space, evaluate, Costs(space), log=lambda _: None)
    start = time.perf_counter()
    search.run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint")
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--generations", type=int, default=20)
    parser.add_argument("--budget", default="macs=30M")
    parser.add_argument("--skip-sequential", action="store_true", help="time the batched search only")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = SearchConfig(budgets=[args.budget], generations=args.generations, holdout_images=args.images,
                          batch_size=256, checkpoint=args.checkpoint, progress=False)
    if args.checkpoint:
        supernet, space, state = load_supernet(args.checkpoint, device)
        batches, test_batches, described = search_data(config, state, space, device)
    else:
        space = load_space("cifar-tiny")
        torch.manual_seed(0)
        supernet = VisionTransformerSupernet(SupernetConfig.from_space(space)).to(device).eval()
        images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8)
        batches = TensorBatches(images, torch.randint(0, 10, (args.images,)), (0.5,) * 3, (0.25,) * 3, 256, device)
        test_batches, described = None, f"{args.images} random images (untrained supernet: timing only)"
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"space {space.name}, {described}, budget {args.budget}, {args.generations} generations, {name}, "
          f"torch {torch.__version__}")

    batched_time, evolution = timed_search(supernet, space, batches, config, batched=True)
    print(f"evolution, batched:    {batched_time:8.1f} s for {len(evolution.evaluated)} candidates")
    if not args.skip_sequential:
        sequential_time, again = timed_search(supernet, space, batches, config, batched=False)
        print(f"evolution, sequential: {sequential_time:8.1f} s for {len(again.evaluated)} candidates")
        print(f"batched speed-up: {sequential_time / batched_time:.2f}x (target 3x)")

    if test_batches is not None:
        random_config = SearchConfig(**{**config.to_dict(), "algorithm": "random"})
        _, random = timed_search(supernet, space, batches, random_config, batched=True)
        for label, search in (("evolution", evolution), ("random", random)):
            best = next(iter(search.best_per_budget().values()))
            test = evaluate_archs(supernet, [best.arch], test_batches, progress=False)[0]
            print(f"{label:9s}: {len(search.evaluated)} evaluated, best search top-1 {best.metrics['top1']:.2f}, "
                  f"test top-1 {test.top1:.2f}, {best.metrics['macs'] / 1e6:.1f}M MACs")


if __name__ == "__main__":
    main()

"""FocusFormer's learned sampler after a default digits-tiny run's worth of policy training: per budget, the MACs of
its proposals (``propose``) and of its own draws, against an accuracy that rises with size as a supernet's does plus
the noise of 256 held-out images (the setting of tests/nas/test_samplers.py, over several seeds).

    python benchmarks/focusformer_budgets.py --seeds 0 1 2
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from nas import costs
from nas.samplers import build_sampler
from nas.spaces import load_space

DEFAULT_RUN_STEPS = 80 * 17  # nas.train --space digits-tiny: 80 epochs of 17 batches of 64 (1151 training images)


def spearman(x, y) -> float:
    return float(np.corrcoef(np.argsort(np.argsort(x)), np.argsort(np.argsort(y)))[0, 1])


def run(seed: int, budgets_count: int = 6, draws: int = 200) -> None:
    space = load_space("digits-tiny")
    low, high = costs.macs_range(space)
    noise = np.random.default_rng(seed + 1)

    def measure(arch):
        return 0.6 + 0.3 * np.log(costs.macs(arch, space) / low) / np.log(high / low) + noise.normal(0, 0.025)

    sampler = build_sampler("learned", space, seed=seed, total_steps=DEFAULT_RUN_STEPS)
    for _ in range(sampler.total_steps):
        sampler.update(sampler.sample(), [0.0], measure)
    budgets = np.linspace(low + 0.1 * (high - low), high, budgets_count)
    proposed = [costs.macs_many(sampler.propose(budget, num=8), space) for budget in budgets]
    with torch.no_grad():
        drawn = [costs.macs_many(sampler.policy_draw([budget] * draws)[0], space) for budget in budgets]
    print(f"seed {seed}: budget (M MACs) | proposals' median MACs | share of budget | policy draws' median, fit")
    for budget, mine, own in zip(budgets, proposed, drawn):
        print(f"  {budget / 1e6:.2f} | {np.median(mine) / 1e6:.2f} | {np.median(mine) / budget:.2f} | "
              f"{np.median(own) / 1e6:.2f}, {np.mean(own <= budget):.2f}")
    shares = np.concatenate([mine / budget for mine, budget in zip(proposed, budgets)])
    fits = np.mean(np.concatenate([own <= budget for own, budget in zip(drawn, budgets)]))
    print(f"  Spearman(budget, proposals' median) {spearman(budgets, [np.median(m) for m in proposed]):.3f}; "
          f"proposals within budget {np.mean(shares <= 1):.0%}; median share {np.median(shares):.2f}; "
          f"policy draws within budget {fits:.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    torch.set_num_threads(1)  # the policy's ops are tiny
    for seed in args.seeds:
        run(seed)


if __name__ == "__main__":
    main()

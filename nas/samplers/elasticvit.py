"""ElasticViT's supernet training step as its code runs it (Tang et al. 2023; microsoft/Moonlit ``ElasticViT/``:
``models/model.py`` ``FusedSuperNet.arch_sampling``, ``_importance_comparison``, ``bank_arch_update``,
``bank_loss_update``, ``select_min_arch``; ``process.py`` ``train_one_epoch`` and ``get_bank_id``;
``train_eval_supernet.py``; ``configs/final_3min_space.yaml``).

- Banks are FLOPs targets, 100, 200, 300, 400, 500, 700, 900 and 1200M, and a subnet of a bank lands in
  ``[t, t + 2 * flops_bound]`` with ``flops_bound`` 10M. ElasticViT's ``compute_flops`` counts multiply-accumulates,
  so the targets are MACs here. In a space other than ``elasticvit-mobile`` (whose range they were chosen for) the
  targets and the window's width are mapped affinely from ``elasticvit-mobile``'s MACs range onto the space's: on
  ``elasticvit-mobile-cifar`` the banks are 1.70 to 5.08M MACs with windows 61K wide.
- The bank walks (``get_bank_id``): one of down, stay, up with equal chances, only stay and the way in at the ends,
  before every step and once more between epochs. The walk has its own generator, seeded from the sampler's seed,
  so that it can be replayed.
- Each bank has a minimum arch: every field at or above it (ElasticViT reads them from an offline table). Here
  they are computed once, when the sampler is built, and kept in its state (the checkpoint): of the archs with
  every field at the same fraction of its choices and no more MACs than the bank's target, the one whose draws
  above it land in the bank's window most often.
- A step trains the modes ``['uniform', 'uniform', 'uniform', 'min']``: three subnets of the bank and its minimum
  arch; no largest subnet. A uniform subnet retrains an arch of the bank's memory, with probability ``0.2 + 0.15``
  per 100 epochs once the memory is more than half full, drawn by ``softmax(score)``; otherwise it is the best of
  up to 5 draws in the bank's window above the bank's minimum arch by the depth-versus-width importance comparison
  with an anchor (only one draw while the memory is less than half full).
- The memory keeps up to 150 archs per bank (50 from the 500M bank on), scored by minus the cross-entropy on the
  step's training batch; an explored arch enters while there is room or in place of the worst-scored one if it
  scores better. Four times an epoch the memories are scored again: all banks at an epoch's first step, the
  step's bank at each further quarter.
- Losses (the trainer, ``learns_from_peers``): the uniform subnets learn from the labels, or with a teacher half
  from the labels and half from the teacher (``compute_dist_loss``); the minimum arch learns by alpha-divergence
  (AlphaNet's, ``AdaptiveLossSoft``) from the mean of the uniform subnets' probabilities.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from .. import costs
from ..errors import ConfigError
from ..family import Space, family_of
from ..hybrid.arch import HybridArch
from ..hybrid.space import HybridSpace
from ..spaces import load_space
from .base import ArchSampler, Measure
from .performance import keep_if_better

MOBILE_SPACE = "elasticvit-mobile"
MOBILE_TARGETS = (100e6, 200e6, 300e6, 400e6, 500e6, 700e6, 900e6, 1200e6)  # bank_flops_ranges (MACs)
MOBILE_WINDOW = 20e6  # 2 * flops_bound
MOBILE_BIG_BANK = 500e6  # banks from here on keep big_bank_size archs
UNIFORM_PER_STEP = 3  # sampling_mode: ['uniform', 'uniform', 'uniform', 'min']
RESCORES_PER_EPOCH = 4


class FlopsTargets:
    """ElasticViT's banks for ``space``: MACs ``targets`` and the window width (``targets`` and ``width`` as given,
    or ElasticViT's mapped onto the space's MACs range), and from which target on a bank's memory is the small one."""

    def __init__(self, space: Space, targets: Sequence[float] | None = None, width: float | None = None):
        low, high = costs.macs_range(space)
        scale, shift = 1.0, 0.0
        if space.name != MOBILE_SPACE:
            mobile_low, mobile_high = costs.macs_range(load_space(MOBILE_SPACE))
            scale = (high - low) / (mobile_high - mobile_low)
            shift = low - scale * mobile_low
        self.targets = tuple(float(t) for t in targets) if targets is not None else tuple(
            shift + scale * t for t in MOBILE_TARGETS)
        self.width = float(width) if width is not None else scale * MOBILE_WINDOW
        self.big_from = shift + scale * MOBILE_BIG_BANK
        if not self.targets or list(self.targets) != sorted(set(self.targets)) or self.width <= 0:
            raise ValueError(f"elasticvit: targets must rise and the window be positive, got {list(self.targets)} "
                             f"and {self.width}")
        outside = [t for t in self.targets if t < low or t + self.width > high]
        if outside:
            raise ValueError(f"elasticvit: bank windows at {[f'{t:.4g}' for t in outside]} MACs are not inside space "
                             f"{space.name!r}'s range [{low:.4g}, {high:.4g}]")

    @property
    def num_banks(self) -> int:
        return len(self.targets)

    def window(self, bank: int) -> tuple[float, float]:
        return self.targets[bank], self.targets[bank] + self.width


def bank_move(bank: int, num_banks: int, rng: np.random.Generator) -> int:
    """``get_bank_id``: down, stay or up with equal chances; at an end, stay or the one way in."""
    moves = [m for m in (-1, 0, 1) if 0 <= bank + m < num_banks]
    return bank + moves[int(rng.integers(len(moves)))]


class ElasticViTSampler(ArchSampler):
    """ElasticViT's training step (see the module docstring); ``candidates``, ``memory_size``, ``big_memory_size``,
    ``exploit_start``, ``exploit_increase`` (per ``exploit_every`` epochs), ``targets`` and ``width`` (MACs) are its
    settings, with its values as defaults."""

    name = "elasticvit"
    scores_batches = True
    learns_from_peers = True

    def __init__(self, space: Space, *, seed: int = 0, total_steps: int = 1, targets: Sequence[float] | None = None,
                 width: float | None = None, candidates: int = 5, memory_size: int = 150, big_memory_size: int = 50,
                 exploit_start: float = 0.2, exploit_increase: float = 0.15, exploit_every: int = 100,
                 floor_draws: int = 256):
        super().__init__(space, seed=seed, total_steps=total_steps)
        if family_of(space).name != "hybrid":
            raise ValueError(f"elasticvit follows ElasticViT's hybrid supernet; space {space.name!r} is a ViT space "
                             "(the complexity, performance and elasticvit-sandwich samplers take any space)")
        if min(candidates, memory_size, big_memory_size, exploit_every, floor_draws) < 1:
            raise ValueError("elasticvit: candidates, memory_size, big_memory_size, exploit_every and floor_draws "
                             "must be >= 1")
        self.banks = FlopsTargets(space, targets, width)
        self.candidates, self.exploit_every = int(candidates), int(exploit_every)
        self.exploit_start, self.exploit_increase = float(exploit_start), float(exploit_increase)
        self.capacity = [int(memory_size) if t < self.banks.big_from else int(big_memory_size)
                         for t in self.banks.targets]
        self.walk_rng = np.random.default_rng([seed, 1])
        self.bank = 0
        self.floors = bank_floors(space, self.banks, np.random.default_rng([seed, 2]), floor_draws)
        self.memory: list[list[list]] = [[] for _ in self.banks.targets]  # bank -> [[arch as dict, score], ...]
        self.from_memory: list[bool] = []  # per uniform arch of the last step

    # -- drawing -------------------------------------------------------------------------------------------------
    def exploit_probability(self) -> float:
        """``bank_sampling_rate`` 0.2, raised by ``sampling_rate_inc`` 0.15 as epoch 99, 199, ... begins."""
        epoch = self.step // self.steps_per_epoch
        return self.exploit_start + self.exploit_increase * ((epoch + 1) // self.exploit_every)

    def draw(self) -> list[HybridArch]:
        # train_eval_supernet.py moves once more after each epoch, process.py before each step
        if self.step % self.steps_per_epoch == 0 and self.step > 0:
            self.bank = bank_move(self.bank, self.banks.num_banks, self.walk_rng)
        self.bank = bank_move(self.bank, self.banks.num_banks, self.walk_rng)
        archs, self.from_memory = [], []
        for _ in range(UNIFORM_PER_STEP):
            exploit = self.rng.random() < self.exploit_probability()
            self.from_memory.append(exploit and len(self.memory[self.bank]) > self.capacity[self.bank] // 2)
            archs.append(self.recall(self.bank) if self.from_memory[-1] else self.explore(self.bank))
        return archs + [self.floors[self.bank]]

    def recall(self, bank: int) -> HybridArch:
        scores = np.array([score for _, score in self.memory[bank]])
        weights = np.exp(scores - scores.max())
        return HybridArch.from_dict(self.memory[bank][self.rng.choice(len(scores), p=weights / weights.sum())][0])

    def explore(self, bank: int) -> HybridArch:
        """The first draw in the bank's window while its memory is less than half full, else the one of
        ``candidates`` draws whose width counts most against its depth (the smallest importance difference)."""
        drawn, differences = [], []
        while len(drawn) < self.candidates:
            drawn.append(in_window(self.space, self.rng, self.banks.window(bank), self.floors[bank]))
            if len(self.memory[bank]) < self.capacity[bank] // 2:
                return drawn[0]
            differences.append(self.importance_difference(drawn[-1], bank))
        return drawn[int(np.argmin(differences))]

    def anchor(self, bank: int) -> HybridArch:
        """``_importance_comparison``'s anchor: the best-scored arch of the first bank for a higher bank (ElasticViT
        looks for a 150M or 50M bank first, which its banks do not have), else the space's smallest."""
        if bank > 0 and self.memory[0]:
            return HybridArch.from_dict(max(self.memory[0], key=lambda entry: entry[1])[0])
        return self.space.min_arch()

    def importance_difference(self, arch: HybridArch, bank: int) -> float:
        """MACs of ``arch`` with the anchor's channels in its transformer stages, minus MACs of ``arch`` with the
        anchor's depths there: small where the arch's widths buy more MACs than its depths."""
        anchor = self.anchor(bank)
        attending = [stage.op != "conv" for stage in arch.stages]
        stages = list(zip(arch.stages, anchor.stages, attending))
        widths = tuple(dataclasses.replace(s, channels=a.channels) if t else s for s, a, t in stages)
        depths = tuple(dataclasses.replace(s, depth=a.depth) if t else s for s, a, t in stages)
        anchored = costs.macs_many([HybridArch(arch.resolution, widths), HybridArch(arch.resolution, depths)],
                                  self.space)
        return float(anchored[0] - anchored[1])

    # -- the memory ----------------------------------------------------------------------------------------------
    def update(self, archs: Sequence[HybridArch], losses: Sequence[float], measure: Measure | None = None
               ) -> dict[str, float]:
        """``measure(arch)``: minus the cross-entropy of ``arch`` on this step's training batch."""
        measure = self.require_measure(measure)
        index = (self.step - 1) % self.steps_per_epoch  # of the step just trained
        quarter = max(1, self.steps_per_epoch // RESCORES_PER_EPOCH)
        if index == 0:  # bank_loss_update, at an epoch's first batch
            rescored = range(self.banks.num_banks)
        else:  # bank_arch_update(update_bank=True) at the end of each further quarter
            rescored = [self.bank] if (index + 1) % quarter == 0 and index + 1 != quarter * RESCORES_PER_EPOCH else []
        for bank in rescored:
            for entry in self.memory[bank]:
                entry[1] = float(measure(HybridArch.from_dict(entry[0])))
        scores = [self.remember(arch, float(measure(arch)))
                  for arch, recalled in zip(archs, self.from_memory) if not recalled]
        stats = {"from_memory": float(np.mean(self.from_memory)), "bank": float(self.bank)}
        if scores:
            stats["score"] = float(np.mean(scores))
        return stats

    def remember(self, arch: HybridArch, score: float) -> float:
        keep_if_better(self.memory[self.bank], arch.to_dict(), score, self.capacity[self.bank])
        return score

    # -- state ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "bank": self.bank, "walk_rng": self.walk_rng.bit_generator.state,
                "targets": list(self.banks.targets), "width": self.banks.width,
                "floors": [arch.to_dict() for arch in self.floors], "from_memory": list(self.from_memory),
                "memory": [[[dict(arch), score] for arch, score in bank] for bank in self.memory]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if state["targets"] != list(self.banks.targets) or state["width"] != self.banks.width:
            raise ValueError(f"elasticvit: the state's banks {state['targets']} (window {state['width']}) are not this "
                             f"sampler's {list(self.banks.targets)} (window {self.banks.width})")
        self.bank = int(state["bank"])
        self.walk_rng.bit_generator.state = state["walk_rng"]
        self.floors = [HybridArch.from_dict(arch) for arch in state["floors"]]
        self.from_memory = [bool(flag) for flag in state["from_memory"]]
        self.memory = [[[dict(arch), float(score)] for arch, score in bank] for bank in state["memory"]]


def in_window(space: HybridSpace, rng: np.random.Generator, window: tuple[float, float], floor: HybridArch,
              batch_size: int = 256, max_tries: int = 64) -> HybridArch:
    """A uniform draw above ``floor`` whose MACs are in ``window`` (``sample_random_subnet_from_range``), by
    rejection over batches."""
    for _ in range(max_tries):
        batch = space.sample_many(rng, batch_size, floor=floor)
        macs = costs.macs_many(batch, space)
        hits = np.flatnonzero((macs >= window[0]) & (macs <= window[1]))
        if hits.size:
            return batch.arch(int(hits[0]))
    raise ConfigError(f"elasticvit: no arch of space {space.name!r} above the bank's minimum arch in the MACs window "
                      f"[{window[0]:.4g}, {window[1]:.4g}] after {batch_size * max_tries} draws; widen the windows "
                      f"(sampler_options.width, now {window[1] - window[0]:.4g} MACs)")


def bank_floors(space: HybridSpace, banks: FlopsTargets, rng: np.random.Generator, draws: int,
                fractions: int = 11) -> list[HybridArch]:
    """Each bank's minimum arch: of the archs with every field at the same fraction of its choices (0, 0.1, ..., 1)
    and MACs at most the bank's target, the one whose ``draws`` draws above it land in the window most often (the
    lowest such fraction on a tie)."""
    genes = space.genes()
    levels = np.linspace(0.0, 1.0, fractions)
    indices = np.array([[round(q * (len(choices) - 1)) for _, choices in genes] for q in levels])
    diagonal = space.decode_genes(indices).archs()
    diagonal_macs = costs.macs_many(diagonal, space)
    floors = []
    for bank in range(banks.num_banks):
        low, high = banks.window(bank)
        best, best_hits = space.min_arch(), -1.0
        for arch, macs in zip(diagonal, diagonal_macs):
            if macs > low:
                break
            drawn = costs.macs_many(space.sample_many(rng, draws, floor=arch), space)
            hits = float(np.mean((drawn >= low) & (drawn <= high)))
            if hits > best_hits:
                best, best_hits = arch, hits
        floors.append(best)
    return floors


__all__ = ["ElasticViTSampler", "FlopsTargets", "bank_floors", "bank_move", "in_window"]

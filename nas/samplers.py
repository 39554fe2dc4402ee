"""Which subnets the supernet trains at each step.

Every sampler has the same small interface, and the training config picks one by name (:data:`SAMPLERS`):

- ``sample() -> list[Arch]``: the archs to train at this step (one forward/backward each, gradients summed).
  Where ``distill`` is True, the first is the teacher: the others learn from its outputs (in-place
  distillation).
- ``update(archs, losses, measure=None) -> dict``: feedback after the step (losses averaged over all
  ranks), plus ``measure(arch) -> accuracy`` on held-out batches for samplers that learn from it.
  Returns numbers worth logging.
- ``state_dict()`` / ``load_state_dict()``: plain dicts, lists, numbers and tensors (``torch.load(...,
  weights_only=True)`` reads them back); a resumed sampler draws exactly what it would have drawn.

All randomness comes from the sampler's own generator, seeded by the config: every rank builds the same
sampler with the same seed, gets the same (rank-averaged) feedback, and so draws the same arch at each step.

Costs are MACs (``nas.cost.macs``; FLOPs are ``2 * macs``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from . import cost
from .arch import Arch, ArchBatch
from .space import SearchSpace

Measure = Callable[[Arch], float]


class ArchSampler:
    """Base class: a seeded numpy generator, a step counter and their state."""

    name: ClassVar[str] = ""
    distill: ClassVar[bool] = False   # the first arch of each step is the others' teacher
    measures: ClassVar[bool] = False  # update() needs measure(arch) -> held-out accuracy

    def __init__(self, space: SearchSpace, *, seed: int = 0, total_steps: int = 1):
        if total_steps < 1:
            raise ValueError(f"{type(self).__name__}: total_steps must be >= 1, got {total_steps}")
        self.space, self.total_steps = space, int(total_steps)
        self.rng = np.random.default_rng(seed)
        self.step = 0

    def sample(self) -> list[Arch]:
        archs = self.draw()
        self.step += 1
        return archs

    def draw(self) -> list[Arch]:
        raise NotImplementedError

    def update(self, archs: Sequence[Arch], losses: Sequence[float], measure: Measure | None = None) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "step": self.step, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"sampler state is for {state.get('name')!r}, this sampler is {self.name!r}")
        self.step = int(state["step"])
        self.rng.bit_generator.state = state["rng"]


class UniformSampler(ArchSampler):
    """AutoFormer: one arch per step, uniform over the space (depth, then per-layer heads and MLP ratio,
    one embed dim: ``SearchSpace.sample``)."""

    name = "uniform"

    def draw(self) -> list[Arch]:
        return [self.space.sample(self.rng)]


class SandwichSampler(ArchSampler):
    """BigNAS/OFA sandwich rule: the largest, the smallest and ``num_random`` uniform archs per step; the
    largest learns from the labels, the others from its outputs (in-place distillation).

    BigNAS draws two random archs; one is the default here because it trained the small presets better
    (digits-tiny, 1360 steps: smallest/largest 88.0/89.7% with one, 78.3/85.5% with two) in less time."""

    name = "sandwich"
    distill = True

    def __init__(self, space: SearchSpace, *, seed: int = 0, total_steps: int = 1, num_random: int = 1):
        super().__init__(space, seed=seed, total_steps=total_steps)
        if num_random < 0:
            raise ValueError(f"sandwich: num_random must be >= 0, got {num_random}")
        self.num_random = int(num_random)

    def draw(self) -> list[Arch]:
        return [self.space.max_arch(), self.space.min_arch()] + [self.space.sample(self.rng) for _ in range(self.num_random)]


class FlopsBanks:
    """``num_banks`` MAC ranges covering the space from its smallest to its largest subnet.

    Inner edges are quantiles of the MACs of ``samples`` uniform draws, so that every bank holds an equal
    share of the space (equal-width banks would leave the top banks nearly impossible to draw into: few
    archs are close to the largest one)."""

    def __init__(self, space: SearchSpace, num_banks: int, samples: int = 4096, seed: int = 0):
        if num_banks < 1:
            raise ValueError(f"num_banks must be >= 1, got {num_banks}")
        low, high = space.macs_range
        draws = cost.macs_many(space.sample_many(np.random.default_rng(seed), samples), space)
        inner = np.quantile(draws, np.arange(1, num_banks) / num_banks)
        self.edges = np.concatenate([[low], inner, [high]]).astype(np.float64)
        self.num_banks = num_banks

    def window(self, bank: int) -> tuple[float, float]:
        return float(self.edges[bank]), float(self.edges[bank + 1])

    def bank_of(self, macs: float) -> int:
        return int(np.clip(np.searchsorted(self.edges, macs, side="right") - 1, 0, self.num_banks - 1))


class ComplexityAwareSampler(ArchSampler):
    """ElasticViT's complexity-aware sampling: the target FLOPs bank does a lazy random walk (down one,
    stay, or up one bank per step, clipped at the ends, so its long-run distribution is uniform over
    banks), and the step's subnets are drawn inside the target bank's MAC window. Subnets of adjacent
    steps thus differ little in size, which keeps the shared weights' gradients from swinging."""

    name = "complexity"

    def __init__(self, space: SearchSpace, *, seed: int = 0, total_steps: int = 1, num_banks: int = 8, archs_per_step: int = 1):
        super().__init__(space, seed=seed, total_steps=total_steps)
        if archs_per_step < 1:
            raise ValueError(f"{self.name}: archs_per_step must be >= 1, got {archs_per_step}")
        self.banks = FlopsBanks(space, num_banks)
        self.archs_per_step = int(archs_per_step)
        self.bank = int(self.rng.integers(num_banks))
        self.history: list[int] = []

    def next_bank(self) -> int:
        if self.step > 0:
            self.bank = int(np.clip(self.bank + self.rng.integers(-1, 2), 0, self.banks.num_banks - 1))
        return self.bank

    def explore(self, bank: int) -> Arch:
        return self.space.sample_in_flops_window(self.rng, *self.banks.window(bank))

    def draw(self) -> list[Arch]:
        bank = self.next_bank()
        return [self.explore(bank) for _ in range(self.archs_per_step)]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "bank": self.bank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.bank = int(state["bank"])


class PerformanceAwareSampler(ComplexityAwareSampler):
    """ElasticViT's performance-aware sampling on top of the bank walk: each bank remembers its
    ``memory_size`` most recently trained archs with their loss. With probability ``exploit_max * step /
    total_steps`` (growing over training) a step exploits: it draws from the target bank's memory with
    probability ``softmax(-loss / temperature)``; otherwise it explores a fresh arch in the bank's window."""

    name = "performance"

    def __init__(self, space: SearchSpace, *, seed: int = 0, total_steps: int = 1, num_banks: int = 8,
                 memory_size: int = 16, exploit_max: float = 0.8, temperature: float = 1.0):
        super().__init__(space, seed=seed, total_steps=total_steps, num_banks=num_banks)
        if memory_size < 1 or not 0.0 <= exploit_max <= 1.0 or temperature <= 0:
            raise ValueError(f"{self.name}: need memory_size >= 1, 0 <= exploit_max <= 1, temperature > 0; got "
                             f"{memory_size}, {exploit_max}, {temperature}")
        self.memory_size, self.exploit_max, self.temperature = int(memory_size), float(exploit_max), float(temperature)
        # bank -> list of [arch as dict, loss], oldest first
        self.memory: list[list[list]] = [[] for _ in range(num_banks)]
        self.exploited = False

    def exploit_probability(self) -> float:
        return self.exploit_max * min(1.0, self.step / self.total_steps)

    def draw(self) -> list[Arch]:
        bank = self.next_bank()
        entries = self.memory[bank]
        self.exploited = bool(entries) and self.rng.random() < self.exploit_probability()
        if not self.exploited:
            return [self.explore(bank)]
        losses = np.array([loss for _, loss in entries])
        weights = np.exp(-(losses - losses.min()) / self.temperature)
        choice = self.rng.choice(len(entries), p=weights / weights.sum())
        return [Arch.from_dict(entries[choice][0])]

    def update(self, archs: Sequence[Arch], losses: Sequence[float], measure: Measure | None = None) -> dict[str, float]:
        for arch, loss in zip(archs, losses):
            entries = self.memory[self.banks.bank_of(cost.macs(arch, self.space))]
            record = arch.to_dict()
            entries[:] = [e for e in entries if e[0] != record] + [[record, float(loss)]]
            del entries[:-self.memory_size]
        return {"exploited": float(self.exploited)}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "memory": [[[dict(a), l] for a, l in bank] for bank in self.memory],
                "exploited": self.exploited}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.memory = [[[dict(a), float(l)] for a, l in bank] for bank in state["memory"]]
        self.exploited = bool(state["exploited"])


class BudgetPolicy(nn.Module):
    """Independent categorical decisions (embed dim, depth, patch size, then heads and MLP ratio of every
    layer) whose logits come from a small MLP of the normalised resource budget.

    All decisions share one padded ``[decisions, max choices]`` logit table (padding masked out), so
    that a draw for a batch of budgets is a handful of tensor ops however deep the space is."""

    def __init__(self, space: SearchSpace, hidden: int = 32):
        super().__init__()
        self.space, layers = space, space.max_depth
        self.options = [space.embed_dims, space.depths, space.patch_sizes] + [space.num_heads] * layers + [space.mlp_ratios] * layers
        width = max(len(o) for o in self.options)
        self.register_buffer("valid", torch.tensor([[c < len(o) for c in range(width)] for o in self.options]))
        self.net = nn.Sequential(nn.Linear(2, hidden), nn.Tanh(), nn.Linear(hidden, self.valid.numel()))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def log_probs(self, budget: torch.Tensor) -> torch.Tensor:
        """``[B, decisions, max choices]`` log-probabilities for ``budget`` [B] normalised to [0, 1]."""
        logits = self.net(torch.stack([budget, torch.ones_like(budget)], dim=-1)).view(-1, *self.valid.shape)
        # a large finite negative, not -inf: 0 * -inf in the entropy's backward would be NaN
        return logits.masked_fill(~self.valid, -1e9).log_softmax(dim=-1)

    def to_archs(self, choices: np.ndarray) -> ArchBatch:
        """Canonical archs (the first ``depth`` layers on) from ``[B, decisions]`` choice indices."""
        s, layers = self.space, self.space.max_depth
        pick = lambda values, column: np.asarray(values)[column]  # noqa: E731
        depth = pick(s.depths, choices[:, 1])
        source = np.minimum(np.arange(layers), depth[:, None] - 1)  # an inactive layer copies the last active one
        heads = np.take_along_axis(pick(s.num_heads, choices[:, 3:3 + layers]), source, axis=1)
        ratios = np.take_along_axis(pick(s.mlp_ratios, choices[:, 3 + layers:]), source, axis=1)
        patch = pick(s.patch_sizes, choices[:, 2]) if len(s.patch_sizes) > 1 else np.zeros(len(choices), dtype=np.int64)
        return ArchBatch(pick(s.embed_dims, choices[:, 0]), heads, ratios, np.arange(layers) < depth[:, None], patch)


class LearnedSampler(ArchSampler):
    """FocusFormer's learned architecture sampler.

    A :class:`BudgetPolicy` maps a MAC budget to a distribution over archs. Training alternates: each step
    the supernet trains the policy's arch for a budget drawn uniformly between the smallest and largest
    subnet (or, with probability ``explore``, a uniform arch); every ``policy_every`` steps the policy takes
    ``policy_updates`` REINFORCE steps on ``budgets_per_update`` budgets x ``archs_per_budget`` archs, with
    reward ``accuracy - penalty * max(0, macs / budget - 1)``, where accuracy is the supernet's own, measured
    on held-out batches (``measure``). The advantage is the reward minus its budget's mean, over the batch's
    standard deviation, so the policy learns which archs beat others of the same budget: those at its
    Pareto frontier. After training, :meth:`propose` gives archs for a budget directly.
    """

    name = "learned"
    measures = True

    def __init__(self, space: SearchSpace, *, seed: int = 0, total_steps: int = 1, policy_every: int = 20,
                 policy_updates: int = 1, budgets_per_update: int = 4, archs_per_budget: int = 4,
                 penalty: float = 20.0, entropy: float = 0.01, lr: float = 0.03, explore: float = 0.1, hidden: int = 32):
        super().__init__(space, seed=seed, total_steps=total_steps)
        if policy_every < 1 or archs_per_budget < 2 or budgets_per_update < 1:
            raise ValueError(f"{self.name}: need policy_every >= 1, budgets_per_update >= 1, archs_per_budget >= 2")
        self.policy_every, self.policy_updates = int(policy_every), int(policy_updates)
        self.budgets_per_update, self.archs_per_budget = int(budgets_per_update), int(archs_per_budget)
        self.penalty, self.entropy, self.explore = float(penalty), float(entropy), float(explore)
        self.min_macs, self.max_macs = map(float, space.macs_range)
        self.generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.policy = BudgetPolicy(space, hidden)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=lr)

    def policy_draw(self, budgets: Sequence[float]) -> tuple[ArchBatch, torch.Tensor, torch.Tensor]:
        """Archs for ``budgets`` (MACs), their log-probabilities [B] and the mean entropy (both differentiable)."""
        normalised = (torch.tensor(budgets, dtype=torch.float32) - self.min_macs) / max(self.max_macs - self.min_macs, 1.0)
        log_probs = self.policy.log_probs(normalised)
        probs = log_probs.exp()
        choices = torch.multinomial(probs.detach().flatten(0, 1), 1, generator=self.generator).view(probs.shape[:2])
        log_prob = log_probs.gather(-1, choices[..., None]).squeeze(-1).sum(dim=-1)
        entropy = -(probs * log_probs).sum(dim=(1, 2)).mean()
        return self.policy.to_archs(choices.numpy()), log_prob, entropy

    def draw(self) -> list[Arch]:
        if self.rng.random() < self.explore:
            return [self.space.sample(self.rng)]
        budget = self.rng.uniform(self.min_macs, self.max_macs)
        with torch.no_grad():
            return self.policy_draw([budget])[0].archs()

    def update(self, archs: Sequence[Arch], losses: Sequence[float], measure: Measure | None = None) -> dict[str, float]:
        if self.step % self.policy_every != 0:
            return {}
        if measure is None:
            raise ValueError("learned sampler: update() needs measure(arch) -> held-out accuracy")
        stats = {}
        for _ in range(self.policy_updates):
            stats = self.policy_step(measure)
        return stats

    def policy_step(self, measure: Measure) -> dict[str, float]:
        """One REINFORCE step of the policy on fresh budgets."""
        budgets = self.rng.uniform(self.min_macs, self.max_macs, self.budgets_per_update).repeat(self.archs_per_budget)
        batch, log_prob, entropy = self.policy_draw(budgets.tolist())
        over = np.maximum(0.0, cost.macs_many(batch, self.space) / budgets - 1.0)
        accuracy = np.array([measure(arch) for arch in batch.archs()])
        rewards = torch.tensor(accuracy - self.penalty * over, dtype=torch.float32)
        grouped = rewards.view(self.budgets_per_update, self.archs_per_budget)
        advantage = ((grouped - grouped.mean(dim=1, keepdim=True)) / (grouped.std() + 1e-8)).view(-1)
        loss = -(advantage * log_prob).mean() - self.entropy * entropy
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"policy_reward": float(rewards.mean()), "policy_within_budget": float(np.mean(over == 0))}

    def propose(self, budget: float, num: int = 1, samples: int = 64) -> list[Arch]:
        """Up to ``num`` distinct archs within ``budget`` MACs, the policy's most probable first."""
        if budget < self.min_macs:
            raise ValueError(f"learned sampler: budget {budget:.4g} MACs is below the smallest subnet ({self.min_macs:.4g})")
        with torch.no_grad():
            batch, log_prob, _ = self.policy_draw([budget] * samples)
        fits = cost.macs_many(batch, self.space) <= budget
        ranked = [i for i in np.argsort(-log_prob.numpy(), kind="stable") if fits[i]]
        found = list(dict.fromkeys(batch.arch(int(i)) for i in ranked))
        if not found:
            found = [self.space.sample_in_flops_window(self.rng, self.min_macs, budget)]
        return found[:num]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "policy": self.policy.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])


class IdentitySampler(ArchSampler):
    """ViTAS identity probability and SuperSAM layer-drop probabilities (spaces with ``identity_layers``).

    Layer ``i`` is an identity with probability ``min(1, scale * profile[i])``; widths are drawn uniformly
    per layer. ``profile`` is ``"uniform"`` (ViTAS: one identity probability for every layer), ``"linear"``
    (SuperSAM: drop probability growing with depth, ``(i + 1) / L``) or a list of per-layer weights. Where
    fewer layers stay on than the space's smallest depth allows, the dropped layers whose draws came
    closest to their threshold come back on. Before training, ``scale`` is found by bisection so that the
    mean MACs of sampled subnets lie in ``macs_range`` (default: the middle third between the smallest and
    the largest subnet); the estimate uses ``samples`` draws with common random numbers, so that it falls
    monotonically as ``scale`` grows.
    """

    name = "identity"

    def __init__(self, space: SearchSpace, *, seed: int = 0, total_steps: int = 1, profile: str | Sequence[float] = "uniform",
                 macs_range: Sequence[float] | None = None, samples: int = 1024):
        super().__init__(space, seed=seed, total_steps=total_steps)
        if not space.identity_layers:
            raise ValueError(f"identity sampler: space {space.name!r} has identity_layers=False (only the first "
                             "`depth` layers may be on); use a ViTAS-style space")
        layers = space.max_depth
        if isinstance(profile, str):
            if profile not in ("uniform", "linear"):
                raise ValueError(f"identity sampler: profile must be 'uniform', 'linear' or a list, got {profile!r}")
            weights = np.ones(layers) if profile == "uniform" else np.arange(1, layers + 1) / layers
        else:
            weights = np.asarray(profile, dtype=np.float64)
            if weights.shape != (layers,) or (weights < 0).any() or not (weights > 0).any():
                raise ValueError(f"identity sampler: profile must list {layers} non-negative weights, not all zero")
        self.profile = weights
        low, high = space.macs_range
        if macs_range is None:
            macs_range = (low + (high - low) / 3, low + 2 * (high - low) / 3)
        self.macs_range = (float(macs_range[0]), float(macs_range[1]))
        self.scale = self.search_scale(np.random.default_rng([seed, 1]), samples)

    @property
    def probabilities(self) -> np.ndarray:
        """Per-layer identity probability."""
        return np.minimum(1.0, self.scale * self.profile)

    def draw_batch(self, rng: np.random.Generator, count: int) -> tuple[ArchBatch, np.ndarray]:
        """``count`` archs with uniform widths in every layer and all layers on, and their uniform draws ``[count, L]``."""
        s, layers = self.space, self.space.max_depth
        widths = ArchBatch(
            embed_dim=np.asarray(s.embed_dims)[rng.integers(len(s.embed_dims), size=count)],
            num_heads=np.asarray(s.num_heads)[rng.integers(len(s.num_heads), size=(count, layers))],
            mlp_ratio=np.asarray(s.mlp_ratios)[rng.integers(len(s.mlp_ratios), size=(count, layers))],
            layer_on=np.ones((count, layers), dtype=bool),
            patch_size=(np.asarray(s.patch_sizes)[rng.integers(len(s.patch_sizes), size=count)]
                        if len(s.patch_sizes) > 1 else np.zeros(count, dtype=np.int64)),
        )
        return widths, rng.random((count, layers))

    def with_layers(self, widths: ArchBatch, uniforms: np.ndarray, probabilities: np.ndarray) -> ArchBatch:
        """``widths`` with layer i off where its uniform draw is below its identity probability, then the
        fewest dropped layers (those closest to their threshold) back on to reach a depth of the space."""
        margin = uniforms - probabilities  # < 0: dropped
        on = margin >= 0
        depths = np.asarray(self.space.depths)
        target = depths[np.searchsorted(depths, on.sum(axis=1))]
        rank = (-np.where(on, np.inf, margin)).argsort(axis=1).argsort(axis=1)  # kept first, then closest drops
        return dataclasses.replace(widths, layer_on=rank < target[:, None])

    def search_scale(self, rng: np.random.Generator, samples: int) -> float:
        widths, uniforms = self.draw_batch(rng, samples)
        low, high = self.macs_range

        def mean_macs(scale: float) -> float:
            probabilities = np.minimum(1.0, scale * self.profile)
            return float(cost.macs_many(self.with_layers(widths, uniforms, probabilities), self.space).mean())

        lo, hi = 0.0, 1.0 / self.profile.max()
        reachable = (mean_macs(hi), mean_macs(lo))
        if reachable[0] > high or reachable[1] < low:
            raise ValueError(f"identity sampler: the mean MACs of sampled subnets range over [{reachable[0]:.4g}, "
                             f"{reachable[1]:.4g}], which misses macs_range [{low:.4g}, {high:.4g}]")
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            mean = mean_macs(mid)
            if low <= mean <= high:
                return mid
            lo, hi = (mid, hi) if mean > high else (lo, mid)
        raise ValueError(f"identity sampler: no identity probability puts the mean MACs in [{low:.4g}, {high:.4g}]")

    def draw(self) -> list[Arch]:
        widths, uniforms = self.draw_batch(self.rng, 1)
        return [self.space.canonical(self.with_layers(widths, uniforms, self.probabilities).arch(0))]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "scale": float(self.scale)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.scale = float(state["scale"])


SAMPLERS: dict[str, type[ArchSampler]] = {
    cls.name: cls for cls in (UniformSampler, SandwichSampler, ComplexityAwareSampler, PerformanceAwareSampler,
                              LearnedSampler, IdentitySampler)
}


def build_sampler(name: str, space: SearchSpace, *, seed: int = 0, total_steps: int = 1, **options) -> ArchSampler:
    """The sampler registered as ``name`` in :data:`SAMPLERS`; ``options`` are its keyword arguments."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    cls = SAMPLERS[name]
    try:
        return cls(space, seed=seed, total_steps=total_steps, **options)
    except TypeError as err:
        raise ValueError(f"sampler {name!r}: bad options {sorted(options)}: {err}") from err

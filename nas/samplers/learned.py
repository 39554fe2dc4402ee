"""FocusFormer's learned architecture sampler (Liu et al. 2022): a policy that maps a resource budget to archs at
the Pareto frontier of the supernet, trained alongside it, for budgets of several kinds."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import costs
from ..family import Arch, Space, family_of
from ..latency import LatencyModel
from .base import ArchSampler, Measure

BUDGET_KINDS = ("macs", "params", "latency")  # latency in milliseconds, from a latency model (nas.latency)
BUDGET_FEATURES = 8  # Gaussian bumps the normalised budget is read through


class BudgetPolicy(nn.Module):
    """Independent categorical decisions whose logits come from a small MLP of the normalised budget, itself and
    through ``BUDGET_FEATURES`` Gaussian bumps spread over [0, 1] (so that each range of budgets has features of its
    own: the scalar budget alone, through one tanh layer, gave every budget nearly the same archs), and the one-hot
    kind of budget: the decisions of the space's family (``Family.decisions``).

    All decisions share one padded ``[decisions, max choices]`` logit table (padding masked out), so
    that a draw for a batch of budgets is a handful of tensor ops however deep the space is."""

    def __init__(self, space: Space, kinds: int = 1, hidden: int = 32):
        super().__init__()
        self.space = space
        self.options = family_of(space).decisions(space)
        width = max(len(o) for o in self.options)
        self.register_buffer("valid", torch.tensor([[c < len(o) for c in range(width)] for o in self.options]))
        self.register_buffer("centres", torch.linspace(0.0, 1.0, BUDGET_FEATURES))
        self.net = nn.Sequential(nn.Linear(1 + BUDGET_FEATURES + kinds, hidden), nn.Tanh(),
                                 nn.Linear(hidden, self.valid.numel()))
        nn.init.zeros_(self.net[2].weight)
        nn.init.zeros_(self.net[2].bias)

    def log_probs(self, budget: torch.Tensor, kind: torch.Tensor) -> torch.Tensor:
        """``[B, decisions, max choices]`` log-probabilities for ``budget`` [B] normalised to [0, 1] and ``kind``
        [B, kinds] (one-hot)."""
        features = torch.exp(-((budget[:, None] - self.centres) * (len(self.centres) - 1)) ** 2)
        logits = self.net(torch.cat([budget[:, None], features, kind], dim=-1)).view(-1, *self.valid.shape)
        # a large finite negative, not -inf: 0 * -inf in the entropy's backward would be NaN
        return logits.masked_fill(~self.valid, -1e9).log_softmax(dim=-1)

    def to_archs(self, choices: np.ndarray):
        """Canonical archs (the family's batch) from ``[B, decisions]`` choice indices (``Family.decode_decisions``)."""
        return family_of(self.space).decode_decisions(self.space, choices)


class LearnedSampler(ArchSampler):
    """FocusFormer's learned architecture sampler.

    A :class:`BudgetPolicy` maps a budget of one of ``budget_kinds`` (``macs``, ``params``, and ``latency`` in
    milliseconds with a ``latency_model`` file written by ``nas.latency``) to a distribution over archs. Training
    alternates: each step the supernet trains the policy's arch for a budget of a random kind drawn uniformly
    between that kind's smallest and largest subnet (or, with probability ``explore``, a uniform arch); every
    ``policy_every`` steps the policy takes ``policy_updates`` policy-gradient steps on ``budgets_per_update`` budgets
    x ``archs_per_budget`` archs, with reward ``accuracy - shortfall * max(0, 1 - cost / budget)`` for an arch that
    fits and ``accuracy - infeasible - penalty * (cost / budget - 1)`` for one over its budget, where accuracy is the
    supernet's own, measured on held-out images (``measure``).

    FocusFormer's policy focuses on the archs at the Pareto front under each budget: the most accurate ones that fit.
    A supernet's accuracy rises with size, so they use most of the budget; but a few hundred held-out images do not
    tell a subnet from a slightly larger one, so the reward also charges the unused share of the budget
    (``shortfall``). A budget is a constraint: an arch over it is infeasible however slightly, so it loses
    ``infeasible`` (more than any accuracy or shortfall difference) besides the excess (``penalty``); with the excess
    alone, an arch 0.5% over its budget cost less than one 25% under it, and the policy's draws settled on the
    budget's edge, half of them over. The advantage is the reward minus its budget's mean, over
    the batch's standard deviation, so the policy learns which archs beat others of the same budget.
    After training, :meth:`propose` gives archs for a budget directly.
    """

    name = "learned"
    measures = True

    def __init__(self, space: Space, *, seed: int = 0, total_steps: int = 1, policy_every: int = 5,
                 policy_updates: int = 1, budgets_per_update: int = 4, archs_per_budget: int = 4,
                 penalty: float = 20.0, shortfall: float = 0.4, infeasible: float = 1.0, entropy: float = 0.01,
                 lr: float = 0.03,
                 explore: float = 0.1, hidden: int = 32,
                 budget_kinds: Sequence[str] = ("macs", "params"), latency_model: str | None = None):
        super().__init__(space, seed=seed, total_steps=total_steps)
        if policy_every < 1 or archs_per_budget < 2 or budgets_per_update < 1:
            raise ValueError(f"{self.name}: need policy_every >= 1, budgets_per_update >= 1, archs_per_budget >= 2")
        kinds = list(dict.fromkeys(budget_kinds))
        if not kinds or not set(kinds) <= set(BUDGET_KINDS):
            raise ValueError(f"{self.name}: budget_kinds must be some of {', '.join(BUDGET_KINDS)}, got {budget_kinds}")
        if ("latency" in kinds) != (latency_model is not None):
            raise ValueError(f"{self.name}: a latency budget kind needs a latency_model (a file written by "
                             "nas.latency), and a latency_model is only used with 'latency' in budget_kinds")
        self.policy_every, self.policy_updates = int(policy_every), int(policy_updates)
        self.budgets_per_update, self.archs_per_budget = int(budgets_per_update), int(archs_per_budget)
        self.penalty, self.entropy, self.explore = float(penalty), float(entropy), float(explore)
        self.shortfall, self.infeasible = float(shortfall), float(infeasible)
        self.kinds = kinds
        self.costs = {kind: self._cost_of(kind, latency_model) for kind in kinds}
        self.ranges = {kind: costs.cost_range(space, self.costs[kind]) for kind in kinds}
        self.generator = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.policy = BudgetPolicy(space, len(kinds), hidden)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=lr)

    def _cost_of(self, kind: str, latency_model: str | None) -> Callable[[Sequence[Arch]], np.ndarray]:
        if kind == "macs":
            return lambda archs: costs.macs_many(archs, self.space).astype(np.float64)
        if kind == "params":
            return lambda archs: costs.params_many(archs, self.space).astype(np.float64)
        model = LatencyModel.load(latency_model)
        if model.space != self.space:
            raise ValueError(f"{self.name}: latency model {latency_model!r} is for space {model.space.name!r}")
        return lambda archs: 1e3 * model.predict_many(archs)

    def policy_draw(self, budgets: Sequence[float], kinds: Sequence[str] | str = "macs"
                    ) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """Archs for ``budgets`` of ``kinds`` (one per budget, or one for all), their log-probabilities [B] and the
        mean entropy (both differentiable)."""
        kinds = [kinds] * len(budgets) if isinstance(kinds, str) else list(kinds)
        low, high = (np.array([self.ranges[k][i] for k in kinds]) for i in (0, 1))
        normalised = torch.tensor((np.asarray(budgets) - low) / np.maximum(high - low, 1e-12), dtype=torch.float32)
        one_hot = torch.zeros(len(kinds), len(self.kinds))
        one_hot[torch.arange(len(kinds)), torch.tensor([self.kinds.index(k) for k in kinds])] = 1.0
        log_probs = self.policy.log_probs(normalised, one_hot)
        probs = log_probs.exp()
        choices = torch.multinomial(probs.detach().flatten(0, 1), 1, generator=self.generator).view(probs.shape[:2])
        log_prob = log_probs.gather(-1, choices[..., None]).squeeze(-1).sum(dim=-1)
        entropy = -(probs * log_probs).sum(dim=(1, 2)).mean()
        return self.policy.to_archs(choices.numpy()), log_prob, entropy

    def random_budgets(self, count: int) -> tuple[list[float], list[str]]:
        """``count`` budgets, each of a kind drawn uniformly and uniform in that kind's range."""
        kinds = [self.kinds[i] for i in self.rng.integers(len(self.kinds), size=count)]
        return [float(self.rng.uniform(*self.ranges[kind])) for kind in kinds], kinds

    def draw(self) -> list[Arch]:
        if self.rng.random() < self.explore:
            return [self.space.sample(self.rng)]
        budgets, kinds = self.random_budgets(1)
        with torch.no_grad():
            return self.policy_draw(budgets, kinds)[0].archs()

    def update(self, archs: Sequence[Arch], losses: Sequence[float], measure: Measure | None = None
               ) -> dict[str, float]:
        if self.step % self.policy_every != 0:
            return {}
        measure = self.require_measure(measure)
        stats = {}
        for _ in range(self.policy_updates):
            stats = self.policy_step(measure)
        return stats

    def policy_step(self, measure: Measure) -> dict[str, float]:
        """One REINFORCE step of the policy on fresh budgets."""
        budgets, kinds = self.random_budgets(self.budgets_per_update)
        budgets = np.repeat(budgets, self.archs_per_budget)
        kinds = [kind for kind in kinds for _ in range(self.archs_per_budget)]
        batch, log_prob, entropy = self.policy_draw(budgets.tolist(), kinds)
        spent = {kind: self.costs[kind](batch) for kind in set(kinds)}
        used = np.array([spent[kind][i] for i, kind in enumerate(kinds)])
        over = np.maximum(0.0, used / budgets - 1.0)
        unused = np.maximum(0.0, 1.0 - used / budgets)
        accuracy = np.array([measure(arch) for arch in batch.archs()])
        rewards = torch.tensor(accuracy - self.infeasible * (over > 0) - self.penalty * over - self.shortfall * unused,
                               dtype=torch.float32)
        grouped = rewards.view(self.budgets_per_update, self.archs_per_budget)
        advantage = ((grouped - grouped.mean(dim=1, keepdim=True)) / (grouped.std() + 1e-8)).view(-1)
        loss = -(advantage * log_prob).mean() - self.entropy * entropy
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"policy_reward": float(rewards.mean()), "policy_within_budget": float(np.mean(over == 0))}

    def propose(self, budget: float, num: int = 1, samples: int = 64, kind: str = "macs") -> list[Arch]:
        """Up to ``num`` distinct archs within ``budget`` of ``kind``, the policy's most probable first."""
        if kind not in self.kinds:
            raise ValueError(f"learned sampler: trained for {', '.join(self.kinds)} budgets, not {kind}")
        if budget < self.ranges[kind][0]:
            raise ValueError(f"learned sampler: budget {budget:.4g} ({kind}) is below the smallest subnet "
                             f"({self.ranges[kind][0]:.4g})")
        with torch.no_grad():
            batch, log_prob, _ = self.policy_draw([budget] * samples, kind)
        fits = self.costs[kind](batch) <= budget
        ranked = [i for i in np.argsort(-log_prob.numpy(), kind="stable") if fits[i]]
        found = list(dict.fromkeys(batch.arch(int(i)) for i in ranked))
        if not found:
            found = [self.space.sample_where(self.rng, lambda draws: self.costs[kind](draws) <= budget,
                                             f"a {kind} budget of {budget:.4g}")]
        return found[:num]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "budget_kinds": list(self.kinds), "policy": self.policy.state_dict(),
                "optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        saved_kinds = list(state.get("budget_kinds", ["macs"]))  # a state without them served MAC budgets only
        if saved_kinds != self.kinds:
            raise ValueError(f"learned sampler state was trained for {', '.join(saved_kinds)} budgets, this sampler "
                             f"for {', '.join(self.kinds)} (sampler_options.budget_kinds)")
        try:
            self.policy.load_state_dict(state["policy"])
        except RuntimeError as err:
            raise ValueError("learned sampler state holds a policy of another layout (before its budget features, or "
                             f"for another space): {err}") from err
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])

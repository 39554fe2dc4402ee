"""Every training sampler and search algorithm on the hybrid CIFAR presets (budgets respected, states that continue
exactly), the identity sampler's refusal, and nas.train on a hybrid space."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from nas import costs
from nas import train as cli
from nas.budget import Budget, Costs
from nas.checkpoint import load_supernet
from nas.data import load_dataset, normalize
from nas.errors import ConfigError
from nas.export import load_subnet
from nas.hybrid.arch import HybridArch
from nas.hybrid.supernet import HybridSupernet
from nas.report import read_log
from nas.samplers import SAMPLERS, LearnedSampler, build_sampler
from nas.searchers import SEARCHERS, build_searcher
from nas.searching import SearchConfig, read_state, run_search
from nas.spaces import load_space
from nas.trainer import TrainConfig, train

SPACES = ["uninet-cifar", "elasticvit-mobile-cifar"]
SAMPLER_OPTIONS = {"complexity": {"num_banks": 3}, "performance": {"num_banks": 3, "memory_size": 4},
                   "elasticvit": {"num_banks": 3, "memory_size": 4},
                   "learned": {"policy_every": 3, "budgets_per_update": 2}}


def accuracy_of(space):
    """A synthetic accuracy that grows with size, as a supernet's does."""
    high = costs.macs_range(space)[1]
    return lambda arch: costs.macs(arch, space) / high


def run(sampler, steps: int, measure) -> list:
    drawn = []
    for _ in range(steps):
        archs = sampler.sample()
        sampler.update(archs, [1.0] * len(archs), measure)
        drawn.append(archs)
    return drawn


@pytest.mark.parametrize("space_name", SPACES)
@pytest.mark.parametrize("name", sorted(set(SAMPLERS) - {"identity"}))
def test_every_sampler_draws_archs_of_a_hybrid_space_and_continues_exactly(name, space_name):
    space = load_space(space_name)
    measure = accuracy_of(space)
    sampler = build_sampler(name, space, seed=3, total_steps=30, **SAMPLER_OPTIONS.get(name, {}))
    for archs in run(sampler, 10, measure):
        for arch in archs:
            space.validate(arch)
    buffer = io.BytesIO()
    torch.save(sampler.state_dict(), buffer)
    expected = run(sampler, 6, measure)
    resumed = build_sampler(name, space, seed=99, total_steps=30, **SAMPLER_OPTIONS.get(name, {}))
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert run(resumed, 6, measure) == expected


def test_the_complexity_walk_draws_inside_its_banks():
    space = load_space("uninet-cifar")
    sampler = build_sampler("complexity", space, seed=1, num_banks=4)
    for _ in range(30):
        archs = sampler.sample()
        low, high = sampler.banks.window(sampler.bank)
        assert all(low <= costs.macs(arch, space) <= high for arch in archs)


def test_the_learned_sampler_proposes_within_a_budget():
    space = load_space("elasticvit-mobile-cifar")
    sampler = LearnedSampler(space, seed=0, policy_every=1, budgets_per_update=2)
    run(sampler, 3, accuracy_of(space))
    low, high = costs.macs_range(space)
    budget = low + 0.3 * (high - low)
    for arch in sampler.propose(budget, num=5):
        assert space.contains(arch) and costs.macs(arch, space) <= budget


def test_the_identity_sampler_refuses_a_hybrid_space():
    with pytest.raises(ValueError, match="identity sampler: space 'uninet-cifar' is a hybrid space, whose stages have "
                                         "a depth rather than layers that may be identities"):
        build_sampler("identity", load_space("uninet-cifar"))


@pytest.mark.parametrize("space_name", SPACES)
@pytest.mark.parametrize("name", sorted(SEARCHERS))
def test_every_searcher_respects_the_budget_on_a_hybrid_space(name, space_name):
    space = load_space(space_name)
    costs = Costs(space)
    limit = float(np.quantile(costs.macs_many(space.sample_many(np.random.default_rng(0), 300), space), 0.4))
    feasible = costs.feasible([Budget("macs", limit)])
    options = {"sampler": LearnedSampler(space, seed=0)} if name == "sampler" else {}
    searcher = build_searcher(name, space, feasible, seed=2, cost=costs.metric("macs"), **options)
    score = accuracy_of(space)
    for _ in range(3):
        archs = searcher.propose(8)
        assert len(archs) == 8 and all(space.contains(arch) for arch in archs)
        assert (costs.macs_many(archs, space) <= limit).all(), f"{name} proposed an arch over the budget"
        searcher.observe(archs, [score(arch) for arch in archs])
    restored = build_searcher(name, space, feasible, seed=5, cost=costs.metric("macs"), **options)
    restored.load_state_dict(searcher.state_dict())
    assert restored.best() == searcher.best()


def digits_space(tmp_path):
    """A hybrid space for the built-in 8x8 digits (one channel): a conv stage, then attention or MLP."""
    path = tmp_path / "digits-hybrid.yaml"
    path.write_text("""
name: digits-hybrid
style: uninet
resolutions: [6, 8]
stem_channels: 8
stem_stride: 1
head_features: 32
head_dim: 8
in_chans: 1
num_classes: 10
stages:
  - {ops: [conv], depths: [1, 2], channels: [8, 16], expansions: [2, 3], dsms: [none], se: true}
  - {ops: [conv, mlp, attention], depths: [1, 2], channels: [16, 24], expansions: [2], dsms: [local, local-global],
     stride: 2}
""")
    return str(path)


def test_training_a_hybrid_supernet(tmp_path):
    """nas.train builds the hybrid supernet, evaluates subnets with BatchNorm recalibrated for each, and its
    checkpoint loads as a hybrid supernet."""
    space_path = digits_space(tmp_path)
    space = load_space(space_path)
    eval_arch = space.sample(3)
    config = TrainConfig(space=space_path, out_dir=str(tmp_path / "run"), train_subset=128, test_subset=64,
                         batch_size=32, max_steps=4, warmup_steps=1, ckpt_every=0, progress=False, plot=False,
                         bn_calibration_images=64, eval_archs=[eval_arch.to_dict()])
    result = train(config)
    assert result.steps == 4 and all(0.0 <= acc <= 1.0 for acc in (result.smallest, result.largest))
    assert len(result.eval_archs) == 1
    model, loaded_space, _ = load_supernet(result.checkpoint)
    assert isinstance(model, HybridSupernet) and loaded_space == space


@pytest.fixture(scope="module")
def hybrid_checkpoint(tmp_path_factory) -> str:
    """A digits-hybrid supernet trained a few steps with the learned sampler (which the sampler search needs)."""
    tmp_path = tmp_path_factory.mktemp("hybrid")
    config = TrainConfig(space=digits_space(tmp_path), out_dir=str(tmp_path / "run"), train_subset=96, test_subset=48,
                         batch_size=32, max_steps=3, warmup_steps=1, ckpt_every=0, progress=False, plot=False,
                         bn_calibration_images=64, sampler="learned", measure_images=32,
                         sampler_options={"policy_every": 2, "budgets_per_update": 2}, backend="reference")
    return train(config).checkpoint


def hybrid_search(checkpoint: str, out_dir, algorithm: str, generations: int = 2, **options) -> dict:
    return run_search(SearchConfig(checkpoint=checkpoint, out_dir=str(out_dir), algorithm=algorithm,
                                   generations=generations, population=4, parents=2, mutations=2, crossovers=1,
                                   budgets=["macs=50k"], holdout_images=48, test_images=48, progress=False,
                                   **options))


@pytest.mark.parametrize("algorithm", sorted(SEARCHERS))
def test_nas_search_on_a_hybrid_checkpoint(hybrid_checkpoint, tmp_path, algorithm):
    """Every algorithm searches a hybrid supernet within the budget; the best arch's test top-1 is that of the exported
    subnet, whose BatchNorm statistics were re-estimated for it as the search's evaluation does."""
    summary = hybrid_search(hybrid_checkpoint, tmp_path, algorithm, export=True)
    space = load_supernet(hybrid_checkpoint)[1]
    # rl's soft constraint evaluates archs over the budget too, and learns from their scores
    inside = [c["macs"] <= 50_000 for c in summary["candidates"]]
    assert summary["candidates"] and (any(inside) if algorithm == "rl" else all(inside))
    best = summary["best"]["macs=50K"]
    assert best["macs"] <= 50_000
    arch = HybridArch.from_dict(best["arch"])
    assert space.contains(arch) and costs.macs(arch, space) == best["macs"]
    model, saved_arch = load_subnet(summary["exported"]["macs=50K"])
    assert saved_arch == arch
    data = load_dataset("digits", split="test")
    images, labels = data.images[:48], data.labels[:48]
    with torch.no_grad():
        logits = model(normalize(images, data.mean, data.std))
    assert summary["test"]["macs=50K"]["top1"] == pytest.approx(100.0 * float((logits.argmax(-1) == labels).float()
                                                                              .mean()))


def test_a_hybrid_search_resumes_exactly(hybrid_checkpoint, tmp_path):
    straight = hybrid_search(hybrid_checkpoint, tmp_path / "straight", "evolution", generations=3)
    hybrid_search(hybrid_checkpoint, tmp_path / "resumed", "evolution", generations=1)
    resumed = run_search(SearchConfig.from_dict({**read_state(tmp_path / "resumed" / "state.pt")["config"],
                                                 "generations": 3}), resume=True)
    assert resumed["candidates"] == straight["candidates"] and resumed["best"] == straight["best"]


def test_a_hybrid_space_that_does_not_fit_the_data_is_a_one_line_error(tmp_path, capsys):
    status = cli.main(["--space", "uninet-cifar", "--out-dir", str(tmp_path / "run"), "--steps", "1",
                       "--no-progress", "--no-plot"])
    assert status == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "nas.train: error:" in error


def test_the_elasticvit_sampler_walks_banks_of_the_whole_space_between_its_largest_and_smallest():
    """ElasticViT's step: the largest subnet (the teacher), subnets of one FLOPs bank, the smallest; the bank moves at
    most one bank a step and the banks cover the space; only the bank subnets are measured, and those drawn from the
    memory are members of it; over a run the bank subnets come at every resolution of the space."""
    space = load_space("elasticvit-mobile-cifar")
    score = accuracy_of(space)
    measured = []

    def measure(arch):
        measured.append(arch)
        return score(arch)

    sampler = build_sampler("elasticvit", space, seed=5, total_steps=200, num_banks=4, memory_size=4,
                            archs_per_step=2)
    assert sampler.distill
    assert sampler.banks.edges[0] == costs.macs(space.min_arch(), space)
    assert sampler.banks.edges[-1] == costs.macs(space.max_arch(), space)
    banks, resolutions, exploited = [], set(), 0
    for _ in range(200):
        memory = [entry[0] for entry in sampler.memory[sampler.bank]] + [
            entry[0] for b in (sampler.bank - 1, sampler.bank + 1) if 0 <= b < 4 for entry in sampler.memory[b]]
        archs = sampler.sample()
        assert len(archs) == 4 and archs[0] == space.max_arch() and archs[-1] == space.min_arch()
        low, high = sampler.banks.window(sampler.bank)
        for arch, from_memory in zip(archs[1:-1], sampler.exploited):
            assert low <= costs.macs(arch, space) <= high
            if from_memory:
                exploited += 1
                assert arch.to_dict() in memory
            resolutions.add(arch.resolution)
        if banks:
            assert abs(sampler.bank - banks[-1]) <= 1
        banks.append(sampler.bank)
        measured.clear()
        sampler.update(archs, [1.0] * len(archs), measure)
        assert space.max_arch() not in measured[:2] or space.max_arch() in archs[1:-1]
    assert set(banks) == {0, 1, 2, 3} and resolutions == set(space.resolutions) and exploited > 20


def test_nas_train_with_the_elasticvit_sampler(tmp_path):
    """Every step trains the largest subnet first (the teacher of the others) and the smallest last."""
    space_path = digits_space(tmp_path)
    space = load_space(space_path)
    config = TrainConfig(space=space_path, out_dir=str(tmp_path / "run"), train_subset=96, test_subset=32,
                         batch_size=32, max_steps=3, warmup_steps=1, ckpt_every=0, progress=False, plot=False,
                         bn_calibration_images=32, measure_images=32, sampler="elasticvit",
                         sampler_options={"num_banks": 2, "memory_size": 2}, backend="reference")
    train(config)
    steps = [r for r in read_log(tmp_path / "run" / "log.jsonl") if r["event"] == "train"]
    assert len(steps) == 3
    for record in steps:
        archs = [HybridArch.from_dict(a) for a in record["archs"]]
        assert len(archs) == 4 and archs[0] == space.max_arch() and archs[-1] == space.min_arch()
        assert "exploited" in record


def op_dsm_objective(space, target):
    """A synthetic accuracy with a known optimum: 90 at ``target``, 3 points less per stage whose operator differs, 2
    per stage whose DSM differs and 1 per other choice of a stage (depth, channels, expansion) that differs; the
    resolution does not count."""
    def score(arch) -> float:
        differ = {field: sum(getattr(a, field) != getattr(b, field) for a, b in zip(arch.stages, target.stages))
                  for field in ("op", "dsm", "depth", "channels", "expansion")}
        return 90.0 - 3.0 * differ.pop("op") - 2.0 * differ.pop("dsm") - sum(differ.values())
    return score


def test_the_rl_controller_finds_the_best_operators_and_dsms_under_a_soft_budget():
    """UniNet's search on uninet-cifar (three operators and three DSMs in three stages): with MnasNet's reward around a
    MACs target, the controller's most probable operator and DSM in every stage become the optimum's, and its best arch
    inside the budget beats random search's at the same number of evaluations (320, over three seeds)."""
    space = load_space("uninet-cifar")
    costs = Costs(space)
    draws = space.sample_many(np.random.default_rng(0), 400)
    limit = float(np.median(costs.macs_many(draws, space)))
    target = next(arch for arch in draws.archs()[1:] if costs.macs(arch, space) <= 0.6 * limit
                  and len({s.op for s in arch.stages[2:]}) > 1)
    score = op_dsm_objective(space, target)
    feasible = costs.feasible([Budget("macs", limit)])
    finals = {}
    for algorithm in ("rl", "random"):
        bests = []
        for seed in range(3):
            options = {"target": limit, "lr": 0.5} if algorithm == "rl" else {}
            searcher = build_searcher(algorithm, space, feasible, seed=seed, cost=costs.metric("macs"), **options)
            for _ in range(20):
                archs = searcher.propose(16)
                searcher.observe(archs, [score(arch) for arch in archs])
            best_arch, best = searcher.best()
            assert costs.macs(best_arch, space) <= limit
            bests.append(best)
            if algorithm == "rl":
                probabilities = dict(zip((name for name, _ in space.genes()), searcher.probabilities()))
                for i, (stage, choices) in enumerate(zip(target.stages, space.stages)):
                    for field, options_ in (("op", choices.ops), ("dsm", choices.dsms)):
                        if len(options_) > 1:
                            assert options_[int(np.argmax(probabilities[f"stage{i}.{field}"]))] == getattr(stage, field)
        finals[algorithm] = float(np.mean(bests))
    assert finals["rl"] > finals["random"], finals


def test_the_soft_constraint_reward_is_mnasnets():
    space = load_space("uninet-cifar")
    costs = Costs(space)
    archs = [space.min_arch(), space.max_arch()]
    macs = costs.macs_many(archs, space)
    target = float(macs.mean())
    searcher = build_searcher("rl", space, costs.feasible([Budget("macs", target)]), cost=costs.metric("macs"),
                              target=target, alpha=-0.07, beta=-0.5)
    rewards = searcher.rewards(archs, [80.0, 90.0])
    assert rewards == pytest.approx([80.0 * (macs[0] / target) ** -0.07, 90.0 * (macs[1] / target) ** -0.5])
    with pytest.raises(ConfigError, match="soft-constraint target needs the cost"):
        build_searcher("rl", space, costs.feasible([]), target=target)


def test_nas_search_writes_the_compound_scaled_family_of_the_best_arch(hybrid_checkpoint, tmp_path):
    summary = hybrid_search(hybrid_checkpoint, tmp_path, "random", scale_family=2)
    best = HybridArch.from_dict(summary["best"]["macs=50K"]["arch"])
    family = summary["family"]["macs=50K"]
    assert [row["phi"] for row in family] == [0, 1, 2]
    assert HybridArch.from_dict(family[0]["arch"]) == best
    for row in family:
        own = load_space(row["space"])  # a space holding the member alone, which nas.train can train
        arch = HybridArch.from_dict(row["arch"])
        assert own.max_arch() == own.min_arch() == arch
        assert costs.macs(arch, own) == row["macs"] and row["macs_growth"] == row["macs"] / family[0]["macs"]
        assert row["stated_growth"] == pytest.approx((1.2 * 1.1 ** 2 * 1.15 ** 2) ** row["phi"])
    assert family[0]["macs"] < family[1]["macs"] < family[2]["macs"]

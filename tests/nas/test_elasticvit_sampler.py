"""The elasticvit sampler against ElasticViT's code (microsoft/Moonlit ElasticViT/: process.py, models/model.py,
train_eval_supernet.py, configs/final_3min_space.yaml), re-implemented here from that code, and its alpha-divergence
against the divergence's own gradient."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import yaml
from test_hybrid_search import digits_space

from nas import costs
from nas.build import build_supernet
from nas.errors import ConfigError
from nas.export import save_subnet
from nas.hybrid.arch import HybridArch
from nas.report import read_log
from nas.samplers import build_sampler
from nas.samplers.elasticvit import ElasticViTSampler, in_window
from nas.spaces import load_space
from nas.trainer import TrainConfig, alpha_divergence, train


def get_bank_id(current_bank_id: int, bank_nums: int, rng: np.random.Generator) -> int:
    """process.py's get_bank_id, with the walk's generator in place of random.choice."""
    if current_bank_id == 0:
        next_step = [0, 1]
    elif current_bank_id == bank_nums - 1:
        next_step = [-1, 0]
    else:
        next_step = [-1, 0, 1]
    return next_step[int(rng.integers(len(next_step)))] + current_bank_id


def bank_flops_ranges() -> list[int]:
    """build_model.py with final_3min_space.yaml: min_flops 100 to limit_flops 500 in bank_step 100, then the big
    bank choices."""
    return [c for c in range(100, 500 + 1, 100)] + [700, 900, 1200]


def test_elasticvit_replays_its_bank_walk_and_windows():
    """From a seed, the banks of every step (one move before each step, one more between epochs: process.py and
    train_eval_supernet.py) and every uniform subnet inside [t, t + 2 * flops_bound] MFLOPs, flops_bound 10
    (ElasticViT's FLOPs are MACs)."""
    space, seed, steps_per_epoch = load_space("elasticvit-mobile"), 4, 4
    sampler = build_sampler("elasticvit", space, seed=seed, total_steps=16, memory_size=4, big_memory_size=2)
    sampler.set_epoch_length(steps_per_epoch)
    targets = [t * 1e6 for t in bank_flops_ranges()]
    assert list(sampler.banks.targets) == targets and sampler.banks.width == 2 * 10e6
    rng, bank = np.random.default_rng([seed, 1]), 0
    for step in range(16):
        if step % steps_per_epoch == 0 and step > 0:
            bank = get_bank_id(bank, len(targets), rng)
        bank = get_bank_id(bank, len(targets), rng)
        archs = sampler.sample()
        assert sampler.bank == bank
        assert len(archs) == 4 and archs[-1] == sampler.floors[bank]  # ['uniform'] * 3 + ['min']
        for arch, recalled in zip(archs[:3], sampler.from_memory):
            assert recalled or targets[bank] <= costs.macs(arch, space) <= targets[bank] + 20e6
        sampler.update(archs, [0.0] * 4, lambda arch: -costs.macs(arch, space) / 1e9)


def test_elasticvit_banks_are_scaled_onto_a_smaller_space():
    """ElasticViT's targets and window, mapped affinely from elasticvit-mobile's MACs range onto the CIFAR preset's."""
    mobile, cifar = load_space("elasticvit-mobile"), load_space("elasticvit-mobile-cifar")
    (m_low, m_high), (c_low, c_high) = costs.macs_range(mobile), costs.macs_range(cifar)
    banks = build_sampler("elasticvit", cifar, seed=0).banks
    scale = (c_high - c_low) / (m_high - m_low)
    assert banks.targets == pytest.approx([c_low + (t * 1e6 - m_low) * scale for t in bank_flops_ranges()])
    assert banks.width == pytest.approx(20e6 * scale)


def test_elasticvit_memory_as_it_keeps_it():
    """150 archs a bank (50 from the 500M bank on); scored again four times an epoch (all banks at the first batch,
    the step's bank where (batch + 1) % (steps // 4) == 0 except the last quarter); the chance of retraining from it
    0.2, raised by 0.15 as every 100th epoch begins."""
    space, steps_per_epoch = load_space("elasticvit-mobile-cifar"), 8
    sampler = build_sampler("elasticvit", space, seed=1, total_steps=10_000)
    assert sampler.capacity == [150 if t < 500 else 50 for t in bank_flops_ranges()]
    sampler = build_sampler("elasticvit", space, seed=1, total_steps=10_000, memory_size=3, big_memory_size=3)
    sampler.set_epoch_length(steps_per_epoch)
    bank_update_steps = steps_per_epoch // 4
    expected = {batch for batch in range(steps_per_epoch)
                if batch == 0 or ((batch + 1) % bank_update_steps == 0 and (batch + 1) != bank_update_steps * 4)}
    rescored = set()
    for step in range(2 * steps_per_epoch):
        archs = sampler.sample()
        explored = [a for a, recalled in zip(archs, sampler.from_memory) if not recalled]
        remembered = [HybridArch.from_dict(arch) for bank in sampler.memory for arch, _ in bank]
        scored = []
        sampler.update(archs, [0.0] * 4, lambda arch: scored.append(arch) or -costs.macs(arch, space) / 1e7)
        if len(scored) > len(explored):
            assert scored[:len(scored) - len(explored)] == [a for a in remembered if a in scored]
            rescored.add(step % steps_per_epoch)
        for bank in sampler.memory:
            assert len(bank) <= 3
    assert rescored == expected

    def rate(epoch: int) -> float:  # train_eval_supernet.py
        rate = 0.2
        for e in range(epoch + 1):
            if (e + 1) % 100 == 0:
                rate += 0.15
        return rate

    for epoch in (0, 98, 99, 150, 199, 420):
        sampler.step = epoch * steps_per_epoch
        assert sampler.exploit_probability() == pytest.approx(rate(epoch))


def test_elasticvit_keeps_the_best_scored_and_recalls_by_softmax():
    """A full bank replaces its worst-scored arch with a better one (bank_arch_update); recall draws by
    softmax(score) (_arch_bank_sampling, weighted_prob)."""
    space = load_space("elasticvit-mobile-cifar")
    sampler = build_sampler("elasticvit", space, seed=2, memory_size=2, big_memory_size=2)
    a, b, c = space.sample_many(3, 3).archs()
    sampler.bank = 0
    for arch, score in ((a, -2.0), (b, -1.0), (c, -1.5)):
        sampler.remember(arch, score)
    assert sampler.memory[0] == [[c.to_dict(), -1.5], [b.to_dict(), -1.0]]
    drawn = [sampler.recall(0) for _ in range(4000)]
    share = drawn.count(b) / len(drawn)
    assert abs(share - 1 / (1 + np.exp(-0.5))) < 0.03


def test_elasticvit_keeps_the_candidate_whose_width_counts_most():
    """With a memory at least half full, the subnet is the one of 5 window draws with the smallest
    _importance_comparison: MACs with the anchor's transformer-stage channels minus MACs with its depths; the
    anchor is the best-scored arch of the first bank."""
    space = load_space("elasticvit-mobile-cifar")
    sampler = build_sampler("elasticvit", space, seed=3, memory_size=4, big_memory_size=4)
    sampler.bank = 5
    for arch in space.sample_many(4, 4).archs():
        sampler.memory[5].append([arch.to_dict(), -1.0])
    anchor = space.sample(5)
    sampler.memory[0] = [[space.min_arch().to_dict(), -3.0], [anchor.to_dict(), -0.5]]

    def difference(arch):
        widths = [dataclasses.replace(s, channels=a.channels) if s.op != "conv" else s
                  for s, a in zip(arch.stages, anchor.stages)]
        depths = [dataclasses.replace(s, depth=a.depth) if s.op != "conv" else s
                  for s, a in zip(arch.stages, anchor.stages)]
        return (costs.macs(HybridArch(arch.resolution, tuple(widths)), space)
                - costs.macs(HybridArch(arch.resolution, tuple(depths)), space))

    replay = np.random.default_rng()
    replay.bit_generator.state = sampler.rng.bit_generator.state
    candidates = [in_window(space, replay, sampler.banks.window(5), sampler.floors[5]) for _ in range(5)]
    chosen = sampler.explore(5)
    assert chosen == min(candidates, key=difference)
    assert len({difference(c) for c in candidates}) > 1


def test_elasticvit_floors_lie_under_their_banks_and_are_kept_in_the_state():
    space = load_space("elasticvit-mobile")
    sampler = build_sampler("elasticvit", space, seed=0)
    for bank, floor in enumerate(sampler.floors):
        assert costs.macs(floor, space) <= sampler.banks.targets[bank]
    state = sampler.state_dict()
    other = ElasticViTSampler(space, seed=7)
    other.load_state_dict(state)
    assert other.floors == sampler.floors


def test_elasticvit_refuses_vit_spaces_and_windows_outside_the_space():
    with pytest.raises(ValueError, match="hybrid supernet"):
        build_sampler("elasticvit", load_space("autoformer-t"))
    with pytest.raises(ValueError, match="not inside space 'elasticvit-mobile'"):
        build_sampler("elasticvit", load_space("elasticvit-mobile"), targets=[10e6])


def exact_alpha_divergence(logits, p, alpha):
    q = logits.softmax(dim=1)
    if alpha == 1:
        return (p * (p / q).log()).sum(dim=1)
    return (q * ((p / q) ** alpha - 1)).sum(dim=1) / (alpha * (alpha - 1))


def test_alpha_divergence_follows_the_divergence_it_picks():
    """Per image the larger of D_-1 and D_1 (AdaptiveLossSoft): the surrogate's gradient is that divergence's."""
    torch.manual_seed(0)
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    p = torch.randn(6, 5, dtype=torch.float64).softmax(dim=1)
    alpha_divergence(logits, p, ratio_clip=1e9).backward()
    ours = logits.grad.clone()
    logits.grad = None
    low, high = (exact_alpha_divergence(logits, p, a) for a in (-1, 1))
    assert (low > high).any() and (low < high).any()  # both divergences chosen somewhere
    torch.where(low > high, low, high).mean().backward()
    torch.testing.assert_close(ours, logits.grad, rtol=1e-6, atol=1e-9)


def test_nas_train_with_the_elasticvit_sampler_and_a_teacher_file(tmp_path):
    """Each step trains three bank subnets and the bank's minimum arch, with a teacher read from an exported model."""
    space_path = digits_space(tmp_path)
    space = load_space(space_path)
    teacher = tmp_path / "teacher.pt"
    save_subnet(teacher, build_supernet(space).extract(space.max_arch()), space.max_arch(), space)
    config = TrainConfig(space=space_path, out_dir=str(tmp_path / "run"), train_subset=96, test_subset=32,
                         batch_size=32, max_steps=2, warmup_steps=1, ckpt_every=0, progress=False, plot=False,
                         bn_calibration_images=32, sampler="elasticvit", teacher="file", teacher_file=str(teacher),
                         sampler_options={"memory_size": 2, "big_memory_size": 2}, backend="reference")
    train(config)
    steps = [r for r in read_log(tmp_path / "run" / "log.jsonl") if r["event"] == "train"]
    assert len(steps) == 2
    for record in steps:
        assert len(record["archs"]) == 4 and "from_memory" in record and "score" in record


def test_a_window_with_no_arch_is_a_user_error(tmp_path):
    """elasticvit-mobile-cifar at 8 px: the mapped windows (about 3,700 MACs wide) catch no subnet of that small grid,
    which the sampler says in one line naming the setting to widen, not in a traceback from the middle of training."""
    values = {**load_space("elasticvit-mobile-cifar").to_dict(), "name": "tiny-grid", "resolutions": [8]}
    path = tmp_path / "tiny-grid.yaml"
    path.write_text(yaml.safe_dump(values))
    sampler = build_sampler("elasticvit", load_space(str(path)), seed=0, total_steps=10)
    with pytest.raises(ConfigError, match=r"no arch of space 'tiny-grid' .*sampler_options\.width"):
        for _ in range(20):
            sampler.sample()

"""Hybrid search spaces (nas.hybrid.space): the presets, archs and spaces through JSON and YAML, validation that
names the field, sampling, the evolution operators and the categorical genes."""
import dataclasses
import time
from collections import Counter

import numpy as np
import pytest

from nas import costs
from nas.hybrid.arch import HybridArch, HybridArchBatch, Stage
from nas.hybrid.space import HybridSpace, StageChoices
from nas.spaces import PRESETS, load_space

HYBRID_PRESETS = ["elasticvit-mobile", "elasticvit-mobile-cifar", "uninet", "uninet-cifar"]


@pytest.fixture(scope="module", params=HYBRID_PRESETS)
def space(request) -> HybridSpace:
    return load_space(request.param)


def uninet_b(resolution: int) -> HybridArch:
    """UniNet-B0 (160 px) or B1 (224 px), from Sense-X/UniNet uninet.py."""
    ops = ["conv"] * 4 + ["attention"] * 2
    dsms = ["none", "local", "local", "local", "local-global", "local-global"]
    stages = zip(ops, [1, 2, 4, 4, 4, 8], [24, 48, 80, 128, 128, 256], [1, 4, 6, 3, 2, 5], dsms)
    return HybridArch(resolution, tuple(Stage(op, depth, channels, expansion, 3 if op == "conv" else 0, 0, dsm)
                                        for op, depth, channels, expansion, dsm in stages))


def test_presets_load_from_yaml_and_hold_the_papers_numbers():
    assert set(HYBRID_PRESETS) <= set(PRESETS)
    vit = load_space("elasticvit-mobile")
    assert vit.resolutions == (128, 160, 176, 192, 224, 256) and vit.style == "elasticvit" and vit.head_dim == 16
    stages = vit.stages[1:]  # stage 0 is ElasticViT's conv stem layer
    assert [s.ops for s in stages] == [("conv",)] * 2 + [("attention",)] * 4
    assert [s.depths[0] for s in stages] == [2, 2, 1, 1, 1, 1] and [s.depths[-1] for s in stages] == [5, 6, 5, 6, 6, 6]
    assert [s.channels[0] for s in stages] == [16, 16, 48, 80, 144, 160]
    assert [s.channels[-1] for s in stages] == [32, 48, 96, 160, 288, 320]
    assert [np.diff(s.channels).max() for s in stages] == [8, 8, 16, 16, 16, 16]
    assert {s.expansions for s in stages[:2]} == {(3, 4, 5, 6)} and {s.kernel_sizes for s in stages[:2]} == {(3, 5)}
    assert {s.expansions for s in stages[2:]} == {(2, 3, 4, 5)} and {s.v_scales for s in stages[2:]} == {(2, 3, 4)}
    assert [s.stride for s in stages] == [2, 2, 2, 1, 2, 2] and [s.se for s in stages[:2]] == [False, True]
    assert (vit.head_expansion, vit.pre_logits) == (6, 1984)
    uni = load_space("uninet")
    assert uni.contains(uninet_b(160)) and uni.contains(uninet_b(224))
    assert [s.stride for s in uni.stages] == [1, 2, 2, 2, 1, 2] and (uni.stem_channels, uni.head_features) == (32, 1280)
    assert [set(s.ops) for s in uni.stages[3:]] == [{"conv", "attention", "mlp"}] * 3
    assert [set(s.dsms) for s in uni.stages[3:]] == [{"local", "global", "local-global"}] * 3


def test_space_round_trips_through_yaml(space, tmp_path):
    assert HybridSpace.from_dict(space.to_dict()) == space and HybridSpace.from_yaml(space.to_yaml()) == space
    path = tmp_path / "space.yaml"
    path.write_text(space.to_yaml())
    assert load_space(path) == space and hash(load_space(path)) == hash(space)


def test_arch_round_trips_and_hashes(space):
    archs = space.sample_many(np.random.default_rng(0), 20).archs()
    for arch in archs:
        assert HybridArch.from_json(arch.to_json()) == arch and HybridArch.from_yaml(arch.to_yaml()) == arch
        assert HybridArchBatch.from_archs([arch]).arch(0) == arch
    assert len(set(archs)) == len({a.to_json() for a in archs})


BAD_ARCHS = [  # (change to UniNet-B0, message)
    (lambda a: dataclasses.replace(a, resolution=161), r"arch.resolution=161 not in \(160, 192, 224\)"),
    (lambda a: replace_stage(a, 2, channels=81), r"arch.stages\[2\].channels=81 not in \(64, 72, 80, 88, 96\)"),
    (lambda a: replace_stage(a, 0, op="mlp"), r"arch.stages\[0\].op='mlp' not in \('conv',\)"),
    (lambda a: replace_stage(a, 4, kernel_size=3), r"arch.stages\[4\].kernel_size=3 not in \(0,\) \(space 'uninet'; "
                                                   r"kernel_size does not apply to operator 'attention'\)"),
    (lambda a: replace_stage(a, 5, dsm="mbconv"), r"arch.stages\[5\].dsm='mbconv' not in"),
    (lambda a: replace_stage(a, 5, depth=10), r"arch.stages\[5\].depth=10 not in \(6, 7, 8, 9\)"),
    (lambda a: HybridArch(160, a.stages[:5]), "arch has 5 stages but space 'uninet' has 6"),
]


def replace_stage(arch: HybridArch, index: int, **changes) -> HybridArch:
    stages = list(arch.stages)
    stages[index] = dataclasses.replace(stages[index], **changes)
    return HybridArch(arch.resolution, tuple(stages))


@pytest.mark.parametrize("change, message", BAD_ARCHS)
def test_bad_archs_name_the_field(change, message):
    space = load_space("uninet")
    with pytest.raises(ValueError, match=message):
        space.validate(change(uninet_b(160)))
    assert not space.contains(change(uninet_b(160)))
    with pytest.raises(TypeError, match="expected a HybridArch for hybrid space 'uninet', got Arch"):
        space.validate(load_space("autoformer-t").max_arch())


@pytest.mark.parametrize("data, message", [
    ({"resolution": 32, "stages": [{"op": "cnn", "depth": 1, "channels": 8, "expansion": 1}]},
     r"stages\[0\]: Stage.op='cnn' is not one of conv, attention, mlp"),
    ({"resolution": 32, "stages": [{"op": "conv", "depth": 1, "channels": 8}]},
     r"stages\[0\]: unknown field\(s\) \[\], missing field\(s\) \['expansion'\]"),
    ({"resolution": 32, "stages": [{"op": "conv", "depth": 1.5, "channels": 8, "expansion": 1}]},
     r"stages\[0\]: Stage.depth must be an int, got 1.5"),
    ({"resolution": 32}, r"missing field\(s\) \['stages'\]"),
])
def test_bad_arch_files_name_the_field(data, message):
    with pytest.raises(ValueError, match=message):
        HybridArch.from_dict(data)


def tiny_stage(**changes) -> dict:
    return {"ops": ["conv"], "depths": [1], "channels": [32], "expansions": [2], "dsms": ["local"], **changes}


@pytest.mark.parametrize("changes, stage, message", [
    (dict(), tiny_stage(dsms=["none", "local"]), "'none' makes the first block downsample"),
    (dict(), tiny_stage(ops=["attention"], dsms=["none"]), "'none' makes the first block downsample"),
    (dict(head_dim=64), tiny_stage(ops=["attention"]), r"stages\[0\]: attention needs channels >= head_dim=64"),
    (dict(), tiny_stage(ops=["attention"], v_scales=[2]), r"stages\[0\]: v_scales are for the attention stages of "
                                                          "the elasticvit style"),
    (dict(style="elasticvit"), tiny_stage(ops=["attention"]), r"stages\[0\]: v_scales are for"),
    (dict(), tiny_stage(kernel_sizes=[4]), r"stages\[0\]: kernel_sizes \(4,\) must be odd"),
    (dict(), tiny_stage(ops=["transformer"]), r"stages\[0\]: ops must be some of conv, attention, mlp"),
    (dict(), tiny_stage(stride=3), r"stages\[0\]: stride=3 must be 1 or 2"),
    (dict(), tiny_stage(width=3), r"stages\[0\]: unknown field\(s\) \['width'\]"),
    (dict(head_expansion=6), tiny_stage(), "set one of head_features"),
    (dict(style="levit"), tiny_stage(), "style='levit' must be one of uninet, elasticvit"),
])
def test_bad_spaces_are_refused_with_the_reason(changes, stage, message):
    data = dict(name="tiny", style="uninet", resolutions=[32], stages=[stage], head_features=64, head_dim=16)
    with pytest.raises(ValueError, match=message):
        HybridSpace.from_dict({**data, **changes})


def test_min_and_max_arch_are_the_cost_extremes(space):
    """The declared operator and DSM orders put the cheapest first and the costliest last: min_arch and max_arch are
    the extremes of MACs, which the cost model finds by choosing every stage's operator and DSM."""
    low, high = space.min_arch(), space.max_arch()
    assert space.contains(low) and space.contains(high)
    assert costs.macs_range(space) == (costs.macs(low, space), costs.macs(high, space))
    assert costs.cost_range(space, lambda archs: costs.params_many(archs, space))[1] >= costs.params(high, space)
    macs = costs.macs_many(space.sample_many(np.random.default_rng(1), 3000), space)
    assert macs.min() >= costs.macs(low, space) and macs.max() <= costs.macs(high, space)


def test_samples_are_canonical_uniform_and_fast(space):
    batch = space.sample_many(np.random.default_rng(2), 4000)
    archs = batch.archs()
    for arch in archs[:200]:
        space.validate(arch)
        assert space.canonical(arch) == arch
    last = space.stages[-1]
    counts = Counter(arch.stages[-1].channels for arch in archs)
    expected = len(archs) / len(last.channels)
    assert all(abs(counts[c] - expected) < 5 * np.sqrt(expected) for c in last.channels), counts
    assert Counter(a.resolution for a in archs).keys() == set(space.resolutions)
    rng = np.random.default_rng(3)
    started = time.perf_counter()
    for _ in range(500):
        space.sample(rng)
    # about 8,000 a second on one idle core; a loose floor, so that a busy machine does not fail it
    assert 500 / (time.perf_counter() - started) > 500, "thousands of single draws per second"


def test_draws_depend_only_on_the_seed(space):
    assert space.sample_many(7, 50).archs() == space.sample_many(7, 50).archs()
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    parent = space.sample(1)
    assert [space.mutate(parent, rng_a) for _ in range(5)] == [space.mutate(parent, rng_b) for _ in range(5)]


def test_mutation_and_crossover_stay_in_the_space(space):
    rng = np.random.default_rng(4)
    parents = space.sample_many(rng, 30).archs()
    changed_ops = 0
    for a, b in zip(parents, parents[1:]):
        child = space.mutate(a, rng, prob=0.5, structure_prob=0.5)
        space.validate(child)
        assert space.canonical(child) == child
        changed_ops += any(x.op != y.op for x, y in zip(a.stages, child.stages))
        mixed = space.crossover(a, b, rng)
        space.validate(mixed)
        assert all(stage in (x, y) for stage, x, y in zip(mixed.stages, a.stages, b.stages))
    assert changed_ops > 0 or all(len(s.ops) == 1 for s in space.stages)
    assert space.mutate(parents[0], rng, prob=0.0, structure_prob=0.0) == parents[0]


def test_a_stage_that_becomes_conv_gets_a_kernel():
    space = load_space("uninet")
    attention = replace_stage(uninet_b(224), 3, op="attention", kernel_size=0)
    rng = np.random.default_rng(0)
    children = [space.mutate(attention, rng, prob=0.0, structure_prob=1.0) for _ in range(40)]
    convs = [child.stages[3] for child in children if child.stages[3].op == "conv"]
    assert convs and all(stage.kernel_size == 3 for stage in convs)


def test_genes_decode_to_valid_archs_and_cover_the_space(space):
    genes = space.genes()
    assert genes[0] == ("resolution", space.resolutions)
    rng = np.random.default_rng(6)
    indices = np.stack([rng.integers(len(choices), size=300) for _, choices in genes], axis=1)
    archs = space.decode_genes(indices).archs()
    for arch in archs:
        space.validate(arch)
    assert {a.resolution for a in archs} == set(space.resolutions)
    last = len(space.stages) - 1
    assert {a.stages[last].op for a in archs} == set(space.stages[last].ops)


def test_flops_window_draws_land_in_the_window():
    space = load_space("uninet-cifar")
    low, high = costs.macs_range(space)
    window = (low + (high - low) * 0.3, low + (high - low) * 0.4)
    rng = np.random.default_rng(8)
    for _ in range(20):
        arch = costs.sample_in_flops_window(space, rng, *window)
        assert window[0] <= costs.macs(arch, space) <= window[1]
    with pytest.raises(ValueError, match="outside space 'uninet-cifar'"):
        costs.sample_in_flops_window(space, rng, 2 * high, 3 * high)


def test_stage_choices_are_normalised():
    stage = StageChoices(ops=["mlp", "conv", "mlp"], depths=[3, 1, 3], channels=32, expansions=[4, 2],
                         dsms="local")
    assert (stage.ops, stage.depths, stage.channels, stage.expansions, stage.dsms) == (
        ("mlp", "conv"), (1, 3), (32,), (2, 4), ("local",))

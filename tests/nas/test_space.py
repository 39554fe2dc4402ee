"""Search spaces: validation, presets and serialisation, sampling, evolution operators, FLOPs windows,
AutoFormer config files."""
import collections
import dataclasses
import random
import re

import numpy as np
import pytest

from nas.costs import macs, macs_many, macs_range, sample_in_flops_window
from nas.spaces import PRESETS, load_space
from nas.vit.arch import Arch
from nas.vit.space import SearchSpace, read_autoformer_space, read_autoformer_subnet, read_autoformer_yaml

SPACES = sorted(name for name in PRESETS if load_space(name).family == "vit")  # hybrid, SAM: their tests
# An AutoFormer-like space and a ViTAS-like one (identity layers, several patch sizes) cover both kinds.
KINDS = ["autoformer-t", "vitas-t"]


def test_presets_are_the_documented_ones():
    documented = {"autoformer-t", "autoformer-s", "autoformer-b", "vitas-t", "cifar-tiny", "mnist-tiny", "digits-tiny"}
    assert documented <= set(PRESETS)
    t = load_space("autoformer-t")
    assert (t.embed_dims, t.depths, t.num_heads, t.mlp_ratios) == ((192, 216, 240), (12, 13, 14), (3, 4), (3.5, 4.0))
    largest = (t.max_embed_dim, t.max_depth, t.max_heads, t.max_mlp_ratio, t.max_hidden, t.max_tokens)
    assert largest == (240, 14, 4, 4.0, 960, 197)
    digits = load_space("digits-tiny")
    assert (digits.img_size, digits.in_chans, digits.num_classes) == (8, 1, 10)
    vitas = load_space("vitas-t")
    assert vitas.identity_layers and vitas.private_class_tokens and len(vitas.patch_sizes) > 1


@pytest.mark.parametrize("name, embed, mlp_max, patches, img", [("vitas", 384, 1440, (14, 16, 32), 224),
                                                                  ("vitas-cifar", 96, 360, (4, 8), 32)])
def test_vitas_presets_hold_its_space(name, embed, mlp_max, patches, img):
    """ViTAS's 1.3G space (vit_tiny_search_1.3G_search.yaml): 16 blocks that may be identities, its patch sizes, heads
    3/6/12/16 with private q/k and tokens, MLP widths the ten fractions 0.1..1.0 of the largest."""
    space = load_space(name)
    assert (space.embed_dims, space.max_depth, space.num_heads, space.patch_sizes, space.img_size) == (
        (embed,), 16, (3, 6, 12, 16), patches, img)
    assert space.identity_layers and space.private_qk and space.private_class_tokens
    assert space.depths == tuple(range(1, 17))
    assert [int(embed * r) for r in space.mlp_ratios] == [round(mlp_max * k / 10) for k in range(1, 11)]
    if name == "vitas":
        assert space.max_heads * space.head_dim == 480  # ViTAS's qkv width 1440 / 3


@pytest.mark.parametrize("name", SPACES)
def test_space_round_trips(name, tmp_path):
    space = load_space(name)
    assert SearchSpace.from_dict(space.to_dict()) == space
    assert SearchSpace.from_yaml(space.to_yaml()) == space
    path = tmp_path / "space.yaml"
    path.write_text(space.to_yaml())
    assert load_space(path) == space
    arch = space.sample(1)
    assert Arch.from_yaml(arch.to_yaml()) == arch and Arch.from_json(arch.to_json()) == arch


def test_space_normalises_and_rejects_bad_definitions():
    space = SearchSpace("s", embed_dims=[64, 32, 64], depths=3, num_heads=[2, 1], mlp_ratios=[4, 2])
    assert (space.embed_dims, space.depths, space.num_heads, space.mlp_ratios) == ((32, 64), (3,), (1, 2), (2.0, 4.0))
    with pytest.raises(ValueError, match="embed_dims"):
        SearchSpace("s", embed_dims=[], depths=[2], num_heads=[1], mlp_ratios=[2])
    with pytest.raises(ValueError, match="depths"):
        SearchSpace("s", embed_dims=[32], depths=[0, 2], num_heads=[1], mlp_ratios=[2])
    with pytest.raises(ValueError, match=r"patch_sizes \(7,\) do not divide img_size=32"):
        SearchSpace("s", embed_dims=[32], depths=[2], num_heads=[1], mlp_ratios=[2], patch_sizes=[4, 7], img_size=32)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['depth'\]"):
        SearchSpace.from_dict({**space.to_dict(), "depth": 3})
    with pytest.raises(ValueError, match="missing"):
        SearchSpace.from_dict({"name": "s", "embed_dims": [32]})
    relative = SearchSpace("s", embed_dims=[32], depths=[2], num_heads=[1], mlp_ratios=[2], relative_position=14)
    assert SearchSpace.from_yaml(relative.to_yaml()) == relative and relative.to_dict()["relative_position"] == 14
    assert relative != SearchSpace("s", embed_dims=[32], depths=[2], num_heads=[1], mlp_ratios=[2])
    with pytest.raises(ValueError, match="relative_position=-1 must be an int >= 0"):
        SearchSpace("s", embed_dims=[32], depths=[2], num_heads=[1], mlp_ratios=[2], relative_position=-1)


@pytest.mark.parametrize("field, values, shown", [
    ("mlp_ratios", [float("nan"), 2.0], "nan"), ("mlp_ratios", [2.0, float("inf")], "inf"),
    ("embed_dims", [True, 48], "True"), ("embed_dims", [32.7, 48], "32.7"), ("depths", ["2", 3], "'2'"),
])
def test_choices_that_are_not_what_they_look_like_are_refused(field, values, shown):
    """int(True) is 1 and int(32.7) is 32: read as such, the space would not be the one the file describes."""
    fields = {"embed_dims": [32], "depths": [2], "num_heads": [1], "mlp_ratios": [2.0], field: values}
    with pytest.raises(ValueError, match=rf"SearchSpace.{field}: choices must be finite \w+, got {re.escape(shown)}"):
        SearchSpace("s", **fields)
    assert getattr(SearchSpace("s", **{**fields, field: [32.0, 48]}), field) == (32, 48)


def test_load_space_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown search space 'autoformer-x'.*autoformer-t"):
        load_space("autoformer-x")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: s\nembed_dims: [32\n")
    with pytest.raises(ValueError, match="broken.yaml: not a valid search space"):
        load_space(broken)


def test_validate_names_the_field():
    space = load_space("autoformer-t")
    good = Arch.from_depth(216, 13, 3, 4.0, 14)
    space.validate(good)
    cases = {
        r"arch.embed_dim=200 not in \(192, 216, 240\)": dataclasses.replace(good, embed_dim=200),
        r"arch.num_heads\[3\]=8 not in \(3, 4\)":
            dataclasses.replace(good, num_heads=good.num_heads[:3] + (8,) + good.num_heads[4:]),
        r"arch.mlp_ratio\[13\]=2.0 not in \(3.5, 4.0\)":
            dataclasses.replace(good, mlp_ratio=good.mlp_ratio[:13] + (2.0,)),
        r"arch.depth=11 \(layers on\) not in \(12, 13, 14\)": Arch.from_depth(216, 11, 3, 4.0, 14),
        r"arch.layer_on\[2\]=False before an active layer":
            dataclasses.replace(good, layer_on=(True, True, False) + (True,) * 10 + (False,)),
        r"arch has 16 layers.*max depth 14": Arch.from_depth(216, 13, 3, 4.0, 16),
        r"arch.patch_size=14 not in \(16,\)": dataclasses.replace(good, patch_size=14),
    }
    for message, arch in cases.items():
        with pytest.raises(ValueError, match=message):
            space.validate(arch)
        assert not space.contains(arch)
    vitas = load_space("vitas-t")
    with pytest.raises(ValueError, match=r"arch.patch_size=None but space 'vitas-t' has several patch sizes "
                                         r"\(14, 16\)"):
        vitas.validate(Arch.from_depth(192, 12, 3, 4.0, 16))
    gappy = Arch(192, (3,) * 16, (4.0,) * 16, (True, False) * 6 + (True,) * 4, 16)
    assert vitas.contains(gappy) and gappy.depth == 10


@pytest.mark.parametrize("name", SPACES)
def test_min_max_arch_bound_every_sample(name):
    space = load_space(name)
    low, high = space.min_arch(), space.max_arch()
    assert space.contains(low) and space.contains(high)
    assert (high.embed_dim, high.depth, set(high.num_heads), set(high.mlp_ratio)) == (
        space.max_embed_dim, space.max_depth, {space.max_heads}, {space.max_mlp_ratio})
    assert (low.embed_dim, low.depth, set(low.num_heads), set(low.mlp_ratio)) == (
        space.embed_dims[0], space.depths[0], {space.num_heads[0]}, {space.mlp_ratios[0]})
    cost = macs_many(space.sample_many(np.random.default_rng(0), 2000), space)
    assert macs_range(space) == (macs(low, space), macs(high, space))
    assert cost.min() >= macs_range(space)[0] and cost.max() <= macs_range(space)[1]


@pytest.mark.parametrize("name", SPACES)
def test_samples_stay_in_space_and_are_canonical(name):
    space = load_space(name)
    for seed in range(50):
        arch = space.sample(seed)
        space.validate(arch)
        assert space.canonical(arch) == arch
    for arch in space.sample_many(np.random.default_rng(0), 300).archs():
        space.validate(arch)


def test_same_seed_same_arch_on_every_rank():
    space = load_space("vitas-t")
    rank0, rank1 = np.random.default_rng(1234), np.random.default_rng(1234)
    assert [space.sample(rank0) for _ in range(20)] == [space.sample(rank1) for _ in range(20)]
    assert sample_in_flops_window(space, rank0, 1e9, 1.5e9) == sample_in_flops_window(space, rank1, 1e9, 1.5e9)
    assert space.mutate(space.sample(5), rank0) == space.mutate(space.sample(5), rank1)
    with pytest.raises(TypeError, match="numpy.random.Generator or an int seed"):
        space.sample(random.Random(0))


def test_sampling_is_uniform_over_choices():
    space, draws = load_space("vitas-t"), 4000
    batch = space.sample_many(np.random.default_rng(0), draws)
    on = batch.layer_on
    checks = [
        (collections.Counter(batch.embed_dim.tolist()), space.embed_dims),
        (collections.Counter(on.sum(axis=1).tolist()), space.depths),
        (collections.Counter(batch.patch_size.tolist()), space.patch_sizes),
        (collections.Counter(batch.num_heads[on].tolist()), space.num_heads),
        (collections.Counter(batch.mlp_ratio[on].tolist()), space.mlp_ratios),
    ]
    for counts, choices in checks:
        assert set(counts) == set(choices)
        total = sum(counts.values())
        for choice in choices:
            # 5 binomial standard deviations: fails only on a real bias.
            p = 1 / len(choices)
            assert abs(counts[choice] - total * p) < 5 * (total * p * (1 - p)) ** 0.5, (choice, counts)
    # Every layer is an identity equally often given the depth: no layer position is favoured.
    per_layer = on.mean(axis=0)
    assert np.ptp(per_layer) < 0.1
    prefix = load_space("autoformer-t").sample_many(3, 200).layer_on
    assert all(row.tolist() == sorted(row.tolist(), reverse=True) for row in prefix)


def test_canonical_fills_inactive_layers_from_the_nearest_active_one():
    space = load_space("vitas-t")
    heads = (2, 3, 4, 2, 3, 4, 2, 3, 4, 2, 3, 4, 2, 3, 4, 2)
    layer_on = (False, False, True, True, False, True) + (True,) * 7 + (False, True, False)
    arch = Arch(192, heads, (3.0,) * 16, layer_on, 16)
    canonical = space.canonical(arch)
    assert canonical.num_heads == (4, 4, 4, 2, 2, 4, 2, 3, 4, 2, 3, 4, 2, 2, 4, 4)
    assert canonical.layer_on == layer_on
    assert Arch.from_depth(192, 12, [3] * 12, [3.5] * 12, 14) == load_space("autoformer-t").canonical(
        Arch.from_depth(192, 12, [3] * 12, [3.5] * 12, 14))


@pytest.mark.parametrize("name", KINDS)
def test_mutate_stays_in_space(name):
    space = load_space(name)
    rng = np.random.default_rng(0)
    changed = 0
    for _ in range(200):
        parent = space.sample(rng)
        child = space.mutate(parent, rng)
        space.validate(child)
        assert space.canonical(child) == child
        changed += child != parent
    assert changed > 150  # with AutoFormer's probabilities almost every mutation changes the arch


@pytest.mark.parametrize("name", KINDS)
def test_mutate_probabilities(name):
    space = load_space(name)
    rng = np.random.default_rng(0)
    parent = space.sample(rng)
    assert space.mutate(parent, rng, prob=0.0, depth_embed_prob=0.0) == parent
    # Per-layer mutation only: embed dim, depth, active set and patch size stay.
    for _ in range(50):
        child = space.mutate(parent, rng, prob=1.0, depth_embed_prob=0.0)
        assert (child.embed_dim, child.layer_on, child.patch_size) == \
            (parent.embed_dim, parent.layer_on, parent.patch_size)
    depths = {space.mutate(parent, rng, prob=0.0, depth_embed_prob=1.0).depth for _ in range(100)}
    assert depths == set(space.depths)


def test_mutate_keeps_surviving_layers_when_depth_changes():
    space = load_space("autoformer-t")
    rng = np.random.default_rng(0)
    for _ in range(100):
        parent = space.sample(rng)
        child = space.mutate(parent, rng, prob=0.0, depth_embed_prob=1.0)
        kept = min(parent.depth, child.depth)
        assert child.num_heads[:kept] == parent.num_heads[:kept] and child.mlp_ratio[:kept] == parent.mlp_ratio[:kept]


@pytest.mark.parametrize("name", KINDS)
def test_crossover_takes_every_gene_from_a_parent(name):
    space = load_space(name)
    rng = np.random.default_rng(0)
    for _ in range(200):
        a, b = space.sample(rng), space.sample(rng)
        child = space.crossover(a, b, rng)
        space.validate(child)
        assert child.embed_dim in (a.embed_dim, b.embed_dim)
        assert child.patch_size in (a.patch_size, b.patch_size)
        assert child.layer_on in (a.layer_on, b.layer_on)
        for i in range(space.max_depth):
            if child.layer_on[i]:
                assert child.num_heads[i] in (a.num_heads[i], b.num_heads[i])
                assert child.mlp_ratio[i] in (a.mlp_ratio[i], b.mlp_ratio[i])
        assert space.crossover(a, a, rng) == a
    with pytest.raises(ValueError, match="arch.embed_dim"):
        space.crossover(a, dataclasses.replace(b, embed_dim=7), rng)


SUPERNET_YAML = """\
SUPERNET:
  MLP_RATIO: 4.0
  NUM_HEADS: 4
  EMBED_DIM: 160
  DEPTH: 6
SEARCH_SPACE:
  MLP_RATIO:
    - 3.0
    - 4
  NUM_HEADS:
    - 2
    - 4
  DEPTH:
    - 4
    - 6
  EMBED_DIM:
    - 96
    - 128
"""

SUBNET_YAML = SUPERNET_YAML + """\
RETRAIN:
  MLP_RATIO:
    - 3.0
    - 4.0
    - 4.0
    - 3.0
  NUM_HEADS:
    - 2
    - 4
    - 2
    - 2
  DEPTH: 4
  EMBED_DIM: 128
"""


def test_reads_autoformer_config_files(tmp_path):
    supernet, subnet = tmp_path / "supernet-X.yaml", tmp_path / "AutoFormer-X.yaml"
    supernet.write_text(SUPERNET_YAML)
    subnet.write_text(SUBNET_YAML)
    space = read_autoformer_yaml(supernet)
    assert space == SearchSpace("supernet-X", embed_dims=(96, 128), depths=(4, 6), num_heads=(2, 4),
                                mlp_ratios=(3.0, 4.0), qkv_bias_layout="autoformer", global_pool="avg",
                                layer_norm_eps=1e-5,
                                supernet={"embed_dim": 160, "depth": 6, "num_heads": 4, "mlp_ratio": 4.0})
    assert read_autoformer_space(subnet, name="x", img_size=32, patch_sizes=(4,)).img_size == 32
    arch = read_autoformer_yaml(subnet)
    assert arch == Arch(128, (2, 4, 2, 2, 2, 2), (3.0, 4.0, 4.0, 3.0, 3.0, 3.0), (True,) * 4 + (False,) * 2)
    space.validate(arch)
    assert read_autoformer_subnet(subnet, max_depth=8).max_depth == 8


def test_autoformer_config_errors(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(SUPERNET_YAML.replace("  DEPTH:\n    - 4\n    - 6\n", ""))
    with pytest.raises(ValueError, match="bad.yaml: SEARCH_SPACE lacks DEPTH"):
        read_autoformer_space(path)
    path.write_text(SUBNET_YAML.replace("  DEPTH: 4", "  DEPTH: 5"))
    with pytest.raises(ValueError, match=r"RETRAIN.MLP_RATIO must list one value per layer \(DEPTH=5\)"):
        read_autoformer_subnet(path)
    path.write_text(SUPERNET_YAML)
    with pytest.raises(ValueError, match="no RETRAIN section"):
        read_autoformer_subnet(path)
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="not an AutoFormer config"):
        read_autoformer_yaml(path)

"""Grouped K-subnet ops and the batched supernet forward against the single-subnet reference, per subnet."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from elastic_ops import reference
from elastic_ops.group_sizes import GroupSizes
from elastic_ops.reference import grouped_attention, grouped_layer_norm, grouped_linear, grouped_mlp
from nas.evaluate import batched_forward
from nas.spaces import PRESETS, load_space
from nas.vit.arch import Arch
from nas.vit.batched import BatchedSubnets
from nas.vit.space import SearchSpace
from nas.vit.supernet import SupernetConfig, VisionTransformerSupernet

# hybrid: test_hybrid_*; vitas: its smallest image is 224 px (patches 14, 16, 32), and vitas-cifar has its structure.
VIT_PRESETS = sorted(name for name in PRESETS if isinstance(load_space(name), SearchSpace) and name != "vitas")

TOL = dict(atol=2e-5, rtol=2e-5)


def super_weight(*shape: int, active: tuple[int, ...]) -> torch.Tensor:
    """Random in the leading ``active`` block, NaN outside: a grouped op must not read past the group's widest
    subnet."""
    data = torch.full(shape, float("nan"))
    data[tuple(slice(0, a) for a in active)] = torch.randn(*active) * shape[-1] ** -0.5
    return data


def stacked(per_subnet: list[torch.Tensor], width: int) -> torch.Tensor:
    """``[K, ..., width]`` with each subnet's activations zero-padded on the last dim."""
    out = torch.zeros(len(per_subnet), *per_subnet[0].shape[:-1], width)
    for k, x in enumerate(per_subnet):
        out[k, ..., : x.shape[-1]] = x
    return out


def assert_matches_per_subnet(y: torch.Tensor, expected: list[torch.Tensor]) -> None:
    for k, e in enumerate(expected):
        torch.testing.assert_close(y[k, ..., : e.shape[-1]], e, **TOL)
        padding = y[k, ..., e.shape[-1]:]
        assert torch.equal(padding, torch.zeros_like(padding)), f"subnet {k}: padding is not zero"


EMBEDS = [17, 1, 24, 9]  # prime, size 1, the group max, another


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_grouped_linear_matches_each_subnet(activation):
    outs = [5, 31, 12, 1]
    weight = super_weight(40, 30, active=(max(outs), max(EMBEDS)))
    bias = super_weight(40, active=(max(outs),))
    xs = [torch.randn(2, 7, e) for e in EMBEDS]
    y = grouped_linear(stacked(xs, max(EMBEDS)), weight, bias, GroupSizes(outs, "cpu"), activation)
    assert y.shape == (4, 2, 7, max(outs))
    assert_matches_per_subnet(y, [reference.linear(x, weight, bias, o, activation) for x, o in zip(xs, outs)])


def test_grouped_layer_norm_normalises_over_each_subnets_channels():
    weight = super_weight(32, active=(24,)) + 1.0
    bias = super_weight(32, active=(24,))
    # A large offset makes statistics over the wrong channel count visibly wrong.
    xs = [torch.randn(3, 5, e) * 3 + 4 for e in EMBEDS]
    y = grouped_layer_norm(stacked(xs, 24), GroupSizes(EMBEDS, "cpu"), weight, bias)
    assert_matches_per_subnet(y, [reference.layer_norm(x, weight, bias) for x in xs])


def test_grouped_layer_norm_uniform_sizes():
    weight, bias = torch.randn(16), torch.randn(16)
    xs = [torch.randn(2, 3, 12) for _ in range(3)]
    y = grouped_layer_norm(torch.stack(xs), GroupSizes([12] * 3, "cpu"), weight, bias)
    assert_matches_per_subnet(y, [reference.layer_norm(x, weight, bias) for x in xs])


def test_grouped_mlp_matches_each_subnet():
    hidden = [int(e * r) for e, r in zip(EMBEDS, (3.5, 4.0, 2.0, 3.0))]
    fc1_w = super_weight(100, 32, active=(max(hidden), 24))
    fc1_b = super_weight(100, active=(max(hidden),))
    fc2_w = super_weight(32, 100, active=(24, max(hidden)))
    fc2_b = super_weight(32, active=(24,))
    xs = [torch.randn(2, 5, e) for e in EMBEDS]
    y = grouped_mlp(stacked(xs, 24), GroupSizes(EMBEDS, "cpu"), fc1_w, fc1_b, fc2_w, fc2_b, GroupSizes(hidden, "cpu"))
    assert_matches_per_subnet(y, [reference.mlp(x, fc1_w, fc1_b, fc2_w, fc2_b, h) for x, h in zip(xs, hidden)])


@pytest.mark.parametrize("tokens", [197, 5])
def test_grouped_attention_matches_each_subnet(tokens):
    head_dim, max_heads = 16, 4
    heads = [3, 1, 3, 2]  # the group's widest is below the supernet's: rows of head 4 are NaN
    qkv_w = torch.full((3 * max_heads * head_dim, 32), float("nan"))
    qkv_b = torch.full((3 * max_heads * head_dim,), float("nan"))
    for j in range(3):
        rows = slice(j * max_heads * head_dim, j * max_heads * head_dim + 3 * head_dim)
        qkv_w[rows, :24] = torch.randn(3 * head_dim, 24) * 0.3
        qkv_b[rows] = torch.randn(3 * head_dim)
    proj_w = super_weight(32, max_heads * head_dim, active=(24, 3 * head_dim))
    proj_b = super_weight(32, active=(24,))
    xs = [torch.randn(2, tokens, e) for e in EMBEDS]
    y = grouped_attention(stacked(xs, 24), GroupSizes(EMBEDS, "cpu"), qkv_w, qkv_b, proj_w, proj_b,
                          GroupSizes(heads, "cpu"), head_dim)
    expected = [reference.attention(x, qkv_w, qkv_b, proj_w, proj_b, h, head_dim) for x, h in zip(xs, heads)]
    assert_matches_per_subnet(y, expected)


def test_group_sizes_rejects_empty_and_zero():
    with pytest.raises(ValueError, match="active size >= 1"):
        GroupSizes([3, 0], "cpu")
    with pytest.raises(ValueError, match="active size >= 1"):
        GroupSizes([], "cpu")


# --- the batched supernet forward ---------------------------------------------------------------------


def small_supernet(space_name: str, seed: int = 0, full_size: bool = False, **changes) -> VisionTransformerSupernet:
    """The supernet of a preset space (with ``changes`` to its fields) at a small image size (few tokens, every
    width and depth choice kept; ``full_size``: the space's own image size and classes), with weights large
    enough that different subnets give clearly different logits."""
    space = dataclasses.replace(load_space(space_name), **changes)
    if not full_size:
        img_size = math.lcm(*space.patch_sizes) * (2 if space.img_size > 32 else 1)
        space = dataclasses.replace(space, img_size=min(space.img_size, img_size), num_classes=7)
    torch.manual_seed(seed)
    model = VisionTransformerSupernet(SupernetConfig.from_space(space)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if "norm" in name else 0.0, param.shape[-1] ** -0.5 if param.dim() > 1 else 0.2)
    return model


def images_for(model, batch: int = 3) -> torch.Tensor:
    c = model.config
    return torch.randn(batch, c.in_chans, c.img_size, c.img_size)


@pytest.mark.parametrize("space_name", VIT_PRESETS)
def test_batched_forward_equals_single_subnet_forward(space_name):
    model = small_supernet(space_name)
    space = model.config.space
    archs = space.sample_many(np.random.default_rng(1), 4).archs() + [space.min_arch(), space.max_arch()]
    images = images_for(model, 2)
    with torch.no_grad():
        logits = batched_forward(model, images, archs)
        pixels = (7, space.img_size, space.img_size) if space.task == "segmentation" else (7,)
        assert logits.shape == (len(archs), 2, *pixels)
        singles = torch.stack([model(images, arch) for arch in archs])
    torch.testing.assert_close(logits, singles, **TOL)
    assert (singles[0] - singles[-1]).abs().max() > 1e-2, "subnets should differ; the check would be vacuous"


def test_layers_off_pass_through():
    """ViTAS-style identity layers: a subnet whose layer is off is unchanged by that layer while others run it."""
    model = small_supernet("vitas-t")
    space = model.config.space
    rng = np.random.default_rng(3)
    archs = [a for a in space.sample_many(rng, 40).archs() if a.patch_size == 16][:3]
    assert len({a.layer_on for a in archs}) > 1
    images = images_for(model, 2)
    with torch.no_grad():
        logits = BatchedSubnets(model, archs)(images)
        for k, arch in enumerate(archs):
            torch.testing.assert_close(logits[k], model(images, arch), **TOL)


def test_shared_prefixes_are_computed_once_and_split_where_subnets_part():
    """Mutants of one parent share their leading layers: the pass computes each distinct prefix once (a hand
    count of branches), and every subnet still gets its own forward's logits. Two subnets whose only layer so
    far has the same sizes, but in layers 0 and 1 (the other one off), must not be taken for one branch."""
    model = small_supernet("vitas-t")
    space = model.config.space
    depth = space.max_depth
    smallest = space.min_arch()
    on = (True,) * depth

    def variant(embed=smallest.embed_dim, heads=smallest.num_heads, layer_on=on):
        return Arch(embed, heads, smallest.mlp_ratio, layer_on, smallest.patch_size)

    last_layer_wider = smallest.num_heads[:-1] + (max(space.num_heads),)
    archs = [
        variant(),                                          # the parent
        variant(heads=last_layer_wider),                    # parts from the parent in the last layer only
        variant(embed=max(space.embed_dims)),               # another embed dim: its own branch from the start
        variant(layer_on=(True, False) + on[2:]),           # layer 1 off: parts from the parent after layer 0
        variant(layer_on=(False, True) + on[2:]),           # layer 0 off: after layer 1 its prefix has the sizes
    ]                                                       # of arch 3's after layer 0, in another layer
    pass_ = BatchedSubnets(model, archs)
    running = [len(plan.embed) for plan in pass_.layers]
    # layer 0: archs {0, 1, 3} and {2} (4 is off); layer 1: {0, 1}, {2}, {4} (3 is off); then all four branches
    # until the last layer, where 0 and 1 part.
    assert running == [2, 3] + [4] * (depth - 3) + [5]
    assert pass_.branches == 5
    images = images_for(model, 2)
    with torch.no_grad():
        logits = pass_(images)
        for k, arch in enumerate(archs):
            torch.testing.assert_close(logits[k], model(images, arch), **TOL)
    assert (logits[3] - logits[4]).abs().max() > 1e-2


def test_a_pass_split_into_cache_sized_chunks_of_images_gives_the_same_logits(monkeypatch):
    """On a CPU a pass runs its batch in chunks sized by ``CPU_CHUNK_BYTES``: one image per chunk must give
    every subnet the logits of its own forward on the whole batch."""
    import nas.vit.batched as batched_module

    model = small_supernet("cifar-tiny", seed=1)
    space = model.config.space
    archs = space.sample_many(np.random.default_rng(5), 5).archs()
    images = images_for(model, 5)
    monkeypatch.setattr(batched_module, "CPU_CHUNK_BYTES", 1)
    forward, chunks = BatchedSubnets._forward, []

    def recording(self, chunk):
        chunks.append(chunk.shape[0])
        return forward(self, chunk)

    monkeypatch.setattr(BatchedSubnets, "_forward", recording)
    with torch.no_grad():
        logits = BatchedSubnets(model, archs)(images)
        singles = torch.stack([model(images, arch) for arch in archs])
    assert chunks == [1] * 5
    torch.testing.assert_close(logits, singles, **TOL)


def test_private_qk_per_head_count_in_one_pass():
    """ViTAS: a head count with private q/k projections takes them, the largest the shared rows. Every layer
    of this pass mixes both (the unfused grouped attention, with q and k gathered per source)."""
    model = small_supernet("vitas-t")
    space = model.config.space
    private = model.config.private_qk_heads
    assert private and max(space.num_heads) not in private
    depth, patch = space.max_depth, space.patch_sizes[0]
    cycle = sorted(space.num_heads)
    archs = [Arch(space.embed_dims[k % 2], tuple(cycle[(i + k) % len(cycle)] for i in range(depth)),
                  (space.mlp_ratios[0],) * depth, (True,) * depth, patch) for k in range(len(cycle))]
    for i in range(depth):
        heads = {arch.num_heads[i] for arch in archs}
        assert heads & set(private) and heads - set(private)
    images = images_for(model, 2)
    with torch.no_grad():
        logits = batched_forward(model, images, archs)
        for k, arch in enumerate(archs):
            torch.testing.assert_close(logits[k], model(images, arch), **TOL)


def test_relative_position_in_one_pass():
    """AutoFormer's 2D relative position: the batched pass gives each subnet its own forward's logits, and
    evaluate_archs runs such a supernet batched with the results of each subnet alone."""
    from nas.evaluate import evaluate_archs
    model = small_supernet("cifar-tiny", relative_position=2)
    space = model.config.space
    archs = space.sample_many(np.random.default_rng(2), 3).archs() + [space.min_arch(), space.max_arch()]
    images, labels = images_for(model, 4), torch.randint(0, 7, (4,))
    with torch.no_grad():
        logits = batched_forward(model, images, archs)
        singles = torch.stack([model(images, arch) for arch in archs])
    torch.testing.assert_close(logits, singles, **TOL)
    results = evaluate_archs(model, archs, [(images, labels)], progress=False)
    for result, single in zip(results, singles):
        assert result.loss == pytest.approx(torch.nn.functional.cross_entropy(single, labels).item(), rel=1e-5)
        assert result.top1 == pytest.approx((single.argmax(1) == labels).float().mean().item() * 100)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".rel_pos." in name:
                param.zero_()
        without = batched_forward(model, images, archs)
    assert (without - logits).abs().max() > 1e-2, ("relative position should change the logits; the check would "
                                                   "be vacuous")


def test_batched_forward_rejects_bad_input():
    model = small_supernet("digits-tiny")
    other = load_space("cifar-tiny").max_arch()
    with torch.no_grad():
        with pytest.raises(ValueError, match="arch 1 of 2"):
            batched_forward(model, images_for(model), [model.config.space.max_arch(), other])
        with pytest.raises(ValueError, match="expected images"):
            batched_forward(model, torch.randn(2, 3, 8, 8), [model.config.space.max_arch()])
        with pytest.raises(ValueError, match="no archs"):
            batched_forward(model, images_for(model), [])
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        batched_forward(model, images_for(model), [model.config.space.max_arch()])


def test_native_grouped_kernels_match_the_grouped_reference():
    """The native grouped kernels (forced) against the grouped PyTorch implementation, layers off included."""
    elastic_ops = pytest.importorskip("elastic_ops")
    if not elastic_ops.backends()["native"].available:
        pytest.skip(f"native backend: {elastic_ops.backends()['native']}")
    model = small_supernet("cifar-tiny", seed=2)
    space = model.config.space
    archs = space.sample_many(np.random.default_rng(4), 6).archs() + [space.min_arch()]
    images = images_for(model, 4)
    with torch.no_grad():
        expected = batched_forward(model, images, archs)
        with elastic_ops.use_backend("native"):
            native = batched_forward(model, images, archs)
    torch.testing.assert_close(native, expected, **TOL)


def test_forced_grouped_kernels_that_cannot_run_say_why():
    import elastic_ops

    model = small_supernet("digits-tiny")
    # The grouped kernels are forward-only: with gradients needed, a forced kernel backend cannot run.
    for backend in ("triton", "native"):
        with elastic_ops.use_backend(backend):
            with pytest.raises(elastic_ops.BackendUnavailableError, match="forward-only"):
                batched_forward(model, images_for(model), [model.config.space.max_arch()])

"""ViTAS's attention width as a gene of its own (``SearchSpace.attn_dims``, ``Arch.attn_dim``): a subnet's head dim is
its width over its heads. Oracles: attention written out in plain PyTorch on explicitly sliced weights, counts by
hand and by the extracted module, and the exported subnet rebuilt from its record."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import elastic_ops.functional
from elastic_ops import _backend
from elastic_ops.nn import ElasticAttention
from nas.export import load_subnet, save_subnet
from nas.searchers import GeneCoding
from nas.spaces import load_space
from nas.vit.arch import Arch
from nas.vit.batched import forward_by_patch_size
from nas.vit.cost import macs_many, params_many
from nas.vit.export import extract
from nas.vit.family import FAMILY
from nas.vit.space import SearchSpace
from nas.vit.supernet import SupernetConfig, VisionTransformerSupernet

EMBED, HEADS, HEAD_DIM = 24, 16, 9  # a stored width of 144, as vitas-cifar's
PRIVATE = (6,)


def sliced_attention(x, attn: ElasticAttention, heads: int, width: int, side: str = "left"):
    """Multi-head attention of ``x [B, N, e]`` from the rows and columns that ``width`` over ``heads`` reads, written
    out: q, k, v from rows ``[start, start + width)`` of their ``max_width`` blocks (q and k from a head count's private
    weight where it has one), heads of ``width // heads`` channels, the projection's columns of that width."""
    e, max_width = x.shape[-1], HEADS * HEAD_DIM
    cols = slice(0, e) if side == "left" else slice(EMBED - e, EMBED)

    def rows(weight, bias, block_start, block):
        start = block_start + (0 if side == "left" else block - width)
        return x @ weight[start:start + width, cols].T + bias[start:start + width]

    if heads in attn.private_qk_heads:
        private = attn.private_qk[str(heads)]
        block = private.weight.shape[0] // 2
        q, k = (rows(private.weight, private.bias, part * block, block) for part in (0, 1))
    else:
        q, k = (rows(attn.qkv.weight, attn.qkv.bias, part * max_width, max_width) for part in (0, 1))
    v = rows(attn.qkv.weight, attn.qkv.bias, 2 * max_width, max_width)
    head_dim = width // heads
    q, k, v = (t.view(*x.shape[:2], heads, head_dim).transpose(1, 2) for t in (q, k, v))
    context = ((q @ k.transpose(-2, -1)) / head_dim ** 0.5).softmax(-1) @ v
    context = context.transpose(1, 2).reshape(*x.shape[:2], width)
    out_rows = cols
    in_cols = slice(0, width) if side == "left" else slice(max_width - width, max_width)
    return context @ attn.proj.weight[out_rows, in_cols].T + attn.proj.bias[out_rows]


def small_attention() -> ElasticAttention:
    torch.manual_seed(0)
    attn = ElasticAttention(EMBED, HEADS, HEAD_DIM, private_qk_heads=PRIVATE, private_qk_width=HEADS * HEAD_DIM)
    with torch.no_grad():
        for param in attn.parameters():
            param.normal_(0.0, 0.3)
    return attn


# (width, heads): head dims 16 (fused, a power of two), 32 (144 rows do not hold heads of 32: unfused), 9 (fused,
# not a power of two), 8 and, with private q/k, 16.
PAIRS = [(48, 3), (96, 3), (144, 16), (96, 12), (96, 6)]


@pytest.mark.parametrize("side", ["left", "right"])
def test_attention_of_a_width_matches_plain_attention_on_sliced_weights(side):
    attn = small_attention().set_side(side)
    x = torch.randn(2, 5, 20)
    for width, heads in PAIRS:
        expected = sliced_attention(x, attn, heads, width, side)
        torch.testing.assert_close(attn(x, embed_dim=20, num_heads=heads, attn_dim=width), expected)
        attn.set_active(embed_dim=20, num_heads=heads, attn_dim=width)
        torch.testing.assert_close(attn(x), expected)  # the active width
        if side == "left":
            torch.testing.assert_close(attn.extract()(x), expected)


@pytest.mark.parametrize("width, heads", [(48, 3), (96, 3), (96, 6)])
def test_gradients_of_a_width_match_plain_attention(width, heads):
    attn = small_attention().double()  # float64: the two orders of summation agree to far below the tolerance
    x = torch.randn(2, 5, 20, dtype=torch.float64, requires_grad=True)
    attn(x, embed_dim=20, num_heads=heads, attn_dim=width).square().sum().backward()
    got = [x.grad] + [p.grad for p in attn.parameters()]
    attn.zero_grad()
    x.grad = None
    sliced_attention(x, attn, heads, width).square().sum().backward()
    expected = [x.grad] + [p.grad for p in attn.parameters()]
    for a, b in zip(got, expected):
        if a is None or b is None:  # a weight neither reads (another head count's private q/k)
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b)


def test_fused_op_gets_the_head_dim_and_its_backend_choice_follows_it(monkeypatch):
    """Heads the stored rows hold run the fused op with head dim width / heads, whose backend choice takes Triton for
    powers of two only (when Triton can run at all); other head dims never reach it."""
    chosen = []

    def spy(op, *args, **kwargs):
        backend = _backend.select(op, *args, **kwargs)
        if op == "attention":
            chosen.append((kwargs.get("triton_shape_problem", args[-1] if len(args) > 4 else None), backend))
        return backend

    monkeypatch.setattr(elastic_ops.functional, "select", spy)
    monkeypatch.setattr(elastic_ops.functional, "_plans", {})
    attn = small_attention().eval()
    x = torch.randn(1, 4, 20)
    reference_64 = _backend.select("attention", x.device, x.dtype, False, True, None)
    with torch.no_grad():
        for width, heads, fused in [(48, 3, True), (96, 3, False), (144, 16, True)]:
            chosen.clear()
            attn(x, embed_dim=20, num_heads=heads, attn_dim=width)
            if not fused:
                assert chosen == []
                continue
            ((problem, backend),) = chosen
            head_dim = width // heads
            if head_dim & (head_dim - 1) == 0:
                assert problem is None and backend == reference_64
            else:
                assert f"got {head_dim}" in problem and backend != "triton"


def tiny_space(**changes) -> SearchSpace:
    """vitas-cifar at 16 px with few layers: every gene kept, small enough to run many archs."""
    space = load_space("vitas-cifar")
    return dataclasses.replace(space, img_size=16, num_classes=7, depths=(1, 2, 3, 4), **changes)


def trained_like(space: SearchSpace) -> VisionTransformerSupernet:
    torch.manual_seed(1)
    model = VisionTransformerSupernet(SupernetConfig.from_space(space)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if "norm" in name else 0.0, param.shape[-1] ** -0.5 if param.dim() > 1 else 0.2)
    return model


def test_space_validates_widths_and_draws_them_per_layer():
    space = load_space("vitas")
    assert space.attn_dims == tuple(round(480 * k / 10) for k in range(1, 11))  # ViTAS's fractions of 480
    assert space.max_heads * space.head_dim == 480
    with pytest.raises(ValueError, match="width 40 does not divide by 3 heads"):
        dataclasses.replace(space, attn_dims=(40, 480))
    with pytest.raises(ValueError, match="widest attention 432 must be the stored width"):
        dataclasses.replace(space, attn_dims=(48, 432))
    with pytest.raises(ValueError, match="relative position"):
        dataclasses.replace(space, relative_position=14)
    batch = space.sample_many(0, 2000)
    assert set(np.unique(batch.attn_dim)) == set(space.attn_dims)
    head_dims = {w // h for a in batch.archs() for w, h, on in zip(a.attn_dim, a.num_heads, a.layer_on) if on}
    assert {3, 160, 30} <= head_dims  # 48 / 16, 480 / 3, and as many as the pairs give
    arch = batch.arch(0)
    with pytest.raises(ValueError, match=r"arch.attn_dim\[0\]=50 not in"):
        space.validate(dataclasses.replace(arch, attn_dim=(50,) + arch.attn_dim[1:]))
    with pytest.raises(ValueError, match="arch.attn_dim is missing"):
        space.validate(dataclasses.replace(arch, attn_dim=None))
    with pytest.raises(ValueError, match="arch.attn_dim is set"):
        load_space("vitas-t").validate(dataclasses.replace(load_space("vitas-t").sample(0), attn_dim=(48,) * 16))
    assert Arch.from_json(arch.to_json()) == arch and "attn_dim" not in load_space("vitas-t").sample(0).to_dict()


def test_evolution_and_gene_codings_move_widths():
    space = tiny_space()
    rng = np.random.default_rng(0)
    parents = space.sample_many(rng, 40).archs()
    children = [space.mutate(a, rng, prob=0.5) for a in parents] + [
        space.crossover(a, b, rng) for a, b in zip(parents, parents[1:])]
    assert all(space.contains(child) for child in children)
    changed = [c.attn_dim != p.attn_dim for c, p in zip(children, parents)]
    assert np.mean(changed) > 0.5
    coding = GeneCoding(space)
    genes = coding.uniform(rng, 200)
    archs = space.decode_genes(genes).archs()
    assert all(space.contains(a) for a in archs)
    assert len({a.attn_dim for a in archs}) > 40  # of 81 patterns of 4 layers
    decisions = FAMILY.decisions(space)
    choices = np.stack([rng.integers(len(d), size=50) for d in decisions], axis=1)
    decoded = FAMILY.decode_decisions(space, choices).archs()
    assert all(space.contains(a) for a in decoded)
    decided = np.asarray(space.attn_dims)[choices[:, -space.max_depth:]]
    on = np.array([a.layer_on for a in decoded])
    np.testing.assert_array_equal(np.array([a.attn_dim for a in decoded])[on], decided[on])
    assert len(decisions) == 3 + 4 * space.max_depth


def hand_count(space: SearchSpace, arch: Arch) -> tuple[int, int]:
    """Params and MACs of a classifier ViT subnet counted term by term."""
    e, patch = arch.embed_dim, arch.patch_size
    tokens = (space.img_size // patch) ** 2 + 1
    params = 3 * patch * patch * e + e + e + tokens * e + 2 * e + (e + 1) * space.num_classes
    macs = (tokens - 1) * 3 * patch * patch * e + e * space.num_classes
    for i in range(arch.max_depth):
        if not arch.layer_on[i]:
            continue
        width, hidden = arch.attn_dim[i], int(e * arch.mlp_ratio[i])
        params += 4 * e + (e * 3 * width + 3 * width) + (width * e + e) + (e * hidden + hidden) + (hidden * e + e)
        macs += tokens * e * 3 * width + 2 * tokens * tokens * width + tokens * width * e + 2 * tokens * e * hidden
    return params, macs


def test_costs_match_a_hand_count_the_extracted_module_and_the_flop_counter():
    space = tiny_space()
    model = trained_like(space)
    archs = space.sample_many(3, 6).archs() + [space.max_arch(), space.min_arch()]
    params, macs = params_many(archs, space), macs_many(archs, space)
    for arch, p, m in zip(archs, params, macs):
        assert (p, m) == hand_count(space, arch)
        subnet = extract(model, arch)
        assert p == sum(t.numel() for t in subnet.parameters())
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            subnet(torch.randn(1, 3, space.img_size, space.img_size))
        assert counter.get_total_flops() == 2 * m


def test_supernet_extraction_batched_pass_and_export_round_trip_agree(tmp_path):
    space = tiny_space()
    model = trained_like(space)
    images = torch.randn(3, 3, space.img_size, space.img_size)
    archs = space.sample_many(5, 6).archs()
    archs[1] = dataclasses.replace(archs[0], attn_dim=tuple(96 if w == 48 else 48 for w in archs[0].attn_dim))
    with torch.no_grad():
        singles = torch.stack([model(images, arch) for arch in archs])
        assert not torch.allclose(singles[0], singles[1])  # the widths alone change the subnet
        torch.testing.assert_close(forward_by_patch_size(model, images, archs), singles)
        for k, (arch, expected) in enumerate(zip(archs, singles)):
            save_subnet(tmp_path / f"{k}.pt", extract(model, arch), arch, space)
            rebuilt, same_arch = load_subnet(tmp_path / f"{k}.pt")
            assert same_arch == arch
            torch.testing.assert_close(rebuilt(images), expected)
            right = arch.on_side("right")
            torch.testing.assert_close(extract(model, right)(images), model(images, right))

"""The ViT supernet: subnets against their extracted plain ViTs on every preset space, identity layers,
importance reordering, timm conversion against an independent timm-style ViT, and arch validation.
(Runs on the reference backend: tests/nas/conftest.py.)"""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nas import costs
from nas.convert import from_timm_state_dict
from nas.export import extract_subnet
from nas.spaces import PRESETS, load_space
from nas.vit.arch import Arch
from nas.vit.space import SearchSpace
from nas.vit.supernet import SupernetConfig, VisionTransformerSupernet

VIT_PRESETS = sorted(name for name in PRESETS if load_space(name).family == "vit")  # hybrid, SAM: their tests

TOL = dict(atol=1e-5, rtol=1e-5)

# The ImageNet spaces at a small image size (fewer tokens and a 10-class head) keep the test fast;
# the layer widths, which are what slicing gets wrong, stay as published.
SMALL_IMAGES = {"autoformer-t": 32, "autoformer-s": 32, "autoformer-b": 32, "vitas-t": 112, "vitas": 224,
               "vitas-cifar": 16}

TINY = SearchSpace(name="tiny", embed_dims=[24, 32], depths=[2, 3], num_heads=[1, 2], mlp_ratios=[2.0, 4.0],
                   head_dim=16, patch_sizes=[4], img_size=16, in_chans=3, num_classes=5)


def small_space(name: str) -> SearchSpace:
    space = load_space(name)
    if name in SMALL_IMAGES:
        space = dataclasses.replace(space, img_size=SMALL_IMAGES[name], num_classes=10)
    return space


def build(space: SearchSpace, seed: int = 0, **kwargs) -> VisionTransformerSupernet:
    torch.manual_seed(seed)
    model = VisionTransformerSupernet(SupernetConfig.from_space(space, **kwargs)).eval()
    with torch.no_grad():  # random LayerNorms and biases, so that a slicing mistake in any of them shows
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.copy_(torch.randn_like(param) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
    return model


def images(space: SearchSpace, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, space.in_chans, space.img_size, space.img_size)


@pytest.mark.parametrize("name", VIT_PRESETS)
def test_subnets_match_their_extracted_plain_vit(name):
    space = small_space(name)
    model = build(space)
    x = images(space)
    rng = np.random.default_rng(1)
    archs = [space.min_arch(), space.sample(rng), space.sample(rng)]
    if name not in SMALL_IMAGES:  # the max arch copies the whole supernet: only where it is small
        archs.append(space.max_arch())
    for arch in archs:
        logits = model(x, arch)
        pixels = (space.img_size, space.img_size) if space.task == "segmentation" else ()
        assert logits.shape == (2, space.num_classes, *pixels)
        plain = extract_subnet(model, arch)
        assert len(plain.blocks) == arch.depth
        torch.testing.assert_close(plain(x), logits, **TOL)


def test_layers_switched_off_are_identities_and_never_read():
    space = dataclasses.replace(TINY, identity_layers=True, depths=[1, 2, 3])
    model = build(space)
    x = images(space)
    arch = Arch(32, (2, 1, 2), (4.0, 2.0, 2.0), (True, False, True))
    before = model(x, arch)
    with torch.no_grad():
        for param in model.blocks[1].parameters():
            param.fill_(float("nan"))
    after = model(x, arch)
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    plain = extract_subnet(model, arch)
    assert len(plain.blocks) == 2
    torch.testing.assert_close(plain(x), before, **TOL)


def test_private_class_tokens_per_patch_size():
    space = dataclasses.replace(TINY, patch_sizes=[2, 4], private_class_tokens=True)
    model = build(space)
    assert set(model.patch_embed.keys()) == {"2", "4"} and model.pos_embed["2"].shape == (1, 65, 32)
    x = images(space)
    arch4 = Arch(32, (2, 2, 2), (4.0,) * 3, (True,) * 3, patch_size=4)
    before = model(x, arch4)
    with torch.no_grad():  # the other patch size's private parts are not read
        for param in (model.patch_embed["2"].proj.weight, model.cls_token["2"], model.pos_embed["2"]):
            param.fill_(float("nan"))
    torch.testing.assert_close(model(x, arch4), before, atol=0, rtol=0)


def test_private_class_tokens_need_several_patch_sizes():
    """With one patch size there is nothing to keep apart: an error, not a flag that silently does nothing."""
    with pytest.raises(ValueError, match="private_class_tokens .* the only patch size is 4"):
        dataclasses.replace(TINY, private_class_tokens=True)
    with pytest.raises(ValueError, match="private_class_tokens .* one patch size, 4"):
        dataclasses.replace(SupernetConfig.from_space(TINY), private_class_tokens=True)


def test_shared_patch_embedding_with_several_patch_sizes_uses_leading_kernel_block():
    space = dataclasses.replace(TINY, patch_sizes=[2, 4])
    model = build(space)
    arch2 = Arch(24, (1, 1, 1), (2.0,) * 3, (True, True, False), patch_size=2)
    x = images(space)
    tokens = model.patch_embed(x, embed_dim=24, patch_size=2)
    expected = F.conv2d(x, model.patch_embed.proj.weight[:24, :, :2, :2], model.patch_embed.proj.bias[:24], stride=2)
    torch.testing.assert_close(tokens, expected.flatten(2).transpose(1, 2), **TOL)
    torch.testing.assert_close(extract_subnet(model, arch2)(x), model(x, arch2), **TOL)


def test_private_qk_per_head_count():
    """ViTAS: every head count but the largest has private q/k; the largest uses the shared qkv's q/k blocks."""
    space = dataclasses.replace(TINY, num_heads=[1, 2], private_qk=True)
    model, shared = build(space), build(TINY)
    private = {name: tuple(p.shape) for name, p in model.named_parameters() if "private_qk" in name}
    assert private == {f"blocks.{i}.attn.private_qk.1.{kind}": shape for i in range(3)
                       for kind, shape in (("weight", (32, 32)), ("bias", (32,)))}
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in shared.parameters()) + 3 * 32 * 33
    x = images(space)
    arch = Arch(24, (1, 2, 1), (2.0, 4.0, 4.0), (True, True, True))
    before = model(x, arch)
    plain = extract_subnet(model, arch)
    torch.testing.assert_close(plain(x), before, **TOL)
    assert sum(p.numel() for p in plain.parameters()) == costs.params(arch, space)
    with torch.no_grad():  # layer 0 (1 head) does not read the shared q/k blocks; its private q/k matter
        model.blocks[0].attn.qkv.weight[:64].normal_()
        torch.testing.assert_close(model(x, arch), before, atol=0, rtol=0)
        model.blocks[0].attn.private_qk["1"].weight.normal_()
        assert not torch.allclose(model(x, arch), before)


def test_relative_position_subnets_match_their_extracted_plain_vit():
    """AutoFormer's relative position on cifar-tiny (8 x 8 patches, distances clipped at 4), absolute embedding kept."""
    space = dataclasses.replace(load_space("cifar-tiny"), relative_position=4)
    model = build(space)
    names = {name for name, _ in model.named_parameters()}
    assert "pos_embed" in names
    assert {n for n in names if ".rel_pos." in n} == {f"blocks.{i}.attn.rel_pos.{t}" for i in range(6)
                                                       for t in ("k_rows", "k_cols", "v_rows", "v_cols")}
    assert tuple(model.blocks[0].attn.rel_pos.k_rows.shape) == (2 * 4 + 2, space.head_dim)
    x = images(space)
    rng = np.random.default_rng(5)
    for arch in [space.min_arch(), space.sample(rng), space.sample(rng)]:
        logits = model(x, arch)
        plain = extract_subnet(model, arch)
        torch.testing.assert_close(plain(x), logits, **TOL)
        assert sum(p.numel() for p in plain.parameters()) == costs.params(arch, space)
    with torch.no_grad():  # the tables take part: changing one changes the output
        before = model(x, space.min_arch())
        model.blocks[0].attn.rel_pos.v_rows.normal_()
        assert not torch.allclose(model(x, space.min_arch()), before, atol=1e-4)


def test_relative_position_is_shared_by_every_patch_size():
    space = dataclasses.replace(TINY, patch_sizes=[2, 4], relative_position=2)
    model = build(space)
    x = images(space)
    for patch in (2, 4):  # 8 x 8 and 4 x 4 grids read the same tables
        arch = dataclasses.replace(space.sample(np.random.default_rng(patch)), patch_size=patch)
        torch.testing.assert_close(extract_subnet(model, arch)(x), model(x, arch), **TOL)
    model.train()
    model(x, dataclasses.replace(space.max_arch(), patch_size=2)).square().sum().backward()
    assert model.blocks[1].attn.rel_pos.k_cols.grad.abs().sum(dim=1).min() > 0


def test_bad_arch_and_bad_images_raise_clear_errors():
    model = build(TINY)
    with pytest.raises(ValueError, match=r"arch.embed_dim=28 not in \(24, 32\)"):
        model.set_arch(Arch(28, (1, 1, 1), (2.0,) * 3, (True,) * 3))
    with pytest.raises(ValueError, match="max depth 3"):
        model(images(TINY), Arch(32, (1, 1), (2.0,) * 2, (True,) * 2))
    assert model.arch == TINY.max_arch(), "a rejected arch must leave the active subnet alone"
    with pytest.raises(ValueError, match=r"expected images \[batch, 3, 16, 16\]"):
        model(torch.randn(2, 3, 32, 32))
    with pytest.raises(TypeError, match="must be a nas.vit.arch.Arch"):
        model.set_arch({"embed_dim": 32})


def test_drop_path_is_random_in_training_only():
    model = build(TINY, drop_path_rate=0.5)
    x = images(TINY, batch=8)
    model.train()
    torch.manual_seed(0)
    first, second = model(x), model(x)
    assert not torch.allclose(first, second)
    model.eval()
    torch.testing.assert_close(model(x), extract_subnet(model)(x), **TOL)


def test_gradients_stay_inside_the_active_slices():
    model = build(TINY).train()
    arch = Arch(24, (1, 2, 2), (2.0, 4.0, 2.0), (True, True, False))
    F.cross_entropy(model(images(TINY), arch), torch.tensor([0, 3])).backward()
    assert model.head.weight.grad[:, :24].abs().sum() > 0
    assert torch.count_nonzero(model.head.weight.grad[:, 24:]) == 0
    assert torch.count_nonzero(model.blocks[0].mlp.fc1.weight.grad[48:]) == 0
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.blocks[2].parameters())


# --- importance reordering ----------------------------------------------------------------------------

def test_magnitude_reordering_keeps_the_largest_subnet_and_puts_important_units_first():
    model = build(TINY)
    x = images(TINY)
    before = model(x, TINY.max_arch())
    old = [(b.mlp.fc1.weight.detach().clone(), b.mlp.fc2.weight.detach().clone()) for b in model.blocks]
    permutations = model.reorder_mlp_importance("magnitude")
    torch.testing.assert_close(model(x, TINY.max_arch()), before, **TOL)
    # A subnet with MLP ratio 2.0 keeps 64 of the 128 hidden units: now the 64 most important ones.
    for block, perm, (fc1, fc2) in zip(model.blocks, permutations, old):
        importance = fc2.abs().sum(dim=0)  # OFA: L1 norm of each unit's outgoing weights
        top = torch.topk(importance, 64).indices
        kept_rows = block.mlp.fc1.weight.detach()[:64]
        assert sorted(perm[:64].tolist()) == sorted(top.tolist())
        torch.testing.assert_close(kept_rows, fc1[perm[:64]], atol=0, rtol=0)
        assert torch.all(block.mlp.fc2.weight.abs().sum(dim=0).diff() <= 1e-6), "units not sorted by importance"
    # Idempotent: the units are already in order.
    for perm in model.reorder_mlp_importance("magnitude"):
        assert torch.equal(perm, torch.arange(perm.numel()))


def test_activation_reordering_ranks_units_by_mean_absolute_activation():
    model = build(TINY)
    batches = [images(TINY, batch=4) for _ in range(2)]
    # Independent statistics: hooks on the GELU of the extracted plain ViT.
    plain = extract_subnet(model, TINY.max_arch())
    totals = [torch.zeros(128) for _ in plain.blocks]

    def hook(i):
        def record(module, inputs, output):
            totals[i].add_(output.abs().flatten(0, 1).sum(0))
        return record
    for i, block in enumerate(plain.blocks):
        block.mlp.act.register_forward_hook(hook(i))
    for batch in batches:
        plain(batch)
    x = images(TINY)
    before = model(x, TINY.max_arch())
    model.set_arch(TINY.min_arch())
    permutations = model.reorder_mlp_importance("activation", batches=[(b, None) for b in batches])
    assert model.arch == TINY.min_arch(), "the active subnet is restored"
    torch.testing.assert_close(model(x, TINY.max_arch()), before, **TOL)
    for perm, total in zip(permutations, totals):
        assert torch.equal(perm, torch.argsort(total, descending=True, stable=True))


def test_reordering_with_optimizer_state_keeps_training_identical():
    reference = build(TINY).train()
    reordered = copy.deepcopy(reference)
    x, labels = images(TINY, batch=4), torch.tensor([0, 1, 2, 3])
    arch = TINY.max_arch()
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (reference, reordered)]
    for model, optimizer in zip((reference, reordered), optimizers):
        F.cross_entropy(model(x, arch), labels).backward()
        optimizer.step()
    reordered.reorder_mlp_importance("magnitude", optimizer=optimizers[1])
    for model, optimizer in zip((reference, reordered), optimizers):
        optimizer.zero_grad()
        F.cross_entropy(model(x, arch), labels).backward()
        optimizer.step()
    reference.eval(), reordered.eval()
    torch.testing.assert_close(reordered(x, arch), reference(x, arch), atol=1e-5, rtol=1e-5)


def test_reordering_bad_arguments():
    model = build(TINY)
    with pytest.raises(ValueError, match="method must be 'magnitude' or 'activation'"):
        model.reorder_mlp_importance("l2")
    with pytest.raises(ValueError, match="needs batches"):
        model.reorder_mlp_importance("activation")


# --- timm conversion -----------------------------------------------------------------------------------

class TimmStyleViT(nn.Module):
    """A ViT written as timm writes it (names, eps 1e-6, fused scaled_dot_product_attention), the oracle."""

    def __init__(self, img_size=16, patch=4, chans=3, classes=5, dim=32, depth=3, heads=2, hidden=128):
        super().__init__()
        self.heads = heads
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(chans, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, (img_size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            block = nn.Module()
            block.norm1, block.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
            block.attn = nn.Module()
            block.attn.qkv, block.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            block.mlp = nn.Module()
            block.mlp.fc1, block.mlp.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
            self.blocks.append(block)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if "norm" in name:
                    param.copy_(torch.randn_like(param) * 0.2 + (1.0 if name.endswith("weight") else 0.0))

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        batch, tokens, dim = x.shape
        for blk in self.blocks:
            qkv = blk.attn.qkv(blk.norm1(x)).reshape(batch, tokens, 3, self.heads, dim // self.heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            x = x + blk.attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, dim))
            x = x + blk.mlp.fc2(F.gelu(blk.mlp.fc1(blk.norm2(x))))
        return self.head(self.norm(x)[:, 0])


def test_timm_state_dict_converts_to_a_supernet_whose_largest_subnet_is_the_timm_model():
    torch.manual_seed(0)
    timm_model = TimmStyleViT().eval()
    supernet = from_timm_state_dict(timm_model.state_dict(), TINY).eval()
    x = images(TINY)
    torch.testing.assert_close(supernet(x, TINY.max_arch()), timm_model(x), **TOL)


def test_timm_state_dict_into_private_patch_embeddings():
    torch.manual_seed(0)
    timm_model = TimmStyleViT().eval()
    space = dataclasses.replace(TINY, patch_sizes=[2, 4], private_class_tokens=True)
    supernet = from_timm_state_dict(timm_model.state_dict(), SupernetConfig.from_space(space)).eval()
    x = images(space)
    torch.testing.assert_close(supernet(x, dataclasses.replace(space.max_arch(), patch_size=4)), timm_model(x), **TOL)


def test_timm_state_dict_into_a_supernet_with_private_qk():
    torch.manual_seed(0)
    timm_model = TimmStyleViT().eval()
    space = dataclasses.replace(TINY, private_qk=True)
    supernet = from_timm_state_dict(timm_model.state_dict(), space).eval()
    assert any("private_qk" in name for name in supernet.state_dict())
    x = images(space)
    torch.testing.assert_close(supernet(x, space.max_arch()), timm_model(x), **TOL)


def test_timm_state_dict_into_a_supernet_with_relative_position():
    """timm has no relative position: the tables start at zero, so the largest subnet is still the timm model."""
    torch.manual_seed(0)
    timm_model = TimmStyleViT().eval()
    space = dataclasses.replace(TINY, relative_position=3)
    supernet = from_timm_state_dict(timm_model.state_dict(), space).eval()
    assert all(torch.count_nonzero(p) == 0 for name, p in supernet.named_parameters() if ".rel_pos." in name)
    x = images(space)
    torch.testing.assert_close(supernet(x, space.max_arch()), timm_model(x), **TOL)


def test_timm_state_dict_that_does_not_fit_raises_clear_errors():
    state = TimmStyleViT(dim=24, heads=1, hidden=48).state_dict()
    with pytest.raises(ValueError, match=r"shape mismatch: .*blocks.0.attn.qkv.weight: timm \(72, 24\) vs "
                                         r"supernet \(96, 32\)"):
        from_timm_state_dict(state, TINY)
    state = TimmStyleViT().state_dict()
    state["fc_norm.weight"] = torch.ones(32)
    del state["blocks.2.mlp.fc2.bias"]
    with pytest.raises(ValueError, match=r"unexpected .*fc_norm.weight.*missing: \['blocks.2.mlp.fc2.bias'\]"):
        from_timm_state_dict(state, TINY)

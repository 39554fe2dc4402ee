"""AutoFormer checkpoints and timm models into the supernet: equal outputs.

AutoFormer's model code is not in this repository (nor importable here), so its side is a hand-built state dict with
AutoFormer's key names and layout (``Vision_TransformerSuper`` with ``change_qkv=True``, ``relative_position=True`` and
``gp=True``, as its released supernets were trained) and, below, an independent implementation of its forward written
from microsoft/Cream ``AutoFormer/model/vision_transformer/{supernet_transformer.py, module/multihead_super.py}`` and
its ``qkv_super``: the interleaved qkv rows gathered with stride-3 slices and ``torch.cat``, the qkv bias sliced as a
leading block, the relative position computed with its distance matrices and reshapes, LayerNorm eps 1e-5, exact
GELU, and the patch tokens' mean classified.

timm does not import beside the CPU build of torch (its torchvision dependency fails), so its side is a module tree
with timm's structure and parameter names and timm's forward, built here; timm itself is used where it imports.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from elastic_ops.plain import LayerScale
from nas.convert import (
    blocks_to_interleaved,
    convert_timm_vit,
    from_autoformer_state_dict,
    from_timm_state_dict,
    interleaved_to_blocks,
    timm_space,
    to_autoformer_state_dict,
)
from nas.evaluate import batched_forward, evaluate_archs
from nas.export import extract_subnet, load_safetensors, load_subnet
from nas.spaces import load_space
from nas.vit.arch import Arch
from nas.vit.space import SearchSpace, read_autoformer_yaml
from nas.vit.supernet import SupernetConfig

TOL = dict(atol=2e-5, rtol=1e-4)

# A small AutoFormer space: head dim 64 and the stored embed dim = heads * 64, as AutoFormer's qkv_super needs; the
# stored weights wider than the largest choices, as AutoFormer's supernets are (its SUPERNET section).
AF_SPACE = SearchSpace(name="autoformer-small", embed_dims=[96, 112], depths=[2, 3], num_heads=[1, 2],
                       mlp_ratios=[2.0, 3.0], head_dim=64, patch_sizes=[8], img_size=32, in_chans=3, num_classes=7,
                       supernet={"embed_dim": 128, "depth": 3, "num_heads": 2, "mlp_ratio": 3.5})
MAX_DISTANCE = 3


def autoformer_state_dict(space: SearchSpace, seed: int = 0, relative: bool = True) -> dict[str, torch.Tensor]:
    """Random weights under AutoFormer's names and shapes (every LayerNorm and bias random too; ``relative``: with
    relative position tables)."""
    g = torch.Generator().manual_seed(seed)
    sizes = space.supernet_sizes()
    embed, hidden = sizes.embed_dim, sizes.hidden_features
    tokens = (space.img_size // space.patch_sizes[0]) ** 2 + 1
    patch = space.patch_sizes[0]

    def t(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    state = {"patch_embed_super.proj.weight": t(embed, space.in_chans, patch, patch),
             "patch_embed_super.proj.bias": t(embed), "cls_token": t(1, 1, embed), "pos_embed": t(1, tokens, embed)}
    for i in range(space.max_depth):
        b = f"blocks.{i}."
        for norm in ("attn_layer_norm", "ffn_layer_norm"):
            state[b + norm + ".weight"], state[b + norm + ".bias"] = 1 + t(embed), t(embed)
        state[b + "attn.qkv.weight"], state[b + "attn.qkv.bias"] = t(3 * embed, embed), t(3 * embed)
        state[b + "attn.proj.weight"], state[b + "attn.proj.bias"] = t(embed, embed), t(embed)
        for which in ("k", "v") if relative else ():
            for axis in ("v", "h"):
                state[f"{b}attn.rel_pos_embed_{which}.embeddings_table_{axis}"] = t(2 * MAX_DISTANCE + 2, 64)
        state[b + "fc1.weight"], state[b + "fc1.bias"] = t(hidden, embed), t(hidden)
        state[b + "fc2.weight"], state[b + "fc2.bias"] = t(embed, hidden), t(embed)
    state["norm.weight"], state["norm.bias"] = 1 + t(embed), t(embed)
    state["head.weight"], state["head.bias"] = t(space.num_classes, embed), t(space.num_classes)
    return state


def autoformer_relative(table_v, table_h, length, max_distance, head_dim):
    """AutoFormer's RelativePosition2D_super.forward."""
    length = length - 1
    side = int(length ** 0.5)
    range_q, range_k = torch.arange(length), torch.arange(length)
    distance_v = range_k[None, :] // side - range_q[:, None] // side
    distance_h = range_k[None, :] % side - range_q[:, None] % side
    final_v = F.pad(torch.clamp(distance_v, -max_distance, max_distance) + max_distance + 1, (1, 0, 1, 0))
    final_h = F.pad(torch.clamp(distance_h, -max_distance, max_distance) + max_distance + 1, (1, 0, 1, 0))
    return table_v[:, :head_dim][final_v] + table_h[:, :head_dim][final_h]


def autoformer_forward(state, images, arch: Arch, max_distance=MAX_DISTANCE):
    """AutoFormer's Vision_TransformerSuper.forward for one subnet (eval mode), on its own state dict."""
    e = arch.embed_dim
    w = state["patch_embed_super.proj.weight"]
    x = F.conv2d(images, w[:e], state["patch_embed_super.proj.bias"][:e], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    batch = x.shape[0]
    x = torch.cat((state["cls_token"][..., :e].expand(batch, -1, -1), x), dim=1) + state["pos_embed"][..., :e]
    for i in range(arch.depth):
        b, heads, hidden = f"blocks.{i}.", arch.num_heads[i], arch.hidden_features(i)

        def norm(name, v):
            return F.layer_norm(v, (e,), state[b + name + ".weight"][:e], state[b + name + ".bias"][:e], 1e-5)

        residual, h = x, norm("attn_layer_norm", x)
        out_dim = 3 * heads * 64
        qkv_w = state[b + "attn.qkv.weight"][:, :e]
        qkv_w = torch.cat([qkv_w[j:out_dim:3, :] for j in range(3)], dim=0)  # qkv_super.sample_weight
        qkv_b = state[b + "attn.qkv.bias"][:out_dim]  # qkv_super.sample_bias
        n = h.shape[1]
        qkv = F.linear(h, qkv_w, qkv_b).reshape(batch, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scale = 64 ** -0.5
        attn = (q @ k.transpose(-2, -1)) * scale
        relative = b + "attn.rel_pos_embed_k.embeddings_table_v" in state  # AutoFormer's --relative_position
        if relative:
            r_p_k = autoformer_relative(state[b + "attn.rel_pos_embed_k.embeddings_table_v"],
                                        state[b + "attn.rel_pos_embed_k.embeddings_table_h"], n, max_distance, 64)
            attn = attn + (q.permute(2, 0, 1, 3).reshape(n, heads * batch, -1) @ r_p_k.transpose(2, 1)) \
                .transpose(1, 0).reshape(batch, heads, n, n) * scale
        attn = attn.softmax(dim=-1)
        h = (attn @ v).transpose(1, 2).reshape(batch, n, -1)
        if relative:
            r_p_v = autoformer_relative(state[b + "attn.rel_pos_embed_v.embeddings_table_v"],
                                        state[b + "attn.rel_pos_embed_v.embeddings_table_h"], n, max_distance, 64)
            attn_1 = attn.permute(2, 0, 1, 3).reshape(n, batch * heads, -1)
            h = h + (attn_1 @ r_p_v).transpose(1, 0).reshape(batch, heads, n, -1).transpose(2, 1).reshape(batch, n, -1)
        h = F.linear(h, state[b + "attn.proj.weight"][:e, :heads * 64], state[b + "attn.proj.bias"][:e])
        x = residual + h
        residual, h = x, norm("ffn_layer_norm", x)
        h = F.gelu(F.linear(h, state[b + "fc1.weight"][:hidden, :e], state[b + "fc1.bias"][:hidden]))
        x = residual + F.linear(h, state[b + "fc2.weight"][:e, :hidden], state[b + "fc2.bias"][:e])
    x = F.layer_norm(x, (e,), state["norm.weight"][:e], state["norm.bias"][:e], 1e-5)
    x = torch.mean(x[:, 1:], dim=1)  # gp
    return F.linear(x, state["head.weight"][:, :e], state["head.bias"])


def subnets(space: SearchSpace, count: int, seed: int, full_heads: bool) -> list[Arch]:
    archs = [space.sample(np.random.default_rng(seed + i)) for i in range(count)] + [space.max_arch(), space.min_arch()]
    if full_heads:
        archs = [dataclasses.replace(a, num_heads=(max(space.num_heads),) * a.max_depth) for a in archs]
    return archs


def test_qkv_rows_interleaved_and_in_blocks():
    heads, head_dim, embed = 3, 4, 5
    interleaved = torch.randn(3 * heads * head_dim, embed)
    blocks = interleaved_to_blocks(interleaved)
    for j in range(3):  # q, k, v
        for u in range(heads * head_dim):
            assert torch.equal(blocks[j * heads * head_dim + u], interleaved[3 * u + j])
    assert torch.equal(blocks_to_interleaved(blocks), interleaved)


def test_autoformer_supernet_gives_autoformers_logits():
    state = autoformer_state_dict(AF_SPACE)
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    model = from_autoformer_state_dict({"model": state, "epoch": 300}, AF_SPACE).double().eval()
    assert model.config.relative_position == MAX_DISTANCE and model.config.global_pool == "avg"
    assert (model.config.embed_dim, model.config.hidden_features) == (128, 448)
    # Every subnet, the largest head count or fewer in any layer (AutoFormer's k and v biases then move).
    archs = subnets(AF_SPACE, 6, 10, full_heads=False)
    archs.append(dataclasses.replace(AF_SPACE.max_arch(), num_heads=(1, 2, 1)))
    assert sum(min(a.num_heads[:a.depth]) < 2 for a in archs) >= 4
    expected = torch.stack([autoformer_forward({k: v.double() for k, v in state.items()}, images, arch)
                            for arch in archs])
    torch.testing.assert_close(torch.stack([model(images, arch) for arch in archs]), expected, atol=1e-10, rtol=0)
    # Batched evaluation (the grouped pass) and export see the same model.
    model.float()
    images, expected = images.float(), expected.float()
    # Every arch's metrics are those of its own logits, with labels that differ per image.
    labels = torch.stack([expected[k % len(archs), k].argmax() for k in range(len(images))])
    results = evaluate_archs(model, archs, [(images, labels)], progress=False)
    for result, logits in zip(results, expected, strict=True):
        assert result.top1 == pytest.approx(100 * float((logits.argmax(-1) == labels).float().mean()))
        assert result.loss == pytest.approx(float(F.cross_entropy(logits, labels)), rel=1e-4)
    assert len({result.top1 for result in results}) > 1
    for k in (1, len(archs) - 1):
        torch.testing.assert_close(extract_subnet(model, archs[k])(images), expected[k], **TOL)


def test_grouped_pass_reads_autoformers_bias_per_subnet():
    """A grouped pass of subnets with different head counts adds each one's own q, k, v biases (an independent
    oracle: one subnet at a time)."""
    model = from_autoformer_state_dict(autoformer_state_dict(AF_SPACE, seed=2), AF_SPACE).eval()
    archs = [dataclasses.replace(AF_SPACE.max_arch(), num_heads=heads) for heads in ((1, 2, 1), (2, 1, 2), (1,) * 3)]
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(batched_forward(model, images, archs), torch.stack([model(images, a) for a in archs]),
                               **TOL)


def test_without_relative_position_the_fused_attention_reads_autoformers_bias():
    """No relative position: a subnet's attention runs fused on the bias moved to the block layout; its logits and the
    qkv bias's gradient are AutoFormer's (autograd through the independent forward on AutoFormer's state dict)."""
    state = {k: v.double().requires_grad_() for k, v in autoformer_state_dict(AF_SPACE, seed=4, relative=False).items()}
    model = from_autoformer_state_dict({k: v.detach() for k, v in state.items()}, AF_SPACE).double().eval()
    assert model.config.relative_position == 0
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    arch = dataclasses.replace(AF_SPACE.max_arch(), num_heads=(1, 2, 1))
    expected = autoformer_forward(state, images, arch)
    logits = model(images, arch)
    torch.testing.assert_close(logits, expected, atol=1e-10, rtol=0)
    expected.square().sum().backward()
    logits.square().sum().backward()
    for i in range(AF_SPACE.max_depth):
        torch.testing.assert_close(model.blocks[i].attn.qkv.bias.grad, state[f"blocks.{i}.attn.qkv.bias"].grad,
                                   atol=1e-9, rtol=0)


def test_autoformer_round_trip_and_errors():
    state = autoformer_state_dict(AF_SPACE, seed=1)
    model = from_autoformer_state_dict(state, AF_SPACE)
    back = to_autoformer_state_dict(model)
    assert sorted(back) == sorted(state)
    assert all(torch.equal(back[name], state[name]) for name in state)
    with pytest.raises(ValueError, match=r"missing: \['blocks.2.mlp.fc1.bias'\]"):
        from_autoformer_state_dict({k: v for k, v in state.items() if k != "blocks.2.fc1.bias"}, AF_SPACE)
    with pytest.raises(ValueError, match=r"unexpected: \['blocks.0.attn.q_norm.weight'\]"):
        from_autoformer_state_dict({**state, "blocks.0.attn.q_norm.weight": torch.ones(3)}, AF_SPACE)
    with pytest.raises(ValueError, match="shape mismatch"):  # the stored sizes are not the largest choices
        from_autoformer_state_dict(state, dataclasses.replace(AF_SPACE, supernet=None))
    with pytest.raises(ValueError, match="64 channels"):
        from_autoformer_state_dict(state, dataclasses.replace(AF_SPACE, head_dim=32))
    blocks_layout = from_timm_state_dict(model.state_dict(), dataclasses.replace(model.config.space,
                                                                                qkv_bias_layout="blocks"))
    with pytest.raises(ValueError, match="block layout"):
        to_autoformer_state_dict(blocks_layout)


def test_presets_hold_autoformers_supernets():
    """The SUPERNET sections of AutoFormer's experiments/supernet/supernet-{T,S,B}.yaml (microsoft/Cream)."""
    for name, sizes in (("autoformer-t", (256, 14, 4, 1024)), ("autoformer-s", (448, 14, 7, 1792)),
                        ("autoformer-b", (640, 16, 10, 2560))):
        config = SupernetConfig.from_space(load_space(name))
        assert (config.embed_dim, config.depth, config.num_heads, config.hidden_features) == sizes, name
        assert config.num_heads * 64 == config.embed_dim and config.qkv_bias_layout == "autoformer"


def test_read_autoformer_yaml_reads_both_sections(tmp_path):
    path = tmp_path / "supernet-T.yaml"
    path.write_text("SUPERNET:\n  MLP_RATIO: 4.0\n  NUM_HEADS: 4\n  EMBED_DIM: 256\n  DEPTH: 14\n"
                    "SEARCH_SPACE:\n  MLP_RATIO: [3.5, 4]\n  NUM_HEADS: [3, 4]\n  DEPTH: [12, 13, 14]\n"
                    "  EMBED_DIM: [192, 216, 240]\n")
    space = read_autoformer_yaml(path)
    assert dataclasses.replace(space, name="autoformer-t") == load_space("autoformer-t")
    assert SearchSpace.from_yaml(space.to_yaml()) == space
    path.write_text(path.read_text().replace("EMBED_DIM: 256", "EMBED_DIM: 224"))
    with pytest.raises(ValueError, match="embed_dim 224 < 240"):
        read_autoformer_yaml(path)



def test_autoformer_weights_that_are_not_weights_are_its_promised_value_error():
    state = autoformer_state_dict(AF_SPACE, seed=1)
    qkv = next(name for name in state if name.endswith("qkv.weight"))
    cases = {"holds NaN or infinite values": {**state, qkv: state[qkv] * math.nan},
             r"shape \(5,\), not q, k and v rows": {**state, qkv: torch.ones(5)},
             r"not q, k and v rows": {**state, qkv: state[qkv][:-1]},
             "is torch.bool, not a floating-point tensor": {**state, qkv: state[qkv] > 0},
             "is str, not a floating-point tensor": {**state, qkv: "weights"},
             "expected a state dict .* got list": list(state.values()),
             "expected a state dict .* got NoneType": None}
    for message, bad in cases.items():
        with pytest.raises(ValueError, match=message):
            from_autoformer_state_dict(bad, AF_SPACE)


# -- timm ----------------------------------------------------------------------------------------------------------

class TimmLayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x):
        return x * self.gamma


class TimmAttention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm, self.k_norm, self.attn_drop = nn.Identity(), nn.Identity(), nn.Dropout(0.0)
        self.proj, self.proj_drop = nn.Linear(dim, dim), nn.Dropout(0.0)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class TimmMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0)
        self.norm, self.fc2, self.drop2 = nn.Identity(), nn.Linear(hidden, dim), nn.Dropout(0.0)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class TimmBlock(nn.Module):
    def __init__(self, dim, num_heads, hidden, qkv_bias, layer_scale):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), TimmAttention(dim, num_heads, qkv_bias)
        self.ls1 = TimmLayerScale(dim) if layer_scale else nn.Identity()
        self.drop_path1, self.norm2 = nn.Identity(), nn.LayerNorm(dim, eps=1e-6)
        self.mlp, self.ls2 = TimmMlp(dim, hidden), TimmLayerScale(dim) if layer_scale else nn.Identity()
        self.drop_path2 = nn.Identity()

    def forward(self, x):
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class TimmPatchEmbed(nn.Module):
    def __init__(self, img_size, patch, in_chans, dim):
        super().__init__()
        self.img_size, self.patch_size = (img_size, img_size), (patch, patch)
        self.proj, self.norm = nn.Conv2d(in_chans, dim, patch, stride=patch), nn.Identity()

    def forward(self, x):
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class TimmVisionTransformer(nn.Module):
    """timm's VisionTransformer as its module tree, names and forward are (class token, global_pool="token")."""

    def __init__(self, img_size=32, patch=8, in_chans=3, num_classes=6, dim=48, depth=3, num_heads=3, mlp_ratio=4.0,
                 qkv_bias=True, layer_scale=False):
        super().__init__()
        self.global_pool, self.num_prefix_tokens, self.no_embed_class, self.dynamic_img_size = "token", 1, False, False
        self.patch_embed = TimmPatchEmbed(img_size, patch, in_chans, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.2)
        self.reg_token = None
        self.pos_embed = nn.Parameter(torch.randn(1, (img_size // patch) ** 2 + 1, dim) * 0.2)
        self.pos_drop, self.patch_drop, self.norm_pre = nn.Dropout(0.0), nn.Identity(), nn.Identity()
        self.blocks = nn.Sequential(*[TimmBlock(dim, num_heads, int(dim * mlp_ratio), qkv_bias, layer_scale)
                                      for _ in range(depth)])
        self.norm, self.fc_norm, self.head_drop = nn.LayerNorm(dim, eps=1e-6), nn.Identity(), nn.Dropout(0.0)
        self.head = nn.Linear(dim, num_classes)
        with torch.no_grad():
            for name, param in self.named_parameters():
                if "norm" in name or name.endswith("bias"):
                    param.add_(torch.randn_like(param) * 0.2)

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(self.norm_pre(self.patch_drop(self.pos_drop(x)))))
        return self.head(self.head_drop(self.fc_norm(x[:, 0])))


def check_conversion(model: nn.Module, images: torch.Tensor) -> None:
    model.eval()
    expected = model(images)
    before = {name: p for name, p in model.named_parameters()}
    supernet = convert_timm_vit(model)
    # In place, sharing: the timm model holds the same parameter tensors, and so does the supernet.
    after = dict(model.named_parameters())
    assert all(before[name] is after[name] for name in before) and set(before) == set(after)
    shared = {id(p) for p in before.values()}
    assert {id(p) for p in supernet.parameters()} <= shared
    assert type(model.blocks[0]).__name__ == "ElasticBlock"
    torch.testing.assert_close(model(images), expected, **TOL)
    space = supernet.config.space
    torch.testing.assert_close(supernet(images, space.max_arch()), expected, **TOL)
    # Any subnet runs, and is the subnet: its extracted plain model computes the same.
    for i in range(4):
        arch = space.sample(np.random.default_rng(i))
        torch.testing.assert_close(supernet(images, arch), extract_subnet(supernet, arch)(images), **TOL)
    # Training the supernet trains the timm model's parameters.
    supernet.train()
    supernet(images, space.min_arch()).sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


@pytest.mark.parametrize("qkv_bias, layer_scale", [(True, False), (False, True)])
def test_a_timm_tree_converts_in_place(qkv_bias, layer_scale):
    torch.manual_seed(0)
    model = TimmVisionTransformer(qkv_bias=qkv_bias, layer_scale=layer_scale)
    space = timm_space(model)
    assert (space.embed_dims, space.depths, space.num_heads, space.mlp_ratios, space.head_dim) == \
        ((32, 48), (2, 3), (2, 3), (2.0, 3.0, 4.0), 16)
    check_conversion(model, torch.randn(2, 3, 32, 32))


def test_unsupported_timm_models_are_refused():
    model = TimmVisionTransformer()
    model.global_pool = "avg"
    with pytest.raises(ValueError, match="global_pool='avg'"):
        convert_timm_vit(model)
    model = TimmVisionTransformer()
    model.blocks[1].mlp.act = nn.GELU(approximate="tanh")
    with pytest.raises(ValueError, match="block 1: MLP activation GELU"):
        convert_timm_vit(model)
    with pytest.raises(ValueError, match="is not the timm model"):
        convert_timm_vit(TimmVisionTransformer(), dataclasses.replace(timm_space(TimmVisionTransformer()),
                                                                       embed_dims=[32]))


def test_timm_state_dicts_take_layer_scale_and_refuse_a_distilled_deit(tmp_path, capsys):
    import json

    from nas.checkpoint import load_supernet
    from nas.convert.__main__ import main as convert_main
    from nas.costs import params
    from nas.export.__main__ import main as export_main

    torch.manual_seed(0)
    model = TimmVisionTransformer(layer_scale=True).eval()
    space = dataclasses.replace(timm_space(model), layer_scale=False)  # the weights have it: the supernet takes it
    supernet = from_timm_state_dict(model.state_dict(), space).eval()
    assert supernet.config.space.layer_scale
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(supernet(images, space.max_arch()), model(images), **TOL)
    arch = space.min_arch()
    assert params(arch, supernet.config.space) == sum(p.numel() for p in extract_subnet(supernet, arch).parameters())
    # The command line: the same, from a file; the supernet it writes reloads.
    weights, space_file = tmp_path / "vit.pth", tmp_path / "space.yaml"
    torch.save({"model": model.state_dict()}, weights)
    space_file.write_text(supernet.config.space.to_yaml())
    assert run_cli(convert_main, ["--from", "timm", "--weights", weights, "--space", space_file, "--out-dir",
                                  tmp_path / "out"], capsys)[0] == 0
    assert sorted(json.loads((tmp_path / "out" / "conversion.json").read_text())["mapped"]) == \
        sorted(model.state_dict())
    reloaded, _, _ = load_supernet(tmp_path / "out" / "checkpoint.pt")
    torch.testing.assert_close(reloaded(images, space.max_arch()), model(images), **TOL)
    # A subnet exported from that checkpoint keeps its layer scale: rebuilt from the export, it computes the subnet.
    assert run_cli(export_main, ["--checkpoint", tmp_path / "out" / "checkpoint.pt", "--arch", "smallest",
                                 "--format", "pytorch", "--format", "safetensors", "--out-dir", tmp_path / "export"],
                   capsys)[0] == 0
    for exported, exported_arch in (load_subnet(tmp_path / "export" / "subnet.pt"),
                                    load_safetensors(tmp_path / "export" / "safetensors")):
        assert exported_arch == space.min_arch() and isinstance(exported.blocks[0].ls1, LayerScale)
        torch.testing.assert_close(exported(images), reloaded.eval()(images, exported_arch), **TOL)
    # A distilled DeiT: refused at conversion, from its state dict and from the model.
    model.dist_token, model.head_dist = nn.Parameter(torch.zeros(1, 1, 48)), nn.Linear(48, 6)
    with pytest.raises(ValueError, match=r"a distilled DeiT \(dist_token, head_dist.bias, head_dist.weight\)"):
        from_timm_state_dict(model.state_dict(), space)
    with pytest.raises(ValueError, match="a distillation token and second head"):
        convert_timm_vit(model)


def import_timm():
    try:
        import timm
    except Exception as error:  # noqa: BLE001 - beside the CPU torch, torchvision fails with a RuntimeError
        pytest.skip(f"timm does not import here: {type(error).__name__}: {error}")
    return timm


def test_a_real_timm_vit_converts_in_place():
    timm = import_timm()
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=6)
    check_conversion(model, torch.randn(2, 3, 32, 32))


# -- python -m nas.convert ---------------------------------------------------------------------------------------

# AutoFormer's layout on the digits (8 x 8 px, one channel, ten classes), its supernet wider than the choices.
DIGITS_AF_SPACE = SearchSpace(name="digits-autoformer", embed_dims=[48, 64], depths=[1, 2], num_heads=[1, 2],
                              mlp_ratios=[1.0, 2.0], head_dim=64, patch_sizes=[2], img_size=8, in_chans=1,
                              num_classes=10, supernet={"embed_dim": 128, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0})


def run_cli(main, args, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 0 or err.count("\n") == 1, err
    return code, err


def test_the_command_line_converts_autoformer_weights_for_search_and_export(tmp_path, capsys):
    """Convert an AutoFormer checkpoint (with its argparse.Namespace), then search and export the output."""
    import argparse
    import json

    from nas.checkpoint import load_supernet
    from nas.convert.__main__ import main as convert_main
    from nas.export.__main__ import main as export_main
    from nas.search import main as search_main

    state = autoformer_state_dict(DIGITS_AF_SPACE, seed=3)
    weights, space_file, out = tmp_path / "autoformer.pth", tmp_path / "space.yaml", tmp_path / "converted"
    torch.save({"model": state, "epoch": 3, "args": argparse.Namespace(lr=5e-4, gp=True)}, weights)
    space_file.write_text(DIGITS_AF_SPACE.to_yaml())
    assert run_cli(convert_main, ["--from", "autoformer", "--weights", weights, "--space", space_file,
                                  "--out-dir", out], capsys)[0] == 0
    report = json.loads((out / "conversion.json").read_text())
    assert sorted(report["mapped"]) == sorted(state) and report["unused"] == [] and report["from"] == "autoformer"
    supernet, space, _ = load_supernet(out / "checkpoint.pt")
    images = torch.randn(2, 1, 8, 8)
    arch = dataclasses.replace(space.max_arch(), num_heads=(1, 2))
    torch.testing.assert_close(supernet(images, arch), autoformer_forward(state, images, arch), **TOL)
    assert run_cli(search_main, ["--checkpoint", out / "checkpoint.pt", "--dataset", "digits", "--search-on", "test",
                                 "--out-dir", tmp_path / "search", "--generations", 1, "--population", 4, "--parents",
                                 2, "--mutations", 2, "--crossovers", 2, "--test-images", 16, "--no-progress"],
                   capsys)[0] == 0
    found = json.loads((tmp_path / "search" / "search.json").read_text())
    arch_file = tmp_path / "arch.json"
    arch_file.write_text(json.dumps(found["candidates"][0]))  # an arch the search scored
    assert run_cli(export_main, ["--checkpoint", out / "checkpoint.pt", "--arch", arch_file, "--format", "pytorch",
                                 "--out-dir", tmp_path / "export"], capsys)[0] == 0
    # A tensor with no counterpart: refused in one line, or left out and reported with --allow-unused.
    torch.save({**state, "blocks.0.attn.q_norm.weight": torch.ones(64)}, weights)
    code, err = run_cli(convert_main, ["--from", "autoformer", "--weights", weights, "--space", space_file,
                                       "--out-dir", tmp_path / "again"], capsys)
    assert code == 2 and "unexpected: ['blocks.0.attn.q_norm.weight']" in err
    assert run_cli(convert_main, ["--from", "autoformer", "--weights", weights, "--space", space_file,
                                  "--out-dir", tmp_path / "again", "--allow-unused"], capsys)[0] == 0
    assert json.loads((tmp_path / "again" / "conversion.json").read_text())["unused"] == [
        "blocks.0.attn.q_norm.weight"]


def test_the_command_line_refuses_in_one_line(tmp_path, capsys):
    from nas.convert.__main__ import main as convert_main

    weights = tmp_path / "w.pt"
    torch.save({"cls_token": torch.zeros(1, 1, 200)}, weights)
    expectations = [
        (["--from", "autoformer", "--weights", weights], "no AutoFormer preset has"),
        (["--from", "timm", "--weights", weights], "--from timm needs --space"),
        (["--from", "uninet", "--weights", weights], "--from uninet needs --name"),
        (["--from", "autoformer"], "needs the weights"),
        (["--from", "autoformer", "--weights", tmp_path / "none.pt"], "no file"),
    ]
    for args, message in expectations:
        code, err = run_cli(convert_main, args, capsys)
        assert code == 2 and message in err, (args, err)

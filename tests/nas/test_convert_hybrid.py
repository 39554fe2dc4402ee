"""UniNet's released models into the hybrid supernet (nas.hybrid.uninet, nas.convert.from_uninet_state_dict), and
ElasticViT's LayerNorm and qkv layout through a supernet.

UniNet's code is not in this repository (and needs timm), so its side is an independent implementation of its models
written from Sense-X/UniNet ``uninet.py`` (commit 81ef332): ``VisionTransformer`` with its ``stem``, its ``blocks``
numbered one after another (a ``LocalDSM`` or ``LocalGlobalDSM`` before every stage but the first, then the stage's
``DWConvBlock``s or ``AttentionBlock``s), its ``head`` and ``classifier``, under UniNet's module names. Its parameter
counts are checked against the ones ``uninet.py`` prints beside each model; the library's against it, less the conv
biases that feed a BatchNorm.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hybrid_models import randomise_running_statistics
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nas import costs as cost
from nas.convert import convert_uninet, from_uninet_state_dict
from nas.errors import ConfigError
from nas.hybrid import uninet_model
from nas.hybrid.supernet import HybridSupernet, HybridSupernetConfig
from nas.spaces import load_space

# UniNetB<i>: repeats, channels, input size (uninet.py), and the parameters its comment gives.
RELEASED = {
    "B0": ([1, 2, 4, 4, 4, 8], [24, 48, 80, 128, 128, 256], 160, 11.451e6),
    "B1": ([1, 2, 4, 4, 4, 8], [24, 48, 80, 128, 128, 256], 224, 11.451e6),
    "B2": ([2, 3, 6, 6, 6, 12], [24, 48, 80, 128, 128, 256], 256, 16.211e6),
    "B3": ([2, 3, 7, 7, 7, 14], [24, 56, 96, 160, 160, 288], 288, 24.02e6),
    "B4": ([2, 4, 9, 9, 9, 18], [32, 64, 112, 192, 192, 352], 320, 43.796e6),
    "B5": ([3, 5, 10, 10, 10, 20], [32, 64, 112, 224, 224, 448], 384, 72.883e6),
    "B6": ([4, 6, 12, 12, 12, 24], [48, 96, 160, 256, 256, 512], 448, 117e6),
}
EXPANSION, STRIDES, HEAD_DIM = [1, 4, 6, 3, 2, 5], [1, 2, 2, 2, 1, 2], 32


def tokens(x):
    return x.flatten(2).transpose(1, 2) if x.dim() == 4 else x


def grid(x):
    if x.dim() == 4:
        return x
    side = math.isqrt(x.shape[1])
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)


def shortcut(cin, cout, stride):
    """UniNet's residual: a 1x1 conv (with bias), after a 3x3 max-pool where it strides."""
    conv = nn.Conv2d(cin, cout, 1)
    return nn.Sequential(conv) if stride == 1 else nn.Sequential(nn.MaxPool2d(3, stride, 1), conv)


def separable(cin, cout, stride):
    return nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin), nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 1))


class SE(nn.Module):
    def __init__(self, channels):
        super().__init__()
        squeeze = max(8, int(channels // 4 + 4) // 8 * 8)  # _make_divisible(channels // 4, 8)
        squeeze += 8 if squeeze < 0.9 * (channels // 4) else 0
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)

    def forward(self, x):
        return x * F.relu6(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))) + 3) / 6


class ConvBlock(nn.Module):  # DWConvBlock
    def __init__(self, cin, cout, ratio):
        super().__init__()
        hidden = cin * ratio
        self.residual = shortcut(cin, cout, 1) if cin != cout else None
        if self.residual is not None:  # a max-pool at stride 1 too
            self.residual = nn.Sequential(nn.MaxPool2d(3, 1, 1), self.residual[0])
        self.b1 = (nn.Sequential(nn.BatchNorm2d(cin), nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                                 nn.GELU()) if cin != hidden else None)
        self.b2 = nn.Sequential(nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                                nn.GELU(), SE(hidden), nn.Conv2d(hidden, cout, 1), nn.BatchNorm2d(cout))

    def forward(self, x):
        x = grid(x)
        residual = x if self.residual is None else self.residual(x)
        return residual + self.b2(x if self.b1 is None else self.b1(x))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.heads = dim // HEAD_DIM
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class AttentionBlock(nn.Module):
    def __init__(self, dim, ratio):
        super().__init__()
        self.pos_embed = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm1, self.attn, self.norm2 = nn.LayerNorm(dim), Attention(dim), nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * ratio)
        self.gamma_1, self.gamma_2 = nn.Parameter(torch.full((dim,), 1e-6)), nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x):
        x = tokens(x)
        x = x + tokens(self.pos_embed(grid(x)))
        x = x + self.gamma_1 * self.attn(self.norm1(x))
        return x + self.gamma_2 * self.mlp(self.norm2(x))


class LocalDSM(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.residual, self.downsample = shortcut(cin, cout, stride), separable(cin, cout, stride)

    def forward(self, x):
        x = grid(x)
        return self.downsample(x) + self.residual(x)


class LocalGlobalDSM(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.heads = cout // HEAD_DIM
        self.residual, self.q = shortcut(cin, cout, stride), separable(cin, cout, stride)
        self.q_norm, self.kv_norm = nn.LayerNorm(cout), nn.LayerNorm(cin)
        self.kv, self.proj = nn.Linear(cin, 2 * cout), nn.Linear(cout, cout)

    def forward(self, x):
        x = grid(x)
        residual, q, x = tokens(self.residual(x)), self.q_norm(tokens(self.q(x))), self.kv_norm(tokens(x))
        (b, m, c), n = q.shape, x.shape[1]
        q = q.reshape(b, m, self.heads, HEAD_DIM).transpose(1, 2)
        k, v = self.kv(x).reshape(b, n, 2, self.heads, HEAD_DIM).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * HEAD_DIM ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, m, c)) + residual


class UniNet(nn.Module):
    def __init__(self, repeats, channels):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.GELU())
        blocks, cin = [], 32
        for stage, (depth, cout, ratio, stride) in enumerate(zip(repeats, channels, EXPANSION, STRIDES)):
            if stage:
                blocks.append((LocalDSM if stage < 4 else LocalGlobalDSM)(cin, cout, stride))
                cin = cout
            for _ in range(depth):
                blocks.append(ConvBlock(cin, cout, ratio) if stage < 4 else AttentionBlock(cin, ratio))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.GELU())
        self.classifier = nn.Linear(1280, 1000)

    def forward(self, x):
        return self.classifier(self.head(grid(self.blocks(self.stem(x)))).mean((2, 3)))


def folded_biases(model: UniNet) -> int:
    return sum(block.b2[4].bias.numel() for block in model.blocks if isinstance(block, ConvBlock))


@pytest.mark.parametrize("name", list(RELEASED))
def test_released_models_have_uninets_parameters_and_macs(name):
    repeats, channels, size, published = RELEASED[name]
    with torch.device("meta"):
        theirs = UniNet(repeats, channels)
    params = sum(p.numel() for p in theirs.parameters())
    assert round(params / 1e6, 3 if name != "B6" else 0) == round(published / 1e6, 3 if name != "B6" else 0)
    counter = FlopCounterMode(display=False)
    with counter:
        theirs(torch.empty(1, 3, size, size, device="meta"))
    space, arch = uninet_model(name)
    assert arch.resolution == size and [s.depth for s in arch.stages] == repeats
    assert [s.channels for s in arch.stages] == channels and [s.expansion for s in arch.stages] == EXPANSION
    assert cost.params(arch, space) == params - folded_biases(theirs)
    assert cost.macs(arch, space) == counter.get_total_flops() // 2


def randomised(model: nn.Module) -> nn.Module:
    """Every weight, norm, layer scale and BatchNorm statistic random (the initial ones would hide branches)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p[0].numel() if p.dim() > 1 else 1
            p.copy_(torch.randn_like(p) * (0.1 if p.dim() == 1 else 0.5 * fan_in ** -0.5))
    randomise_running_statistics(model)
    return model.eval()


def test_uninet_b0_weights_give_uninets_logits():
    repeats, channels, size, _ = RELEASED["B0"]
    theirs = randomised(UniNet(repeats, channels).double())
    conversion = convert_uninet({"model": theirs.state_dict()}, "uninet-b0")
    model, arch = conversion.supernet, conversion.arch
    # Every tensor mapped but the bias of each conv block's last 1x1 conv (one per conv block: 1 + 2 + 4 + 4), folded.
    assert len(conversion.folded) == sum(repeats[:4]) and conversion.unused == []
    assert set(conversion.mapped) | set(conversion.folded) == set(theirs.state_dict())
    images = torch.randn(1, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        expected = theirs(images)
        assert expected.abs().max() > 0.1  # every branch counts (random layer scales and BatchNorm weights)
        torch.testing.assert_close(model.eval()(images, arch), expected, atol=1e-13, rtol=0)


def test_uninet_weights_that_do_not_fit_are_refused_in_one_line():
    repeats, channels, _, _ = RELEASED["B0"]
    state = UniNet(repeats, channels).state_dict()
    with pytest.raises(ValueError, match=r"shape mismatch: \['blocks.0.b2.0.weight|stages"):
        from_uninet_state_dict(state, "B2")
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected: \['extra.weight'\]"):
        from_uninet_state_dict(state, "B0")
    with pytest.raises(ConfigError, match="unknown UniNet model 'B7'"):
        uninet_model("B7")


@pytest.mark.parametrize("name", list(RELEASED))
def test_released_models_are_the_presets(name):
    space, arch = uninet_model(name)
    assert load_space(f"uninet-{name.lower()}") == space and space.max_arch() == arch == space.min_arch()


def test_elasticvit_layouts_in_a_supernet_match_its_extraction():
    """ElasticViT's LayerNorm and per-head qkv reading through a whole supernet: every subnet's plain network gives
    the supernet's logits (smallest, largest and mixed)."""
    space = dataclasses.replace(load_space("elasticvit-mobile-cifar"), norm="sample", qkv_layout="per_head")
    torch.manual_seed(0)
    model = randomised(HybridSupernet(HybridSupernetConfig(space)))
    images = torch.randn(2, 3, 32, 32)
    for arch in [space.min_arch(), space.max_arch(), space.sample(0)]:
        with torch.no_grad():
            torch.testing.assert_close(model.extract(arch)(images), model(images, arch), atol=1e-5, rtol=1e-4)

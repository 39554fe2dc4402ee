"""The hybrid cost model (nas.hybrid.cost, through nas.costs) against counts written out by hand, the parameters of the
extracted plain network, torch's FlopCounterMode, and UniNet's published B0 and B1 sizes."""
import numpy as np
import pytest
import torch
from hybrid_models import supernet
from test_hybrid_space import HYBRID_PRESETS, uninet_b
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from elastic_ops import plain_hybrid
from nas import costs
from nas.hybrid.arch import HybridArch, Stage
from nas.hybrid.space import HybridSpace
from nas.hybrid.supernet import HybridSupernet, HybridSupernetConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_space(style: str, stages: list[dict], **fields) -> HybridSpace:
    return HybridSpace.from_dict(dict(name=f"tiny-{style}", style=style, resolutions=[8], stages=stages,
                                      stem_stride=2, head_dim=8, num_classes=5, **fields))


# UniNet style: stem 3x3/2 to 8 channels (8 px -> 4x4); a conv stage (8 channels, expansion 2, squeeze-excite);
# an attention stage (16 channels, 2 heads of 8, MLP ratio 2) after a local-global DSM (-> 2x2); an MLP stage (16
# channels, ratio 2, token MLP 4 -> 2 -> 4) after a global DSM; the head: 1x1 conv to 32, classifier to 5.
UNINET_TINY = tiny_space("uninet", [
    dict(ops=["conv"], depths=[1], channels=[8], expansions=[2], dsms=["none"], se=True),
    dict(ops=["attention"], depths=[1], channels=[16], expansions=[2], dsms=["local-global"], stride=2),
    dict(ops=["mlp"], depths=[1], channels=[16], expansions=[2], dsms=["global"])], stem_channels=8, head_features=32)
UNINET_TINY_ARCH = HybridArch(8, (Stage("conv", 1, 8, 2, 3, 0, "none"),
                                  Stage("attention", 1, 16, 2, 0, 0, "local-global"),
                                  Stage("mlp", 1, 16, 2, 0, 0, "global")))
UNINET_BY_HAND = {  # (params, MACs) of each part
    # conv 3*8*9 (no bias) + BN 2*8; 4*4 positions x 8 x 27
    "stem": (216 + 16, 16 * 8 * 27),
    # hidden 16: BN in 16, expand 8*16, BN 32, depthwise 16*9, BN 32, SE to make_divisible(16 // 4, 8) = 8 units
    # (16*8 + 8 and 8*16 + 16), project 16*8, BN 16; identity residual. MACs on 16 positions: 8*16 + 16*9 + 16*8,
    # and SE's 2*16*8 once.
    "conv block": (16 + 128 + 32 + 144 + 32 + 136 + 144 + 128 + 16, 16 * (128 + 144 + 128) + 256),
    # queries: depthwise 3x3/2 (8*9 + 8), BN 16, 1x1 to 16 (8*16 + 16), LayerNorm 32; keys and values: LayerNorm 16,
    # linear (8 + 1) * 32; projection 17*16; shortcut 8*16 + 16. MACs: 4 queries x (8*9 + 8*16), 16 tokens x 8*32,
    # q @ k^T and attn @ v 2 * 4*16*16, projection 4*16*16, shortcut 4*8*16.
    "local-global DSM": (80 + 16 + 144 + 32 + 16 + 288 + 272 + 144,
                         4 * (72 + 128) + 16 * 256 + 2 * 4 * 16 * 16 + 4 * 256 + 4 * 128),
    # positional conv 16*9 + 16, LayerNorms 2*32, qkv 17*48, projection 17*16, layer scales 2*16, MLP 17*32 + 33*16.
    # MACs on 4 tokens: 9*16, 16*48, 16*16, 16*32 and 32*16; q @ k^T and attn @ v 4*4*16 each.
    "attention block": (160 + 64 + 816 + 272 + 32 + 544 + 528, 4 * (144 + 768 + 256 + 512 + 512) + 2 * 256),
    # queries: the 2x2 grid strided by 1 through a linear 17*16; the rest as the local-global DSM at 16 channels in.
    "global DSM": (272 + 32 + 544 + 272 + 272, 4 * 256 + 4 * 16 * 32 + 2 * 4 * 4 * 16 + 4 * 256 + 4 * 256),
    # LayerNorms 2*32, token MLP 4 -> 2 -> 4 (4*2 + 2 and 2*4 + 4), channel MLP 17*32 + 33*16. MACs: the token MLP
    # for each of 16 channels (4*2 + 2*4), the channel MLP on 4 tokens.
    "mlp block": (64 + 10 + 12 + 544 + 528, 16 * 16 + 4 * (512 + 512)),
    # 1x1 conv 16*32 (no bias) + BN 64, classifier 33*5. MACs: 4 positions x 16*32, then 32*5.
    "head": (512 + 64 + 165, 4 * 512 + 160),
}

# ElasticViT style: the stem is as wide as the first stage (8 channels); a conv stage of expansion 1 (no expand conv,
# no SE); a V-scale attention stage (16 channels, 2 heads of 8, values 2x wider, MLP ratio 2) opened by the reduction
# block (expansion 6, kernel 3, SE, stride 2); the MobileNetV3 head: 1x1 conv to 2*16, pre-logits 12, classifier 5.
ELASTICVIT_TINY = tiny_space("elasticvit", [
    dict(ops=["conv"], depths=[1], channels=[8], expansions=[1], dsms=["none"]),
    dict(ops=["attention"], depths=[1], channels=[16], expansions=[2], v_scales=[2], dsms=["mbconv"], stride=2)],
    head_expansion=2, pre_logits=12)
ELASTICVIT_TINY_ARCH = HybridArch(8, (Stage("conv", 1, 8, 1, 3, 0, "none"),
                                      Stage("attention", 1, 16, 2, 0, 2, "mbconv")))
ELASTICVIT_BY_HAND = {
    "stem": (216 + 16, 16 * 8 * 27),
    # depthwise 8*9, BN 16, project 8*8, BN 16; MACs on 16 positions.
    "conv block": (72 + 16 + 64 + 16, 16 * (72 + 64)),
    # hidden 48: expand 8*48, BN 96, depthwise 48*9, BN 96, SE to 48 // 4 = 12 units (48*12 + 12, 12*48 + 48),
    # project 48*16, BN 32; shortcut: 2x2 average pool, 1x1 conv 8*16 without bias. MACs: the expand conv on the 16
    # input positions, the rest on 4, SE once.
    "reduction block": (384 + 96 + 432 + 96 + 588 + 624 + 768 + 32 + 128,
                        16 * 384 + 4 * (48 * 9 + 48 * 16 + 8 * 16) + 2 * 48 * 12),
    # LayerNorms 2*32, qkv 16*(16 + 16 + 32) without bias, value conv 32*9, the relative position table of a 2x2 grid
    # ((2*2 - 1)^2 offsets x 2 heads), projection 33*16, MLP 17*32 + 33*16. MACs on 4 tokens: 16*64, 9*32, 32*16,
    # 2 * 16*32; q @ k^T 4*4*16, attn @ v 4*4*32.
    "attention block": (64 + 1024 + 288 + 18 + 528 + 544 + 528, 4 * (1024 + 288 + 512 + 1024) + 16 * 16 + 16 * 32),
    # 1x1 conv 16*32 + BN 64, pre-logits 33*12, classifier 13*5. MACs: 4 positions x 16*32, 32*12, 12*5.
    "head": (512 + 64 + 396 + 65, 4 * 512 + 384 + 60),
}


@torch.no_grad()
def counted(model: nn.Module, resolution: int) -> tuple[int, int]:
    """(parameters, MACs by FlopCounterMode) of a plain network, on one image."""
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, 3, resolution, resolution, device=next(model.parameters()).device))
    return sum(p.numel() for p in model.parameters()), counter.get_total_flops() // 2


@pytest.mark.parametrize("space, arch, by_hand", [(UNINET_TINY, UNINET_TINY_ARCH, UNINET_BY_HAND),
                                                  (ELASTICVIT_TINY, ELASTICVIT_TINY_ARCH, ELASTICVIT_BY_HAND)])
def test_small_archs_counted_by_hand(space, arch, by_hand):
    params, macs = (sum(part[i] for part in by_hand.values()) for i in (0, 1))
    assert (costs.params(arch, space), costs.macs(arch, space)) == (params, macs)
    assert counted(HybridSupernet(HybridSupernetConfig(space)).extract(arch), arch.resolution) == (params, macs)


@pytest.mark.parametrize("name", HYBRID_PRESETS)
def test_cost_model_matches_the_extracted_network_and_flop_counter(name):
    model = supernet(name)
    space = model.space
    archs = [space.min_arch(), space.max_arch()] + space.sample_many(np.random.default_rng(0), 3).archs()
    expected = list(zip(costs.params_many(archs, space).tolist(), costs.macs_many(archs, space).tolist()))
    assert [counted(model.extract(arch), arch.resolution) for arch in archs] == expected


def fvcore_extras(model: nn.Module, resolution: int) -> int:
    """What fvcore's FlopCountAnalysis (UniNet's cal_flops.py) counts besides the matrix products: 2 per element
    through an eval-mode BatchNorm, 5 per element through a LayerNorm and 1 per element pooled (squeeze-excite and
    the head's pooling)."""
    total = [0]

    def count(per_element, of_output=False):
        def hook(module, inputs, output):
            total[0] += per_element * (output if of_output else inputs[0]).numel()
        return hook

    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.register_forward_hook(count(2))
        elif isinstance(module, nn.LayerNorm):
            module.register_forward_hook(count(5))
        elif isinstance(module, plain_hybrid.SqueezeExcite):
            module.register_forward_hook(count(1))
    head = model.head
    head.bn.register_forward_hook(count(1, of_output=True))
    with torch.no_grad():
        model(torch.zeros(1, 3, resolution, resolution))
    return total[0]


@pytest.mark.parametrize("resolution, published_macs", [(160, 0.555e9), (224, 1.118e9)])
def test_uninet_b0_and_b1_from_the_uninet_supernet(resolution, published_macs):
    """UniNet-B0 (160 px) and B1 (224 px): 11.451M parameters and 0.555G / 1.118G "FLOPs" (uninet.py). Ours: 11.450M
    (UniNet's conv blocks also have a bias in the project conv before its BatchNorm, 952 in all, which the BatchNorm
    cancels) and 0.5435G / 1.0946G multiply-accumulates of the matrix products. UniNet's FLOPs are fvcore's count,
    one per multiply-add: adding what fvcore counts besides, norms and pooling, gives 0.5554G and 1.1179G."""
    uninet = supernet("uninet")
    space, arch = uninet.space, uninet_b(resolution)
    plain = uninet.extract(arch)
    params, macs = counted(plain, resolution)
    assert (params, macs) == (costs.params(arch, space), costs.macs(arch, space))
    assert params == 11_449_912 and abs(params / 11.451e6 - 1) < 0.01
    assert macs == {160: 543_530_688, 224: 1_094_639_808}[resolution]
    assert abs((macs + fvcore_extras(plain, resolution)) / published_macs - 1) < 0.002

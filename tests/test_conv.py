"""Elastic conv layers (``elastic_ops.conv``): each active configuration against its extracted plain module and against
an independent construction from torch modules, NaN outside the active slices, gradients only in the active slices,
the kernel's centre, BatchNorm statistics and their recalibration, and clear errors on bad configurations."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from layer_checks import TOL, assert_state_dict_round_trip, check_against_extracted, randomize
from torch import nn

import elastic_ops
from elastic_ops import (
    ElasticBatchNorm2d,
    ElasticClassifierHead,
    ElasticConv2d,
    ElasticConvNormAct,
    ElasticDepthwiseConv2d,
    ElasticInvertedResidual,
    ElasticSqueezeExcite,
    make_divisible,
    plain_hybrid,
    recalibrate_batch_norm,
)


@pytest.fixture(autouse=True)
def reference_backend():
    """Layers are checked on the reference (the ops have their own tests), seeded so that a failure reproduces."""
    torch.manual_seed(0)
    with elastic_ops.use_backend("reference"):
        yield


def copy_into(module: nn.Module, **tensors: torch.Tensor) -> nn.Module:
    with torch.no_grad():
        for name, tensor in tensors.items():
            getattr(module, name).copy_(tensor)
    return module


# --- ElasticConv2d and ElasticDepthwiseConv2d ------------------------------------------------------

def test_smaller_kernel_is_the_centre_of_the_largest_by_hand():
    # A one-channel 7x7 kernel numbered 0..48; an impulse at the centre of the image shows the kernel the conv
    # applies (flipped: conv2d is a cross-correlation), and it must be the centre of the largest one.
    layer = ElasticConv2d(1, 1, kernel_size=7, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(49.0).view(1, 1, 7, 7))
    impulse = torch.zeros(1, 1, 9, 9)
    impulse[0, 0, 4, 4] = 1.0
    for kernel_size, centre in [(7, range(0, 7)), (5, range(1, 6)), (3, range(2, 5)), (1, range(3, 4))]:
        response = layer(impulse, kernel_size=kernel_size)[0, 0]
        rows = torch.tensor(list(centre))
        expected = torch.arange(49.0).view(7, 7)[rows][:, rows].flip(0, 1)
        half = kernel_size // 2
        assert torch.equal(response[4 - half:5 + half, 4 - half:5 + half], expected)
        assert response.abs().sum() == expected.abs().sum(), "nothing outside the centre kernel's reach"
    assert torch.equal(layer.set_active(kernel_size=3).extract().weight, torch.tensor(
        [[16.0, 17.0, 18.0], [23.0, 24.0, 25.0], [30.0, 31.0, 32.0]]).view(1, 1, 3, 3))


@pytest.mark.parametrize("in_channels, out_channels, kernel_size, stride, bias", [
    (5, 7, 3, 1, True), (12, 16, 7, 2, False), (1, 1, 5, 1, True), (3, 16, 1, 2, True)])
def test_conv_matches_extracted_and_nn_conv2d(in_channels, out_channels, kernel_size, stride, bias):
    layer = randomize(ElasticConv2d(12, 16, kernel_size=7, stride=stride, bias=bias))
    layer.set_active(in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size)
    x = torch.randn(2, in_channels, 9, 8)
    start = (7 - kernel_size) // 2
    reference = copy_into(nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=bias),
                          weight=layer.weight[:out_channels, :in_channels, start:start + kernel_size,
                                              start:start + kernel_size])
    if bias:
        copy_into(reference, bias=layer.bias[:out_channels])
    torch.testing.assert_close(layer(x), reference(x), **TOL)
    extracted = check_against_extracted(layer, lambda: x.clone())
    assert isinstance(extracted, nn.Conv2d) and extracted.stride == (stride, stride)


@pytest.mark.parametrize("channels, kernel_size, stride", [(9, 3, 1), (16, 5, 2), (1, 1, 1)])
def test_depthwise_conv_matches_extracted_and_nn_conv2d(channels, kernel_size, stride):
    layer = randomize(ElasticDepthwiseConv2d(16, kernel_size=5, stride=stride, bias=True))
    layer.set_active(channels=channels, kernel_size=kernel_size)
    x = torch.randn(2, channels, 7, 7)
    start = (5 - kernel_size) // 2
    reference = copy_into(nn.Conv2d(channels, channels, kernel_size, stride, kernel_size // 2, groups=channels),
                          weight=layer.weight[:channels, :, start:start + kernel_size, start:start + kernel_size],
                          bias=layer.bias[:channels])
    torch.testing.assert_close(layer(x), reference(x), **TOL)
    extracted = check_against_extracted(layer, lambda: x.clone())
    assert extracted.groups == channels


def test_conv_state_dict_round_trip_with_nn_conv2d():
    assert_state_dict_round_trip(ElasticConv2d(6, 8, kernel_size=3, stride=2), lambda: nn.Conv2d(6, 8, 3, 2, 1),
                                 torch.randn(2, 6, 7, 7))
    assert_state_dict_round_trip(ElasticDepthwiseConv2d(6, kernel_size=5),
                                 lambda: nn.Conv2d(6, 6, 5, padding=2, groups=6, bias=False), torch.randn(2, 6, 7, 7))


@pytest.mark.parametrize("config, error, match", [
    (dict(kernel_size=4), ValueError, r"kernel_size=4 must be odd \(the centre of the largest kernel, 5\)"),
    (dict(kernel_size=7), ValueError, "kernel_size=7 is outside 1..5"),
    (dict(out_channels=17), ValueError, "out_channels=17 is outside 1..16"),
    (dict(in_channels=3.0), TypeError, "in_channels must be an int"),
    (dict(channels=3), TypeError, "'channels'"),  # unknown key
])
def test_conv_bad_config_raises_clear_error(config, error, match):
    layer = ElasticConv2d(8, 16, kernel_size=5)
    with pytest.raises(error, match=match):
        layer.set_active(**config)
    with pytest.raises(error, match=match):
        layer(torch.randn(1, 8, 5, 5), **config)
    assert layer.active == {"in_channels": 8, "out_channels": 16, "kernel_size": 5}


def test_conv_input_errors_name_the_field():
    with pytest.raises(ValueError, match=r"expected \[batch, 6, height, width\] \(the active in_channels is 6\)"):
        ElasticConv2d(8, 16).set_active(in_channels=6)(torch.randn(1, 8, 5, 5))
    with pytest.raises(ValueError, match=r"the active channels is 4"):
        ElasticDepthwiseConv2d(8).set_active(channels=4)(torch.randn(1, 5, 5))
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        ElasticDepthwiseConv2d(8, kernel_size=4)
    with pytest.raises(TypeError, match="input must be a floating-point tensor, got torch.int64"):  # as elastic_linear
        ElasticConv2d(8, 16)(torch.ones(1, 8, 5, 5, dtype=torch.int64))


# --- ElasticBatchNorm2d ----------------------------------------------------------------------------

def test_batch_norm_training_uses_batch_statistics_and_updates_only_active_channels():
    layer = randomize(ElasticBatchNorm2d(12)).set_active(num_features=7)
    with torch.no_grad():
        layer.running_mean.copy_(torch.randn(12))
        layer.running_var.copy_(torch.rand(12) + 0.5)
    before_mean, before_var = layer.running_mean.clone(), layer.running_var.clone()
    reference = copy_into(nn.BatchNorm2d(7), weight=layer.weight[:7], bias=layer.bias[:7],
                          running_mean=layer.running_mean[:7], running_var=layer.running_var[:7])
    x = torch.randn(4, 7, 5, 5) * 3 + 1
    torch.testing.assert_close(layer.train()(x), reference.train()(x), **TOL)
    torch.testing.assert_close(layer.running_mean[:7], reference.running_mean, **TOL)
    torch.testing.assert_close(layer.running_var[:7], reference.running_var, **TOL)
    assert torch.equal(layer.running_mean[7:], before_mean[7:]) and torch.equal(layer.running_var[7:], before_var[7:])
    assert not torch.allclose(layer.running_mean[:7], before_mean[:7])
    # In eval the active channels' running statistics normalise.
    torch.testing.assert_close(layer.eval()(x), reference.eval()(x), **TOL)
    assert layer.num_batches_tracked == 1


def test_batch_norm_matches_extracted_with_nan_outside_active_channels():
    layer = randomize(ElasticBatchNorm2d(16, momentum=0.3)).set_active(num_features=9)
    extracted = check_against_extracted(layer, lambda: torch.randn(3, 9, 4, 4))
    assert isinstance(extracted, nn.BatchNorm2d) and extracted.momentum == 0.3
    assert_state_dict_round_trip(ElasticBatchNorm2d(5), lambda: nn.BatchNorm2d(5), torch.randn(2, 5, 3, 3))


def test_batch_norm_momentum_none_is_a_cumulative_average():
    layer = ElasticBatchNorm2d(8, momentum=None).set_active(num_features=3).train()
    batches = [torch.randn(6, 3, 4, 4) * (i + 1) + i for i in range(3)]
    for batch in batches:
        layer(batch)
    torch.testing.assert_close(layer.running_mean[:3], torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0), **TOL)
    torch.testing.assert_close(layer.running_var[:3],
                               torch.stack([b.transpose(0, 1).flatten(1).var(1) for b in batches]).mean(0), **TOL)


def test_batch_norm_bad_config_and_input():
    with pytest.raises(ValueError, match="num_features=13 is outside 1..12"):
        ElasticBatchNorm2d(12).set_active(num_features=13)
    with pytest.raises(ValueError, match="the active num_features is 12"):
        ElasticBatchNorm2d(12)(torch.randn(2, 11, 3, 3))


# --- recalibration ---------------------------------------------------------------------------------

def small_conv_net() -> nn.Sequential:
    """A stem with torch's BatchNorm and two elastic MBConv blocks (one with drop-path and dropout around it)."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
        ElasticInvertedResidual(8, 16, 4, kernel_size=5, stride=2, se_reduction=4, shortcut_pool="max", drop_path=0.5),
        nn.Dropout(0.5),
        ElasticInvertedResidual(16, 16, 6, kernel_size=5, activation="hardswish", input_norm=True))


def batch_norm_inputs(model: nn.Module, batches) -> dict[str, list[torch.Tensor]]:
    """The input of every BatchNorm of ``model`` per batch, recorded with hooks on its forward passes."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [module.register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, []).append(args[0]))
             for name, module in model.named_modules() if isinstance(module, (nn.BatchNorm2d, ElasticBatchNorm2d))]
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for hook in hooks:
        hook.remove()
    return seen


def test_recalibration_sets_running_statistics_of_the_active_subnet():
    model = randomize(small_conv_net())
    model[2].set_active(in_channels=8, out_channels=12, expand_ratio=3, kernel_size=3)
    model[4].set_active(in_channels=12, out_channels=12, expand_ratio=2, kernel_size=5)
    model.eval()
    model[4].train()  # a submodule in another mode than its parent, which must be restored too
    batches = [torch.randn(8, 3, 9, 9) * 2 + 0.5 for _ in range(3)]
    # Independently: the extracted subnet in training mode (torch's BatchNorm on batch statistics, no drop-path or
    # dropout; its modules at the same indices) and each BatchNorm's input per batch.
    subnet = nn.Sequential(copy.deepcopy(model[0]), copy.deepcopy(model[1]), model[2].extract(), nn.Identity(),
                           model[4].extract()).train()
    expected = batch_norm_inputs(subnet, batches)

    assert recalibrate_batch_norm(model, batches) is model

    assert not model.training and model[4].training and not model[2].training and not model[3].training
    norms = {name: module for name, module in model.named_modules() if isinstance(module, (nn.BatchNorm2d,
                                                                                           ElasticBatchNorm2d))}
    assert len(norms) == len(expected) == 8
    for name, inputs in expected.items():
        norm = norms[name]
        channels = inputs[0].shape[1]
        mean = torch.stack([x.mean((0, 2, 3)) for x in inputs]).mean(0)
        var = torch.stack([x.transpose(0, 1).flatten(1).var(1) for x in inputs]).mean(0)
        torch.testing.assert_close(norm.running_mean[:channels], mean, **TOL, msg=name)
        torch.testing.assert_close(norm.running_var[:channels], var, **TOL, msg=name)
        assert norm.momentum == 0.1 and norm.num_batches_tracked == len(batches)
        # Channels the subnet does not use are reset, not left with the statistics of another subnet.
        assert torch.count_nonzero(norm.running_mean[channels:]) == 0 and (norm.running_var[channels:] == 1).all()


# --- ElasticSqueezeExcite --------------------------------------------------------------------------

def test_make_divisible_rounds_as_ofa():
    assert [make_divisible(v) for v in (1, 4, 11, 12, 13, 19, 20, 96 // 4, 100)] == [8, 8, 16, 16, 16, 24, 24, 24, 104]
    assert [make_divisible(v, 1) for v in (1, 5, 37)] == [1, 5, 37]
    assert all(make_divisible(c // 4) <= make_divisible((c + 1) // 4) for c in range(1, 4000)), "monotone"


@pytest.mark.parametrize("channels, reduced", [(96, 24), (40, 16), (17, 8)])
def test_squeeze_excite_matches_extracted_and_by_hand(channels, reduced):
    layer = randomize(ElasticSqueezeExcite(96)).set_active(channels=channels)
    x = torch.randn(2, channels, 5, 5)
    reduce, expand = layer.conv_reduce, layer.conv_expand
    pooled = x.mean((2, 3))
    scale = F.linear(F.relu(F.linear(pooled, reduce.weight[:reduced, :channels, 0, 0], reduce.bias[:reduced])),
                     expand.weight[:channels, :reduced, 0, 0], expand.bias[:channels])
    torch.testing.assert_close(layer(x), x * F.hardsigmoid(scale)[..., None, None], **TOL)
    extracted = check_against_extracted(layer, lambda: x.clone())
    assert isinstance(extracted, plain_hybrid.SqueezeExcite) and extracted.conv_reduce.out_channels == reduced


def test_squeeze_excite_with_elasticvit_rounding():
    layer = ElasticSqueezeExcite(96, reduction=4, divisor=1).set_active(channels=36)
    assert layer.extract().conv_reduce.out_channels == 9 and layer.conv_reduce.weight.shape[0] == 24
    assert_state_dict_round_trip(ElasticSqueezeExcite(32), lambda: plain_hybrid.SqueezeExcite(32, 8),
                                 torch.randn(2, 32, 3, 3))


# --- ElasticInvertedResidual -----------------------------------------------------------------------

def mbconv_by_hand(block: ElasticInvertedResidual, x: torch.Tensor, in_channels: int, out_channels: int,
                   expand_ratio: int, kernel_size: int) -> torch.Tensor:
    """MobileNetV2's block in eval mode from torch functions and hand-taken slices of the super weights."""
    hidden = in_channels * expand_ratio
    act = {"relu6": F.relu6, "hardswish": F.hardswish, "gelu": F.gelu, "silu": F.silu}[block.activation]

    def bn(norm: ElasticBatchNorm2d, h: torch.Tensor) -> torch.Tensor:
        c = h.shape[1]
        return F.batch_norm(h, norm.running_mean[:c], norm.running_var[:c], norm.weight[:c], norm.bias[:c], eps=1e-5)

    h = x
    if expand_ratio > 1:
        if block.bn_in is not None:
            h = bn(block.bn_in, h)
        h = act(bn(block.bn1, F.conv2d(h, block.conv_pw.weight[:hidden, :in_channels])))
    start = (block.conv_dw.weight.shape[-1] - kernel_size) // 2
    dw = block.conv_dw.weight[:hidden, :, start:start + kernel_size, start:start + kernel_size]
    h = act(bn(block.bn2, F.conv2d(h, dw, stride=block.stride, padding=kernel_size // 2, groups=hidden)))
    if block.se is not None:
        reduced = make_divisible(hidden // 4)
        squeezed = F.relu(F.conv2d(h.mean((2, 3), keepdim=True), block.se.conv_reduce.weight[:reduced, :hidden],
                                   block.se.conv_reduce.bias[:reduced]))
        h = h * F.hardsigmoid(F.conv2d(squeezed, block.se.conv_expand.weight[:hidden, :reduced],
                                       block.se.conv_expand.bias[:hidden]))
    h = bn(block.bn3, F.conv2d(h, block.conv_pwl.weight[:out_channels, :hidden]))
    if block.stride == 1 and in_channels == out_channels:
        return x + h
    shortcut = block.shortcut
    if block.shortcut_pool == "max":
        return h + F.conv2d(F.max_pool2d(x, 3, block.stride, 1), shortcut.weight[:out_channels, :in_channels],
                            shortcut.bias[:out_channels])
    if block.shortcut_pool == "avg":
        pooled = x if block.stride == 1 else F.avg_pool2d(x, 2, 2, padding=x.shape[-1] % 2)
        same = in_channels == out_channels
        return h + (pooled if same else F.conv2d(pooled, shortcut.weight[:out_channels, :in_channels]))
    return h


MBCONV_CASES = [
    # constructor kwargs, active configuration
    (dict(expand_ratio=6, kernel_size=5, stride=1),
     dict(in_channels=12, out_channels=12, expand_ratio=4, kernel_size=3)),
    (dict(expand_ratio=6, kernel_size=7, stride=2, activation="hardswish", se_reduction=4, shortcut_pool="avg"),
     dict(in_channels=9, out_channels=20, expand_ratio=3, kernel_size=5)),
    (dict(expand_ratio=6, kernel_size=3, stride=2, activation="hardswish", se_reduction=4, shortcut_pool="avg"),
     dict(in_channels=16, out_channels=16, expand_ratio=6, kernel_size=3)),
    (dict(expand_ratio=4, kernel_size=3, activation="gelu", se_reduction=4, input_norm=True, shortcut_pool="max"),
     dict(in_channels=16, out_channels=12, expand_ratio=1, kernel_size=3)),
    (dict(expand_ratio=4, kernel_size=5, activation="gelu", se_reduction=4, input_norm=True, shortcut_pool="max"),
     dict(in_channels=10, out_channels=10, expand_ratio=2, kernel_size=1)),
    (dict(expand_ratio=1, kernel_size=5, stride=2, activation="silu"),
     dict(in_channels=16, out_channels=24, expand_ratio=1, kernel_size=5)),
]


@pytest.mark.parametrize("kwargs, config", MBCONV_CASES)
def test_inverted_residual_matches_extracted_and_by_hand(kwargs, config):
    block = randomize(ElasticInvertedResidual(16, 24, **kwargs)).set_active(**config)
    for norm in block.modules():
        if isinstance(norm, ElasticBatchNorm2d):
            with torch.no_grad():
                norm.running_mean.normal_()
                norm.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, config["in_channels"], 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(block.eval()(x), mbconv_by_hand(block, x, **config), **TOL)
    extracted = check_against_extracted(block, lambda: x.clone())
    assert isinstance(extracted, plain_hybrid.InvertedResidual)
    assert isinstance(extracted.conv_pw, nn.Identity) == (config["expand_ratio"] == 1)


def test_inverted_residual_parts():
    block = ElasticInvertedResidual(16, 24, 6, kernel_size=5, se_reduction=4, input_norm=True, shortcut_pool="max")
    assert {name for name, _ in block.named_children()} == {
        "bn_in", "conv_pw", "bn1", "act", "conv_dw", "bn2", "se", "conv_pwl", "bn3", "shortcut"}
    assert block.conv_dw.weight.shape == (96, 1, 5, 5) and block.se.conv_reduce.weight.shape == (24, 96, 1, 1)
    assert ElasticInvertedResidual(16, 16, 1).conv_pw is None, "no expand conv when no ratio above 1 is possible"


def test_inverted_residual_residual_follows_the_active_shape():
    block = randomize(ElasticInvertedResidual(16, 24, 6)).eval()
    x = torch.randn(1, 16, 5, 5)
    with torch.no_grad():
        block.bn3.weight.zero_()
        block.bn3.bias.zero_()  # the branch now outputs zeros
        assert torch.equal(block(x, out_channels=16), x), "a shape-keeping configuration adds its input"
        assert torch.count_nonzero(block(x)) == 0, "a shape change with no pooled shortcut adds nothing"


def test_inverted_residual_drop_path_drops_the_branch_in_training_only():
    block = randomize(ElasticInvertedResidual(8, 8, 4, drop_path=0.5)).train()
    x = torch.randn(64, 8, 3, 3)
    unchanged = (block(x) == x).flatten(1).all(dim=1)
    assert 10 < int(unchanged.sum()) < 54
    block.eval()
    torch.testing.assert_close(block(x), block.extract().eval()(x), **TOL)


def test_inverted_residual_state_dict_round_trip_with_plain_block():
    options = dict(kernel_size=5, stride=2, activation="hardswish", input_norm=True, shortcut_pool="max")
    elastic = ElasticInvertedResidual(8, 12, 3, se_reduction=4, **options)
    def make_plain():
        return plain_hybrid.InvertedResidual(8, 12, 3, se_channels=8, **options)
    assert set(elastic.state_dict()) == set(make_plain().state_dict())
    assert_state_dict_round_trip(elastic, make_plain, torch.randn(2, 8, 6, 6))


@pytest.mark.parametrize("kwargs, config, error, match", [
    (dict(), dict(kernel_size=2), ValueError, r"ElasticInvertedResidual: kernel_size=2 must be odd"),
    (dict(), dict(expand_ratio=7), ValueError, "expand_ratio=7 is outside 1..6"),
    (dict(), dict(in_channels=0), ValueError, "in_channels=0 is outside 1..16"),
    (dict(), dict(ratio=3), TypeError, r"unknown configuration key\(s\) \['ratio'\]"),
    (dict(shortcut_pool="mean"), None, ValueError, r"shortcut_pool must be one of \('none', 'max', 'avg'\)"),
    (dict(activation="tanh"), None, ValueError, "unknown activation 'tanh'"),
    (dict(shortcut_pool="avg", stride=3), None, ValueError, "stride must be 1 or 2"),
    (dict(drop_path=1.0), None, ValueError, r"drop_path must be in \[0, 1\)"),
])
def test_inverted_residual_bad_config_raises_clear_error(kwargs, config, error, match):
    with pytest.raises(error, match=match):
        block = ElasticInvertedResidual(16, 24, 6, kernel_size=5, **kwargs)
        block.set_active(**config)


# --- ElasticConvNormAct and ElasticClassifierHead --------------------------------------------------

@pytest.mark.parametrize("in_channels, out_channels", [(3, 8), (2, 5)])
def test_conv_norm_act_matches_extracted(in_channels, out_channels):
    layer = randomize(ElasticConvNormAct(3, 8, kernel_size=3, stride=2, activation="hardswish"))
    layer.set_active(in_channels=in_channels, out_channels=out_channels)
    extracted = check_against_extracted(layer, lambda: torch.randn(2, in_channels, 7, 7))
    assert isinstance(extracted, plain_hybrid.ConvNormAct) and extracted.conv.stride == (2, 2)
    assert isinstance(extracted.act, nn.Hardswish) and extracted.conv.bias is None
    assert_state_dict_round_trip(ElasticConvNormAct(3, 8, 3, 2), lambda: plain_hybrid.ConvNormAct(3, 8, 3, 2, "relu"),
                                 torch.randn(2, 3, 7, 7))


def head_by_hand(head: ElasticClassifierHead, x: torch.Tensor) -> torch.Tensor:
    """The head in eval mode from torch functions and hand-taken slices of the super weights."""
    act = {"gelu": F.gelu, "hardswish": F.hardswish}[head.activation]
    channels = x.shape[1]
    features = head.fixed_features or head.expansion * channels
    norm = head.bn
    h = F.batch_norm(F.conv2d(x, head.conv.weight[:features, :channels]), norm.running_mean[:features],
                     norm.running_var[:features], norm.weight[:features], norm.bias[:features], eps=norm.eps)
    h = act(h).mean((2, 3))
    if head.pre_logits is not None:
        h = act(F.linear(h, head.pre_logits.weight[:, :features], head.pre_logits.bias))
    return F.linear(h, head.classifier.weight[:, :h.shape[-1]], head.classifier.bias)


@pytest.mark.parametrize("kwargs, in_channels, features", [
    (dict(features=32), 12, 32),                                            # UniNet: a fixed width
    (dict(expansion=3, pre_logits=20, activation="hardswish"), 10, 30),    # ElasticViT: it follows the input
    (dict(expansion=2), 16, 32),
])
def test_classifier_head_matches_extracted_and_by_hand(kwargs, in_channels, features):
    head = randomize(ElasticClassifierHead(16, 7, **kwargs)).set_active(in_channels=in_channels)
    with torch.no_grad():
        head.bn.running_mean.normal_()
        head.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(3, in_channels, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(head.eval()(x), head_by_hand(head, x), **TOL)
    extracted = check_against_extracted(head, lambda: x.clone())
    assert isinstance(extracted, plain_hybrid.ClassifierHead) and extracted.conv.out_channels == features


def test_classifier_head_state_dict_round_trip_and_errors():
    assert_state_dict_round_trip(ElasticClassifierHead(8, 5, expansion=4, pre_logits=12),
                                 lambda: plain_hybrid.ClassifierHead(8, 32, 5, pre_logits=12), torch.randn(2, 8, 3, 3))
    with pytest.raises(ValueError, match="set one of features and expansion"):
        ElasticClassifierHead(8, 5, features=16, expansion=2)
    with pytest.raises(ValueError, match=r"expected \[batch, 6, height, width\] \(the active in_channels is 6\)"):
        ElasticClassifierHead(8, 5, features=16).set_active(in_channels=6)(torch.randn(2, 8, 3, 3))


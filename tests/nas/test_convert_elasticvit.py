"""ElasticViT's supernet into the hybrid supernet (nas.convert.from_elasticvit_state_dict, arch_from_elasticvit,
``python -m nas.convert --from elasticvit``).

ElasticViT's code is not in this repository (and needs timm), so its side is an independent implementation written
from microsoft/Moonlit ``ElasticViT/models`` (commit 348a402): its state dict as ``FusedSuperNet`` lays it out
(:func:`elasticvit_state_dict`: every ``MobileBlock`` sized by its output width and largest ratio, a shortcut conv in
each, the reduction block inside the first attention layer of a transformer stage, the relative position index
buffers, the head's ``pre_head_*`` and ``classifer``) and its forward in eval mode on that state dict and its own arch
tuple (:func:`elasticvit_forward`: ``set_arch``'s slicing, ``LNSuper``, the per-head q/k/v split, the v conv, the
relative position bias cut to the grid, the head on tokens). Everything in float64, on a small space of ElasticViT's
layout (SMALL).
"""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from nas.convert import arch_from_elasticvit, convert_elasticvit, from_elasticvit_state_dict
from nas.hybrid.space import HybridSpace

pytestmark = pytest.mark.usefixtures("one_thread")  # the small (float64, depthwise) convolutions

# ElasticViT's layout at a small size: the conv stem's blocks (ratio 1), a conv stage with squeeze-excite, a strided
# transformer stage and one that keeps the grid (its reduction block at stride 1). Head dim 8, classifier_mul 2.
SMALL = HybridSpace.from_dict({
    "name": "elasticvit-small", "style": "elasticvit", "resolutions": [20, 32], "head_expansion": 2,
    "pre_logits": 24, "head_dim": 8, "num_classes": 5, "norm": "sample", "qkv_layout": "per_head",
    "stages": [
        {"ops": ["conv"], "depths": [1, 2], "channels": [8, 16], "expansions": [1], "kernel_sizes": [3, 5]},
        {"ops": ["conv"], "depths": [1, 2], "channels": [16, 24], "expansions": [2, 3], "kernel_sizes": [3, 5],
         "stride": 2, "se": True},
        {"ops": ["attention"], "depths": [1, 2], "channels": [16, 32], "expansions": [2, 3], "v_scales": [2, 3],
         "dsms": ["mbconv"], "stride": 2},
        {"ops": ["attention"], "depths": [1, 2], "channels": [32, 48], "expansions": [2, 3], "v_scales": [1, 2],
         "dsms": ["mbconv"], "stride": 1},
    ]})
CONV_STAGES, HEAD_DIM, MUL = 2, 8, 2
KERNELS = (3, 5)  # MobileBlock's kr_size; its reduction block's is (3,)
RATIO = 6  # the reduction block's

# ElasticViT's arch tuples: (res, channels, depths, conv_ratio, kr_size, mlp_ratio, num_heads, window_size, qk_scale,
# v_scale), built by subnet() from per-stage values.


def subnet(res, channels, depths, conv, kernels, mlp, v):
    """ElasticViT's arch tuple from per-stage values (conv ratio and kernel per conv stage, the stem's ratio 1; MLP
    ratio and v scale per transformer stage), repeated per layer as its set_arch takes them."""
    conv_depths, attention_depths = depths[:CONV_STAGES], depths[CONV_STAGES:]
    per_conv = lambda values: [x for x, d in zip(values, conv_depths) for _ in range(d)]  # noqa: E731
    per_attention = lambda values: [x for x, d in zip(values, attention_depths) for _ in range(d)]  # noqa: E731
    heads = [c // HEAD_DIM for c in channels[CONV_STAGES:]]
    return (res, channels, depths, per_conv([1] + conv), per_conv(kernels), per_attention(mlp), per_attention(heads),
            per_attention([1, 1]), per_attention([1, 1]), per_attention(v))


SUBNETS = [
    subnet(32, [16, 24, 32, 48], [2, 2, 2, 2], [3], [5, 5], [3, 3], [3, 2]),  # the largest
    subnet(20, [8, 16, 16, 32], [1, 1, 1, 1], [2], [3, 3], [2, 2], [2, 1]),  # the smallest (odd grids: 5, then 3)
    subnet(32, [8, 16, 16, 48], [2, 1, 2, 1], [3], [3, 5], [3, 2], [3, 1]),  # fewer heads, a wider stage after
    subnet(20, [16, 16, 32, 32], [1, 2, 1, 2], [2], [5, 3], [2, 3], [2, 2]),  # the stride-1 reduction keeps the width
]


def mobile_block(prefix, out, inner, kernel, se, stem=False):
    """A MobileBlock's tensors (names under ``prefix``) at its largest output width ``out``, ``inner`` hidden units
    and largest kernel; with ``stem``, ratio 1 (no expand conv)."""
    shapes = {} if stem else {"pw_conv.weight": (inner, out, 1, 1), **bn("pw_bn", inner)}
    shapes.update({"dw_conv.weight": (inner, 1, kernel, kernel), **bn("dw_bn", inner)})
    if se:
        shapes.update({"se_conv1.weight": (inner // 4, inner, 1, 1), "se_conv1.bias": (inner // 4,),
                       "se_conv2.weight": (inner, inner // 4, 1, 1), "se_conv2.bias": (inner,)})
    shapes.update({"pwl_conv.weight": (out, inner, 1, 1), **bn("pwl_bn", out),
                   "shortcut_conv.weight": (out, out, 1, 1)})
    return {f"{prefix}.{name}": shape for name, shape in shapes.items()}


def bn(name, width):
    return {f"{name}.{p}": (width,) for p in ("weight", "bias", "running_mean", "running_var")} | {
        f"{name}.num_batches_tracked": ()}


def offsets(side, largest):
    """ElasticViT's relative position index of a ``side x side`` grid in a table for grids up to ``largest``: the pair
    of tokens (i1, j1), (i2, j2) reads row (i1 - i2 + largest - 1) * (2 * largest - 1) + j1 - j2 + largest - 1."""
    index = torch.empty(side * side, side * side, dtype=torch.long)
    for a in range(side * side):
        for b in range(side * side):
            dy, dx = a // side - b // side, a % side - b % side
            index[a, b] = (dy + largest - 1) * (2 * largest - 1) + dx + largest - 1
    return index


def largest_grids(space):
    """The grid side of each transformer stage at the largest resolution (ElasticViT's max(self.res))."""
    side, sides = space.img_size // 2, []
    for stage in space.stages[1:]:
        side = math.ceil(side / stage.stride)
        sides.append(side)
    return sides[CONV_STAGES - 1:]


def elasticvit_state_dict(space=SMALL, seed=0):
    """Random tensors with FusedSuperNet's names and shapes for ``space`` (SMALL's layout, other image sizes and
    classes), BatchNorm statistics included."""
    widths = [s.channels[-1] for s in space.stages]
    stem = widths[0]
    shapes = {"first_conv.weight": (stem, space.in_chans, 3, 3), **bn("first_conv_bn", stem)}
    for j in range(2):
        shapes.update(mobile_block(f"conv_stem.layers.{j}.0", stem, stem, 5, se=False, stem=True))
    for j in range(2):
        shapes.update(mobile_block(f"feature_exactor.0.layers.{j}.0", widths[1], widths[1] * 3, 5, se=True))
    for k, (stage, side) in enumerate(zip(space.stages[CONV_STAGES:], largest_grids(space))):
        prefix, width = f"feature_exactor.{k + 1}.layers", stage.channels[-1]
        v_width = width * stage.v_scales[-1]
        for j in range(2):
            attention, ffn = f"{prefix}.{2 * j}", f"{prefix}.{2 * j + 1}"
            shapes.update({f"{attention}.norm1.weight": (width,), f"{attention}.norm1.bias": (width,),
                           f"{attention}.qkv.weight": (2 * width + v_width, width),
                           f"{attention}.proj.weight": (width, v_width), f"{attention}.proj.bias": (width,),
                           f"{attention}.dw_v_conv.weight": (v_width, 1, 3, 3),
                           f"{attention}.attention_bias": ((2 * side - 1) ** 2, width // HEAD_DIM),
                           f"{ffn}.norm1.weight": (width,), f"{ffn}.norm1.bias": (width,),
                           f"{ffn}.fc1.weight": (3 * width, width), f"{ffn}.fc1.bias": (3 * width,),
                           f"{ffn}.fc2.weight": (width, 3 * width), f"{ffn}.fc2.bias": (width,)})
            if j == 0:
                shapes.update(mobile_block(f"{attention}.reduction", width, width * RATIO, 3, se=True))
    last = widths[-1]
    pre_logits, classes = space.pre_logits, space.num_classes
    shapes.update({"pre_head_0.weight": (last * MUL, last), "pre_head_0.bias": (last * MUL,),
                   **bn("pre_head_norm_0", last * MUL), "pre_head_1.weight": (pre_logits, last * MUL),
                   "pre_head_1.bias": (pre_logits,), "classifer.weight": (classes, pre_logits),
                   "classifer.bias": (classes,)})
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(7)
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=generator, dtype=torch.float64) + 0.5
        else:
            scale = 0.3 if len(shape) >= 2 else 0.2
            state[name] = torch.randn(shape, generator=generator, dtype=torch.float64) * scale + (
                1.0 if name.endswith("weight") and len(shape) == 1 else 0.0)
    for k, side in enumerate(largest_grids(space)):
        for j in range(2):
            state[f"feature_exactor.{k + 1}.layers.{2 * j}.relative_position_index"] = offsets(side, side)
    return state


# -- ElasticViT's forward, eval mode, on its state dict and arch tuple --------------------------------------------

def batch_norm(sd, name, x, width):
    return F.batch_norm(x, sd[f"{name}.running_mean"][:width], sd[f"{name}.running_var"][:width],
                        sd[f"{name}.weight"][:width], sd[f"{name}.bias"][:width], False, 0.0, 1e-5)


def mobile_forward(sd, p, x, out, ratio, kernel, stride, se):
    """MobileBlock.forward: hidden units in_channels * ratio; a 3x3 kernel is the centre of a 5x5 one."""
    cin = x.shape[1]
    inner = cin * ratio
    h = x
    if f"{p}.pw_conv.weight" in sd:
        h = F.hardswish(batch_norm(sd, f"{p}.pw_bn", F.conv2d(h, sd[f"{p}.pw_conv.weight"][:inner, :cin]), inner))
    weight = sd[f"{p}.dw_conv.weight"][:inner]
    if weight.shape[-1] > kernel:
        weight = weight[..., 1:4, 1:4]
    h = F.hardswish(batch_norm(sd, f"{p}.dw_bn", F.conv2d(h, weight, None, stride, kernel // 2, groups=inner), inner))
    if se:
        squeezed = F.relu(F.conv2d(h.mean((2, 3), keepdim=True), sd[f"{p}.se_conv1.weight"][:inner // 4, :inner],
                                   sd[f"{p}.se_conv1.bias"][:inner // 4]))
        h = h * F.hardsigmoid(F.conv2d(squeezed, sd[f"{p}.se_conv2.weight"][:inner, :inner // 4],
                                       sd[f"{p}.se_conv2.bias"][:inner]))
    h = batch_norm(sd, f"{p}.pwl_bn", F.conv2d(h, sd[f"{p}.pwl_conv.weight"][:out, :inner]), out)
    if cin == out and stride == 1:
        return h + x
    residual = x
    if stride > 1:
        residual = F.avg_pool2d(residual, stride, padding=0 if residual.shape[-1] % 2 == 0 else 1)
    if cin != out:
        residual = F.conv2d(residual, sd[f"{p}.shortcut_conv.weight"][:out, :cin])
    return h + residual


def sample_norm(sd, name, x):
    """LNSuper: each sample over its tokens and channels, then the per-channel affine."""
    shape = x.shape[1:]
    return F.layer_norm(x, shape, sd[f"{name}.weight"][:x.shape[-1]].expand(shape),
                        sd[f"{name}.bias"][:x.shape[-1]].expand(shape))


def attention_forward(sd, p, x, heads, v_scale, largest):
    """SuperAttention._attention (pre-norm, qk scale 1): q, k, v rows from their blocks, viewed per head."""
    batch, tokens, width = x.shape
    super_width = sd[f"{p}.norm1.weight"].shape[0]
    side, qk, vd = math.isqrt(tokens), HEAD_DIM, HEAD_DIM * v_scale
    weight = sd[f"{p}.qkv.weight"]
    rows = torch.cat([weight[:heads * qk, :width], weight[super_width:super_width + heads * qk, :width],
                      weight[2 * super_width:2 * super_width + heads * vd, :width]])
    q, k, v = (sample_norm(sd, f"{p}.norm1", x) @ rows.T).view(batch, tokens, heads, -1).split([qk, qk, vd], dim=3)
    v = v.reshape(batch, tokens, heads * vd).transpose(1, 2).reshape(batch, heads * vd, side, side)
    v = F.conv2d(v, sd[f"{p}.dw_v_conv.weight"][:heads * vd], padding=1, groups=heads * vd)
    v = v.flatten(2).transpose(1, 2).view(batch, tokens, heads, vd)
    logits = q.permute(0, 2, 1, 3) @ k.permute(0, 2, 3, 1) * qk ** -0.5
    logits = logits + sd[f"{p}.attention_bias"][offsets(side, largest)][..., :heads].permute(2, 0, 1)
    out = (logits.softmax(-1) @ v.permute(0, 2, 1, 3)).transpose(1, 2).reshape(batch, tokens, heads * vd)
    return x + F.linear(F.hardswish(out), sd[f"{p}.proj.weight"][:width, :heads * vd], sd[f"{p}.proj.bias"][:width])


def ffn_forward(sd, p, x, ratio):
    width = x.shape[-1]
    h = F.linear(sample_norm(sd, f"{p}.norm1", x), sd[f"{p}.fc1.weight"][:ratio * width, :width],
                 sd[f"{p}.fc1.bias"][:ratio * width])
    return x + F.linear(F.hardswish(h), sd[f"{p}.fc2.weight"][:width, :ratio * width], sd[f"{p}.fc2.bias"][:width])


def elasticvit_forward(sd, images, arch, space=SMALL):
    res, channels, depths, conv_ratio, kr_size, mlp_ratio, num_heads, _, _, v_scale = arch
    x = images if images.shape[-1] == res else F.interpolate(images, size=res, mode="bicubic")
    x = F.hardswish(batch_norm(sd, "first_conv_bn", F.conv2d(x, sd["first_conv.weight"][:channels[0]], None, 2, 1),
                               channels[0]))
    conv_layer, attention_layer = 0, 0
    for stage, (width, depth) in enumerate(zip(channels, depths)):
        prefix = "conv_stem" if stage == 0 else f"feature_exactor.{stage - 1}"
        if stage < CONV_STAGES:
            for j in range(depth):
                stride = space.stages[stage].stride if j == 0 else 1
                x = mobile_forward(sd, f"{prefix}.layers.{j}.0", x, width, conv_ratio[conv_layer], kr_size[conv_layer],
                                   stride, se=space.stages[stage].se)
                conv_layer += 1
            continue
        largest = largest_grids(space)[stage - CONV_STAGES]
        x = x if x.dim() == 4 else x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *[math.isqrt(x.shape[1])] * 2)
        x = mobile_forward(sd, f"{prefix}.layers.0.reduction", x, width, RATIO, 3, space.stages[stage].stride, se=True)
        x = x.flatten(2).transpose(1, 2)
        for j in range(depth):
            x = attention_forward(sd, f"{prefix}.layers.{2 * j}", x, num_heads[attention_layer],
                                  v_scale[attention_layer], largest)
            x = ffn_forward(sd, f"{prefix}.layers.{2 * j + 1}", x, mlp_ratio[attention_layer])
            attention_layer += 1
    width = x.shape[-1]
    h = F.linear(x, sd["pre_head_0.weight"][:width * MUL, :width], sd["pre_head_0.bias"][:width * MUL])
    h = F.hardswish(batch_norm(sd, "pre_head_norm_0", h.flatten(0, 1), width * MUL).reshape_as(h)).mean(1)
    h = F.hardswish(F.linear(h, sd["pre_head_1.weight"][:, :width * MUL], sd["pre_head_1.bias"]))
    return F.linear(h, sd["classifer.weight"], sd["classifer.bias"])


# -- the tests -------------------------------------------------------------------------------------------------------

def test_every_subnet_of_a_converted_elasticvit_supernet_gives_its_logits():
    state = elasticvit_state_dict()
    conversion = convert_elasticvit(state, SMALL)
    supernet = conversion.supernet.eval()
    assert next(supernet.parameters()).dtype == torch.float64
    # Every source tensor has a fate: mapped, the head's bias folded, and what ElasticViT's own code never reads (the
    # shortcut convs of blocks that keep their shape) or derives (its relative position indexes) redundant.
    assert conversion.unused == [] and conversion.folded == {"pre_head_0.bias": "head.bn.running_mean"}
    assert sorted(conversion.redundant) == sorted(
        [f"{p}.layers.1.0.shortcut_conv.weight" for p in ("conv_stem", "feature_exactor.0")]
        + [f"feature_exactor.{k}.layers.{j}.relative_position_index" for k in (1, 2) for j in (0, 2)])
    assert set(conversion.mapped) | set(conversion.folded) | set(conversion.redundant) == set(state)
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for config in SUBNETS:
            arch = arch_from_elasticvit(config, SMALL)
            expected = elasticvit_forward(state, images, config)
            torch.testing.assert_close(supernet(images, arch), expected, rtol=1e-9, atol=1e-10)
    assert arch_from_elasticvit(SUBNETS[0], SMALL) == SMALL.max_arch()
    fields = ("res", "channels", "depths", "conv_ratio", "kr_size", "mlp_ratio", "num_heads", "window_size",
              "qk_scale", "v_scale")  # the names of set_arch's parameters
    assert arch_from_elasticvit(dict(zip(fields, SUBNETS[0])), SMALL) == SMALL.max_arch()
    assert arch_from_elasticvit(SUBNETS[1], SMALL) == SMALL.min_arch()


def test_elasticvit_weights_and_configs_that_do_not_fit_are_refused_in_one_line():
    state = elasticvit_state_dict()
    with pytest.raises(ValueError, match=r"unexpected: \['feature_exactor.1.layers.0.norm2.weight'\]"):
        from_elasticvit_state_dict({**state, "feature_exactor.1.layers.0.norm2.weight": torch.ones(32)}, SMALL)
    index = "feature_exactor.1.layers.0.relative_position_index"
    with pytest.raises(ValueError, match="is not ElasticViT's relative position index"):
        from_elasticvit_state_dict({**state, index: state[index].flip(0)}, SMALL)
    with pytest.raises(ValueError, match="shape mismatch"):
        from_elasticvit_state_dict(state)  # the weights of SMALL are not those of the elasticvit-mobile preset
    res, channels, depths, conv_ratio, kr_size, mlp_ratio, num_heads, window, qk_scale, v_scale = SUBNETS[0]
    refusals = [
        ((res, channels, depths, [1, 1, 3, 2], kr_size, mlp_ratio, num_heads, window, qk_scale, v_scale),
         r"conv_ratio differs between the layers of one stage \(\[3, 2\]\)"),
        ((res, channels, depths, conv_ratio, kr_size, mlp_ratio, [2, 2, 6, 6], window, qk_scale, v_scale),
         r"num_heads \[2, 6\] per transformer stage, but ElasticViT's heads are channels // head_dim, \[4, 6\]"),
        ((res, channels, depths, conv_ratio, kr_size, mlp_ratio, num_heads, window, [0.5] * 4, v_scale),
         "qk_scale other than 1"),
        ((24, channels, depths, conv_ratio, kr_size, mlp_ratio, num_heads, window, qk_scale, v_scale),
         "arch.resolution=24 not in"),
        (SUBNETS[0][:9], "expected ElasticViT's arch tuple"),
        ({"res": 32}, "expected ElasticViT's arch tuple"),
    ]
    for config, message in refusals:
        with pytest.raises(ValueError, match=message):
            arch_from_elasticvit(config, SMALL)


def test_the_command_line_converts_elasticvit_weights_for_search_and_export(tmp_path, capsys):
    """Convert an ElasticViT checkpoint of SMALL's layout on the digits (8 px, one channel, ten classes), search it (its
    BatchNorm statistics re-estimated per subnet on training images, as ElasticViT's search does) and export a subnet,
    which computes ElasticViT's logits."""
    from nas.checkpoint import load_supernet
    from nas.convert.__main__ import main as convert_main
    from nas.export import load_subnet
    from nas.export.__main__ import main as export_main
    from nas.search import main as search_main

    digits = dataclasses.replace(SMALL, name="elasticvit-digits", in_chans=1, resolutions=(8,), num_classes=10)
    state = elasticvit_state_dict(digits, seed=2)
    weights, space_file, out = tmp_path / "elasticvit.pth.tar", tmp_path / "space.yaml", tmp_path / "converted"
    # ElasticViT's checkpoint: the state dict beside its epoch, bank of archs and losses, and arch name
    torch.save({"epoch": 3, "state_dict": state, "bank": [[[list(SUBNETS[1]), -2.3]]], "arch": "elasticvit"},
               weights)
    space_file.write_text(digits.to_yaml())
    assert convert_main(["--from", "elasticvit", "--weights", str(weights), "--space", str(space_file),
                         "--out-dir", str(out)]) == 0
    assert "1 folded, 6 redundant, 0 unused" in capsys.readouterr().out
    report = json.loads((out / "conversion.json").read_text())
    assert report["unused"] == [] and len(report["redundant"]) == 6 and report["from"] == "elasticvit"
    supernet, space, _ = load_supernet(out / "checkpoint.pt")
    assert space.qkv_layout == "per_head" and space.norm == "sample"
    assert search_main(["--checkpoint", str(out / "checkpoint.pt"), "--dataset", "digits", "--search-on", "test",
                        "--out-dir", str(tmp_path / "search"), "--generations", "1", "--population", "4", "--parents",
                        "2", "--mutations", "2", "--crossovers", "2", "--test-images", "16", "--no-progress",
                        "--set", "bn_calibration_images=32"]) == 0
    assert json.loads((tmp_path / "search" / "search.json").read_text())["candidates"]
    config = (8,) + SUBNETS[2][1:]
    arch = arch_from_elasticvit(config, space)
    (tmp_path / "arch.json").write_text(arch.to_json())
    assert export_main(["--checkpoint", str(out / "checkpoint.pt"), "--arch", str(tmp_path / "arch.json"),
                        "--format", "pytorch", "--out-dir", str(tmp_path / "export")]) == 0
    exported, exported_arch = load_subnet(tmp_path / "export" / "subnet.pt")
    # The checkpoint's supernet is float32, as every checkpoint's: ElasticViT's logits to float32 rounding.
    images = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    expected = elasticvit_forward(state, images, config, digits).float()
    with torch.no_grad():
        got = supernet.eval()(images.float(), arch)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-5)
        torch.testing.assert_close(exported(images.float()), got, rtol=1e-5, atol=1e-6)
    assert exported_arch == arch
    capsys.readouterr()
    assert convert_main(["--from", "elasticvit", "--weights", str(weights), "--space", "vitas-cifar",
                         "--out-dir", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ElasticViT's supernet is a hybrid space of the elasticvit style" in err

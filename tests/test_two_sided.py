"""Two-sided width sharing (BCNet, ViTAS): a width read from the trailing channels of the super weights, in every
backend, forward and backward, against plain torch built by hand from the trailing slices. NaN fills everything
outside the active slices, and gradients must land in place: inside the slice they add to what ``.grad`` held,
outside it ``.grad`` stays bit for bit as it was."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from layer_checks import TOL, assert_close_to_scale, randomize

import elastic_ops
from elastic_ops.conv import ElasticBatchNorm2d
from elastic_ops.nn import ElasticAttention, ElasticBlock, ElasticLayerNorm, ElasticLinear, ElasticMlp, ElasticModule

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_TOL = dict(atol=1e-4, rtol=1e-4) if torch.cuda.is_available() else TOL


def backends() -> list[str]:
    names = ["reference"]
    available = elastic_ops.backends()
    names += [name for name in ("triton", "native") if available[name].available]
    return names


def span(size: int, maximum: int, side: str) -> slice:
    return slice(0, size) if side == "left" else slice(maximum - size, maximum)


def poison_and_seed(params: dict[str, tuple[torch.nn.Parameter, tuple]]) -> dict[str, torch.Tensor]:
    """NaN outside each parameter's active region, a random existing gradient; returns copies of those gradients."""
    before = {}
    with torch.no_grad():
        for name, (param, region) in params.items():
            kept = param[region].clone()
            param.fill_(float("nan"))
            param[region] = kept
            param.grad = torch.randn_like(param)
            before[name] = param.grad.clone()
    return before


def run(layer, x: torch.Tensor, backend: str, dy: torch.Tensor | None):
    """The layer's output on ``backend`` and, except on the forward-only native kernels, its backward with ``dy``."""
    with elastic_ops.use_backend(backend):
        if backend == "native":
            with torch.no_grad():
                return layer(x), False
        y = layer(x)
        y.backward(dy)
        return y.detach(), True


def check_grads(params, before, oracle_grads: dict[str, torch.Tensor], tol: dict) -> None:
    for name, (param, region) in params.items():
        inside = torch.zeros_like(param, dtype=torch.bool)
        inside[region] = True
        assert torch.equal(param.grad[~inside], before[name][~inside]), f"{name}: gradient outside the slice changed"
        torch.testing.assert_close(param.grad[region], before[name][region] + oracle_grads[name], **tol,
                                   msg=lambda m, name=name: f"{name}: {m}")


SIDE_PAIRS = [("right", "right"), ("right", "left"), ("left", "right")]


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("out_side, in_side", SIDE_PAIRS)
def test_linear_reads_and_writes_the_trailing_block(backend, out_side, in_side):
    torch.manual_seed(0)
    layer = randomize(ElasticLinear(29, 23)).to(DEVICE).set_active(in_features=17, out_features=11)
    layer.set_side(out_features=out_side, in_features=in_side)
    rows, cols = span(11, 23, out_side), span(17, 29, in_side)
    plain = torch.nn.Linear(17, 11).to(DEVICE)
    with torch.no_grad():
        plain.weight.copy_(layer.weight[rows, cols])
        plain.bias.copy_(layer.bias[rows])
    params = {"weight": (layer.weight, (rows, cols)), "bias": (layer.bias, (rows,))}
    before = poison_and_seed(params)
    x = torch.randn(3, 7, 17, device=DEVICE, requires_grad=True)
    dy = torch.randn(3, 7, 11, device=DEVICE)
    y, backward = run(layer, x, backend, dy)
    x_plain = x.detach().clone().requires_grad_(True)
    y_plain = plain(x_plain)
    tol = TRITON_TOL if backend == "triton" else TOL
    torch.testing.assert_close(y, y_plain.detach(), **tol)
    if backward:
        y_plain.backward(dy)
        torch.testing.assert_close(x.grad, x_plain.grad, **tol)
        check_grads(params, before, {"weight": plain.weight.grad, "bias": plain.bias.grad}, tol)
    torch.testing.assert_close(layer.extract()(x.detach()), y_plain.detach(), **TOL)


@pytest.mark.parametrize("backend", backends())
def test_layer_norm_reads_and_writes_the_trailing_channels(backend):
    torch.manual_seed(1)
    layer = randomize(ElasticLayerNorm(37)).to(DEVICE).set_active(dim=19).set_side("right")
    region = (slice(18, 37),)
    weight, bias = layer.weight[region].detach().clone(), layer.bias[region].detach().clone()
    params = {"weight": (layer.weight, region), "bias": (layer.bias, region)}
    before = poison_and_seed(params)
    x = torch.randn(2, 13, 19, device=DEVICE, requires_grad=True)
    dy = torch.randn(2, 13, 19, device=DEVICE)
    y, backward = run(layer, x, backend, dy)
    leaves = [t.clone().requires_grad_(True) for t in (x.detach(), weight, bias)]
    y_plain = F.layer_norm(leaves[0], (19,), leaves[1], leaves[2], layer.eps)
    tol = TRITON_TOL if backend == "triton" else TOL
    torch.testing.assert_close(y, y_plain.detach(), **tol)
    if backward:
        y_plain.backward(dy)
        torch.testing.assert_close(x.grad, leaves[0].grad, **tol)
        check_grads(params, before, {"weight": leaves[1].grad, "bias": leaves[2].grad}, tol)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("embed_side, hidden_side", SIDE_PAIRS)
def test_mlp_reads_and_writes_the_trailing_blocks(backend, embed_side, hidden_side):
    torch.manual_seed(2)
    layer = randomize(ElasticMlp(31, 53)).to(DEVICE).set_active(embed_dim=20, hidden_features=37)
    layer.set_side(embed_dim=embed_side, hidden_features=hidden_side)
    e, h = span(20, 31, embed_side), span(37, 53, hidden_side)
    regions = {"fc1.weight": (h, e), "fc1.bias": (h,), "fc2.weight": (e, h), "fc2.bias": (e,)}
    tensors = dict(layer.named_parameters())
    leaves = {name: tensors[name][region].detach().clone().requires_grad_(True) for name, region in regions.items()}
    params = {name: (tensors[name], region) for name, region in regions.items()}
    before = poison_and_seed(params)
    x = torch.randn(2, 9, 20, device=DEVICE, requires_grad=True)
    dy = torch.randn(2, 9, 20, device=DEVICE)
    y, backward = run(layer, x, backend, dy)
    x_plain = x.detach().clone().requires_grad_(True)
    hidden = F.gelu(F.linear(x_plain, leaves["fc1.weight"], leaves["fc1.bias"]))
    y_plain = F.linear(hidden, leaves["fc2.weight"], leaves["fc2.bias"])
    tol = TRITON_TOL if backend == "triton" else TOL
    torch.testing.assert_close(y, y_plain.detach(), **tol)
    if backward:
        y_plain.backward(dy)
        assert_close_to_scale(x.grad, x_plain.grad)
        check_grads(params, before, {name: leaf.grad for name, leaf in leaves.items()}, tol)
    torch.testing.assert_close(layer.extract()(x.detach()), y_plain.detach(), **TOL)


def plain_attention(x, qkv_w, qkv_b, proj_w, proj_b, heads, head_dim):
    """timm's attention on a plain ``[3 * h * Dh, e]`` qkv weight (q rows, k rows, v rows)."""
    batch, tokens, _ = x.shape
    q, k, v = F.linear(x, qkv_w, qkv_b).view(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    context = ((q @ k.transpose(-2, -1)) * head_dim ** -0.5).softmax(-1) @ v
    return F.linear(context.transpose(1, 2).reshape(batch, tokens, heads * head_dim), proj_w, proj_b)


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("embed_side, heads_side", SIDE_PAIRS)
def test_attention_reads_and_writes_the_trailing_heads_and_channels(backend, embed_side, heads_side):
    torch.manual_seed(3)
    head_dim, max_heads, heads = 16, 4, 2
    layer = randomize(ElasticAttention(40, max_heads, head_dim)).to(DEVICE).set_active(embed_dim=27, num_heads=heads)
    layer.set_side(embed_dim=embed_side, num_heads=heads_side)
    e = span(27, 40, embed_side)
    first = (max_heads - heads) * head_dim if heads_side == "right" else 0
    max_width, width = max_heads * head_dim, heads * head_dim
    qkv_rows = torch.cat([torch.arange(j * max_width + first, j * max_width + first + width) for j in range(3)])
    heads_span = slice(first, first + width)
    with torch.no_grad():
        leaves = {"qkv.weight": layer.qkv.weight[qkv_rows][:, e], "qkv.bias": layer.qkv.bias[qkv_rows],
                  "proj.weight": layer.proj.weight[e, heads_span], "proj.bias": layer.proj.bias[e]}
    leaves = {name: t.detach().clone().requires_grad_(True) for name, t in leaves.items()}
    x = torch.randn(2, 11, 27, device=DEVICE, requires_grad=True)
    dy = torch.randn(2, 11, 27, device=DEVICE)
    # NaN outside: between the row blocks of qkv too.
    inactive_rows = torch.ones(3 * max_width, dtype=torch.bool)
    inactive_rows[qkv_rows] = False
    qkv_region = torch.zeros(3 * max_width, 40, dtype=torch.bool)
    qkv_region[qkv_rows, e] = True
    params = {"proj.weight": (layer.proj.weight, (e, heads_span)), "proj.bias": (layer.proj.bias, (e,))}
    before = poison_and_seed(params)
    with torch.no_grad():
        layer.qkv.weight[~qkv_region.to(DEVICE)] = float("nan")
        layer.qkv.bias[inactive_rows.to(DEVICE)] = float("nan")
        layer.qkv.weight.grad = torch.randn_like(layer.qkv.weight)
        layer.qkv.bias.grad = torch.randn_like(layer.qkv.bias)
    qkv_before = layer.qkv.weight.grad.clone(), layer.qkv.bias.grad.clone()
    y, backward = run(layer, x, backend, dy)
    x_plain = x.detach().clone().requires_grad_(True)
    y_plain = plain_attention(x_plain, *leaves.values(), heads, head_dim)
    tol = TRITON_TOL if backend == "triton" else TOL
    torch.testing.assert_close(y, y_plain.detach(), **tol)
    if backward:
        y_plain.backward(dy)
        assert_close_to_scale(x.grad, x_plain.grad)
        check_grads(params, before, {"proj.weight": leaves["proj.weight"].grad, "proj.bias": leaves["proj.bias"].grad},
                    tol)
        region = qkv_region.to(DEVICE)
        grad = layer.qkv.weight.grad
        assert torch.equal(grad[~region], qkv_before[0][~region]), "qkv gradient outside the active rows changed"
        assert_close_to_scale(grad[qkv_rows][:, e], qkv_before[0][qkv_rows][:, e] + leaves["qkv.weight"].grad)
        assert torch.equal(layer.qkv.bias.grad[inactive_rows], qkv_before[1][inactive_rows])
        assert_close_to_scale(layer.qkv.bias.grad[qkv_rows], qkv_before[1][qkv_rows] + leaves["qkv.bias"].grad)
    torch.testing.assert_close(layer.extract()(x.detach()), y_plain.detach(), **TOL)


@pytest.mark.parametrize("heads", [2, 4])
def test_private_qk_attention_on_the_right_side_matches_extracted(heads):
    torch.manual_seed(4)
    layer = randomize(ElasticAttention(40, 4, 16, private_qk_heads=(2,))).set_active(embed_dim=23, num_heads=heads)
    layer.set_side("right")
    x = torch.randn(2, 9, 23)
    with elastic_ops.use_backend("reference"):
        torch.testing.assert_close(layer.extract()(x), layer(x), **TOL)


def test_block_sides_reach_every_child_and_extract_matches():
    torch.manual_seed(5)
    block = randomize(ElasticBlock(40, 4, 96, head_dim=16, layer_scale=0.5))
    block.set_active(embed_dim=24, num_heads=3, hidden_features=50).set_side("right", hidden_features="left")
    assert block.mlp.fc1.sides == {"in_features": "right", "out_features": "left"}
    assert block.attn.proj.sides == {"in_features": "right", "out_features": "right"}
    assert block.norm2.sides == {"dim": "right"} and block.ls1.sides == {"dim": "right"}
    x = torch.randn(2, 7, 24)
    with elastic_ops.use_backend("reference"):
        torch.testing.assert_close(block.extract()(x), block(x), **TOL)
    right = block.extract()
    block.set_side("left")
    assert not torch.allclose(block.extract()(x), right(x)), "left and right extracted the same weights"


def test_bad_sides_and_grouped_passes_raise_clear_errors():
    layer = ElasticLinear(8, 8)
    with pytest.raises(ValueError, match="must be one of"):
        layer.set_side("middle")
    with pytest.raises(TypeError, match="unknown width"):
        layer.set_side(embed_dim="right")
    norm = ElasticLayerNorm(8).set_side("right")
    with pytest.raises(ValueError, match="leading channels only"):
        norm.grouped_forward(torch.zeros(1, 2, 8), elastic_ops.GroupSizes([8], "cpu"))
    assert ElasticModule.sides == {}, "set_side mutated the class default"
    with pytest.raises(TypeError, match="leading channels only"):
        ElasticBatchNorm2d(8).set_side("right")

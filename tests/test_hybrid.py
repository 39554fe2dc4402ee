"""Elastic hybrid layers (``elastic_ops.hybrid``): UniNet's MLP operator, attention block and downsampling modules, and
ElasticViT's V-scale attention, each against its extracted plain module and against the published structure written
out by hand in torch, with NaN outside the active slices, gradients only in them, full-width state_dict round trips,
TorchScript of the extracted modules, and clear errors on bad configurations."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from layer_checks import (
    TOL,
    assert_grad_in,
    assert_state_dict_round_trip,
    check_against_extracted,
    keep_only,
    randomize,
)

import elastic_ops
from elastic_ops import (
    ElasticBlock,
    ElasticGlobalDSM,
    ElasticLocalDSM,
    ElasticLocalGlobalDSM,
    ElasticMixerBlock,
    ElasticPositionalAttentionBlock,
    ElasticSampleLayerNorm,
    ElasticVScaleAttention,
    ElasticVScaleBlock,
    GroupSizes,
    plain_hybrid,
    to_grid,
    to_tokens,
)


@pytest.fixture(autouse=True)
def reference_backend():
    """Layers are checked on the reference (the ops have their own tests), seeded so that a failure reproduces."""
    torch.manual_seed(0)
    with elastic_ops.use_backend("reference"):
        yield


def layer_norm(x: torch.Tensor, norm) -> torch.Tensor:
    width = x.shape[-1]
    return F.layer_norm(x, (width,), norm.weight[:width], norm.bias[:width], norm.eps)


def row_blocks(blocks: list[tuple[int, int]], in_features: int) -> tuple[torch.Tensor, slice]:
    """The region (rows, columns) of a stacked projection's active row blocks ``(start, rows)``."""
    rows = torch.cat([torch.arange(start, start + count) for start, count in blocks])
    return rows, slice(0, in_features)


def heads_attention(q, k, v, heads: int, bias=None) -> torch.Tensor:
    """Softmax attention per head, written out: ``[B, N, h * d]`` inputs, ``[B, N_q, h * d_v]`` output."""
    def split(t):
        return t.unflatten(-1, (heads, -1)).transpose(1, 2)
    q, k, v = split(q), split(k), split(v)
    logits = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + bias
    return (logits.softmax(-1) @ v).transpose(1, 2).flatten(2)


# --- ElasticMixerBlock -----------------------------------------------------------------------------

def mixer_by_hand(layer: ElasticMixerBlock, x: torch.Tensor, hidden_features: int, grid_size: int) -> torch.Tensor:
    """MLP-Mixer's block; the token MLP's weights of grid position (y, x) are those of (y, x) on the largest grid."""
    embed_dim, side = x.shape[-1], layer.max_grid
    positions = [row * side + col for row in range(grid_size) for col in range(grid_size)]
    fc1, fc2 = layer.mlp_tokens.fc1, layer.mlp_tokens.fc2
    mixed = F.linear(F.gelu(F.linear(layer_norm(x, layer.norm1).transpose(1, 2), fc1.weight[:, positions], fc1.bias)),
                     fc2.weight[positions], fc2.bias[positions])
    x = x + mixed.transpose(1, 2)
    mlp = layer.mlp_channels
    h = F.gelu(F.linear(layer_norm(x, layer.norm2), mlp.fc1.weight[:hidden_features, :embed_dim],
                        mlp.fc1.bias[:hidden_features]))
    return x + F.linear(h, mlp.fc2.weight[:embed_dim, :hidden_features], mlp.fc2.bias[:embed_dim])


@pytest.mark.parametrize("embed_dim, hidden_features, grid_size", [(20, 45, 3), (32, 64, 5), (7, 1, 1)])
def test_mixer_matches_extracted_and_by_hand(embed_dim, hidden_features, grid_size):
    layer = randomize(ElasticMixerBlock(32, 64, max_grid=5, token_hidden=12))
    layer.set_active(embed_dim=embed_dim, hidden_features=hidden_features, grid_size=grid_size)
    x = torch.randn(2, grid_size * grid_size, embed_dim)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), mixer_by_hand(layer, x, hidden_features, grid_size), **TOL)
    # The token MLP's active weights are the columns (fc1) and rows (fc2) of the top-left grid block.
    block = torch.tensor([row * 5 + col for row in range(grid_size) for col in range(grid_size)])
    tokens = layer.mlp_tokens
    keep_only(tokens.fc1.weight, (slice(None), block))
    keep_only(tokens.fc2.weight, (block,))
    keep_only(tokens.fc2.bias, (block,))
    extracted = check_against_extracted(layer, lambda: x.clone(), by_hand=("mlp_tokens.",))
    assert isinstance(extracted, plain_hybrid.MixerBlock) and extracted.mlp_tokens.fc1.in_features == grid_size ** 2
    assert_grad_in(tokens.fc1.weight, (slice(None), block), extracted.mlp_tokens.fc1.weight.grad)
    assert_grad_in(tokens.fc2.weight, (block,), extracted.mlp_tokens.fc2.weight.grad)
    assert_grad_in(tokens.fc2.bias, (block,), extracted.mlp_tokens.fc2.bias.grad)


def test_mixer_state_dict_round_trip_and_errors():
    assert_state_dict_round_trip(ElasticMixerBlock(16, 32, max_grid=4, token_hidden=8),
                                 lambda: plain_hybrid.MixerBlock(16, 16, 8, 32), torch.randn(2, 16, 16))
    layer = ElasticMixerBlock(16, 32, max_grid=4, token_hidden=8).set_active(grid_size=3)
    with pytest.raises(ValueError, match=r"the active grid_size is 3 \(\[batch, 9, embed_dim\]\)"):
        layer(torch.randn(2, 16, 16))
    with pytest.raises(ValueError, match="grid_size=5 is outside 1..4"):
        layer.set_active(grid_size=5)


# --- ElasticPositionalAttentionBlock ---------------------------------------------------------------

@pytest.mark.parametrize("embed_dim, num_heads, hidden_features", [(40, 3, 70), (64, 4, 128)])
def test_positional_attention_block_matches_extracted_and_by_hand(embed_dim, num_heads, hidden_features):
    layer = randomize(ElasticPositionalAttentionBlock(64, 4, 128, head_dim=16))
    config = dict(embed_dim=embed_dim, num_heads=num_heads, hidden_features=hidden_features)
    layer.set_active(**config)
    x = torch.randn(2, 25, embed_dim)
    position = F.conv2d(to_grid(x), layer.pos_embed.weight[:embed_dim], layer.pos_embed.bias[:embed_dim], padding=1,
                        groups=embed_dim)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ElasticBlock.forward(layer, x + to_tokens(position), **config), **TOL)
    width = num_heads * 16
    region = row_blocks([(0, width), (64, width), (128, width)], embed_dim)
    keep_only(layer.attn.qkv.weight, region)
    keep_only(layer.attn.qkv.bias, region[:1])
    extracted = check_against_extracted(layer, lambda: x.clone(), by_hand=("attn.qkv.",))
    assert_grad_in(layer.attn.qkv.weight, region, extracted.attn.qkv.weight.grad)
    assert isinstance(extracted, plain_hybrid.PositionalAttentionBlock)
    assert extracted.ls1.gamma.shape == (embed_dim,) and extracted.norm1.eps == 1e-5


def test_positional_attention_block_grouped_forward_matches_each_subnet():
    layer = randomize(ElasticPositionalAttentionBlock(64, 4, 128, head_dim=16)).eval()
    configs = [dict(embed_dim=40, num_heads=3, hidden_features=70),
               dict(embed_dim=64, num_heads=2, hidden_features=128)]
    inputs = [torch.randn(2, 16, c["embed_dim"]) for c in configs]
    stacked = torch.zeros(2, 2, 16, 64)
    for k, x in enumerate(inputs):
        stacked[k, ..., :x.shape[-1]] = x
    sizes, heads, hidden = (GroupSizes([c[key] for c in configs], "cpu")
                            for key in ("embed_dim", "num_heads", "hidden_features"))
    with torch.no_grad():
        grouped = layer.grouped_forward(stacked, sizes, heads, hidden)
        for k, (x, config) in enumerate(zip(inputs, configs)):
            torch.testing.assert_close(grouped[k, ..., :x.shape[-1]], layer(x, **config), **TOL)
    assert torch.count_nonzero(grouped[0, ..., 40:]) == 0


def test_positional_attention_block_state_dict_round_trip_and_errors():
    assert_state_dict_round_trip(ElasticPositionalAttentionBlock(32, 2, 64, head_dim=16),
                                 lambda: plain_hybrid.PositionalAttentionBlock(32, 2, 16, 64, layer_scale=1e-6),
                                 torch.randn(2, 9, 32))
    layer = ElasticPositionalAttentionBlock(32, 2, 64, head_dim=16)
    with pytest.raises(ValueError, match="expected the tokens of a square grid, got 10 tokens"):
        layer(torch.randn(2, 10, 32))
    with pytest.raises(ValueError, match="num_heads=3 is outside 1..2"):
        layer(torch.randn(2, 9, 32), num_heads=3)


# --- ElasticVScaleAttention and ElasticVScaleBlock (ElasticViT) ------------------------------------

def vscale_attention_by_hand(layer: ElasticVScaleAttention, x: torch.Tensor, heads: int, v_scale: int):
    """ElasticViT's attention, written out: q, k, v rows of the three blocks, the 3x3 depthwise conv on v, the
    relative position bias looked up pair by pair, Hardswish, the projection."""
    embed_dim, tokens = x.shape[-1], x.shape[1]
    head_dim, max_rows = layer.head_dim, layer.num_heads * layer.head_dim
    qk, v_width = heads * head_dim, heads * head_dim * v_scale
    weight = layer.qkv.weight
    q, k = x @ weight[:qk, :embed_dim].T, x @ weight[max_rows:max_rows + qk, :embed_dim].T
    v = x @ weight[2 * max_rows:2 * max_rows + v_width, :embed_dim].T
    v = to_tokens(F.conv2d(to_grid(v), layer.v_conv.weight[:v_width], padding=1, groups=v_width))
    side, span = math.isqrt(tokens), 2 * layer.max_grid - 1
    bias = torch.empty(heads, tokens, tokens)
    for i in range(tokens):
        for j in range(tokens):
            dy, dx = i // side - j // side, i % side - j % side
            bias[:, i, j] = layer.rel_pos_bias.table[(dy + layer.max_grid - 1) * span + dx + layer.max_grid - 1, :heads]
    context = F.hardswish(heads_attention(q, k, v, heads, bias))
    return F.linear(context, layer.proj.weight[:embed_dim, :v_width], layer.proj.bias[:embed_dim])


def qkv_region(layer: ElasticVScaleAttention, embed_dim: int, heads: int, v_scale: int):
    qk, max_rows = heads * layer.head_dim, layer.num_heads * layer.head_dim
    return row_blocks([(0, qk), (max_rows, qk), (2 * max_rows, qk * v_scale)], embed_dim)


@pytest.mark.parametrize("embed_dim, heads, v_scale, side", [(40, 3, 2, 4), (64, 4, 4, 6), (9, 1, 1, 1)])
def test_vscale_attention_matches_extracted_and_by_hand(embed_dim, heads, v_scale, side):
    layer = randomize(ElasticVScaleAttention(64, 4, v_scale=4, head_dim=8, max_grid=6))
    layer.set_active(embed_dim=embed_dim, num_heads=heads, v_scale=v_scale)
    x = torch.randn(2, side * side, embed_dim)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), vscale_attention_by_hand(layer, x, heads, v_scale), **TOL)
    region = qkv_region(layer, embed_dim, heads, v_scale)
    keep_only(layer.qkv.weight, region)
    extracted = check_against_extracted(layer, lambda: x.clone(), by_hand=("qkv.",))
    assert extracted.qkv.weight.shape == (2 * heads * 8 + heads * 8 * v_scale, embed_dim)
    assert extracted.rel_pos_bias.table.shape == (11 * 11, heads) and extracted.qkv.bias is None
    assert_grad_in(layer.qkv.weight, region, extracted.qkv.weight.grad)


def test_vscale_block_matches_extracted_with_options_off():
    layer = randomize(ElasticVScaleBlock(48, 3, 3, 96, head_dim=8, qkv_bias=True, value_conv=False,
                                         activation="gelu"))
    layer.set_active(embed_dim=30, num_heads=2, v_scale=2, hidden_features=50)
    region = qkv_region(layer.attn, 30, 2, 2)
    keep_only(layer.attn.qkv.weight, region)
    keep_only(layer.attn.qkv.bias, region[:1])
    extracted = check_against_extracted(layer, lambda: torch.randn(2, 7, 30), by_hand=("attn.qkv.",))
    assert isinstance(extracted, plain_hybrid.VScaleBlock) and isinstance(extracted.mlp.act, torch.nn.GELU)
    assert_grad_in(layer.attn.qkv.weight, region, extracted.attn.qkv.weight.grad)
    assert_grad_in(layer.attn.qkv.bias, region[:1], extracted.attn.qkv.bias.grad)


def elasticvit_attention(layer: ElasticVScaleAttention, x: torch.Tensor, heads: int, v_scale: int):
    """ElasticViT's SuperAttention._attention, from its code: the q, k and v rows of its ELinear (at 0, at the super
    width, at twice it) concatenated, the output viewed as (B, N, heads, -1) and split per head into q, k and v, the v
    conv on the heads' v side by side, the relative position bias, softmax, Hardswish, the projection."""
    (batch, tokens, embed_dim), super_dim = x.shape, layer.num_heads * layer.head_dim
    qk, v_dim = layer.head_dim, layer.head_dim * v_scale
    weight = layer.qkv.weight
    rows = torch.cat([weight[:heads * qk], weight[super_dim:super_dim + heads * qk],
                      weight[2 * super_dim:2 * super_dim + heads * v_dim]])[:, :embed_dim]
    q, k, v = F.linear(x, rows).view(batch, tokens, heads, -1).split([qk, qk, v_dim], dim=3)
    width = heads * v_dim
    v = to_tokens(F.conv2d(to_grid(v.reshape(batch, tokens, width)), layer.v_conv.weight[:width], padding=1,
                           groups=width)).view(batch, tokens, heads, -1)
    attn = (q.permute(0, 2, 1, 3) @ k.permute(0, 2, 1, 3).transpose(-2, -1)) * qk ** -0.5
    side, span = math.isqrt(tokens), 2 * layer.max_grid - 1
    index = torch.tensor([[(i // side - j // side + layer.max_grid - 1) * span + i % side - j % side
                           + layer.max_grid - 1 for j in range(tokens)] for i in range(tokens)])
    attn = (attn + layer.rel_pos_bias.table[index, :heads].permute(2, 0, 1)).softmax(-1)
    out = F.hardswish((attn @ v.permute(0, 2, 1, 3)).transpose(1, 2).reshape(batch, tokens, -1))
    return F.linear(out, layer.proj.weight[:embed_dim, :width], layer.proj.bias[:embed_dim])


@pytest.mark.parametrize("embed_dim, heads, v_scale", [(64, 4, 4), (48, 3, 2), (32, 2, 3), (16, 1, 1)])
def test_per_head_qkv_layout_is_elasticvits(embed_dim, heads, v_scale):
    layer = randomize(ElasticVScaleAttention(64, 4, v_scale=4, head_dim=16, max_grid=4, qkv_layout="per_head"))
    layer.set_active(embed_dim=embed_dim, num_heads=heads, v_scale=v_scale)
    x = torch.randn(2, 9, embed_dim)
    with torch.no_grad():
        expected = elasticvit_attention(layer, x, heads, v_scale)
        torch.testing.assert_close(layer(x), expected, **TOL)
        extracted = layer.extract()
        torch.testing.assert_close(extracted(x), expected, **TOL)
    if heads > 1:  # the per-head reading differs from the block layout's
        blocks = ElasticVScaleAttention(64, 4, v_scale=4, head_dim=16, max_grid=4)
        blocks.load_state_dict(layer.state_dict())
        with torch.no_grad():
            assert not torch.allclose(blocks(x, embed_dim, heads, v_scale), expected, **TOL)


def test_sample_layer_norm_is_elasticvits_lnsuper():
    """ElasticViT's LNSuper: mean and variance over all tokens and channels of a sample, then the leading channels'
    weight and bias per channel."""
    norm = randomize(ElasticSampleLayerNorm(32))
    x = torch.randn(3, 9, 20) * 2 + 1
    mean, var = x.mean((1, 2), keepdim=True), x.var((1, 2), unbiased=False, keepdim=True)
    by_hand = (x - mean) / torch.sqrt(var + norm.eps) * norm.weight[:20] + norm.bias[:20]
    with torch.no_grad():
        torch.testing.assert_close(norm(x, dim=20), by_hand, **TOL)
    norm.set_active(dim=20)
    extracted = check_against_extracted(norm, lambda: torch.randn(3, 9, 20))
    assert isinstance(extracted, plain_hybrid.SampleLayerNorm) and extracted.weight.shape == (20,)


def test_vscale_block_with_elasticvits_layer_norm_matches_extracted():
    layer = randomize(ElasticVScaleBlock(48, 3, 3, 96, head_dim=8, max_grid=3, norm="sample"))
    layer.set_active(embed_dim=24, num_heads=2, v_scale=2, hidden_features=40)
    region = qkv_region(layer.attn, 24, 2, 2)
    keep_only(layer.attn.qkv.weight, region)
    extracted = check_against_extracted(layer, lambda: torch.randn(2, 9, 24), by_hand=("attn.qkv.",))
    assert isinstance(extracted.norm1, plain_hybrid.SampleLayerNorm)
    assert isinstance(extracted.norm2, plain_hybrid.SampleLayerNorm)
    with pytest.raises(ValueError, match="norm must be one of token, sample, got 'channel'"):
        ElasticVScaleBlock(48, 3, 3, 96, norm="channel")


def test_vscale_block_state_dict_round_trip_and_errors():
    assert_state_dict_round_trip(ElasticVScaleBlock(32, 2, 2, 64, head_dim=16, max_grid=4),
                                 lambda: plain_hybrid.VScaleBlock(32, 2, 16, 2, 64, max_grid=4), torch.randn(2, 9, 32))
    layer = ElasticVScaleBlock(32, 2, 2, 64, head_dim=16, max_grid=3)
    with pytest.raises(ValueError, match="v_scale=3 is outside 1..2"):
        layer.set_active(v_scale=3)
    with pytest.raises(ValueError, match=r"the token grid side 4 is outside 1..3 \(max_grid\)"):
        layer(torch.randn(2, 16, 32))


# --- DSMs ------------------------------------------------------------------------------------------

def batch_norm_eval(x: torch.Tensor, norm) -> torch.Tensor:
    c = x.shape[1]
    return F.batch_norm(x, norm.running_mean[:c], norm.running_var[:c], norm.weight[:c], norm.bias[:c], eps=norm.eps)


def local_path_by_hand(path, x: torch.Tensor, out_channels: int) -> torch.Tensor:
    """UniNet's local path: 3x3 depthwise strided conv (bias), BatchNorm (eval), 1x1 conv (bias)."""
    c = x.shape[1]
    h = F.conv2d(x, path.conv_dw.weight[:c], path.conv_dw.bias[:c], path.stride, 1, groups=c)
    return F.conv2d(batch_norm_eval(h, path.bn), path.conv_pw.weight[:out_channels, :c],
                    path.conv_pw.bias[:out_channels])


def shortcut_by_hand(dsm, x: torch.Tensor, out_channels: int) -> torch.Tensor:
    pooled = F.max_pool2d(x, 3, dsm.stride, 1) if dsm.stride > 1 else x
    c = x.shape[1]
    return F.conv2d(pooled, dsm.shortcut.weight[:out_channels, :c], dsm.shortcut.bias[:out_channels])


def attention_dsm_by_hand(dsm, x: torch.Tensor, q: torch.Tensor, out_channels: int, heads: int) -> torch.Tensor:
    """UniNet's local-global DSM after its queries: k, v from the normalised input tokens, attention, projection,
    plus the shortcut, as tokens."""
    c, width, max_width = x.shape[1], heads * dsm.head_dim, dsm.num_heads * dsm.head_dim
    tokens = layer_norm(to_tokens(x), dsm.kv_norm)
    k = F.linear(tokens, dsm.kv.weight[:width, :c], dsm.kv.bias[:width])
    v = F.linear(tokens, dsm.kv.weight[max_width:max_width + width, :c], dsm.kv.bias[max_width:max_width + width])
    projected = F.linear(heads_attention(q, k, v, heads), dsm.proj.weight[:out_channels, :width],
                         dsm.proj.bias[:out_channels])
    return projected + to_tokens(shortcut_by_hand(dsm, x, out_channels))


def local_global_by_hand(dsm: ElasticLocalGlobalDSM, x: torch.Tensor, out_channels: int, heads: int) -> torch.Tensor:
    q = layer_norm(to_tokens(local_path_by_hand(dsm.q, x, heads * dsm.head_dim)), dsm.q_norm)
    return attention_dsm_by_hand(dsm, x, q, out_channels, heads)


def global_by_hand(dsm: ElasticGlobalDSM, x: torch.Tensor, out_channels: int, heads: int) -> torch.Tensor:
    c, width = x.shape[1], heads * dsm.head_dim
    strided = layer_norm(to_tokens(x[:, :, ::dsm.stride, ::dsm.stride]), dsm.kv_norm)
    q = F.linear(strided, dsm.q.weight[:width, :c], dsm.q.bias[:width])
    return attention_dsm_by_hand(dsm, x, q, out_channels, heads)


def randomize_statistics(module: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_()
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
    return module


@pytest.mark.parametrize("in_channels, out_channels, stride, side", [(20, 40, 2, 7), (32, 48, 2, 8), (5, 3, 1, 4)])
def test_local_dsm_matches_extracted_and_by_hand(in_channels, out_channels, stride, side):
    dsm = randomize_statistics(randomize(ElasticLocalDSM(32, 48, stride=stride)))
    dsm.set_active(in_channels=in_channels, out_channels=out_channels)
    x = torch.randn(2, in_channels, side, side)
    with torch.no_grad():
        expected = local_path_by_hand(dsm.downsample, x, out_channels) + shortcut_by_hand(dsm, x, out_channels)
        output = dsm.eval()(x)
    torch.testing.assert_close(output, expected, **TOL)
    assert output.shape == (2, out_channels, math.ceil(side / stride), math.ceil(side / stride))
    assert isinstance(check_against_extracted(dsm, lambda: x.clone()), plain_hybrid.LocalDSM)


def kv_region(dsm, in_channels: int, heads: int):
    width, max_width = heads * dsm.head_dim, dsm.num_heads * dsm.head_dim
    return row_blocks([(0, width), (max_width, width)], in_channels)


@pytest.mark.parametrize("dsm_type, by_hand", [(ElasticLocalGlobalDSM, local_global_by_hand),
                                              (ElasticGlobalDSM, global_by_hand)])
@pytest.mark.parametrize("in_channels, out_channels, heads, stride, side", [(20, 40, 2, 2, 7), (32, 48, 3, 2, 6),
                                                                            (8, 16, 1, 1, 3)])
def test_attention_dsm_matches_extracted_and_by_hand(dsm_type, by_hand, in_channels, out_channels, heads, stride, side):
    dsm = randomize_statistics(randomize(dsm_type(32, 48, 3, head_dim=8, stride=stride)))
    dsm.set_active(in_channels=in_channels, out_channels=out_channels, num_heads=heads)
    x = torch.randn(2, in_channels, side, side)
    with torch.no_grad():
        output = dsm.eval()(x)
        torch.testing.assert_close(output, by_hand(dsm, x, out_channels, heads), **TOL)
    assert output.shape == (2, math.ceil(side / stride) ** 2, out_channels)
    region = kv_region(dsm, in_channels, heads)
    keep_only(dsm.kv.weight, region)
    keep_only(dsm.kv.bias, region[:1])
    extracted = check_against_extracted(dsm, lambda: x.clone(), by_hand=("kv.",))
    assert isinstance(extracted, dsm_type.plain_type)
    assert_grad_in(dsm.kv.weight, region, extracted.kv.weight.grad)


@pytest.mark.parametrize("elastic, plain_module", [
    (lambda: ElasticLocalDSM(8, 16), lambda: plain_hybrid.LocalDSM(8, 16)),
    (lambda: ElasticLocalGlobalDSM(8, 16, 2, head_dim=8), lambda: plain_hybrid.LocalGlobalDSM(8, 16, 2, 8)),
    (lambda: ElasticGlobalDSM(8, 16, 2, head_dim=8), lambda: plain_hybrid.GlobalDSM(8, 16, 2, 8)),
])
def test_dsm_state_dict_round_trip(elastic, plain_module):
    assert set(elastic().state_dict()) == set(plain_module().state_dict())
    assert_state_dict_round_trip(elastic(), plain_module, torch.randn(2, 8, 5, 5))


def test_dsm_bad_config_raises_clear_error():
    with pytest.raises(ValueError, match="num_heads=4 is outside 1..3"):
        ElasticLocalGlobalDSM(32, 48, 3).set_active(num_heads=4)
    with pytest.raises(ValueError, match=r"expected \[batch, 20, height, width\] \(the active in_channels is 20\)"):
        ElasticGlobalDSM(32, 48, 3).set_active(in_channels=20)(torch.randn(2, 32, 4, 4))
    with pytest.raises(ValueError, match="out_channels=49 is outside 1..48"):
        ElasticLocalDSM(32, 48)(torch.randn(2, 32, 4, 4), out_channels=49)


# --- TorchScript -----------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:DeprecationWarning")
@pytest.mark.parametrize("layer, x", [
    (lambda: ElasticMixerBlock(16, 32, max_grid=4, token_hidden=8).set_active(grid_size=3), torch.randn(2, 9, 16)),
    (lambda: ElasticPositionalAttentionBlock(32, 2, 64, head_dim=16), torch.randn(2, 9, 32)),
    (lambda: ElasticVScaleBlock(32, 2, 2, 64, head_dim=16, max_grid=4), torch.randn(2, 9, 32)),
    (lambda: ElasticLocalDSM(8, 16), torch.randn(2, 8, 5, 5)),
    (lambda: ElasticLocalGlobalDSM(8, 16, 2, head_dim=8), torch.randn(2, 8, 5, 5)),
    (lambda: ElasticGlobalDSM(8, 16, 2, head_dim=8), torch.randn(2, 8, 5, 5)),
    (lambda: elastic_ops.ElasticInvertedResidual(8, 12, 4, 5, 2, "hardswish", 4, input_norm=True, shortcut_pool="max"),
     torch.randn(2, 8, 5, 5)),
])
def test_extracted_modules_script(layer, x):
    extracted = randomize(layer().extract()).eval()
    torch.testing.assert_close(torch.jit.script(extracted)(x), extracted(x), **TOL)

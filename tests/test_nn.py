"""Drop-in elastic layers: the active configuration against its extracted plain module, full-width
state_dict round trips with the plain PyTorch / timm-named modules, and clear errors on bad configurations."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from layer_checks import TOL, assert_extract_matches, assert_state_dict_round_trip, randomize
from torch import nn

import elastic_ops
from elastic_ops import (
    ElasticAttention,
    ElasticBlock,
    ElasticLayerNorm,
    ElasticLinear,
    ElasticMlp,
    ElasticPatchEmbed,
    GroupSizes,
    plain,
)


@pytest.fixture(autouse=True)
def reference_backend():
    """Layers are checked on the reference; the Triton ops have their own tests (two checks below run them)."""
    with elastic_ops.use_backend("reference"):
        yield


# --- ElasticLinear ----------------------------------------------------------------------------------

def test_linear_active_config_matches_extracted_nn_linear():
    layer = randomize(ElasticLinear(64, 48)).set_active(in_features=37, out_features=23)
    x = torch.randn(2, 5, 37)
    extracted = assert_extract_matches(layer, x)
    assert isinstance(extracted, nn.Linear) and extracted.weight.shape == (23, 37)
    torch.testing.assert_close(layer(x), x @ layer.weight[:23, :37].T + layer.bias[:23], **TOL)
    # The extracted weights are copies: changing them leaves the super weight alone.
    before = layer.weight.detach().clone()
    with torch.no_grad():
        extracted.weight.add_(1.0)
    assert torch.equal(layer.weight, before)


def test_linear_forward_arguments_override_for_one_call():
    layer = randomize(ElasticLinear(32, 32, bias=False))
    x = torch.randn(3, 17)
    torch.testing.assert_close(layer(x, in_features=17, out_features=1), x @ layer.weight[:1, :17].T, **TOL)
    assert layer.active == {"in_features": 32, "out_features": 32}


def test_linear_state_dict_round_trip_with_nn_linear():
    assert_state_dict_round_trip(ElasticLinear(24, 40), lambda: nn.Linear(24, 40), torch.randn(4, 24))


@pytest.mark.parametrize("config, error, match", [
    (dict(out_features=0), ValueError, "out_features=0 is outside 1..48"),
    (dict(out_features=49), ValueError, "out_features=49 is outside 1..48"),
    (dict(in_features=2.0), TypeError, "in_features must be an int"),
    (dict(width=3), TypeError, "width"),  # unknown key
])
def test_linear_bad_config_raises_clear_error(config, error, match):
    layer = ElasticLinear(64, 48)
    with pytest.raises(error, match=match):
        layer.set_active(**config)
    with pytest.raises(error, match=match):
        layer(torch.randn(2, 64), **config)
    assert layer.active == {"in_features": 64, "out_features": 48}, "a rejected configuration must not be kept"


def test_linear_input_width_must_match_active_config():
    layer = ElasticLinear(64, 48).set_active(in_features=32)
    with pytest.raises(ValueError, match=r"active in_features is 32"):
        layer(torch.randn(2, 31))


# --- ElasticLayerNorm -------------------------------------------------------------------------------

def test_layer_norm_active_config_matches_extracted_nn_layer_norm():
    layer = randomize(ElasticLayerNorm(50, eps=1e-6)).set_active(dim=29)
    extracted = assert_extract_matches(layer, torch.randn(3, 7, 29) * 2 + 1)
    assert isinstance(extracted, nn.LayerNorm) and extracted.normalized_shape == (29,) and extracted.eps == 1e-6


def test_layer_norm_state_dict_round_trip_and_errors():
    assert_state_dict_round_trip(ElasticLayerNorm(33), lambda: nn.LayerNorm(33), torch.randn(5, 33))
    with pytest.raises(ValueError, match="dim=34 is outside 1..33"):
        ElasticLayerNorm(33).set_active(dim=34)


# --- ElasticMlp -------------------------------------------------------------------------------------

def test_mlp_active_config_matches_extracted_plain_mlp():
    layer = randomize(ElasticMlp(48, 192)).set_active(embed_dim=40, hidden_features=97)
    extracted = assert_extract_matches(layer, torch.randn(2, 9, 40))
    assert extracted.fc1.weight.shape == (97, 40) and extracted.fc2.weight.shape == (40, 97)


def test_mlp_state_dict_round_trip_with_timm_named_mlp():
    layer = ElasticMlp(32, 64)
    assert set(layer.state_dict()) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert_state_dict_round_trip(layer, lambda: plain.Mlp(32, 64), torch.randn(2, 5, 32))


def test_mlp_bad_config_raises_clear_error():
    with pytest.raises(ValueError, match="hidden_features=65 is outside 1..64"):
        ElasticMlp(32, 64)(torch.randn(2, 32), hidden_features=65)


def test_mlp_with_another_activation_matches_extracted_and_grouped():
    layer = randomize(ElasticMlp(48, 192, activation="hardswish")).set_active(embed_dim=40, hidden_features=97)
    x = torch.randn(2, 9, 40)
    extracted = assert_extract_matches(layer, x)
    assert isinstance(extracted.act, nn.Hardswish)
    torch.testing.assert_close(layer(x), extracted.fc2(nn.functional.hardswish(extracted.fc1(x))), **TOL)
    # Grouped: two subnets stacked with zero padding give each its own output, zero past its width.
    sizes, hidden = GroupSizes([40, 24], "cpu"), GroupSizes([97, 50], "cpu")
    stacked = torch.zeros(2, 2, 9, 40)
    stacked[0], stacked[1, ..., :24] = x, x[..., :24]
    grouped = layer.grouped_forward(stacked, sizes, hidden)
    torch.testing.assert_close(grouped[0], layer(x), **TOL)
    torch.testing.assert_close(grouped[1, ..., :24], layer(x[..., :24], embed_dim=24, hidden_features=50), **TOL)
    assert torch.count_nonzero(grouped[1, ..., 24:]) == 0
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        ElasticMlp(8, 16, activation="tanh")


# --- ElasticAttention -------------------------------------------------------------------------------

@pytest.mark.parametrize("embed_dim, num_heads", [(64, 4), (40, 3), (17, 1)])
def test_attention_active_config_matches_extracted_plain_attention(embed_dim, num_heads):
    layer = randomize(ElasticAttention(64, 4, head_dim=16)).set_active(embed_dim=embed_dim, num_heads=num_heads)
    extracted = assert_extract_matches(layer, torch.randn(2, 11, embed_dim))
    assert extracted.qkv.weight.shape == (3 * num_heads * 16, embed_dim)


def test_attention_state_dict_round_trip_with_timm_named_attention():
    layer = ElasticAttention(48, 3, head_dim=16)
    assert set(layer.state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}
    assert_state_dict_round_trip(layer, lambda: plain.Attention(48, 3, 16), torch.randn(2, 6, 48))


def test_attention_bad_config_raises_clear_error():
    layer = ElasticAttention(48, 3, head_dim=16)
    with pytest.raises(ValueError, match="num_heads=4 is outside 1..3"):
        layer.set_active(num_heads=4)
    with pytest.raises(ValueError, match=r"\[batch, tokens, embed_dim\]"):
        layer(torch.randn(6, 48))


# --- ElasticAttention with private q/k per head count (ViTAS) --------------------------------------

def private_qk_attention() -> ElasticAttention:
    """4 heads of 16 channels on 64; head counts 1 and 3 have their own q/k, 2 and 4 use the shared q/k blocks."""
    return randomize(ElasticAttention(64, 4, head_dim=16, private_qk_heads=(3, 1)))


@pytest.mark.parametrize("embed_dim, num_heads", [(64, 3), (37, 1), (40, 2), (64, 4)])
def test_private_qk_attention_matches_extracted_plain_attention(embed_dim, num_heads):
    layer = private_qk_attention().set_active(embed_dim=embed_dim, num_heads=num_heads)
    extracted = assert_extract_matches(layer, torch.randn(2, 11, embed_dim))
    # The extracted rows by hand: q and k from the head count's private weight where it has one, else from the
    # shared q and k blocks; v always from the shared v block.
    width, blocks = num_heads * 16, layer.qkv.weight.view(3, 64, 64)
    bias_blocks = layer.qkv.bias.view(3, 64)
    if num_heads in (1, 3):
        private = layer.private_qk[str(num_heads)]
        qk_weight, qk_bias = private.weight, private.bias
    else:
        qk_weight, qk_bias = blocks[:2, :width].reshape(2 * width, 64), bias_blocks[:2, :width].reshape(-1)
    torch.testing.assert_close(extracted.qkv.weight, torch.cat([qk_weight, blocks[2, :width]])[:, :embed_dim],
                               atol=0, rtol=0)
    torch.testing.assert_close(extracted.qkv.bias, torch.cat([qk_bias, bias_blocks[2, :width]]), atol=0, rtol=0)


def test_private_qk_attention_parameters_and_bad_head_counts():
    layer = ElasticAttention(48, 3, head_dim=16, private_qk_heads=(1, 2))
    assert {name: tuple(p.shape) for name, p in layer.named_parameters() if "private" in name} == {
        "private_qk.1.weight": (32, 48), "private_qk.1.bias": (32,), "private_qk.2.weight": (64, 48),
        "private_qk.2.bias": (64,)}
    assert ElasticAttention(48, 3, head_dim=16).private_qk is None
    with pytest.raises(ValueError, match=r"private_qk_heads \[0, 4\] are outside 1..3"):
        ElasticAttention(48, 3, head_dim=16, private_qk_heads=(0, 2, 4))


def test_each_head_count_reads_its_own_qk_and_the_shared_v():
    # New random values in a weight must change exactly the outputs of the head counts that read it.
    # (Not NaN: torch's CPU attention turns NaN scores into zeros.)
    layer = private_qk_attention()
    x = torch.randn(2, 7, 64)

    def outputs():
        with torch.no_grad():
            return {h: layer(x, num_heads=h) for h in (1, 2, 3, 4)}

    def redraw_and_compare(weight: torch.Tensor, readers: set[int]) -> None:
        before = outputs()
        with torch.no_grad():
            weight.copy_(torch.randn_like(weight))
        after = outputs()
        assert {h for h in before if not torch.equal(before[h], after[h])} == readers

    redraw_and_compare(layer.private_qk["1"].weight, {1})
    redraw_and_compare(layer.private_qk["3"].weight, {3})
    redraw_and_compare(layer.qkv.weight[:16], {2, 4})  # the shared q rows of head 1
    redraw_and_compare(layer.qkv.weight[64 + 32:64 + 48], {4})  # the shared k rows of head 3
    redraw_and_compare(layer.qkv.weight[128:128 + 16], {1, 2, 3, 4})  # the v rows of head 1 are shared by all
    redraw_and_compare(layer.qkv.weight[128 + 32:128 + 48], {3, 4})


def test_private_qk_gradients_reach_only_the_chosen_weights():
    layer = private_qk_attention()
    layer(torch.randn(2, 5, 40), embed_dim=40, num_heads=3).square().sum().backward()
    chosen = layer.private_qk["3"]
    assert chosen.weight.grad[:, :40].abs().min() > 0 and torch.count_nonzero(chosen.weight.grad[:, 40:]) == 0
    assert chosen.bias.grad[:48].abs().min() > 0  # q bias (softmax cancels the k bias: its gradient is ~0)
    assert all(p.grad is None for p in layer.private_qk["1"].parameters())
    qkv_grad = layer.qkv.weight.grad
    assert torch.count_nonzero(qkv_grad[:128]) == 0, "the shared q and k blocks are not used by 3 heads"
    assert qkv_grad[128:128 + 48, :40].abs().min() > 0
    assert torch.count_nonzero(qkv_grad[128 + 48:]) == 0 and torch.count_nonzero(qkv_grad[:, 40:]) == 0
    assert torch.count_nonzero(layer.qkv.bias.grad[:128]) == 0 and layer.qkv.bias.grad[128:128 + 48].abs().min() > 0
    assert layer.proj.weight.grad[:40, :48].abs().min() > 0 and torch.count_nonzero(layer.proj.weight.grad[:, 48:]) == 0


# --- ElasticAttention with 2D relative position (AutoFormer) ----------------------------------------

def autoformer_relative_attention(attn_layer: plain.Attention, x: torch.Tensor) -> torch.Tensor:
    """AutoFormer's AttentionSuper/RelativePosition2D_super forward, written from its definition: index matrices
    built pair by pair (class token at index 0), the relative terms as [N, B*h, .] batched matmuls."""
    rel, heads, dh = attn_layer.rel_pos, attn_layer.num_heads, attn_layer.head_dim
    batch, tokens, _ = x.shape
    side, m = math.isqrt(tokens - 1), rel.max_relative_position
    rows = torch.zeros(tokens, tokens, dtype=torch.long)
    cols = torch.zeros(tokens, tokens, dtype=torch.long)
    for i in range(1, tokens):
        for j in range(1, tokens):
            rows[i, j] = max(-m, min(m, (j - 1) // side - (i - 1) // side)) + m + 1
            cols[i, j] = max(-m, min(m, (j - 1) % side - (i - 1) % side)) + m + 1
    r_k, r_v = rel.k_rows[rows] + rel.k_cols[cols], rel.v_rows[rows] + rel.v_cols[cols]
    q, k, v = attn_layer.qkv(x).reshape(batch, tokens, 3, heads, dh).permute(2, 0, 3, 1, 4)
    scale = dh ** -0.5
    logits = (q @ k.transpose(-2, -1)) * scale
    logits = logits + (q.permute(2, 0, 1, 3).reshape(tokens, heads * batch, dh) @ r_k.transpose(2, 1)) \
        .transpose(1, 0).reshape(batch, heads, tokens, tokens) * scale
    attn = logits.softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(batch, tokens, -1)
    by_query = attn.permute(2, 0, 1, 3).reshape(tokens, batch * heads, tokens)
    by_position = (by_query @ r_v).transpose(1, 0).reshape(batch, heads, tokens, dh)
    out = out + by_position.transpose(2, 1).reshape(batch, tokens, -1)
    return attn_layer.proj(out)


@pytest.mark.parametrize("embed_dim, num_heads, tokens, private", [(64, 3, 26, False), (37, 1, 10, False),
                                                                     (40, 2, 50, True), (64, 4, 17, True)])
def test_relative_position_attention_matches_extracted_and_autoformer(embed_dim, num_heads, tokens, private):
    # max distance 2 < the grid side in most cases, so clipping is exercised; grids of 3, 4, 5 and 7 patches a side.
    layer = randomize(ElasticAttention(64, 4, head_dim=16, relative_position=2,
                                       private_qk_heads=(1, 2) if private else ()))
    layer.set_active(embed_dim=embed_dim, num_heads=num_heads)
    x = torch.randn(2, tokens, embed_dim)
    extracted = assert_extract_matches(layer, x)
    assert isinstance(extracted, plain.Attention) and extracted.rel_pos is not None
    with torch.no_grad():
        torch.testing.assert_close(layer(x), autoformer_relative_attention(extracted, x), **TOL)
        without = ElasticAttention(64, 4, head_dim=16, private_qk_heads=(1, 2) if private else ())
        without.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("rel_pos.")})
        assert not torch.allclose(without(x, embed_dim=embed_dim, num_heads=num_heads), layer(x), atol=1e-3)


def test_relative_position_tables_and_gradients():
    layer = randomize(ElasticAttention(48, 3, head_dim=16, relative_position=3))
    assert {name: tuple(p.shape) for name, p in layer.named_parameters() if name.startswith("rel_pos.")} == {
        f"rel_pos.{name}": (2 * 3 + 2, 16) for name in ("k_rows", "k_cols", "v_rows", "v_cols")}
    layer(torch.randn(2, 1 + 8 * 8, 40), embed_dim=40, num_heads=2).square().sum().backward()
    for name in ("k_rows", "k_cols", "v_rows", "v_cols"):
        grad = getattr(layer.rel_pos, name).grad
        assert grad.abs().sum(dim=1).min() > 0, f"every entry of {name} (distances 0..3 and the class token) is used"
    assert layer.qkv.weight.grad[:32, :40].abs().min() > 0 and torch.count_nonzero(layer.qkv.weight.grad[32:48]) == 0
    with pytest.raises(ValueError, match="square grid of patch tokens, got 11 tokens"):
        layer(torch.randn(1, 11, 48))
    with pytest.raises(ValueError, match="relative_position must be an int >= 0"):
        ElasticAttention(48, 3, head_dim=16, relative_position=-1)


def test_block_with_relative_position_matches_extracted_plain_block():
    layer = randomize(ElasticBlock(64, 4, 256, head_dim=16, relative_position=14))
    layer.set_active(embed_dim=48, num_heads=2, hidden_features=131)
    extracted = assert_extract_matches(layer, torch.randn(2, 1 + 4 * 4, 48))
    assert extracted.attn.rel_pos.max_relative_position == 14


# --- ElasticBlock -----------------------------------------------------------------------------------

def test_block_active_config_matches_extracted_plain_block():
    layer = randomize(ElasticBlock(64, 4, 256, head_dim=16)).set_active(embed_dim=48, num_heads=2, hidden_features=131)
    extracted = assert_extract_matches(layer, torch.randn(2, 10, 48))
    assert isinstance(extracted, plain.Block)
    assert extracted.mlp.fc1.out_features == 131 and extracted.attn.num_heads == 2
    torch.testing.assert_close(layer(torch.randn(2, 10, 64), embed_dim=64, num_heads=4, hidden_features=256).shape,
                               torch.Size([2, 10, 64]))


def test_block_with_layer_scale_matches_extracted_plain_block_and_grouped():
    layer = randomize(ElasticBlock(64, 4, 256, head_dim=16, layer_scale=1e-6))
    assert {name for name in layer.state_dict() if name.startswith("ls")} == {"ls1.gamma", "ls2.gamma"}
    layer.set_active(embed_dim=48, num_heads=2, hidden_features=131)
    x = torch.randn(2, 10, 48)
    extracted = assert_extract_matches(layer, x)
    assert extracted.ls1.gamma.shape == (48,)
    torch.testing.assert_close(extracted.ls2.gamma, layer.ls2.gamma[:48], atol=0, rtol=0)
    stacked = torch.zeros(2, 2, 10, 64)
    stacked[0, ..., :48], stacked[1] = x, torch.randn(2, 10, 64)
    grouped = layer.grouped_forward(stacked, GroupSizes([48, 64], "cpu"), GroupSizes([2, 4], "cpu"),
                                    GroupSizes([131, 256], "cpu"))
    torch.testing.assert_close(grouped[0, ..., :48], layer(x), **TOL)
    torch.testing.assert_close(grouped[1], layer(stacked[1], embed_dim=64, num_heads=4, hidden_features=256), **TOL)
    assert torch.count_nonzero(grouped[0, ..., 48:]) == 0
    assert_state_dict_round_trip(ElasticBlock(32, 2, 64, head_dim=16, layer_scale=0.1),
                                 lambda: plain.Block(32, 2, 16, 64, layer_scale=0.1), torch.randn(2, 5, 32))


def test_block_state_dict_round_trip_with_timm_named_block():
    layer = ElasticBlock(32, 2, 64, head_dim=16)
    assert_state_dict_round_trip(layer, lambda: plain.Block(32, 2, 16, 64), torch.randn(2, 5, 32))


def test_block_drop_path_drops_whole_samples_in_training_only():
    torch.manual_seed(0)
    layer = randomize(ElasticBlock(32, 2, 64, head_dim=16, drop_path=0.5))
    x = torch.randn(64, 5, 32)
    layer.train()
    y = layer(x)
    unchanged = (y == x).flatten(1).all(dim=1)
    # Both branches dropped with probability 1/4 per sample: some samples pass through untouched, most do not.
    assert 0 < int(unchanged.sum()) < 40
    layer.eval()
    torch.testing.assert_close(layer(x), layer.extract()(x), **TOL)
    with pytest.raises(ValueError, match="drop_path must be in"):
        ElasticBlock(32, 2, 64, head_dim=16, drop_path=1.0)


# --- ElasticPatchEmbed ------------------------------------------------------------------------------

@pytest.mark.parametrize("embed_dim, patch_size", [(32, 8), (21, 4)])
def test_patch_embed_active_config_matches_extracted_plain_patch_embed(embed_dim, patch_size):
    layer = randomize(ElasticPatchEmbed(8, 3, 32)).set_active(embed_dim=embed_dim, patch_size=patch_size)
    images = torch.randn(2, 3, 16, 16)
    extracted = assert_extract_matches(layer, images)
    assert extracted.proj.weight.shape == (embed_dim, 3, patch_size, patch_size)
    assert layer(images).shape == (2, (16 // patch_size) ** 2, embed_dim)


def test_patch_embed_state_dict_round_trip_and_errors():
    assert_state_dict_round_trip(ElasticPatchEmbed(4, 3, 24), lambda: plain.PatchEmbed(4, 3, 24),
                                 torch.randn(2, 3, 8, 8))
    layer = ElasticPatchEmbed(8, 3, 32)
    with pytest.raises(ValueError, match="not a multiple of patch_size 8"):
        layer(torch.randn(1, 3, 12, 16))
    with pytest.raises(ValueError, match=r"expected images \[batch, 3, height, width\]"):
        layer(torch.randn(1, 1, 16, 16))


# --- gradients and the Triton backend ---------------------------------------------------------------

def test_gradients_reach_only_the_active_slice():
    layer = randomize(ElasticMlp(24, 48)).set_active(embed_dim=16, hidden_features=20)
    layer(torch.randn(3, 16)).square().sum().backward()
    grad = layer.fc1.weight.grad
    assert grad[:20, :16].abs().sum() > 0
    assert torch.count_nonzero(grad[20:]) == 0 and torch.count_nonzero(grad[:, 16:]) == 0


def _has_triton_op(name: str) -> bool:
    found = importlib.util.find_spec(f"elastic_ops.ops.{name}") is not None
    return found and elastic_ops.backends()["triton"].available


# The Triton kernels run compiled where there is a GPU (fp32 products, another summation order), else interpreted.
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_TOL = dict(atol=1e-4, rtol=1e-4) if torch.cuda.is_available() else TOL


@pytest.mark.skipif(not _has_triton_op("linear"), reason="the Triton linear op or the interpreter is not available")
def test_linear_through_triton_backend_matches_extracted():
    layer = randomize(ElasticLinear(48, 40)).set_active(in_features=33, out_features=19).to(TRITON_DEVICE)
    x = torch.randn(20, 33, device=TRITON_DEVICE)
    with elastic_ops.use_backend("triton"):
        y = layer(x)
    torch.testing.assert_close(y, layer.extract()(x), **TRITON_TOL)


@pytest.mark.skipif(not _has_triton_op("mlp"), reason="the Triton MLP op or the interpreter is not available")
def test_mlp_through_triton_backend_matches_extracted():
    layer = randomize(ElasticMlp(32, 64)).set_active(embed_dim=24, hidden_features=40).to(TRITON_DEVICE)
    x = torch.randn(16, 24, device=TRITON_DEVICE)
    with elastic_ops.use_backend("triton"):
        y = layer(x)
    torch.testing.assert_close(y, layer.extract()(x), **TRITON_TOL)

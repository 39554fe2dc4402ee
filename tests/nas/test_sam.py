"""SAM's image encoder as a supernet (``nas.sam``): the converted supernet's largest subnet against segment-anything's
own ``ImageEncoderViT`` (random weights), a layer-dropped subnet against a shallower ``ImageEncoderViT`` holding the
same layers, the windowed attention's grouped pass, and clear errors for bad weights."""
from __future__ import annotations

import importlib.util
import pickle
import sys
import types
from functools import partial

import pytest
import torch
from hostile import RunsCode
from torch import nn

from elastic_ops import GroupSizes
from nas.errors import CheckpointError
from nas.sam import from_sam_state_dict, read_sam_weights
from nas.vit.arch import Arch


def image_encoder_module():
    """segment_anything.modeling.image_encoder without the package's __init__ (which imports torchvision)."""
    if "segment_anything" not in sys.modules:
        spec = importlib.util.find_spec("segment_anything")
        if spec is None:
            pytest.skip("pip install segment-anything")
        package = types.ModuleType("segment_anything")
        package.__path__ = list(spec.submodule_search_locations)
        modeling = types.ModuleType("segment_anything.modeling")
        modeling.__path__ = [f"{package.__path__[0]}/modeling"]
        sys.modules.update({"segment_anything": package, "segment_anything.modeling": modeling})
    return importlib.import_module("segment_anything.modeling.image_encoder")


def sam_encoder(depth=4, global_layers=(1, 3), seed=0):
    """A small SAM encoder: 40 px, patch 8 (a 5x5 grid), windows of 3 (padded to 6x6), 4 heads of 16, relative
    position, every weight random (SAM initialises the relative position tables to zero)."""
    torch.manual_seed(seed)
    encoder = image_encoder_module().ImageEncoderViT(
        img_size=40, patch_size=8, in_chans=3, embed_dim=64, depth=depth, num_heads=4, mlp_ratio=4.0, out_chans=32,
        qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), use_abs_pos=True, use_rel_pos=True,
        window_size=3, global_attn_indexes=global_layers)
    with torch.no_grad():
        for param in encoder.parameters():
            param.normal_(0, 0.3)
    return encoder.eval()


def test_the_largest_subnet_reproduces_the_sam_encoder():
    encoder = sam_encoder()
    model = from_sam_state_dict(encoder.state_dict())
    c = model.config
    assert (c.grid, c.window_size, c.global_layers, c.num_heads, c.head_dim) == (5, 3, (1, 3), 4, 16)
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        expected = encoder(x)
        torch.testing.assert_close(model(x, c.space.max_arch()), expected, atol=1e-4, rtol=1e-4)
        # A SAM checkpoint holds the encoder under image_encoder.
        whole = {f"image_encoder.{k}": v for k, v in encoder.state_dict().items()} | {"mask_decoder.w": torch.ones(1)}
        torch.testing.assert_close(from_sam_state_dict(whole)(x), expected, atol=1e-4, rtol=1e-4)


def test_a_layer_dropped_subnet_is_the_encoder_of_its_layers():
    encoder = sam_encoder()
    model = from_sam_state_dict(encoder.state_dict())
    kept = (0, 1, 3)  # layer 2 (windowed) dropped; 1 and 3 global
    shallow = sam_encoder(depth=3, global_layers=(1, 2))
    state = {k: v for k, v in encoder.state_dict().items() if not k.startswith("blocks.")}
    for new, old in enumerate(kept):
        state |= {k.replace(f"blocks.{old}.", f"blocks.{new}.", 1): v for k, v in encoder.state_dict().items()
                  if k.startswith(f"blocks.{old}.")}
    shallow.load_state_dict(state)
    arch = Arch(64, (4,) * 4, (4.0,) * 4, (True, True, False, True))
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(model(x, arch), shallow(x), atol=1e-4, rtol=1e-4)
        smaller = Arch(48, (2, 3, 3, 4), (2.0, 3.0, 4.0, 3.0), (True, True, False, True))
        assert model(x, smaller).shape == (2, 32, 5, 5)
    model.reorder_mlp_importance("activation", [x])  # SuperSAM's reordering keeps the encoder's function
    with torch.no_grad():
        torch.testing.assert_close(model(x, model.config.space.max_arch()), encoder(x), atol=1e-4, rtol=1e-4)


def test_windowed_attention_grouped_pass_equals_single_passes():
    model = from_sam_state_dict(sam_encoder().state_dict())
    attn = model.blocks[0].attn  # windowed
    x = torch.randn(2, 2, 25, 64)
    x[1, ..., 48:] = 0  # subnet 1 has embed dim 48
    sizes, heads = GroupSizes([64, 48], "cpu"), GroupSizes([4, 2], "cpu")
    with torch.no_grad():
        grouped = attn.grouped_forward(x, sizes, heads)
        torch.testing.assert_close(grouped[0], attn(x[0], embed_dim=64, num_heads=4), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grouped[1, ..., :48], attn(x[1, ..., :48], embed_dim=48, num_heads=2),
                                   atol=1e-5, rtol=1e-5)


def test_bad_sam_weights_get_one_line_errors(tmp_path):
    state = sam_encoder().state_dict()
    cases = {
        "missing.pt": (None, "no file"),
        "garbage.pt": (b"not torch", "is corrupt or not a torch file"),
        "timm.pt": ({"cls_token": torch.zeros(1, 1, 8)}, "no patch_embed.proj.weight and pos_embed"),
        "norelpos.pt": ({k: v for k, v in state.items() if "rel_pos" not in k}, "cannot read the encoder's sizes"),
        "nan.pt": ({**state, "neck.0.weight": torch.full_like(state["neck.0.weight"], float("nan"))}, "NaN"),
        "extra.pt": ({**state, "blocks.0.attn.q_norm.weight": torch.ones(16)}, "unexpected"),
        "shapes.pt": ({**state, "blocks.2.mlp.lin1.weight": torch.zeros(128, 64)}, "shape mismatch"),
    }
    for name, (content, message) in cases.items():
        if isinstance(content, bytes):
            (tmp_path / name).write_bytes(content)
        elif content is not None:
            torch.save(content, tmp_path / name)
        with pytest.raises(CheckpointError, match=message) as error:
            from_sam_state_dict(read_sam_weights(tmp_path / name))
        assert "\n" not in str(error.value)
    marker = tmp_path / "MARKER"
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(CheckpointError):
        read_sam_weights(tmp_path / "evil.pt")
    assert not marker.exists()

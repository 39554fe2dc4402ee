"""The SAM family: the presets against segment-anything's own builders, the cost of a windowed layer by hand, the
command lines on a SAM checkpoint (nas.train --init-from with its report, nas.search, nas.export) as the issue's check
runs them, and relative position tables of another window. Costs against FlopCounterMode, batched passes, extraction
and every export format of every family: tests/nas/test_families.py."""
from __future__ import annotations

import importlib
import json
import pathlib
from functools import partial

import processes
import pytest
import torch
import yaml
from test_sam import image_encoder_module
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from nas import costs as cost
from nas.build import build_supernet
from nas.family import space_from_dict
from nas.pretrained import init_from
from nas.sam.plain import SamBlock
from nas.spaces import PRESETS, load_space

TINY = load_space("sam-seg-tiny")
MNIST = str(processes.REPO / ".." / "shared" / "data" / "mnist")


def preset_encoder(name: str) -> nn.Module:
    """segment-anything's ImageEncoderViT built from the preset file's ``sam:`` arguments, as SAM builds it."""
    arguments = yaml.safe_load(PRESETS[name].read_text())["sam"]
    return image_encoder_module().ImageEncoderViT(**arguments, norm_layer=partial(nn.LayerNorm, eps=1e-6))


def random_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.3)
    return model.eval()


def test_sam_vit_b_is_the_encoder_segment_anything_builds():
    image_encoder_module()
    build_sam = importlib.import_module("segment_anything.build_sam")
    with torch.device("meta"):
        sam = build_sam.build_sam_vit_b()
        ours = preset_encoder("sam-vit-b")
    assert load_space("sam-vit-b").sam == yaml.safe_load(PRESETS["sam-vit-b"].read_text())["sam"]
    theirs = {name: t.shape for name, t in sam.image_encoder.state_dict().items()}
    assert {name: t.shape for name, t in ours.state_dict().items()} == theirs
    space = load_space("sam-vit-b")
    blocks = sam.image_encoder.blocks
    assert space.global_layers == tuple(i for i, block in enumerate(blocks) if block.window_size == 0) == (2, 5, 8, 11)
    assert space.window_size == blocks[0].window_size == 14
    # The cost model counts every weight of the encoder (89.7M, SAM ViT-B's image encoder).
    assert cost.params(space.max_arch(), space) == sum(t.numel() for t in sam.image_encoder.parameters()) == 89670912
    with torch.device("meta"):
        tiny = preset_encoder("sam-seg-tiny")
    head = (TINY.out_chans + 1) * TINY.num_classes * TINY.patch_sizes[0] ** 2
    assert cost.params(TINY.max_arch(), TINY) == sum(t.numel() for t in tiny.parameters()) + head


def test_costs_are_exact_for_windowed_attention_with_padding():
    # One windowed layer of sam-seg-tiny by hand: embed 96, 2 heads of 32 (A = 64), MLP 192, an 8x8 grid in windows of
    # 3, padded to 9x9 (81 tokens, 9 windows of 9).
    hand_macs = (81 * 96 * 3 * 64  # qkv on the padded grid
                 + 9 * (9 * 9 * 64) * 2  # q @ k^T and attn @ v in each window
                 + 81 * (3 + 3) * 64  # decomposed relative position: each query against 3 rows and 3 columns
                 + 81 * 64 * 96  # output projection on the padded grid
                 + 2 * 64 * 96 * 192)  # fc1 and fc2 on the 8x8 grid
    hand_params = 4 * 96 + 97 * 192 + 65 * 96 + 97 * 192 + 193 * 96 + 2 * 5 * 32
    block = SamBlock(96, 2, 32, 192, grid=8, window_size=3)
    with FlopCounterMode(display=False) as counter:
        block(torch.randn(1, 64, 96))
    assert counter.get_total_flops() == 2 * hand_macs
    assert sum(p.numel() for p in block.parameters()) == hand_params
    # The same layer is the difference between two archs that differ in it alone.
    narrow = TINY.arch_type(96, (3, 2, 3, 3, 3, 3), (4.0, 2.0, 4.0, 4.0, 4.0, 4.0), (True,) * 6)
    without = TINY.arch_type(96, (3, 2, 3, 3, 3, 3), (4.0, 2.0, 4.0, 4.0, 4.0, 4.0), (True, False) + (True,) * 4)
    assert cost.macs(narrow, TINY) - cost.macs(without, TINY) == hand_macs
    assert cost.params(narrow, TINY) - cost.params(without, TINY) == hand_params
    # Whole subnets against FlopCounterMode on the extracted encoder: tests/nas/test_families.py (every family).
    low, high = cost.macs_range(TINY)
    draws = cost.macs_many(TINY.sample_many(0, 500), TINY)
    assert low <= draws.min() and draws.max() <= high == cost.macs(TINY.max_arch(), TINY)


def run_cli(module: str, *args: str) -> None:
    status = importlib.import_module(module).main(list(args))
    assert status == 0, f"{module} {' '.join(args)} exited {status}"


@pytest.mark.skipif(not pathlib.Path(MNIST).is_dir(), reason=f"MNIST is not at {MNIST}")
def test_a_sam_checkpoint_trains_searches_and_exports_through_the_command_lines(tmp_path, capsys):
    encoder = random_weights(preset_encoder("sam-seg-tiny"))
    whole = {f"image_encoder.{name}": t for name, t in encoder.state_dict().items()}
    whole |= {"prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": torch.randn(2, 128),
              "mask_decoder.iou_token.weight": torch.randn(1, 256)}
    torch.save(whole, tmp_path / "sam.pth")
    train = ["--space", "sam-seg-tiny", "--dataset", "mnist-seg", "--data-dir", MNIST, "--init-from",
             str(tmp_path / "sam.pth"), "--steps", "1", "--batch-size", "8", "--train-subset", "16", "--test-subset",
             "8", "--search-holdout", "16", "--warmup-steps", "1", "--eval-batch-size", "16", "--no-progress",
             "--no-plot", "--init-reorder", "none"]
    run_cli("nas.train", *train, "--out-dir", str(tmp_path / "train"))
    report = json.loads((tmp_path / "train" / "init_report.json").read_text())
    assert sorted(report["loaded"]) == sorted(name for name in build_supernet(TINY).state_dict()
                                              if not name.startswith("head."))
    assert report["partial"] == [] and report["unused"] == []
    assert sorted(report["not_loaded"]) == ["head.bias (not in the file)", "head.weight (not in the file)"]
    assert report["unused_by_design"] == ["mask_decoder.iou_token.weight",
                                          "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"]

    checkpoint = str(sorted((tmp_path / "train" / "checkpoints").glob("*.pt"))[-1])
    run_cli("nas.search", "--checkpoint", checkpoint, "--algorithm", "autotuner", "--budget", "macs=40M",
            "--generations", "1", "--population", "2", "--holdout-images", "8", "--test-images", "8", "--out-dir",
            str(tmp_path / "search"), "--no-progress")
    best = json.loads((tmp_path / "search" / "search.json").read_text())["best"]["macs=40M"]
    assert best["macs"] == cost.macs(TINY.arch_type.from_dict(best["arch"]), TINY) <= 40e6
    run_cli("nas.export.__main__", "--checkpoint", checkpoint, "--arch", json.dumps(best["arch"]), "--format",
            "pytorch", "--out-dir", str(tmp_path / "export"))
    assert "largest relative difference" in capsys.readouterr().out

    # A tensor of the encoder that fits nowhere is an error naming it, unless the initialisation may be partial.
    torch.save(whole | {"image_encoder.blocks.0.attn.q_norm.weight": torch.ones(32)}, tmp_path / "extra.pth")
    extra = [*train[:7], str(tmp_path / "extra.pth"), *train[8:]]
    assert importlib.import_module("nas.train").main([*extra, "--out-dir", str(tmp_path / "refused")]) == 2
    assert "blocks.0.attn.q_norm.weight" in capsys.readouterr().err
    run_cli("nas.train", *extra, "--allow-partial-init", "--out-dir", str(tmp_path / "partial"))
    report = json.loads((tmp_path / "partial" / "init_report.json").read_text())
    assert report["unused"] == ["blocks.0.attn.q_norm.weight"] and "pos_embed" in report["loaded"]


def test_relative_position_tables_of_another_window_are_not_sliced():
    """SAM's tables are indexed from their middle row: a window of another side leaves them at their initialisation,
    which makes the initialisation partial (an error in nas.train unless --allow-partial-init)."""
    other = load_space("sam-seg-tiny").to_dict()
    other["sam"] = {**other["sam"], "window_size": 4}
    source = build_supernet(TINY).state_dict()
    report = init_from(build_supernet(space_from_dict(other)), source, reorder="none")
    windowed = sorted(f"blocks.{i}.attn.rel_pos_{axis}" for i in (0, 1, 3, 4) for axis in "hw")
    assert sorted(report.skipped) == windowed and "blocks.2.attn.rel_pos_h" in report.loaded
    assert "blocks.0.attn.rel_pos_h (relative position over 3 pretrained positions, 4 here)" in report.not_loaded
    assert "8 supernet tensors not loaded though the file has them" in report.problems()


def test_sam_space_files_are_checked():
    data = load_space("sam-seg-tiny").to_dict()
    assert space_from_dict(data) == TINY
    cases = {"task must be segmentation": {**data, "task": "classification"},
             "unknown arguments \\['act_layer'\\]": {**data, "sam": {**data["sam"], "act_layer": "GELU"}},
             "use_rel_pos=False not supported": {**data, "sam": {**data["sam"], "use_rel_pos": False}},
             "depths largest 5 is not sam's 6": {**data, "depths": [2, 5]},
             "global layers \\[7\\] outside 0..5": {**data, "sam": {**data["sam"], "global_attn_indexes": [2, 7]}}}
    for message, bad in cases.items():
        with pytest.raises(ValueError, match=message):
            space_from_dict(bad)

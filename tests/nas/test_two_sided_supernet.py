"""Two-sided width sharing in the supernet (BCNet, as ViTAS trains it): an arch's side, the supernet reading the
trailing channels, export of a right-side subnet, batched passes refusing it, and two-sided training touching both
ends of every width each step while leading-only training never touches the trailing channels."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from nas.evaluate import batched_forward
from nas.export import extract_subnet
from nas.trainer import TrainConfig, Trainer
from nas.vit.arch import Arch
from nas.vit.space import SearchSpace
from nas.vit.supernet import SupernetConfig, VisionTransformerSupernet

SPACE = SearchSpace(name="sides", embed_dims=[16, 24], depths=[2, 3], num_heads=[1, 2], mlp_ratios=[1.0, 2.0],
                    head_dim=8, patch_sizes=[4, 8], img_size=16, num_classes=5, identity_layers=True,
                    private_class_tokens=True, private_qk=True)


def randomized_supernet() -> VisionTransformerSupernet:
    torch.manual_seed(0)
    model = VisionTransformerSupernet(SupernetConfig.from_space(SPACE))
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
    return model.eval()


def test_arch_side_is_checked_and_written_only_when_right():
    arch = SPACE.sample(0)
    assert arch.side == "left" and "side" not in arch.to_dict()
    right = arch.on_side("right")
    assert right.to_dict()["side"] == "right" and Arch.from_json(right.to_json()) == right != arch
    with pytest.raises(ValueError, match="side must be one of"):
        arch.on_side("both")


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_exported_right_side_subnet_computes_the_supernet(seed):
    model = randomized_supernet()
    arch = SPACE.sample(seed).on_side("right")
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = model(images, arch)
        exported = extract_subnet(model, arch)
        torch.testing.assert_close(exported(images), expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(model(images, arch.on_side("left")), expected), "both sides gave the same logits"


def test_right_side_reads_only_the_trailing_channels():
    """NaN in the leading channels that a right-side arch of embed dim 16 (of 24) never reads: the logits stay
    finite; the left side reads them and turns NaN."""
    model = randomized_supernet()
    arch = dataclasses.replace(Arch.from_depth(16, 3, 2, 2.0, 3, patch_size=8), side="right")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(("cls_token", "pos_embed")) or name.endswith(("norm1.weight", "norm.weight")):
                param[..., :8] = float("nan")
        images = torch.randn(2, 3, 16, 16)
        assert torch.isfinite(model(images, arch)).all()
        assert torch.isnan(model(images, arch.on_side("left"))).any()


def test_batched_passes_refuse_right_side_archs_and_read_leading_slices_after_one():
    model = randomized_supernet()
    archs = [SPACE.sample(4), SPACE.sample(5), SPACE.max_arch()]
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        with pytest.raises(ValueError, match="leading channels only"):
            batched_forward(model, images, [archs[0].on_side("right")])
        expected = torch.stack([model(images, a) for a in archs])
        model(images, SPACE.max_arch().on_side("right"))  # every layer on the right side
        model(images, Arch.from_depth(16, 2, 2, 2.0, 3, patch_size=8).on_side("right"))  # the last one switched off
        torch.testing.assert_close(batched_forward(model, images, archs), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sharing", ["leading", "two_sided"])
def test_two_sided_training_updates_both_ends_of_every_width_each_step(tmp_path, sharing):
    config = TrainConfig(out_dir=str(tmp_path / sharing), train_subset=64, test_subset=32, batch_size=16,
                         max_steps=1, warmup_steps=1, log_every=1, ckpt_every=0, progress=False, plot=False,
                         sampler="uniform", sampler_options={}, width_sharing=sharing)
    trainer = Trainer(config)
    try:
        smallest = trainer.space.min_arch()
        trainer.sampler.sample = lambda: [smallest]
        images, labels = next(iter(trainer.batches_from(0)))
        trainer.train_step(images, labels)
        e, full = smallest.embed_dim, trainer.model.config.embed_dim
        assert e < full
        norm = trainer.model.norm.weight.grad
        assert norm[:e].abs().sum() > 0
        trailing = norm[full - e:]
        if sharing == "two_sided":
            assert trailing.abs().sum() > 0 and trainer.sides(smallest) == [smallest, smallest.on_side("right")]
        else:
            assert torch.count_nonzero(norm[e:]) == 0
    finally:
        trainer.close()


def test_two_sided_width_sharing_refuses_hybrid_spaces(tmp_path):
    from nas.errors import ConfigError

    config = TrainConfig(out_dir=str(tmp_path / "h"), space="uninet-cifar", dataset="cifar10", data_dir=str(tmp_path),
                         width_sharing="two_sided", progress=False, plot=False)
    with pytest.raises(ConfigError, match="two_sided"):
        Trainer(config)


def test_two_sided_evaluation_averages_both_sides_and_caches_each_side_alone():
    from nas.evaluate import EvalCache, evaluate_archs, evaluate_sides

    model = randomized_supernet()
    archs = [SPACE.sample(6), SPACE.sample(7)]
    torch.manual_seed(1)
    batches = [(torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))) for _ in range(2)]
    cache = EvalCache()
    both = evaluate_sides(model, archs, batches, ("left", "right"), cache=cache, data_key="d", progress=False)
    for arch, result in zip(archs, both):
        with torch.no_grad():
            correct = [sum(int((model(x, arch.on_side(side)).argmax(-1) == y).sum()) for x, y in batches)
                       for side in ("left", "right")]
        assert result.top1 == pytest.approx(100 * sum(correct) / 2 / 16)
        assert cache.get(arch, "d|left").top1 == pytest.approx(100 * correct[0] / 16)
        assert cache.get(arch.on_side("right"), "d|right").top1 == pytest.approx(100 * correct[1] / 16)
        assert cache.get(arch, "d") is None
    left = evaluate_sides(model, archs, batches, progress=False)
    assert left == evaluate_archs(model, archs, batches, progress=False)


def test_search_on_a_two_sided_checkpoint_scores_the_mean_of_both_sides(tmp_path):
    """python -m nas.search reads width_sharing from the checkpoint: every candidate's top-1 is the mean of its left
    and right side's on the search images, each side cached alone, and search.json says which sides."""
    import json

    from nas.evaluate import EvalCache
    from nas.search import main
    from nas.trainer import train

    checkpoint = train(TrainConfig(max_steps=1, batch_size=32, train_subset=64, test_subset=32, search_holdout=64,
                                   out_dir=str(tmp_path / "run"), ckpt_every=0, progress=False, plot=False,
                                   width_sharing="two_sided", backend="reference")).checkpoint
    out = tmp_path / "search"
    assert main(["--checkpoint", checkpoint, "--out-dir", str(out), "--generations", "1", "--population", "3",
                 "--test-images", "16", "--no-race", "--no-progress"]) == 0
    summary = json.loads((out / "search.json").read_text())
    assert summary["sides"] == ["left", "right"] and summary["candidates"]
    cached = EvalCache(out / "eval_cache.json").state_dict()  # "<data>|<slice>|<side>|<arch json>": result
    for candidate in summary["candidates"]:
        arch = Arch.from_dict(candidate["arch"])
        left = [r["top1"] for k, r in cached.items() if k.endswith("|left|" + arch.to_json())]
        right = [r["top1"] for k, r in cached.items() if k.endswith("|right|" + arch.on_side("right").to_json())]
        assert len(left) == len(right) == 1
        assert candidate["top1"] == pytest.approx((left[0] + right[0]) / 2)

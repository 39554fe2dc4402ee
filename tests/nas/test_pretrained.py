"""SuperSAM's pipeline pieces: pretrained weights of another size into a supernet (``nas.pretrained``) with its report,
checked against the larger supernet's own subnet; MLP reordering before training keeps the function; the sandwich
rule with a per-layer drop profile against the profile; in-place distillation from the pretrained model."""
from __future__ import annotations

import dataclasses
import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from hostile import RunsCode

from nas.errors import CheckpointError, ConfigError
from nas.pretrained import init_from, read_weights
from nas.samplers import build_sampler
from nas.spaces import load_space
from nas.trainer import TrainConfig, Trainer, soft_cross_entropy
from nas.vit.arch import Arch
from nas.vit.space import SearchSpace
from nas.vit.supernet import SupernetConfig, VisionTransformerSupernet

DIGITS = load_space("digits-tiny")  # embed 32..64, depth 2..4, heads 1..2 of 16, mlp 2..4
SMALL = dataclasses.replace(DIGITS, name="small", embed_dims=(32, 48), depths=(2, 3), num_heads=(1,),
                            mlp_ratios=(2.0, 3.0))
DROP = dataclasses.replace(DIGITS, name="digits-drop", depths=(1, 2, 3, 4), identity_layers=True)


def supernet(space: SearchSpace, seed: int = 0) -> VisionTransformerSupernet:
    torch.manual_seed(seed)
    return VisionTransformerSupernet(SupernetConfig.from_space(space)).eval()


def images(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(3))


def test_a_smaller_supernet_from_a_larger_one_computes_its_subnet():
    """The oracle: the larger supernet's own subnet of the smaller one's largest sizes."""
    big, x = supernet(DIGITS, seed=1), images()
    same = Arch.from_depth(48, 3, 1, 3.0, DIGITS.max_depth)  # SMALL's largest arch, as a subnet of DIGITS
    for reorder in ("none", "magnitude"):
        small = supernet(SMALL, seed=2)
        report = init_from(small, big.state_dict(), reorder=reorder)
        reference = supernet(DIGITS, seed=1)
        if reorder == "magnitude":
            reference.reorder_mlp_importance("magnitude")  # the slice keeps the most important units
        torch.testing.assert_close(small(x, SMALL.max_arch()), reference(x, same), atol=1e-5, rtol=1e-5)
        assert "blocks.3.norm1.weight" in report.unused and not report.not_initialised
        assert "blocks.0.attn.qkv.weight: (96, 64) -> (48, 48)" in report.partial
        assert "norm.weight: (64,) -> (48,)" in report.partial and "head.bias" in report.initialised


def test_a_larger_supernet_from_a_smaller_one_holds_it_in_its_leading_slices():
    small, x = supernet(SMALL, seed=2), images()
    big = supernet(DIGITS, seed=5)
    untouched = big.blocks[0].attn.qkv.weight.detach().clone()
    report = init_from(big, small.state_dict(), reorder="none")
    # By hand, per q/k/v block: rows of one 16-channel head, columns of 48 channels.
    for j in range(3):
        torch.testing.assert_close(big.blocks[0].attn.qkv.weight[32 * j:32 * j + 16, :48],
                                   small.blocks[0].attn.qkv.weight[16 * j:16 * j + 16], atol=0, rtol=0)
        torch.testing.assert_close(big.blocks[0].attn.qkv.weight[32 * j + 16:32 * j + 32],
                                   untouched[32 * j + 16:32 * j + 32], atol=0, rtol=0)
    assert big.blocks[0].mlp.fc1.weight[:144, :48].equal(small.blocks[0].mlp.fc1.weight)
    assert sorted(n for n in report.not_initialised if n.startswith("blocks.3.")) == sorted(
        f"{n} (not in the file)" for n in big.state_dict() if n.startswith("blocks.3."))
    assert not report.unused
    torch.testing.assert_close(big(x, Arch.from_depth(48, 3, 1, 3.0, 4)), small(x, SMALL.max_arch()),
                               atol=1e-5, rtol=1e-5)


def test_head_and_position_embedding_of_another_task_are_not_initialised():
    other = dataclasses.replace(DIGITS, num_classes=3, img_size=16)
    report = init_from(supernet(DIGITS), supernet(other).state_dict())
    assert "head.weight (3 pretrained classes, 10 here)" in report.not_initialised
    assert "pos_embed (65 pretrained tokens, 17 here)" in report.not_initialised
    assert "initialised" in report.summary()


def test_bad_pretrained_files_get_one_line_errors(tmp_path):
    cases = {"missing.pt": None, "garbage.pt": b"not a torch file", "list.pt": [torch.zeros(1)],
             "empty.pt": {"note": "no tensors"}, "nan.pt": {"head.weight": torch.tensor([float("nan")])}}
    messages = {"missing.pt": "no file", "garbage.pt": "is corrupt or not a torch file", "list.pt": "holds a list",
                "empty.pt": "holds no tensors", "nan.pt": "NaN or infinite values in head.weight"}
    for name, content in cases.items():
        if isinstance(content, bytes):
            (tmp_path / name).write_bytes(content)
        elif content is not None:
            torch.save(content, tmp_path / name)
        with pytest.raises(CheckpointError, match=messages[name]) as error:
            read_weights(tmp_path / name)
        assert "\n" not in str(error.value)
    marker = tmp_path / "MARKER"
    (tmp_path / "evil.pt").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_weights(tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="none of the 1 pretrained tensors has a name of this supernet"):
        init_from(supernet(DIGITS), {"image_encoder.patch_embed.proj.weight": torch.zeros(2)})


def test_sandwich_drop_profile_sampling_matches_the_profile():
    profile = [0.1, 0.3, 0.5, 0.7]
    sampler = build_sampler("sandwich", DROP, seed=4, num_random=2, drop_profile=profile)
    steps, off, widths = 3000, np.zeros(4), Counter()
    for _ in range(steps):
        archs = sampler.sample()
        assert archs[:2] == [DROP.max_arch(), DROP.min_arch()]
        for arch in archs[2:]:
            off += ~np.array(arch.layer_on)
            widths[arch.embed_dim] += 1
    draws = 2 * steps
    # The smallest depth, 1, brings one layer back only where all four drop (probability 0.0105).
    p_all = np.prod(profile)
    sigma = np.sqrt(np.array(profile) * (1 - np.array(profile)) / draws)
    assert np.all(np.abs(off / draws - profile) < 4 * sigma + p_all), (off / draws, profile)
    assert all(abs(widths[e] / draws - 1 / 3) < 0.03 for e in DROP.embed_dims)
    linear = build_sampler("sandwich", DROP, drop_profile="linear", max_drop=0.4)
    assert np.allclose(linear.drop_profile, [0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="identity_layers=False"):
        build_sampler("sandwich", DIGITS, drop_profile="linear")
    with pytest.raises(ValueError, match="must list 4 probabilities"):
        build_sampler("sandwich", DROP, drop_profile=[0.5, 1.5, 0, 0])


def run_config(tmp_path, name, **overrides):
    values = dict(out_dir=str(tmp_path / name), train_subset=128, test_subset=64, batch_size=32, max_steps=2,
                  warmup_steps=1, log_every=1, ckpt_every=0, progress=False, plot=False, augment=False)
    return TrainConfig(**{**values, **overrides})


def test_pipeline_init_reorder_drop_profile_and_pretrained_teacher(tmp_path):
    space_file = tmp_path / "drop.yaml"
    space_file.write_text(DROP.to_yaml())
    small_file = tmp_path / "small.yaml"
    small_file.write_text(SMALL.to_yaml())
    pretrained = Trainer(run_config(tmp_path, "pretrained", space=str(small_file), sampler="uniform"))
    checkpoint = pretrained.fit().checkpoint
    pretrained.close()

    config = run_config(tmp_path, "supersam", space=str(space_file), init_from=checkpoint, reorder_mlp="activation",
                        reorder_images=64, teacher="pretrained",
                        sampler_options={"drop_profile": [0.0, 0.2, 0.4, 0.6]})
    plain = Trainer(dataclasses.replace(config, out_dir=str(tmp_path / "plain"), reorder_mlp=None))
    trainer = Trainer(config)
    try:
        # Reordering before training keeps the largest subnet's function (and moved units where it mattered).
        x = images().to(torch.float32)
        for model in (plain.model, trainer.model):
            model.eval()
        torch.testing.assert_close(trainer.model(x, DROP.max_arch()), plain.model(x, DROP.max_arch()),
                                   atol=1e-5, rtol=1e-5)
        assert not trainer.model.blocks[0].mlp.fc1.weight.equal(plain.model.blocks[0].mlp.fc1.weight)
        report = (tmp_path / "supersam" / "init_report.json").read_text()
        assert "blocks.3.norm1.weight (not in the file)" in report

        # The subnets after the largest learn from the pretrained model's outputs.
        trainer.model.train()
        images_, labels = next(trainer.batches_from(0))
        normalised, _ = trainer.augmentation(images_, labels, None, trainer.data.mean, trainer.data.std, 10)
        with torch.no_grad():
            teacher = trainer.teacher(normalised).softmax(dim=-1)
            expected = soft_cross_entropy(trainer.model(normalised, DROP.min_arch()), teacher)
            pretrained_model = pretrained.model.eval()
            torch.testing.assert_close(teacher, pretrained_model(normalised, SMALL.max_arch()).softmax(-1))
        record = trainer.train_step(images_, labels)
        assert record["losses"][1] == pytest.approx(float(expected), rel=1e-5)
        assert record["archs"][1] == DROP.min_arch().to_dict()
    finally:
        trainer.close()
        plain.close()
    with pytest.raises(ConfigError, match="teacher=pretrained distils from the model of init_from"):
        run_config(tmp_path, "bad", teacher="pretrained")
    with pytest.raises(ConfigError, match="needs a sampler that distils"):
        run_config(tmp_path, "bad", teacher="pretrained", init_from=checkpoint, sampler="uniform")


def test_fixed_sampler_draws_its_arch():
    arch = Arch.from_depth(48, 2, 1, 2.0, 4)
    sampler = build_sampler("fixed", DIGITS, arch=arch.to_dict())
    assert [sampler.sample() for _ in range(3)] == [[arch]] * 3
    assert build_sampler("fixed", DIGITS).sample() == [DIGITS.max_arch()]
    with pytest.raises(ValueError, match="not in"):
        build_sampler("fixed", DIGITS, arch=Arch.from_depth(40, 2, 1, 2.0, 4).to_dict())

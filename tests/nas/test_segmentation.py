"""The dense task: the mnist-seg canvases' labels against their source digits, the dense head (by hand, batched,
exported), mIoU by hand, and a short train -> search -> export run on the canvases."""
from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
import processes
import pytest
import torch
import torch.nn.functional as F

from elastic_ops.plain import dense_logits
from nas import canvases
from nas.data import load_dataset, load_mnist
from nas.errors import ConfigError, DataError
from nas.evaluate import TensorBatches, batched_forward, confusion_matrix, evaluate_archs, mean_iou
from nas.export import extract_subnet, load_subnet
from nas.searching import SearchConfig, run_search
from nas.spaces import load_space
from nas.trainer import TrainConfig, train
from nas.vit.supernet import SupernetConfig, VisionTransformerSupernet

MNIST = str(processes.REPO / ".." / "shared" / "data" / "mnist")
needs_mnist = pytest.mark.skipif(not pathlib.Path(MNIST).is_dir(),
                                 reason=f"MNIST is not at {MNIST} (expected ../shared/data next to the repo)")
SPACE = load_space("mnist-seg-tiny")


@needs_mnist
def test_canvas_labels_follow_their_source_digits():
    data = load_dataset("mnist-seg", MNIST, "test")
    assert data.images.shape == (1000, 1, 32, 32) and data.labels.shape == (1000, 32, 32)
    source = load_mnist(MNIST, "test")
    digits, classes = source.images[8000:].float(), source.labels[8000:]  # test canvases use images 8000..9999
    shrunk = F.avg_pool2d(digits, 2).round().to(torch.uint8)[:, 0]  # 28 -> 14: each 2x2 block's mean
    placement = canvases.place(1000, 2000, np.random.default_rng(canvases.SPLITS["test"][2]))
    for n in range(200):
        covered = torch.zeros(32, 32, dtype=torch.bool)
        for k in range(canvases.DIGITS_PER_CANVAS):
            d, r, c = (int(a[n, k]) for a in (placement.digits, placement.rows, placement.cols))
            box = (slice(r, r + 14), slice(c, c + 14))
            assert not covered[box].any(), "digits overlap"
            covered[box] = True
            assert torch.equal(data.images[n, 0][box], shrunk[d])
            ink = shrunk[d] >= 128
            assert torch.equal(data.labels[n][box][ink], torch.full((int(ink.sum()),), int(classes[d])))
            assert (data.labels[n][box][~ink] == 10).all()
        assert (data.images[n, 0][~covered] == 0).all() and (data.labels[n][~covered] == 10).all()
    counts = torch.bincount(data.labels.flatten(), minlength=11)
    assert (counts[:10] > 2000).all() and counts[10] > 0.8 * counts.sum()


def test_dense_head_by_hand_batched_and_exported():
    outputs = torch.arange(2 * 4 * 3 * 2 * 2, dtype=torch.float32).view(2, 4, 3 * 2 * 2)  # 2x2 patches of 2x2 px
    logits = dense_logits(outputs, 2, 3)
    assert logits.shape == (2, 3, 4, 4)
    for b, t, cls, i, j in [(0, 0, 0, 0, 0), (1, 3, 2, 1, 0), (0, 1, 1, 0, 1), (1, 2, 0, 1, 1)]:
        row, col = divmod(t, 2)
        assert logits[b, cls, 2 * row + i, 2 * col + j] == outputs[b, t, cls * 4 + i * 2 + j]
    torch.manual_seed(0)
    model = VisionTransformerSupernet(SupernetConfig.from_space(SPACE)).eval()
    assert model.head.weight.shape == (11 * 16, 96)
    x = torch.randn(3, 1, 32, 32)
    archs = [SPACE.max_arch(), SPACE.min_arch(), *SPACE.sample_many(np.random.default_rng(2), 3).archs()]
    with torch.no_grad():
        single = torch.stack([model(x, arch) for arch in archs])
        torch.testing.assert_close(batched_forward(model, x, archs), single, atol=1e-5, rtol=1e-5)
        for arch, expected in zip(archs[1:3], single[1:3]):
            torch.testing.assert_close(extract_subnet(model, arch)(x), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one patch size"):
        dataclasses.replace(SPACE, patch_sizes=(4, 8))


def test_mean_iou_by_hand():
    labels = torch.tensor([[0, 0, 1, 2]])
    predictions = torch.tensor([[0, 1, 1, 1]])
    # class 0: 1 hit / union 2; class 1: 1 / 3; class 2: 0 / 1
    assert mean_iou(confusion_matrix(predictions, labels, 4)) == pytest.approx((1 / 2 + 1 / 3 + 0) / 3)
    torch.manual_seed(1)
    model = VisionTransformerSupernet(SupernetConfig.from_space(SPACE)).eval()
    images = torch.randint(0, 256, (20, 1, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 11, (20, 32, 32))
    batches = TensorBatches(images, labels, (0.1,), (0.3,), batch_size=8)
    arch = SPACE.min_arch()
    result = evaluate_archs(model, [arch], batches, progress=False)[0]
    with torch.no_grad():
        predicted = model((images.float() / 255 - 0.1) / 0.3, arch).argmax(dim=1)
    hits = [((predicted == c) & (labels == c)).sum().double() for c in range(11)]
    unions = [((predicted == c) | (labels == c)).sum() for c in range(11)]
    ious = [hit / union for hit, union in zip(hits, unions) if union > 0]
    assert result.miou == pytest.approx(100 * float(torch.stack(ious).mean()), rel=1e-9)
    assert result.top1 == pytest.approx(100 * float((predicted == labels).float().mean()), rel=1e-6)


@needs_mnist
def test_train_search_and_export_on_the_canvases(tmp_path):
    config = TrainConfig(space="mnist-seg-tiny", dataset="mnist-seg", data_dir=MNIST, train_subset=64, test_subset=32,
                         search_holdout=48, batch_size=16, max_steps=3, warmup_steps=1, eval_batch_size=32,
                         out_dir=str(tmp_path / "train"), progress=False, plot=False,
                         sampler_options={"drop_profile": "linear"})
    result = train(config)
    assert result.metric == "mIoU" and 0 < result.largest < 1
    search = SearchConfig(checkpoint=result.checkpoint, algorithm="autotuner", budgets=["macs=15M"], generations=2,
                          population=4, holdout_images=32, test_images=32, out_dir=str(tmp_path / "search"),
                          export=True, progress=False)
    summary = run_search(search)
    assert summary["score"] == "miou" and all("miou" in c for c in summary["candidates"])
    best = summary["best"]["macs=15M"]
    assert best["macs"] <= 15e6 and summary["test"]["macs=15M"]["miou"] >= 0
    model, arch = load_subnet(summary["exported"]["macs=15M"])
    assert arch.to_dict() == best["arch"] and model(torch.zeros(2, 1, 32, 32)).shape == (2, 11, 32, 32)
    assert json.loads((tmp_path / "search" / "search.json").read_text())["score"] == "miou"

    classify = tmp_path / "classify.yaml"
    classify.write_text(dataclasses.replace(SPACE, task="classification").to_yaml())
    with pytest.raises(DataError, match="labelled per pixel but the search space's task is classification"):
        train(dataclasses.replace(config, space=str(classify), out_dir=str(tmp_path / "bad")))
    with pytest.raises(ConfigError, match="would change the images without their label maps"):
        dataclasses.replace(config, crop="pad")

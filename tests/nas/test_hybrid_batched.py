"""Batched evaluation of hybrid subnets (nas.hybrid.batched, nas.evaluate): a pass over subnets of one layout equals
their single forwards, each with its own BatchNorm statistics; evaluate_archs re-estimates the statistics of every
subnet on the calibration images, as recalibrating by hand and running the plain forward does."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hybrid_models import supernet

from nas.batch_norm import BatchNormStats
from nas.evaluate import batched_forward, evaluate_archs
from nas.hybrid.batched import HybridBatchedSubnets, batched_pass, layout

SPACES = ["uninet-cifar", "elasticvit-mobile-cifar"]
TOL = dict(atol=2e-5, rtol=2e-5)


def same_layout(space, base, count: int, rng) -> list:
    """``count`` archs with ``base``'s layout (resolution, and per stage operator, depth and DSM) and every width drawn
    anew: built from the space's categorical genes."""
    rows = []
    for _ in range(count):
        row = []
        for name, choices in space.genes():
            field = name.rpartition(".")[2]
            if field == "resolution":
                row.append(choices.index(base.resolution))
            elif field in ("op", "depth", "dsm"):
                row.append(choices.index(getattr(base.stages[int(name[len("stage"):name.index(".")])], field)))
            else:
                row.append(int(rng.integers(len(choices))))
        rows.append(row)
    return space.decode_genes(np.array(rows)).archs()


def archs_of(space, rng) -> list:
    """Three archs sharing the largest arch's layout (with it: attention blocks in UniNet's, grouped), two sharing the
    smallest's, one more."""
    archs = same_layout(space, space.max_arch(), 3, rng) + same_layout(space, space.min_arch(), 2, rng)
    return archs + [space.sample(rng)]


def own_statistics(model, archs, seed: int) -> list[BatchNormStats]:
    """Different random BatchNorm statistics for each arch (restoring the model's own afterwards)."""
    own, generator, statistics = BatchNormStats(model), torch.Generator().manual_seed(seed), []
    with torch.no_grad():
        for _ in archs:
            for name, buffer in model.named_buffers():
                if name.endswith("running_mean"):
                    buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)
                elif name.endswith("running_var"):
                    buffer.copy_(torch.rand(buffer.shape, generator=generator) + 0.5)
            statistics.append(BatchNormStats(model))
    own.load(model)
    return statistics


@pytest.mark.parametrize("space_name", SPACES)
def test_a_batched_pass_equals_single_forwards_with_each_subnets_statistics(space_name):
    model = supernet(space_name)
    space = model.space
    archs = archs_of(space, np.random.default_rng(1))
    assert len({layout(arch) for arch in archs[:3]}) == 1 and layout(archs[0]) != layout(archs[3])
    statistics = own_statistics(model, archs, seed=2)
    images = torch.randn(3, space.in_chans, space.img_size, space.img_size, generator=torch.Generator().manual_seed(3))
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    active = model.arch
    logits = batched_pass(model, archs, statistics)(images)
    assert model.arch == active
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), f"the pass left {name} changed"
    for k, arch in enumerate(archs):
        statistics[k].load(model)
        with torch.no_grad():
            expected = model(images, arch)
        torch.testing.assert_close(logits[k], expected, **TOL)
    for name, buffer in model.named_buffers():
        buffer.copy_(before[name])
    model.set_arch(active)


@pytest.mark.parametrize("space_name", SPACES)
def test_batched_forward_on_a_hybrid_supernet_uses_its_own_statistics(space_name):
    model = supernet(space_name)
    space = model.space
    archs = archs_of(space, np.random.default_rng(4))
    images = torch.randn(2, space.in_chans, 28, 28, generator=torch.Generator().manual_seed(5))  # resized per subnet
    logits = batched_forward(model, images, archs)
    with torch.no_grad():
        expected = torch.stack([model(images, arch) for arch in archs])
    torch.testing.assert_close(logits, expected, **TOL)


def test_a_pass_refuses_archs_of_several_layouts_and_training_mode():
    model = supernet("uninet-cifar")
    space = model.space
    with pytest.raises(ValueError, match="archs of one pass must share their layout"):
        HybridBatchedSubnets(model, [space.min_arch(), space.max_arch()])
    model.train()
    try:
        with pytest.raises(ValueError, match="training mode"):
            batched_forward(model, torch.zeros(1, 3, 32, 32), [space.min_arch()])
    finally:
        model.eval()


def by_hand(model, arch, batches, calibration) -> tuple[float, float]:
    """Top-1 (percent) and mean loss of ``arch`` with its statistics re-estimated on ``calibration``, then plain
    forwards: the oracle of evaluate_archs on a supernet with BatchNorm."""
    model.recalibrate_batch_norm(calibration, arch)
    model.eval()
    hits, loss, count = 0, 0.0, 0
    with torch.no_grad():
        for images, labels in batches:
            logits = model(images, arch)
            hits += int((logits.argmax(-1) == labels).sum())
            loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            count += len(labels)
    return 100.0 * hits / count, loss / count


def test_evaluate_archs_recalibrates_batch_norm_for_every_subnet():
    model = supernet("uninet-cifar")
    space = model.space
    generator = torch.Generator().manual_seed(6)
    batches = [(torch.randn(6, 3, 32, 32, generator=generator), torch.randint(0, 10, (6,), generator=generator))]
    calibration = [torch.randn(4, 3, 32, 32, generator=generator) * 2 + 0.5 for _ in range(2)]
    archs = same_layout(space, space.max_arch(), 2, np.random.default_rng(7)) + [space.min_arch()]
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    results = evaluate_archs(model, archs, batches, calibration=calibration, subnets=3,
                             progress=False)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), f"evaluation left {name} changed"
    try:
        for arch, result in zip(archs, results):
            top1, loss = by_hand(model, arch, batches, calibration)
            assert result.top1 == pytest.approx(top1) and result.loss == pytest.approx(loss, rel=1e-5)
    finally:
        for name, buffer in model.named_buffers():
            buffer.copy_(before[name])
    with pytest.raises(ValueError, match="pass calibration batches"):
        evaluate_archs(model, archs, batches, progress=False)

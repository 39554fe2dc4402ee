"""The evaluation API on real CIFAR-10 test images: batched results equal each subnet's own forward, the cache,
and the choice of how many subnets share a pass."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_batched import small_supernet

import nas.evaluate as evaluate_module
import nas.vit.batched as vit_batched
from nas.data import CIFAR10_STATS
from nas.evaluate import EvalCache, TensorBatches, evaluate_archs, subnets_per_pass
from nas.vit.space import SearchSpace
from nas.vit.supernet import SupernetConfig, VisionTransformerSupernet

IMAGES = 128
CIFAR_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "cifar-10-batches-py")


@pytest.fixture(scope="module")
def cifar_test_images():
    path = os.path.join(CIFAR_DIR, "test_batch")
    if not os.path.exists(path):
        pytest.skip(f"CIFAR-10 is not at {os.path.abspath(CIFAR_DIR)} (expected ../shared/data next to the repo)")
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    start = np.random.default_rng().integers(0, 10000 - IMAGES)  # fresh images every run
    images = torch.from_numpy(np.asarray(batch[b"data"][start:start + IMAGES], dtype=np.uint8).reshape(-1, 3, 32, 32))
    labels = torch.tensor(batch[b"labels"][start:start + IMAGES])
    return images, labels


@pytest.fixture(scope="module")
def model_and_archs():
    model = small_supernet("cifar-tiny", seed=int(np.random.default_rng().integers(1000)), full_size=True)
    space = model.config.space
    archs = space.sample_many(np.random.default_rng(), 3).archs() + [space.min_arch()]
    return model, archs


def by_hand(model, arch, batches):
    """Top-1, top-5 and mean loss of one subnet with its own forward: the oracle."""
    logits = torch.cat([model(images, arch) for images, _ in batches])
    labels = torch.cat([labels for _, labels in batches])
    top5 = logits.topk(5, dim=1).indices
    return (100.0 * (top5[:, 0] == labels).double().mean().item(),
            100.0 * (top5 == labels[:, None]).any(1).double().mean().item(),
            F.cross_entropy(logits, labels).item())


def test_batched_evaluation_equals_each_subnet_alone(cifar_test_images, model_and_archs):
    model, archs = model_and_archs
    batches = TensorBatches(*cifar_test_images, *CIFAR10_STATS, batch_size=50)
    results = evaluate_archs(model, archs, batches, subnets=2, progress=False)
    with torch.no_grad():
        for arch, result in zip(archs, results):
            top1, top5, loss = by_hand(model, arch, batches)
            assert result.samples == IMAGES
            assert result.top1 == pytest.approx(top1) and result.top5 == pytest.approx(top5)
            assert result.loss == pytest.approx(loss, rel=1e-4)
    assert len({r.loss for r in results}) > 1
    one_by_one = evaluate_archs(model, archs[:2], batches, batched=False, progress=False)
    assert [r.top1 for r in one_by_one] == [r.top1 for r in results[:2]]


def test_private_qk_supernet_is_evaluated_batched(cifar_test_images, monkeypatch):
    """A ViTAS-style supernet with private q/k per head count and patch sizes: evaluated in batched passes, with
    the results of each subnet alone."""
    space = SearchSpace(name="tiny-vitas", embed_dims=[24, 32], depths=[2, 3], num_heads=[1, 2], mlp_ratios=[2.0, 4.0],
                        head_dim=16, patch_sizes=[4, 8], img_size=32, num_classes=10, identity_layers=True,
                        private_class_tokens=True, private_qk=True)
    torch.manual_seed(0)
    model = VisionTransformerSupernet(SupernetConfig.from_space(space)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if "norm" in name else 0.0, param.shape[-1] ** -0.5 if param.dim() > 1 else 0.2)
    archs = [space.min_arch()]
    rng = np.random.default_rng(0)
    while len(archs) < 3:  # three distinct subnets: a repeated arch would be evaluated once
        arch = space.sample(rng)
        archs += [] if arch in archs else [arch]
    passes = []
    real_forward = vit_batched.forward_by_patch_size
    monkeypatch.setattr(vit_batched, "forward_by_patch_size",
                        lambda m, images, group: passes.append(len(group)) or real_forward(m, images, group))
    batches = TensorBatches(cifar_test_images[0][:64], cifar_test_images[1][:64], *CIFAR10_STATS, batch_size=32)
    results = evaluate_archs(model, archs, batches, progress=False)
    assert passes == [len(archs)] * 2, "one pass per batch for all archs"
    with torch.no_grad():
        for arch, result in zip(archs, results):
            top1, top5, loss = by_hand(model, arch, batches)
            assert (result.top1, result.top5) == (pytest.approx(top1), pytest.approx(top5))
            assert result.loss == pytest.approx(loss, rel=1e-4)
    assert len({r.loss for r in results}) > 1


def test_cache_by_arch_and_data(cifar_test_images, model_and_archs, monkeypatch, tmp_path):
    model, archs = model_and_archs
    batches = TensorBatches(cifar_test_images[0][:32], cifar_test_images[1][:32], *CIFAR10_STATS, batch_size=32)
    cache = EvalCache(tmp_path / "cache.json")
    evaluated = []
    real_forward = vit_batched.forward_by_patch_size
    monkeypatch.setattr(vit_batched, "forward_by_patch_size",
                        lambda m, images, group: evaluated.extend(group) or real_forward(m, images, group))
    first = evaluate_archs(model, archs[:3], batches, cache=cache, progress=False)
    assert sorted(map(str, evaluated)) == sorted(map(str, archs[:3]))
    evaluated.clear()
    again = evaluate_archs(model, archs[2:] + archs[2:3], batches, cache=cache, progress=False)
    assert sorted(map(str, evaluated)) == sorted(map(str, archs[3:])), "only the archs not in the cache are evaluated"
    assert again[0] == first[2] and again[-1] == again[0]
    cache.save()
    assert len(EvalCache(tmp_path / "cache.json")) == len(archs)
    evaluated.clear()
    other_data = TensorBatches(cifar_test_images[0][32:48], cifar_test_images[1][32:48], *CIFAR10_STATS, batch_size=16)
    evaluate_archs(model, archs[:1], other_data, cache=cache, progress=False)
    assert evaluated == archs[:1], "other data is another cache key"


def test_subnets_per_pass_follows_memory(model_and_archs, monkeypatch):
    model, archs = model_and_archs
    monkeypatch.setattr(evaluate_module, "available_memory", lambda device: 1 << 20)
    assert subnets_per_pass(model, archs, 256, torch.device("cpu"), torch.float32) == 1
    monkeypatch.setattr(evaluate_module, "available_memory", lambda device: 1 << 40)
    assert subnets_per_pass(model, archs, 256, torch.device("cpu"), torch.float32) == len(archs)
    per_subnet = vit_batched.pass_memory_per_image(model, archs, torch.float32) * 256
    monkeypatch.setattr(evaluate_module, "available_memory", lambda device: 3 * per_subnet * 2 + 1)
    assert subnets_per_pass(model, archs, 256, torch.device("cpu"), torch.float32, memory_fraction=0.5) == 3


def test_evaluate_rejects_foreign_archs(cifar_test_images, model_and_archs):
    from nas.spaces import load_space

    model, archs = model_and_archs
    batches = TensorBatches(*cifar_test_images, *CIFAR10_STATS, batch_size=IMAGES)
    with pytest.raises(ValueError, match="arch 1 of 2"):
        evaluate_archs(model, [archs[0], load_space("digits-tiny").max_arch()], batches, progress=False)
    with pytest.raises(ValueError, match="uint8 images"):
        TensorBatches(cifar_test_images[0].float(), cifar_test_images[1], *CIFAR10_STATS, batch_size=10)

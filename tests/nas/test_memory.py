"""Sizes a space file declares are checked before anything is allocated (nas.memory)."""
from __future__ import annotations

import subprocess
import weakref

import hostile
import processes
import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from nas.build import build_supernet
from nas.errors import ConfigError
from nas.family import family_of
from nas.memory import check_memory, estimate_bytes
from nas.spaces import PRESETS, load_space

HOSTILE_SIZES = {"num_heads": [1, 100000], "depths": [2, 100000], "embed_dims": [32, 1000000]}


def edited_space(tmp_path, preset: str, **changes) -> str:
    data = yaml.safe_load(PRESETS[preset].read_text())
    data.update(changes, name="edited")
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


HYBRID_PRESETS = sorted(name for name in PRESETS if family_of(load_space(name)).name == "hybrid")


@pytest.mark.parametrize("preset", ["digits-tiny", "mnist-seg-tiny", "vitas-cifar", *HYBRID_PRESETS])
def test_estimate_counts_the_supernets_parameters(preset):
    """The estimate's weights are the built supernet's (built on the meta device: shapes, no storage), counted by
    torch (within 1%: ViTAS's private q/k projections have no biases the estimate tells apart, ElasticViT's supernet
    keeps a few more position-table rows than its largest subnet). A hybrid supernet holds every operator's and DSM's
    modules of a stage, UniNet's about twice its costliest arch's parameters."""
    space = load_space(preset)
    with torch.device("meta"):
        held = sum(p.numel() for p in build_supernet(space).parameters())
    assert family_of(space).memory_estimate(space).parameters == pytest.approx(held, rel=0.01)


@pytest.mark.parametrize("field", sorted(HOSTILE_SIZES))
def test_huge_space_is_refused_naming_its_field(tmp_path, field):
    space = load_space(edited_space(tmp_path, "digits-tiny", **{field: HOSTILE_SIZES[field]}))
    with pytest.raises(ConfigError, match=rf"supernet would take about .* GB .*owes most to {field} \(largest"):
        check_memory(space, batch_size=64)


def test_huge_hybrid_stage_is_refused_naming_its_field(tmp_path):
    data = yaml.safe_load(PRESETS["uninet-cifar"].read_text())
    data["stages"][3]["channels"] = [48, 10**11]  # past int64 in the cost model's MAC counts
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"owes most to stages\[3\]\.channels \(largest 100000000000\)"):
        check_memory(load_space(path), batch_size=64)


class PeakLiveValues(TorchDispatchMode):
    """The most bytes that tensors computed under it hold at once (parameters and inputs not counted)."""

    def __init__(self):
        super().__init__()
        self.live, self.peak = {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                self.live[storage.data_ptr()] = (weakref.ref(tensor), storage.nbytes())
        self.live = {key: value for key, value in self.live.items() if value[0]() is not None}
        self.peak = max(self.peak, sum(size for _, size in self.live.values()))
        return out


@pytest.mark.parametrize("preset", ["uninet-cifar", "elasticvit-mobile-cifar"])
def test_evaluation_estimate_bounds_the_values_a_pass_holds(preset):
    """A hybrid space's ``inference`` is at least the float32 values that an evaluation of the largest subnet holds at
    once, as torch allocates them (counted by a dispatch mode), and at most twice as many."""
    space = load_space(preset)
    images = torch.randn(2, space.in_chans, space.img_size, space.img_size)
    model = build_supernet(space).eval()
    with torch.no_grad(), PeakLiveValues() as counted:
        model(images, space.max_arch())
    held = counted.peak / 4 / len(images) + space.in_chans * space.img_size ** 2  # and the image
    estimate = family_of(space).memory_estimate(space).inference
    assert held <= estimate <= 2 * held


def test_training_counts_the_evaluation_batches():
    """nas.train evaluates between steps: the larger of a step's and an evaluation batch's activations counts."""
    space = load_space("uninet-cifar")
    estimate = family_of(space).memory_estimate(space)
    step, evaluation = 64 * estimate.activations * 4, 10**5 * estimate.inference * 4
    assert evaluation > step
    check_memory(space, 64, max_memory_gb=(estimate.parameters * 16 + step) / 1e9 * 1.01)
    with pytest.raises(ConfigError, match=r"\(training 64 images a step, evaluating 100000 a batch\)"):
        check_memory(space, 64, max_memory_gb=(estimate.parameters * 16 + step) / 1e9 * 1.01, eval_batch_size=10**5)
    check_memory(space, 64, max_memory_gb=(estimate.parameters * 16 + evaluation) / 1e9 * 1.01, eval_batch_size=10**5)


def test_max_memory_gb_is_the_limit():
    space = load_space("digits-tiny")
    needed = estimate_bytes(family_of(space).memory_estimate(space), 64)
    check_memory(space, 64, max_memory_gb=needed / 1e9 * 1.01)
    with pytest.raises(ConfigError, match=r"allowed by max_memory_gb=0\.0"):
        check_memory(space, 64, max_memory_gb=needed / 1e9 * 0.99)


def test_training_a_huge_space_ends_in_one_line_before_allocating(tmp_path):
    """Without the check the run allocates until the kernel kills it; under a 3 GB cap it would end in an allocation
    traceback."""
    space = edited_space(tmp_path, "digits-tiny", num_heads=HOSTILE_SIZES["num_heads"])
    run = subprocess.run(hostile.capped("nas.train", ["--space", space, "--steps", "1", "--out-dir",
                                                      str(tmp_path / "run")]),
                         capture_output=True, text=True, timeout=300, env=processes.child_env())
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and "owes most to num_heads" in run.stderr, run.stderr
    assert not (tmp_path / "run").exists()

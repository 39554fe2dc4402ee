"""Sizes a space file declares are checked before anything is allocated (nas.memory)."""
from __future__ import annotations

import subprocess

import hostile
import processes
import pytest
import yaml

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


@pytest.mark.parametrize("preset", ["digits-tiny", "mnist-seg-tiny", "vitas-cifar", "elasticvit-mobile-cifar"])
def test_estimate_counts_the_supernets_parameters(preset):
    """The estimate's weights are the built supernet's, counted by torch (within 1%: ViTAS's private q/k projections
    have no biases the estimate tells apart, ElasticViT's supernet keeps a few more position-table rows than its
    largest subnet)."""
    space = load_space(preset)
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

"""The family interface (nas.family): the shared machinery holds no isinstance check on a family's classes, and
every registered family works end to end on a tiny space of its own: the supernet builds, the cost model counts the
extracted subnet's weights and operations, a batched pass equals the subnets run one by one, the extracted plain
module equals the supernet's subnet, and every export format loads back and computes the same."""
from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hybrid_models import randomise_running_statistics
from torch.utils.flop_counter import FlopCounterMode

from nas.errors import MissingDependencyError
from nas.evaluate import batched_forward, evaluate_archs
from nas.export import FORMATS, Subnet
from nas.family import families, family_of, space_from_dict

ROOT = Path(__file__).resolve().parents[2]
TOL = dict(atol=1e-5, rtol=1e-5)
pytestmark = pytest.mark.usefixtures("one_thread")  # the hybrid supernet's small convolutions

# One tiny space per family (8x8 one-channel images, three classes). A new family adds its own here.
TINY_SPACES = {
    "vit": {"name": "tiny-vit", "embed_dims": [16, 24], "depths": [1, 2], "num_heads": [1, 2],
            "mlp_ratios": [1.0, 2.0], "head_dim": 8, "patch_sizes": [2, 4], "img_size": 8, "in_chans": 1,
            "num_classes": 3},
    "hybrid": {"name": "tiny-hybrid", "style": "uninet", "resolutions": [6, 8], "stem_channels": 8, "stem_stride": 1,
               "head_features": 16, "head_dim": 8, "in_chans": 1, "num_classes": 3,
               "stages": [{"ops": ["conv"], "depths": [1, 2], "channels": [8, 16], "expansions": [2, 3],
                           "dsms": ["none"], "se": True},
                          {"ops": ["conv", "mlp", "attention"], "depths": [1], "channels": [16, 24],
                           "expansions": [2], "dsms": ["local", "local-global"], "stride": 2}]},
    "sam": {"name": "tiny-sam", "depths": [2, 3], "num_heads": [1, 2], "mlp_ratios": [1.0, 2.0], "num_classes": 3,
            "task": "segmentation",  # a 5x5 grid in windows of 3 (padded to 6x6), layer 1 global
            "sam": {"img_size": 10, "patch_size": 2, "in_chans": 1, "embed_dim": 16, "depth": 3, "num_heads": 2,
                    "mlp_ratio": 2.0, "out_chans": 8, "window_size": 3, "global_attn_indexes": [1]}},
}


def family_packages() -> list[Path]:
    return [d for d in (ROOT / "nas").iterdir() if (d / "family.py").is_file()]


def family_class_names() -> set[str]:
    """Every class defined in a family package, and the plain modules the families extract to."""
    names = set()
    sources = [f for d in family_packages() for f in d.rglob("*.py")]
    sources += [ROOT / "elastic_ops" / "plain.py", ROOT / "elastic_ops" / "plain_hybrid.py"]
    for source in sources:
        names |= {node.name for node in ast.walk(ast.parse(source.read_text())) if isinstance(node, ast.ClassDef)}
    return names


def family_isinstance_checks() -> list[str]:
    """``file:line`` of each isinstance/issubclass on a family's class in nas/ outside the family packages."""
    names, packages, found = family_class_names(), family_packages(), []
    for source in sorted((ROOT / "nas").rglob("*.py")):
        if any(package in source.parents for package in packages):
            continue
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass") \
                    and len(node.args) == 2:
                referenced = {n.id if isinstance(n, ast.Name) else n.attr for n in ast.walk(node.args[1])
                              if isinstance(n, (ast.Name, ast.Attribute))}
                if referenced & names:
                    found.append(f"{source.relative_to(ROOT)}:{node.lineno} {sorted(referenced & names)}")
    return found


def test_the_shared_code_checks_no_family_class():
    assert {"HybridSupernet", "VisionTransformerSupernet", "SearchSpace", "HybridNetwork"} <= family_class_names()
    assert family_isinstance_checks() == []


def test_the_counter_finds_a_family_check(tmp_path, monkeypatch):
    """The counter itself, on a copy of the shared code with one dispatch on a family class put back."""
    copy = tmp_path / "nas"
    for source in (ROOT / "nas").rglob("*.py"):
        target = copy / source.relative_to(ROOT / "nas")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(source.read_text())
    source = (copy / "build.py").read_text() + "\n\ndef f(space):\n    return isinstance(space, (int, HybridSpace))\n"
    (copy / "build.py").write_text(source)
    (tmp_path / "elastic_ops").mkdir()
    for name in ("plain.py", "plain_hybrid.py"):
        (tmp_path / "elastic_ops" / name).write_text((ROOT / "elastic_ops" / name).read_text())
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert family_isinstance_checks() == [f"nas/build.py:{len(source.splitlines())} ['HybridSpace']"]


def test_every_family_is_registered_and_has_a_tiny_space_here():
    assert set(families()) == set(TINY_SPACES) >= {"vit", "hybrid"}
    for name, data in TINY_SPACES.items():
        space = space_from_dict(data)
        assert family_of(space).name == name == family_of(space.max_arch()).name
        assert space_from_dict({**data, "family": name}) == space
    with pytest.raises(ValueError, match="unknown family 'cnn': known are "):
        space_from_dict({**TINY_SPACES["vit"], "family": "cnn"})
    with pytest.raises(ValueError, match="no single family owns this space"):
        space_from_dict({"name": "neither", "depths": [1]})


def randomised(supernet: torch.nn.Module) -> torch.nn.Module:
    """Norm scales, biases and running statistics random, so that a slicing mistake in any of them shows."""
    with torch.no_grad():
        for name, param in supernet.named_parameters():
            if param.dim() == 1:
                param.copy_(torch.rand_like(param) + 0.5 if name.endswith("weight") else torch.randn_like(param) * 0.1)
    randomise_running_statistics(supernet)
    return supernet.eval()


@pytest.fixture(scope="module", params=sorted(TINY_SPACES))
def tiny(request):
    space = space_from_dict(TINY_SPACES[request.param])
    family = family_of(space)
    torch.manual_seed(0)
    supernet = randomised(family.build_supernet(space))
    assert family_of(supernet) is family
    rng = np.random.default_rng(0)
    archs = list(dict.fromkeys([space.min_arch(), space.max_arch()] + [space.sample(rng) for _ in range(3)]))
    images = torch.randn(3, space.in_chans, space.img_size, space.img_size, generator=torch.Generator().manual_seed(1))
    return family, space, supernet, archs, images


def test_cost_counts_the_extracted_subnet(tiny):
    """params: the extracted module's parameters; MACs: half the FLOPs torch's counter sees in its forward pass."""
    family, space, supernet, archs, images = tiny
    params, macs = family.params_many(archs, space), family.macs_many(archs, space)
    assert len(set(params.tolist())) > 2
    for arch, count, work in zip(archs, params, macs):
        model = family.extract(supernet, arch)
        assert count == sum(p.numel() for p in model.parameters()), arch
        with FlopCounterMode(display=False) as flops, torch.no_grad():
            model(images[:1])
        assert 2 * work == flops.get_total_flops(), arch
    low, high = family.cost_range(space, lambda batch: family.macs_many(batch, space))
    assert low <= macs.min() and macs.max() <= high and high == family.macs_many([space.max_arch()], space)[0]


def test_a_batched_pass_equals_the_subnets_one_by_one(tiny):
    family, space, supernet, archs, images = tiny
    with torch.no_grad():
        together = batched_forward(supernet, images, archs)
        for arch, logits in zip(archs, together):
            torch.testing.assert_close(logits, supernet(images, arch), **TOL)


def test_batched_evaluation_equals_evaluation_one_by_one(tiny):
    """evaluate_archs in batched passes and arch by arch (with BatchNorm statistics re-estimated for each subnet in
    a family that has them): the same metrics, and the supernet's own statistics as before."""
    family, space, supernet, archs, images = tiny
    labels = torch.arange(len(images)) % space.num_classes
    if space.task == "segmentation":  # a class per pixel
        labels = torch.randint(space.num_classes, (len(images), space.img_size, space.img_size),
                               generator=torch.Generator().manual_seed(2))
    batches = [(images, labels), (images.flip(0), labels.flip(0))]
    calibration = [images * 2 + 1] if family.batch_norm else None
    before = {name: t.clone() for name, t in supernet.state_dict().items()}
    together, alone = (evaluate_archs(supernet, archs, batches, batched=batched, calibration=calibration,
                                      progress=False) for batched in (True, False))
    for a, b in zip(together, alone):
        assert (a.top1, a.top5, a.samples) == (b.top1, b.top5, b.samples) and a.loss == pytest.approx(b.loss, 1e-5)
    assert len({r.loss for r in alone}) > 1
    for name, t in supernet.state_dict().items():
        torch.testing.assert_close(t, before[name], rtol=0, atol=0, msg=name)


def test_the_extracted_module_equals_the_supernets_subnet(tiny):
    family, space, supernet, archs, images = tiny
    with torch.no_grad():
        for arch in archs:
            model = family.extract(supernet, arch)
            assert not model.training and not any(p is q for p in model.parameters() for q in supernet.parameters())
            torch.testing.assert_close(model(images), supernet(images, arch), **TOL)


@pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:DeprecationWarning")
def test_every_export_format_loads_back_and_computes_the_same(tiny, tmp_path):
    family, space, supernet, archs, images = tiny
    arch = archs[-1]
    subnet = Subnet(family.extract(supernet, arch), arch, space)
    with torch.no_grad():
        expected = supernet(images, arch)
    onnx = all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime"))
    for name, export in FORMATS.items():
        path = tmp_path / export.path
        if name == "onnx" and not onnx:
            with pytest.raises(MissingDependencyError, match="pip install"):
                export.write(subnet, path, images[:2])
            continue
        export.write(subnet, path, images[:2])
        runner = export.load(path)
        with torch.no_grad():
            torch.testing.assert_close(runner(images), expected, atol=1e-4, rtol=1e-4, msg=name)

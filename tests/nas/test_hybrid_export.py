"""Hybrid subnet export: the extracted plain network saved and loaded (rebuilt from its space and arch) equal to the
supernet's subnet, TorchScript and ONNX, clear errors."""
import importlib.util
import os

import numpy as np
import pytest
import torch
from hybrid_models import supernet
from test_hybrid_space import HYBRID_PRESETS

from elastic_ops import plain_hybrid
from nas.export import extract_subnet, load_subnet, save_subnet, to_onnx, to_torchscript
from nas.hybrid.export import rebuild
from nas.hybrid.supernet import HybridSupernet, HybridSupernetConfig
from nas.spaces import load_space

TOL = dict(atol=1e-4, rtol=1e-4)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=["uninet-cifar", "elasticvit-mobile-cifar"])
def calibrated(request):
    """A CIFAR preset's supernet, a random arch with every operator where the space has several, BatchNorm
    recalibrated for it, and images."""
    torch.manual_seed(0)
    space = load_space(request.param)
    model = HybridSupernet(HybridSupernetConfig(space)).eval()
    arch = space.sample(np.random.default_rng(2))
    images = torch.randn(3, 3, 32, 32)
    model.recalibrate_batch_norm([images * 2, images - 1], arch)
    return model, arch, images


def test_save_and_load_round_trip(calibrated, tmp_path):
    model, arch, images = calibrated
    with torch.no_grad():
        expected = model(images, arch)
    path = tmp_path / "subnet.pt"
    save_subnet(path, extract_subnet(model, arch), arch, model.space)
    assert os.listdir(tmp_path) == ["subnet.pt"], "the temporary file of the atomic write is left behind"
    payload = torch.load(path, weights_only=True)
    assert payload["kind"] == "hybrid" and payload["model"] == model.space.to_dict()
    loaded, loaded_arch = load_subnet(path)
    assert loaded_arch == arch and isinstance(loaded, plain_hybrid.HybridNetwork) and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), expected, **TOL)


@pytest.mark.parametrize("name", HYBRID_PRESETS)
def test_rebuild_has_the_structure_the_supernet_extracts(name):
    """A loaded subnet is rebuilt from the supernet of the space narrowed to its arch: the same modules, names and
    shapes as the full supernet's extraction."""
    model = supernet(name)
    space = model.space
    for arch in [space.max_arch(), space.sample(3)]:
        extracted, rebuilt = model.extract(arch), rebuild(space, arch, "meta")
        assert [(n, t.shape) for n, t in rebuilt.state_dict().items()] == \
            [(n, t.shape) for n, t in extracted.state_dict().items()]
        assert str(rebuilt) == str(extracted)


def test_save_needs_the_space_of_its_family_and_load_refuses_an_inconsistent_file(calibrated, tmp_path):
    model, arch, _ = calibrated
    plain = extract_subnet(model, arch)
    with pytest.raises(TypeError, match="the arch is of the hybrid family, the space of the vit family"):
        save_subnet(tmp_path / "s.pt", plain, arch, load_space("digits-tiny"))
    other = model.space.sample(np.random.default_rng(9))
    path = tmp_path / "other.pt"
    save_subnet(path, plain, other, model.space)  # the weights of one arch under the name of another
    with pytest.raises(ValueError, match="inconsistent subnet"):
        load_subnet(path)
    assert os.listdir(tmp_path) == ["other.pt"]


@pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:DeprecationWarning")
def test_torchscript_export_matches(calibrated, tmp_path):
    model, arch, images = calibrated
    with torch.no_grad():
        expected = model(images, arch)
    scripted = to_torchscript(extract_subnet(model, arch), tmp_path / "subnet.ts")
    torch.testing.assert_close(scripted(images), expected, **TOL)
    torch.testing.assert_close(torch.jit.load(str(tmp_path / "subnet.ts"))(images), expected, **TOL)


def test_onnx_export_or_clear_message(calibrated, tmp_path):
    model, arch, images = calibrated
    plain = extract_subnet(model, arch)
    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") is None:
        with pytest.raises(ImportError, match="ONNX export needs"):
            to_onnx(plain, tmp_path / "subnet.onnx", images)
        pytest.skip("onnx/onnxscript are not installed: checked the error message only")
    to_onnx(plain, tmp_path / "subnet.onnx", images)
    if importlib.util.find_spec("onnxruntime") is None:
        assert (tmp_path / "subnet.onnx").stat().st_size > 0
        return
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "subnet.onnx"))
    with torch.no_grad():
        expected = plain(images[:2]).numpy()
    (logits,) = session.run(None, {"images": images[:2].numpy()})  # another batch size than exported
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)


# -- python -m nas.export on a hybrid checkpoint ----------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:DeprecationWarning")
def test_the_command_line_exports_a_hybrid_subnet(tmp_path, capsys):
    """The formats that keep the arch, of a hybrid checkpoint's subnet, each loaded back by the command (which compares
    it with the supernet) and by the loaders here (tests/nas/test_families.py writes and loads every format of every
    family)."""
    import yaml
    from test_families import TINY_SPACES, randomised

    from nas.checkpoint import CHECKPOINT_FORMAT
    from nas.export import load_safetensors
    from nas.export.__main__ import main

    space_file = tmp_path / "tiny-hybrid.yaml"
    space_file.write_text(yaml.safe_dump(TINY_SPACES["hybrid"]))
    space = load_space(space_file)
    torch.manual_seed(0)
    model = randomised(HybridSupernet(HybridSupernetConfig(space)))
    checkpoint = tmp_path / "step.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "step": 1, "config": {"space": str(space_file)},
                "model": model.state_dict()}, checkpoint)
    formats = ["pytorch", "safetensors"]
    arch = space.sample(np.random.default_rng(3))
    out = tmp_path / "out"
    assert main(["--checkpoint", str(checkpoint), "--arch", arch.to_json(), "--out-dir", str(out), "--check-batch",
                 "2"] + [a for name in formats for a in ("--format", name)]) == 0
    printed = capsys.readouterr().out
    assert all(f"[export] {name}: " in printed for name in formats), printed
    images = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        expected = model(images, arch)
        for loaded, loaded_arch in (load_subnet(out / "subnet.pt"), load_safetensors(out / "safetensors")):
            assert loaded_arch == arch and isinstance(loaded, plain_hybrid.HybridNetwork)
            torch.testing.assert_close(loaded(images), expected, **TOL)


def test_the_command_line_recalibrates_batch_norm_for_the_exported_subnet(tmp_path, capsys):
    """A supernet's running statistics belong to no subnet: the command re-estimates them for the arch on the training
    images the checkpoint's training calibrated on (the first 40 kept for training by its split, in batches of its
    eval_batch_size). Oracle: the exported network's BatchNorms equal those of the same network given torch's own
    cumulative estimate (train mode, momentum=None) over those images, and its logits equal the supernet's after
    recalibrate_batch_norm on them. Another count of images is another export, which the out-dir refuses."""
    import copy

    from test_families import randomised
    from test_hybrid_search import digits_space

    from nas.checkpoint import CHECKPOINT_FORMAT
    from nas.data import SearchSplit, load_dataset, normalize
    from nas.export.__main__ import main

    space_file = digits_space(tmp_path)
    space = load_space(space_file)
    torch.manual_seed(0)
    model = randomised(HybridSupernet(HybridSupernetConfig(space)))  # statistics that are no subnet's
    train = load_dataset("digits", split="train")
    split = SearchSplit.hold_out("digits", len(train), None)
    checkpoint = tmp_path / "step.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "step": 1, "model": model.state_dict(), "search_split": split.to_dict(),
                "config": {"space": space_file, "dataset": "digits", "bn_calibration_images": 40,
                           "eval_batch_size": 16}}, checkpoint)
    arch = space.sample(np.random.default_rng(3))
    out = tmp_path / "out"
    assert main(["--checkpoint", str(checkpoint), "--arch", arch.to_json(), "--out-dir", str(out), "--format",
                 "pytorch", "--check-batch", "2"]) == 0
    assert "re-estimated for the subnet on 40 digits training images" in capsys.readouterr().out
    exported = load_subnet(out / "subnet.pt")[0]

    calibration = normalize(train.__getitems__(split.calibration_indices(40).tolist())[0], train.mean, train.std)
    oracle = copy.deepcopy(exported)
    norms = [m for m in oracle.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # the cumulative average over the batches
        norm.train()
    with torch.no_grad():
        for images in calibration.split(16):
            oracle(images)
    got = {name: t for name, t in exported.state_dict().items() if "running_" in name}
    torch.testing.assert_close(got, {name: oracle.state_dict()[name] for name in got}, rtol=1e-5, atol=1e-6)

    images = normalize(load_dataset("digits", split="test").images[:4], train.mean, train.std)
    model.recalibrate_batch_norm(calibration.split(16), arch)
    with torch.no_grad():
        torch.testing.assert_close(exported(images), model(images, arch), **TOL)

    assert main(["--checkpoint", str(checkpoint), "--arch", arch.to_json(), "--out-dir", str(out), "--format",
                 "pytorch", "--bn-calibration-images", "0"]) == 2
    assert "holds the export of this subnet with other BatchNorm statistics" in capsys.readouterr().err

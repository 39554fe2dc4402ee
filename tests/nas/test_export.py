"""Subnet export: the standalone plain ViT, save/load with clear errors, TorchScript and ONNX."""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
import re
import stat

import numpy as np
import pytest
import torch

import elastic_ops.plain
from nas.export import extract_subnet, load_subnet, save_subnet, to_onnx, to_torchscript
from nas.vit.space import SearchSpace
from nas.vit.supernet import SupernetConfig, VisionTransformerSupernet

TOL = dict(atol=1e-5, rtol=1e-5)

SPACE = SearchSpace(name="tiny-vitas", embed_dims=[24, 32], depths=[2, 3], num_heads=[1, 2], mlp_ratios=[2.0, 4.0],
                    head_dim=16, patch_sizes=[4, 8], img_size=16, in_chans=3, num_classes=5, identity_layers=True,
                    private_class_tokens=True, private_qk=True)


@pytest.fixture(scope="module")
def supernet() -> VisionTransformerSupernet:
    torch.manual_seed(0)
    model = VisionTransformerSupernet(SupernetConfig.from_space(SPACE)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.copy_(torch.randn_like(param) * 0.2 + (1.0 if name.endswith("weight") else 0.0))
    return model


@pytest.fixture
def arch():
    # A sampled arch with an identity layer: layers 0 and 2 on.
    base = SPACE.sample(np.random.default_rng(3))
    return dataclasses.replace(base, layer_on=(True, False, True), patch_size=4)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(3, 3, 16, 16)


def test_plain_vit_file_imports_only_torch():
    tree = ast.parse(open(elastic_ops.plain.__file__).read())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert {m.split(".")[0] for m in modules} <= {"torch", "typing", "__future__"}, modules


def test_save_and_load_round_trip(supernet, arch, x, tmp_path):
    expected = supernet(x, arch)
    plain = extract_subnet(supernet, arch)
    path = tmp_path / "subnet.pt"
    save_subnet(path, plain, arch, supernet.config.space)
    assert os.listdir(tmp_path) == ["subnet.pt"], "the temporary file of the atomic write is left behind"
    loaded, loaded_arch = load_subnet(path)
    assert loaded_arch == arch
    assert isinstance(loaded, elastic_ops.plain.VisionTransformer) and not loaded.training
    torch.testing.assert_close(loaded(x), expected, **TOL)
    # The standalone class, loaded from its file alone, runs the saved weights.
    spec = importlib.util.spec_from_file_location("copied_plain_vit", elastic_ops.plain.__file__)
    copied = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copied)
    payload = torch.load(path, weights_only=True)
    standalone = copied.VisionTransformer(**payload["model"])
    standalone.load_state_dict(payload["state_dict"])
    torch.testing.assert_close(standalone.eval()(x), expected, **TOL)


def test_load_rejects_missing_corrupt_and_foreign_files(supernet, arch, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_subnet(tmp_path / "absent.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match="not a readable torch file"):
        load_subnet(corrupt)
    truncated = tmp_path / "truncated.pt"
    save_subnet(truncated, extract_subnet(supernet, arch), arch, supernet.config.space)
    truncated.write_bytes(truncated.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable torch file"):
        load_subnet(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.randn(3)}, foreign)
    with pytest.raises(ValueError, match="not a subnet saved by nas.export.save_subnet"):
        load_subnet(foreign)
    inconsistent = tmp_path / "inconsistent.pt"
    save_subnet(inconsistent, extract_subnet(supernet, arch), arch, supernet.config.space)
    payload = torch.load(inconsistent, weights_only=True)
    payload["model"]["embed_dim"] += 8
    torch.save(payload, inconsistent)
    with pytest.raises(ValueError, match="inconsistent subnet"):
        load_subnet(inconsistent)


def test_save_rejects_a_supernet(supernet, arch, tmp_path):
    with pytest.raises(TypeError, match="see extract_subnet"):
        save_subnet(tmp_path / "s.pt", supernet, arch, supernet.config.space)
    assert os.listdir(tmp_path) == []


@pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:DeprecationWarning")
def test_torchscript_export_matches(supernet, arch, x, tmp_path):
    expected = supernet(x, arch)
    path = tmp_path / "subnet.ts"
    scripted = to_torchscript(extract_subnet(supernet, arch), path)
    torch.testing.assert_close(scripted(x), expected, **TOL)
    torch.testing.assert_close(torch.jit.load(str(path))(x), expected, **TOL)


@pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:DeprecationWarning")
def test_relative_position_subnet_saves_loads_and_scripts(tmp_path):
    space = dataclasses.replace(SPACE, relative_position=2)
    torch.manual_seed(1)
    model = VisionTransformerSupernet(SupernetConfig.from_space(space)).eval()
    arch = dataclasses.replace(space.sample(np.random.default_rng(4)), layer_on=(True, True, False), patch_size=2 * 2)
    x = torch.randn(2, 3, 16, 16)
    expected = model(x, arch)
    plain = extract_subnet(model, arch)
    assert all(block.attn.rel_pos is not None for block in plain.blocks)
    save_subnet(tmp_path / "subnet.pt", plain, arch, space)
    loaded, _ = load_subnet(tmp_path / "subnet.pt")
    torch.testing.assert_close(loaded(x), expected, **TOL)
    scripted = to_torchscript(loaded, tmp_path / "subnet.ts")
    torch.testing.assert_close(scripted(x), expected, **TOL)
    torch.testing.assert_close(torch.jit.load(str(tmp_path / "subnet.ts"))(x), expected, **TOL)


def test_onnx_export_or_clear_message(supernet, arch, x, tmp_path):
    plain = extract_subnet(supernet, arch)
    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") is None:
        with pytest.raises(ImportError, match="ONNX export needs"):
            to_onnx(plain, tmp_path / "subnet.onnx", x)
        pytest.skip("onnx/onnxscript are not installed: checked the error message only")
    to_onnx(plain, tmp_path / "subnet.onnx", x)
    if importlib.util.find_spec("onnxruntime") is None:
        assert (tmp_path / "subnet.onnx").stat().st_size > 0
        pytest.skip("onnxruntime is not installed: checked that the file was written only")
    from nas.export import load_onnx

    run = load_onnx(tmp_path / "subnet.onnx")
    with torch.no_grad():
        for images in (x, x[:2]):  # the exported batch size and another
            torch.testing.assert_close(run(images), supernet(images, arch), atol=1e-4, rtol=1e-4)


# -- python -m nas.export ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    from nas.trainer import TrainConfig, train

    out = tmp_path_factory.mktemp("train") / "run"
    return train(TrainConfig(max_steps=1, batch_size=32, train_subset=64, test_subset=32, out_dir=str(out),
                             ckpt_every=0, progress=False, plot=False, backend="reference")).checkpoint


def test_the_command_line_exports_and_checks_every_format(digits_checkpoint, tmp_path, capsys):
    from nas.export import load_safetensors
    from nas.export.__main__ import main

    formats = ["pytorch", "torch-export", "safetensors"]
    if importlib.util.find_spec("onnx") and importlib.util.find_spec("onnxscript") and \
            importlib.util.find_spec("onnxruntime"):
        formats.append("onnx")
    arch = '{"embed_dim": 48, "num_heads": [2, 1, 2, 2], "mlp_ratio": [2.0, 3.0, 2.0, 2.0], "layer_on": [true, true, ' \
           'true, false]}'
    args = ["--checkpoint", digits_checkpoint, "--arch", arch, "--out-dir", str(tmp_path / "out")]
    assert main(args + [a for f in formats for a in ("--format", f)]) == 0
    out = capsys.readouterr().out
    assert all(f"[export] {f}: " in out for f in formats), out
    model, loaded_arch = load_safetensors(tmp_path / "out" / "safetensors")
    assert loaded_arch.embed_dim == 48 and len(model.blocks) == 3
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"subnet.pt", "subnet.pt2", "safetensors"}
    (tmp_path / "new").touch()  # what any new file gets: the oracle of the permissions
    new_file = stat.S_IMODE((tmp_path / "new").stat().st_mode)
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").rglob("*") if p.is_file()} == {new_file}


@pytest.mark.parametrize("shift", [0.1, float("nan")])
def test_the_command_line_check_fails_on_an_export_that_computes_other_logits(digits_checkpoint, tmp_path, capsys,
                                                                               monkeypatch, shift):
    """The check that every export runs: a subnet whose classifier bias was shifted (as a wrong extraction would), or
    made NaN, is exported faithfully, and its logits then differ from the supernet's: one line naming the format, the
    arch and the difference, exit status 2, and the file of an earlier export of the subnet stays as it was."""
    import json

    import nas.export.__main__ as cli

    out, arch = tmp_path / "out", '{"embed_dim": 48, "num_heads": [2, 1, 2, 2], "mlp_ratio": [2.0, 3.0, 2.0, 2.0], ' \
                                  '"layer_on": [true, true, true, false]}'
    args = ["--checkpoint", digits_checkpoint, "--arch", arch, "--out-dir", str(out), "--format", "pytorch"]
    assert cli.main(args) == 0
    saved = (out / "subnet.pt").read_bytes()
    capsys.readouterr()

    def extract_wrongly(supernet, arch):
        model = extract_subnet(supernet, arch)
        with torch.no_grad():
            model.head.bias[0] += shift
        return model

    monkeypatch.setattr(cli, "extract_subnet", extract_wrongly)
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    loaded_arch = load_subnet(out / "subnet.pt")[1]
    expected_difference = "nan" if shift != shift else r"0\.[0-9]+"
    assert re.fullmatch(rf"nas\.export: error: the pytorch export of arch {re.escape(loaded_arch.to_json())} computes "
                        rf"other logits than the supernet: largest difference {expected_difference} of the largest "
                        rf"logit's magnitude, over the tolerance 0\.0001 \(--tolerance\); nothing was written to "
                        rf"\S+subnet\.pt\n", err), err
    assert (out / "subnet.pt").read_bytes() == saved
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "subnet.pt"]
    assert json.loads((out / "export.json").read_text())["formats"] == {"pytorch": "subnet.pt"}


def test_an_out_dir_holds_the_export_of_one_subnet(digits_checkpoint, tmp_path, capsys):
    """export.json records the subnet of an out-dir's files: another subnet's export into it is refused (its files
    stay as they were), the same subnet's adds formats, and export files that no manifest records are refused."""
    import json

    from nas.export.__main__ import main

    out = tmp_path / "out"
    base = ["--checkpoint", digits_checkpoint, "--out-dir", str(out), "--check-batch", "2"]
    assert main(base + ["--arch", "smallest"]) == 0
    smallest = load_subnet(out / "subnet.pt")[1]
    written = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(base + ["--arch", "largest", "--format", "pytorch"]) == 2
    assert "holds the export of another subnet" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == written
    assert main(base + ["--arch", "smallest", "--format", "safetensors"]) == 0
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["formats"] == {"pytorch": "subnet.pt", "torch-export": "subnet.pt2", "safetensors": "safetensors"}
    assert manifest["arch"] == smallest.to_dict() and manifest["space"] == "digits-tiny"
    (out / "export.json").unlink()
    assert main(base + ["--arch", "smallest", "--format", "pytorch"]) == 2
    assert "holds export files (safetensors, subnet.pt, subnet.pt2) without the export.json" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    ([], "needs a supernet checkpoint"),
    (["--checkpoint", "{ckpt}", "--arch", "{{embed_dim: 4096}}"], "is not an arch of space 'digits-tiny'"),
    (["--checkpoint", "{ckpt}", "--format", "tflite"], "format 'tflite' is not one of pytorch"),
    (["--checkpoint", "{ckpt}", "--check-batch", "1"], "the first >= 2"),
    (["--checkpoint", "{dir}/none.pt"], "checkpoint not found"),
])
def test_the_command_line_errors_are_one_line(digits_checkpoint, tmp_path, capsys, args, message):
    from nas.export.__main__ import main

    assert main([a.format(ckpt=digits_checkpoint, dir=tmp_path) for a in args]
                + ["--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nas.export: error: ") and message in err and err.count("\n") == 1, err

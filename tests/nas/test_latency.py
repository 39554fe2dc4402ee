"""Latency measurement and the latency predictor: fitting, prediction, atomic save and strict load."""
import contextlib
import json
import time

import numpy as np
import pytest
import torch
from torch import nn

from nas import atomic
from nas.costs import macs_many
from nas.errors import CheckpointError
from nas.latency import FEATURES, LatencyModel, latency_features, measure_archs, measure_latency
from nas.spaces import load_space


def test_features_add_up_per_layer():
    space = load_space("vitas-t")
    batch = space.sample_many(np.random.default_rng(0), 30)
    features = latency_features(batch, space)
    column = {name: features[:, i] for i, name in enumerate(FEATURES)}
    # Linear and attention MACs split the cost model's total exactly.
    np.testing.assert_array_equal(column["linear_macs"] + column["attention_macs"], macs_many(batch, space))
    np.testing.assert_array_equal(column["layers"], batch.layer_on.sum(axis=1))
    tokens = (space.img_size // batch.patch_size) ** 2 + 1
    hidden = batch.hidden_features
    for k in range(len(batch)):
        on = batch.layer_on[k]
        assert column["token_embed"][k] == on.sum() * tokens[k] * batch.embed_dim[k]
        assert column["token_hidden"][k] == tokens[k] * hidden[k][on].sum()
    np.testing.assert_array_equal(column["constant"], 1)


def synthetic_measurements(space, rng, count, coef, noise):
    archs = space.sample_many(rng, count).archs()
    seconds = latency_features(archs, space) @ coef * (1 + noise * rng.standard_normal(count))
    return list(zip(archs, seconds.tolist()))


def test_fit_recovers_a_linear_latency():
    space, rng = load_space("autoformer-t"), np.random.default_rng(0)
    # Seconds per unit of each feature: 1 ms fixed, 50 us per layer, 1 ns per 20 linear MACs, ...
    coef = np.array([1e-3, 5e-5, 5e-11, 2e-10, 4e-10, 2e-10])
    measured = synthetic_measurements(space, rng, 80, coef, noise=0.01)
    model = LatencyModel.fit(measured, space, batch_size=8, device="cpu")
    assert all(c >= 0 for c in model.coef)
    assert model.mean_relative_error < 0.02
    held_out = synthetic_measurements(space, rng, 40, coef, noise=0.0)
    predicted = model.predict_many([arch for arch, _ in held_out])
    np.testing.assert_allclose(predicted, [t for _, t in held_out], rtol=0.03)
    assert model.predict(held_out[0][0]) == pytest.approx(predicted[0])


def test_fit_rejects_bad_measurements():
    space = load_space("digits-tiny")
    archs = space.sample_many(0, 10).archs()
    with pytest.raises(ValueError, match="3 measurements, need at least 6"):
        LatencyModel.fit([(a, 1e-3) for a in archs[:3]], space, batch_size=1, device="cpu")
    with pytest.raises(ValueError, match="finite and positive"):
        LatencyModel.fit([(a, -1.0) for a in archs], space, batch_size=1, device="cpu")
    other = load_space("cifar-tiny").sample(0)
    with pytest.raises(ValueError, match="arch has 6 layers"):
        LatencyModel.fit([(a, 1e-3) for a in archs[:-1]] + [(other, 1e-3)], space, batch_size=1, device="cpu")


def fitted_model():  # written before environments were recorded: none
    space, rng = load_space("cifar-tiny"), np.random.default_rng(0)
    coef = rng.uniform(0.5, 2.0, len(FEATURES)) * np.array([1e-4, 1e-5, 1e-11, 1e-11, 1e-9, 1e-9])
    return LatencyModel.fit(synthetic_measurements(space, rng, 20, coef, 0.05), space, batch_size=32, device="cpu")


def test_save_load_round_trip(tmp_path):
    model = fitted_model()
    path = tmp_path / "latency.json"
    model.save(path)
    model.save(path)  # overwriting is fine
    loaded = LatencyModel.load(path)
    assert loaded == model
    archs = model.space.sample_many(1, 10)
    np.testing.assert_array_equal(loaded.predict_many(archs), model.predict_many(archs))
    assert [p.name for p in tmp_path.iterdir()] == ["latency.json"]


def test_interrupted_save_keeps_the_old_file(tmp_path, monkeypatch):
    model, path = fitted_model(), tmp_path / "latency.json"
    model.save(path)
    before = path.read_text()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    # The new contents are written, then the process dies before the rename.
    monkeypatch.setattr(atomic.os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save(path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["latency.json"]


def test_load_rejects_corrupt_files(tmp_path):
    path = tmp_path / "latency.json"
    fitted_model().save(path)
    good = json.loads(path.read_text())
    cases = {
        "invalid JSON": path.read_text()[:-20],
        "expected a JSON object": "[1, 2]",
        r"missing \['coef'\]": json.dumps({k: v for k, v in good.items() if k != "coef"}),
        "format 99": json.dumps({**good, "format_version": 99}),
        "differ from this code's": json.dumps({**good, "coef": good["coef"][:-1]}),
        r"coefficient \w+ is -1.0, not a finite number in \[0, inf\]":
            json.dumps({**good, "coef": [-1.0] + good["coef"][1:]}),
        r"coefficient \w+ is 'x', not a finite number": json.dumps({**good, "coef": ["x"] + good["coef"][1:]}),
        r"batch_size is 0, not an integer in \[1, ": json.dumps({**good, "batch_size": 0}),
        "invalid search space": json.dumps({**good, "space": {**good["space"], "embed_dims": []}}),
    }
    for message, text in cases.items():
        path.write_text(text)
        with pytest.raises(CheckpointError, match=message) as refused:
            LatencyModel.load(path)
        assert "\n" not in str(refused.value)


def test_measure_latency_counts_calls_and_times_them():
    calls = []

    def sleepy(x):
        calls.append(x)
        time.sleep(0.002)

    seconds = measure_latency(sleepy, torch.ones(1), warmup=3, repeats=5)
    assert len(calls) == 8
    assert 0.002 <= seconds < 0.5
    with pytest.raises(ValueError, match="repeats=0"):
        measure_latency(sleepy, torch.ones(1), repeats=0)


def test_measure_archs_builds_and_times_each_arch():
    space = load_space("digits-tiny")
    archs = space.sample_many(np.random.default_rng(0), 3).archs()
    built, training_flags = [], []

    def build_model(arch):
        built.append(arch)
        layers = [nn.Flatten(), nn.Linear(space.img_size ** 2, arch.embed_dim)]
        layers += [nn.Linear(arch.embed_dim, arch.embed_dim) for _ in range(arch.depth)]
        model = nn.Sequential(*layers).train()
        model.register_forward_hook(lambda module, args, output: training_flags.append(module.training))
        return model

    results = measure_archs(archs, build_model, lambda arch: torch.randn(4, 1, 8, 8), warmup=1, repeats=3)
    assert built == archs
    assert training_flags == [False] * 12  # eval mode, 1 warm-up and 3 timed calls per arch
    assert [arch for arch, _ in results] == archs
    assert all(0 < seconds < 1 for _, seconds in results)


# -- python -m nas.latency --------------------------------------------------------------------------------------

def test_the_command_line_measures_fits_and_validates(tmp_path, monkeypatch, capsys):
    from nas.latency.__main__ import main

    monkeypatch.chdir(tmp_path)
    quick = ["--warmup", "1", "--repeats", "2"]
    assert main(["measure", "--space", "digits-tiny", "--archs", "10", "--batch-size", "4"] + quick) == 0
    measured = json.loads((tmp_path / "latency" / "measurements.json").read_text())
    assert 10 <= len(measured["measurements"]) <= 12 and measured["batch_size"] == 4  # draws may repeat an arch
    assert set(measured["environment"]) == {"device", "device_name", "dtype", "threads", "torch", "elastic_ops",
                                            "python"}
    assert main(["fit", "--holdout", "0.25"]) == 0
    assert "held-out subnets: mean" in capsys.readouterr().out
    model = LatencyModel.load(tmp_path / "latency" / "model.json")
    assert model.environment == measured["environment"] and model.batch_size == 4
    assert main(["validate", "--archs", "3"] + quick) == 0
    assert "rank correlation" in capsys.readouterr().out
    # Another device's model is refused, unless asked for.
    other = json.loads((tmp_path / "latency" / "model.json").read_text())
    other["environment"]["device_name"] = "Some Other CPU"
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert main(["validate", "--model", "other.json", "--archs", "1"] + quick) == 2
    err = capsys.readouterr().err
    assert err.startswith("nas.latency: error: latency model 'other.json' was measured on Some Other CPU") \
        and err.count("\n") == 1
    assert main(["validate", "--model", "other.json", "--archs", "1", "--other-device"] + quick) == 0


@pytest.mark.parametrize("args, message", [
    ([], "needs a command, measure, fit or validate (got none)"),
    (["time"], "needs a command, measure, fit or validate (got 'time')"),
    (["fit", "--measurements", "none.json"], "none.json: cannot read the measurements: No such file"),
    (["measure", "--archs", "0"], "archs=0 must be >= 1"),
    (["measure", "--space", "nowhere"], "space='nowhere'"),
])
def test_the_command_line_errors_are_one_line(tmp_path, monkeypatch, capsys, args, message):
    from nas.latency.__main__ import main

    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("nas.latency: error: ") and message in err and err.count("\n") == 1, err


def test_a_search_refuses_another_devices_latency_model(tmp_path):
    model = fitted_model()
    here = {"device_name": "This CPU"}
    other = LatencyModel(model.space, model.coef, 32, "cpu", 0.0, {"device_name": "That GPU", "dtype": "float16"})
    with pytest.raises(CheckpointError, match="was measured on That GPU .*this is This CPU"):
        other.check_environment(here)
    other.check_environment(here, other_device_ok=True)
    with pytest.raises(CheckpointError, match="does not record the device"):
        model.check_environment(here)


def test_help_is_usage_as_the_other_commands_print_it(capsys):
    from nas.latency.__main__ import main

    for argv in (["--help"], ["fit", "--help"]):
        with contextlib.suppress(SystemExit):  # argparse exits after a command's --help
            assert main(argv) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: python -m nas.latency {argv[0] if len(argv) > 1 else '[-h] COMMAND'}"), out
        assert "``" not in out, out  # reST markup of the module docstring

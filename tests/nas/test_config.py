"""The one config mechanism of both command lines (nas.config): the same flags, --help with every default and
choice, one-line errors for bad keys and types, the order of the sources, and the one rule of what may change
when a run resumes."""
from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from nas import search, train
from nas.checkpoint import CHECKPOINT_FORMAT, checkpoint_path
from nas.config import changes_on_resume
from nas.errors import ConfigError
from nas.searching import STATE_FILE, SearchConfig
from nas.trainer import TrainConfig

CLIS = {"nas.train": (train, TrainConfig), "nas.search": (search, SearchConfig)}
COMMON = {"--config", "--set", "--resume", "--data-dir", "--out-dir", "--dataset", "--space", "--seed", "--device",
          "--batch-size", "--progress", "--no-progress"}


def help_text(module, capsys) -> str:
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    return capsys.readouterr().out


def flags_of(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))


def test_both_command_lines_share_the_common_flags(capsys):
    flags = {name: flags_of(help_text(module, capsys)) for name, (module, _) in CLIS.items()}
    for name, found in flags.items():
        assert COMMON <= found, (name, COMMON - found)
    shared = {f.name for f in dataclasses.fields(TrainConfig)} & {f.name for f in dataclasses.fields(SearchConfig)}
    assert {"data_dir", "out_dir", "dataset", "space", "seed", "device", "batch_size", "progress"} <= shared


@pytest.mark.parametrize("name", sorted(CLIS))
def test_help_shows_every_setting_with_its_default_and_choices(name, capsys):
    module, config = CLIS[name]
    text = " ".join(help_text(module, capsys).split())  # argparse wraps lines
    defaults = config()
    for f in dataclasses.fields(config):
        if f.metadata["flag"] is False or isinstance(getattr(defaults, f.name), dict):
            assert f.name in text  # named where --set and --config are explained
            continue
        flag = f.metadata["flag"] if isinstance(f.metadata["flag"], str) else "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        shown = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
        assert re.search(re.escape(flag) + r"\b.*?\(default: " + re.escape(str(shown)), text), (flag, shown)
        if f.metadata["choices"]:
            assert "one of " + ", ".join(str(c) if c is not None else "null" for c in f.metadata["choices"]) in text
    assert "may change on resume" in text


@pytest.mark.parametrize("name", sorted(CLIS))
@pytest.mark.parametrize("args, message", [
    (["--set", "bogus=1"], r"--set 'bogus=1': unknown key 'bogus'; valid keys: "),
    (["--batch-size", "two"], r"bad \w+ config: batch_size must be int, got 'two'"),
    (["--seed", "1.5"], r"bad \w+ config: seed must be int, got 1.5"),
    (["--set", "seed"], r"--set 'seed' must look like KEY=VALUE"),
    (["--set", "batch_size=[1"], r"--set 'batch_size=\[1': the value is not valid YAML: "),
    (["--no-such-flag", "3"], r"unrecognized arguments: --no-such-flag 3 \(see --help\)"),
    (["--config", "{dir}/c.yaml"], r"bad \w+ config: unknown key\(s\) \['sede'\]"),
    (["--config", "{dir}/missing.yaml"], r"cannot read config file '.*missing.yaml': No such file or directory"),
    (["--config", "{dir}/list.yaml"], r"config file '.*list.yaml' must hold a mapping of setting: value, got list"),
    (["--progress", "yes"], r"unrecognized arguments: yes"),
])
def test_bad_keys_and_types_are_one_line_errors(name, args, message, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("sede: 3\n")
    (tmp_path / "list.yaml").write_text("- seed\n")
    module, _ = CLIS[name]
    argv = [a.format(dir=tmp_path) for a in args] + ["--out-dir", str(tmp_path / "out")]
    assert module.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.fullmatch(f"{name}: error: {message}.*\n", err), err
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_later_sources_override_earlier_ones(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.01\nepochs: 3\nseed: 1\nsampler_options: {num_random: 2}\n")
    config, _ = train.parse_args(["--config", str(path), "--set", "epochs=4", "--set", "seed=2", "--seed", "3",
                                  "--set", "sampler_options.extra=true"])
    assert (config.lr, config.epochs, config.seed) == (0.01, 4, 3)
    assert config.sampler_options == {"num_random": 2, "extra": True}


def test_command_line_values_keep_their_types(tmp_path):
    config, _ = train.parse_args(["--data-dir", "123", "--space", "1e3", "--set", "lr=2e-3", "--steps", "7",
                                  "--set", "clip_grad=null", "--no-augment"])
    assert (config.data_dir, config.space, config.lr, config.max_steps, config.clip_grad, config.augment) == \
        ("123", "1e3", 2e-3, 7, None, False)
    assert train.parse_args(["--set", "data_dir=null"])[0].data_dir is None
    config, _ = search.parse_args(["--budget", "macs=1G", "--budget", "params=5M", "--dataset", "null"])
    assert (config.budgets, config.dataset) == (["macs=1G", "params=5M"], None)


def test_resume_starts_from_the_saved_settings(tmp_path):
    """``--resume`` with nothing else continues with the settings the run was saved with; flags change what they
    name (the run itself then refuses a change that the resume rule does not allow)."""
    saved = TrainConfig(space="cifar-tiny", dataset="cifar10", data_dir="somewhere", lr=1e-3, out_dir=str(tmp_path))
    path = checkpoint_path(tmp_path, 30)
    path.parent.mkdir(parents=True)
    torch.save({"format": CHECKPOINT_FORMAT, "step": 30, "config": {**saved.to_dict(), "removed_setting": 1}}, path)
    config, resume = train.parse_args(["--out-dir", str(tmp_path), "--resume"])
    assert (config, resume) == (saved, True)
    config, _ = train.parse_args(["--out-dir", str(tmp_path), "--resume", "--no-progress", "--lr", "0.1"])
    assert config == dataclasses.replace(saved, progress=False, lr=0.1)
    assert changes_on_resume(saved.to_dict(), config) == ["lr: 0.001 -> 0.1"]
    assert train.parse_args(["--out-dir", str(tmp_path / "new"), "--resume"])[0] == TrainConfig(
        out_dir=str(tmp_path / "new"))  # nothing saved there: the run reports that

    searched = SearchConfig(checkpoint="ckpt.pt", budgets=["macs=1G"], algorithm="nsga2", out_dir=str(tmp_path))
    torch.save({"version": 1, "config": searched.to_dict()}, tmp_path / STATE_FILE)
    config, resume = search.parse_args(["--out-dir", str(tmp_path), "--resume", "--generations", "40"])
    assert (config, resume) == (dataclasses.replace(searched, generations=40), True)


@pytest.mark.parametrize("config", [TrainConfig(), SearchConfig()], ids=["train", "search"])
def test_one_rule_for_what_may_change_on_resume(config):
    resumable = {f.name for f in dataclasses.fields(config) if f.metadata["resumable"]}
    expected = {TrainConfig: {"out_dir", "progress", "plot", "log_every", "ckpt_every", "keep_checkpoints",
                              "eval_every", "eval_batch_size", "num_workers", "cpu_threads", "tensorboard",
                              "max_memory_gb"},
                SearchConfig: {"out_dir", "progress", "export", "generations", "device", "subnets_per_pass",
                               "batch_size", "checkpoint", "num_workers", "latency_other_device", "compound_scale",
                               "compound_coefficients"}}[type(config)]
    assert resumable == expected
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        changed = {bool: lambda v: not v, int: lambda v: v + 1, float: lambda v: v / 2 or 0.5}.get(type(value))
        if changed is None:
            continue
        other = dataclasses.replace(config, **{f.name: changed(value)})
        assert bool(changes_on_resume(config.to_dict(), other)) == (f.name not in resumable), f.name


def test_configs_check_types_and_values_however_they_are_built():
    with pytest.raises(ConfigError, match=r"bad training config: epochs must be int, got 'two'"):
        TrainConfig(epochs="two")
    with pytest.raises(ConfigError, match=r"bad search config: budget 'energy=5': unknown metric"):
        SearchConfig(budgets=["energy=5"])
    with pytest.raises(ConfigError, match=r"sampler='greedy' must be one of uniform, sandwich"):
        TrainConfig.from_dict({"sampler": "greedy"})
    with pytest.raises(ConfigError, match=r"a training config is a mapping"):
        TrainConfig.from_dict(["epochs"])
    assert TrainConfig(lr="2e-3").lr == 2e-3  # YAML 1.1 reads 2e-3, without a dot, as a string
    assert TrainConfig(epochs=3.0).epochs == 3 and isinstance(TrainConfig(epochs=3.0).epochs, int)


@pytest.mark.parametrize("make, message", [
    (lambda: TrainConfig(lr=math.inf), "lr=inf must be a finite number"),  # lr=nan failed lr > 0 already
    (lambda: TrainConfig(weight_decay=math.nan), "weight_decay=nan must be a finite number"),
    (lambda: SearchConfig(rl_lr=math.nan), "rl_lr=nan must be a finite number"),
    (lambda: SearchConfig(compound_coefficients=[1.2, math.inf, 1.1]),
     r"compound_coefficients\[1\]=inf must be a finite"),
    (lambda: SearchConfig(budgets=["macs=1e400"]), "budget 'macs=1e400': '1e400' is not a finite number"),
])
def test_no_setting_takes_nan_or_infinity(make, message):
    with pytest.raises(ConfigError, match=message):
        make()

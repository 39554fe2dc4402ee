"""nas.train: config handling, exact resume, NaN stop, clear errors, DDP with two CPU processes, and a short
real CIFAR-10 run whose subnets must beat chance."""
import json
import re
import stat
import sys
import time
from pathlib import Path

import numpy as np
import processes
import pytest
import torch
from hostile import fill_disk
from processes import TORCHRUN

from nas import data as data_lib
from nas import train as cli
from nas.checkpoint import load_checkpoint
from nas.errors import CheckpointError, ConfigError, NonFiniteLossError, OutputError
from nas.optim import warmup_cosine
from nas.report import read_log
from nas.spaces import load_space
from nas.trainer import TrainConfig, Trainer, train
from nas.vit.supernet import VisionTransformerSupernet

CIFAR10 = processes.REPO / ".." / "shared" / "data" / "cifar-10-batches-py"


def tiny(tmp_path, name="run", **overrides):
    """A few steps on the built-in digits: 192 training images, 6 steps per epoch of 32."""
    values = dict(out_dir=str(tmp_path / name), train_subset=192, test_subset=64, batch_size=32, max_steps=8,
                  warmup_steps=2, log_every=1, ckpt_every=0, progress=False, plot=False, sampler="uniform",
                  sampler_options={})
    values.update(overrides)
    return TrainConfig(**values)


def train_losses(out_dir) -> dict[int, list[float]]:
    return {r["step"]: r["losses"] for r in read_log(Path(out_dir) / "log.jsonl") if r["event"] == "train"}


def settings(items: list[str], *flags: str) -> TrainConfig:
    """The config of ``python -m nas.train --set ITEM ... FLAGS``."""
    return cli.parse_args([arg for item in items for arg in ("--set", item)] + list(flags))[0]


def test_config_yaml_overrides_and_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sampler: performance\nsampler_options: {num_banks: 4}\nlr: 0.01\nepochs: 3\n")
    config = settings(["lr=2e-3", "sampler_options.memory_size=5", "clip_grad=null"], "--config", str(path))
    assert (config.sampler, config.lr, config.epochs, config.clip_grad) == ("performance", 2e-3, 3, None)
    assert config.sampler_options == {"num_banks": 4, "memory_size": 5}
    config, resume = cli.parse_args(["--config", str(path), "--steps", "7", "--set", "ema_decay=0.99", "--resume",
                                     "--no-progress", "--out-dir", str(tmp_path / "none")])
    assert (config.max_steps, config.ema_decay, config.progress, resume) == (7, 0.99, False, True)
    assert cli.parse_args([])[0] == TrainConfig()


@pytest.mark.parametrize("overrides, message", [
    (["bogus=1"], "unknown key 'bogus'"),
    (["epochs=two"], "epochs must be int, got 'two'"),
    (["batch_size=0"], "batch_size=0 must be >= 1"),
    (["sampler=greedy"], "sampler='greedy' must be one of"),
    (["lr=0.1", "min_lr=1"], "min_lr <= lr"),
    (["space.embed=3"], r"only a mapping setting \(sampler_options\)"),
    (["lr"], "must look like KEY=VALUE"),
    (["seed=-1"], r"seed=-1 must be in 0..4294967295"),
    (["seed=4294967296"], r"seed=4294967296 must be in 0..4294967295"),
    (["num_workers=100000"], r"num_workers=100000 must be at most 256"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        settings(overrides)


def test_warmup_cosine_schedule():
    factor = warmup_cosine(total_steps=110, warmup_steps=10, min_ratio=0.1)
    assert factor(0) == pytest.approx(1 / 11) and factor(9) == pytest.approx(10 / 11)
    assert factor(10) == pytest.approx(1.0) and factor(60) == pytest.approx(0.55) and factor(110) == pytest.approx(0.1)


@pytest.mark.parametrize("sampler, options", [
    ("learned", {"policy_every": 2, "budgets_per_update": 2, "archs_per_budget": 2}),
    ("performance", {"num_banks": 3}),
])
def test_resume_continues_exactly(tmp_path, sampler, options):
    common = dict(sampler=sampler, sampler_options=options, measure_images=48, drop_path=0.1, ema_decay=0.9,
                  ckpt_every=3, keep_checkpoints=3)
    full = train(tiny(tmp_path, "full", **common))
    checkpoints = sorted((tmp_path / "full" / "checkpoints").glob("step_*.pt"))
    assert [p.name for p in checkpoints] == ["step_00000003.pt", "step_00000006.pt", "step_00000008.pt"]
    state = load_checkpoint(checkpoints[0])  # weights_only=True inside
    assert state["step"] == 3 and isinstance(state["sampler"], dict)
    assert isinstance(state["rng"]["cpu"][0], torch.Tensor)

    resumed = train(tiny(tmp_path, "resumed", **common), resume=str(checkpoints[0]))
    expected, got = train_losses(tmp_path / "full"), train_losses(tmp_path / "resumed")
    assert sorted(got) == [4, 5, 6, 7, 8]
    assert all(got[step] == expected[step] for step in got)  # exactly, not approximately
    assert (resumed.smallest, resumed.largest) == (full.smallest, full.largest)


def test_resume_latest_in_place_and_logs(tmp_path):
    config = tiny(tmp_path, ckpt_every=4, max_steps=6, plot=True, eval_every=3)
    train(config)
    log = read_log(tmp_path / "run" / "log.jsonl")
    assert [r["step"] for r in log if r["event"] == "eval"] == [3, 6]
    final = [r for r in log if r["event"] == "final"][0]
    assert 0 <= final["smallest"] <= 1 and 0 <= final["largest"] <= 1
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    assert all("images_per_s" in r for r in log if r["event"] == "train")  # log_every=1
    # --resume with no path takes the latest checkpoint (step 6, the end): nothing left to train, nor to evaluate
    result = train(config, resume=True)
    assert (result.steps, result.smallest, result.largest) == (6, final["smallest"], final["largest"])
    assert [r["step"] for r in read_log(tmp_path / "run" / "log.jsonl") if r["event"] == "train"] == list(range(1, 7))
    assert (tmp_path / "run" / "log.jsonl").read_text().count('"event": "final"') == 1


def test_out_dir_of_another_run_is_refused_and_left_alone(tmp_path, capsys):
    train(tiny(tmp_path, ckpt_every=4))
    before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert cli.main(["--out-dir", str(tmp_path / "run"), "--steps", "2", "--no-progress"]) == 2
    assert capsys.readouterr().err == (f"nas.train: error: out_dir '{tmp_path / 'run'}' already holds a run "
                                       "(checkpoints, config.yaml, log.jsonl); continue it with --resume, or choose "
                                       "another --out-dir\n")
    train(tiny(tmp_path, "other", max_steps=2))
    with pytest.raises(OutputError, match="resume into it only from its own checkpoints"):
        train(tiny(tmp_path), resume=str(tmp_path / "other" / "checkpoints" / "step_00000002.pt"))
    after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert after == before


def test_a_run_holds_its_out_dir_until_it_ends_or_is_killed(tmp_path):
    first = Trainer(tiny(tmp_path))
    with pytest.raises(OutputError, match=f"out_dir '{tmp_path / 'run'}' is in use by another run"):
        Trainer(tiny(tmp_path, "run"), resume=True)
    first.fit()
    first.close()
    train(tiny(tmp_path), resume=True)

    holder = processes.Child([sys.executable, "-c", "import sys, time; from nas.rundir import OwnedDirectory; "
                              "held = OwnedDirectory(sys.argv[1], 'out_dir'); print('held'); time.sleep(120)",
                              str(tmp_path / "run")], tmp_path)
    while "held" not in holder.stdout_path.read_text():
        assert holder.process.poll() is None, holder.output()
        time.sleep(0.05)
    with pytest.raises(OutputError, match="is in use by another run"):
        train(tiny(tmp_path), resume=True)
    holder.kill()  # kill -9: the kernel drops its lock
    assert train(tiny(tmp_path), resume=True).steps == 8


UNWRITABLE = "(Permission denied|Read-only file system|Operation not permitted)"
MAIN_TINY = ["--steps", "2", "--batch-size", "32", "--no-progress", "--set", "train_subset=64",
             "--set", "test_subset=32", "--set", "plot=false"]


def test_read_only_out_dir_is_a_one_line_error(read_only_dir, capsys):
    assert cli.main(["--out-dir", str(read_only_dir)] + MAIN_TINY) == 2
    assert re.fullmatch(f"nas.train: error: cannot write to out_dir '{read_only_dir}': {UNWRITABLE}\n",
                        capsys.readouterr().err)


@pytest.mark.parametrize("setting", ["batch_size", "eval_batch_size"])
def test_a_batch_past_memory_is_a_one_line_error_naming_it(tmp_path, capsys, setting):
    """A batch size that memory cannot hold (nas.memory's estimate) is refused before anything is read or written,
    naming the setting and how many images fit (digits-tiny's test split of 359 images would have been one batch)."""
    flag = "--" + setting.replace("_", "-")
    assert cli.main(["--out-dir", str(tmp_path / "run")] + MAIN_TINY + [flag, "1000000000"]) == 2
    assert re.fullmatch(rf"nas\.train: error: space 'digits-tiny': its supernet would take about .* GB \(training "
                        rf".*\), more than .* GB allowed by max_memory_gb .*; {setting}=1000000000 is too large: at "
                        rf"most [0-9]+ fit\n", capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_out_dir_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "run").write_text("notes")
    assert cli.main(["--out-dir", str(tmp_path / "run")] + MAIN_TINY) == 2
    assert capsys.readouterr().err == f"nas.train: error: out_dir '{tmp_path / 'run'}' is a file, not a directory\n"


def test_full_disk_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    fill_disk(monkeypatch, room=10_000)  # config.yaml fits, a checkpoint does not
    assert cli.main(["--out-dir", str(tmp_path / "run")] + MAIN_TINY) == 2
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000002.pt"
    assert capsys.readouterr().err == f"nas.train: error: cannot write '{checkpoint}': No space left on device\n"
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []


def test_resume_removes_stale_temporaries_and_nothing_else(tmp_path):
    train(tiny(tmp_path, max_steps=4, ckpt_every=2))
    run = tmp_path / "run"
    # Left by writes killed midway (nas.atomic's names), and the user's own files, which stay.
    stale = [run / ".config.yaml.nas-k3j9x0qa.tmp", run / "checkpoints" / ".step_00000004.pt.nas-ab12cd_4.tmp"]
    others = [run / "notes.tmp", run / "checkpoints" / "step_00000004.pt.tmp", run / ".config.yaml.tmp",
              run / ".mydata.abcdefgh.tmp", run / "checkpoints" / ".keep.12345678.tmp"]
    for path in stale + others:
        path.write_text("x")
    with pytest.raises(OutputError, match="already holds a run"):  # refused: it deletes nothing
        train(tiny(tmp_path, max_steps=4, ckpt_every=2))
    assert all(path.exists() for path in stale + others)
    train(tiny(tmp_path, max_steps=4, ckpt_every=2), resume=True)
    assert [path.exists() for path in stale + others] == [False] * len(stale) + [True] * len(others)
    (tmp_path / "new").touch()  # what any new file gets: the oracle of the permissions
    new_file = stat.S_IMODE((tmp_path / "new").stat().st_mode)
    assert {stat.S_IMODE(p.stat().st_mode) for p in run.rglob("*") if p.is_file() and p not in others} == {new_file}


def test_resuming_from_an_earlier_checkpoint_never_prunes_the_newest(tmp_path):
    train(tiny(tmp_path, ckpt_every=2, keep_checkpoints=3))
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000004.pt", "step_00000006.pt", "step_00000008.pt"]
    trainer = Trainer(tiny(tmp_path, ckpt_every=1, keep_checkpoints=1), resume=str(checkpoints / "step_00000004.pt"))
    save = trainer.save

    def checked_save():
        save()
        assert trainer.last_checkpoint.exists()  # it was once pruned right after it was written
        later = {f"step_{s:08d}.pt" for s in (6, 8) if s > trainer.step}
        assert sorted(p.name for p in checkpoints.iterdir()) == sorted({trainer.last_checkpoint.name} | later)

    trainer.save = checked_save
    result = trainer.fit()
    trainer.close()
    assert Path(result.checkpoint).exists() and [p.name for p in checkpoints.iterdir()] == ["step_00000008.pt"]


def test_log_is_only_appended_to_and_survives_a_torn_line(tmp_path):
    train(tiny(tmp_path, ckpt_every=4))
    log = tmp_path / "run" / "log.jsonl"
    straight = [r["losses"] for r in read_log(log) if r["event"] == "train"]
    # What a run killed while logging step 6 leaves: the records up to step 5, half of step 6's, checkpoint 4.
    kept = [line for line in log.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= 5]
    complete = "".join(line for line in kept if json.loads(line)["event"] == "train")
    log.write_text(complete + '{"event": "train", "step": 6, "lo')
    (tmp_path / "run" / "checkpoints" / "step_00000008.pt").unlink()

    train(tiny(tmp_path, ckpt_every=4), resume=True)
    assert log.read_text().startswith(complete)  # no complete record lost, the torn one gone
    records = read_log(log)
    assert [r["step"] for r in records if r["event"] == "train"] == list(range(1, 9))
    assert [(r["event"], r["step"]) for r in records if r["event"] != "train"] == [("resume", 4), ("final", 8)]
    assert [r["losses"] for r in records if r["event"] == "train"] == straight


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    forward = VisionTransformerSupernet.forward
    calls = []

    def poisoned(self, images, arch=None):
        calls.append(1)
        logits = forward(self, images, arch)
        return logits * float("nan") if len(calls) == 5 else logits

    monkeypatch.setattr(VisionTransformerSupernet, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"loss became \[nan\] at step 5.*step_00000004.pt.*Start a new run "
                                                 r"\(another --out-dir --init-from .*\) with a lower lr"):
        train(tiny(tmp_path, ckpt_every=2))
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*"))
    assert kept == ["step_00000002.pt", "step_00000004.pt"]
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000004.pt")["step"] == 4


def floating_tensors(state):
    """Every floating-point tensor inside a nested checkpoint state."""
    if isinstance(state, torch.Tensor):
        return [state] if state.is_floating_point() else []
    values = state.values() if isinstance(state, dict) else state if isinstance(state, (list, tuple)) else ()
    return [t for value in values for t in floating_tensors(value)]


def test_diverging_run_never_writes_or_names_a_non_finite_checkpoint(tmp_path):
    """The issue's recipe: lr=1e3 without warmup diverges within a few steps, through finite losses whose
    gradients are not finite."""
    config = tiny(tmp_path, max_steps=50, ckpt_every=1, warmup_steps=0, lr=1e3, min_lr=0.0)
    with pytest.raises(NonFiniteLossError, match=r"the last good checkpoint is '(.*)'") as raised:
        train(config)
    named = Path(re.search(r"the last good checkpoint is '(.*?)'", str(raised.value)).group(1))
    written = sorted((tmp_path / "run" / "checkpoints").glob("*.pt"))
    assert named in written
    for path in written:
        assert all(t.isfinite().all() for t in floating_tensors(torch.load(path, weights_only=True))), path


def test_non_finite_gradients_stop_before_the_step(tmp_path, monkeypatch):
    forward = VisionTransformerSupernet.forward
    calls = []

    def poisoned_gradient(self, images, arch=None):
        calls.append(1)
        logits = forward(self, images, arch)
        if len(calls) == 3:  # a finite loss whose gradient is NaN
            logits.register_hook(lambda grad: grad * float("nan"))
        return logits

    monkeypatch.setattr(VisionTransformerSupernet, "forward", poisoned_gradient)
    trainer = Trainer(tiny(tmp_path, ckpt_every=2))
    with pytest.raises(NonFiniteLossError, match=r"gradients became non-finite at step 3 with a finite loss.*"
                                                   r"stopped before updating the weights.*step_00000002.pt"):
        trainer.fit()
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000002.pt")["model"]
    assert all(torch.equal(saved[name], value) for name, value in trainer.model.state_dict().items())


def test_non_finite_weights_are_never_saved(tmp_path):
    trainer = Trainer(tiny(tmp_path))
    trainer.save()
    with torch.no_grad():
        trainer.model.head.weight[0, 0] = float("inf")
    trainer.step = 1
    with pytest.raises(NonFiniteLossError, match=r"at step 1 .* NaN or infinite values \(model.head.weight\); not "
                                                   r"saved; the last good checkpoint is .*step_00000000.pt"):
        trainer.save()
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step_00000000.pt"]


def test_checkpoints_that_cannot_be_used_are_refused(tmp_path, capsys):
    from nas.search import main as search

    train(tiny(tmp_path, max_steps=1))
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "step_00000001.pt")
    qkv = "blocks.0.attn.qkv.weight"
    poisoned = {**state, "model": {**state["model"], qkv: state["model"][qkv] * float("nan")}}
    cases = [(poisoned, r"holds NaN or infinite values \(model.blocks.0.attn.qkv.weight\): its run had diverged"),
             ({**state, "config": ["space", "digits-tiny"]}, "malformed: its config is list, not a mapping"),
             ({k: v for k, v in state.items() if k != "model"}, "malformed: it has no 'model' entry of weights"),
             ({**state, "step": 1.5}, "malformed: its step is 1.5, not an integer >= 0"),
             ({**state, "model": {**state["model"], qkv: torch.zeros(1).expand(10**6, 10**6)}},
              r"tensor model.blocks.0.attn.qkv.weight declares \(1000000, 1000000\) .* over 4 stored bytes")]
    for i, (bad, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.pt"
        torch.save(bad, path)
        with pytest.raises(CheckpointError, match=message):
            Trainer(tiny(tmp_path, f"resumed{i}", max_steps=1), resume=str(path))
        assert search(["--checkpoint", str(path), "--out-dir", str(tmp_path / f"search{i}"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("nas.search: error: checkpoint") and re.search(message, err) and err.count("\n") == 1


def test_clear_errors(tmp_path, capsys):
    assert cli.main(["--dataset", "cifar10", "--data-dir", str(tmp_path / "missing"), "--space", "cifar-tiny",
                   "--out-dir", str(tmp_path / "o")]) == 2
    assert "data directory for 'cifar10' not found" in capsys.readouterr().err
    with pytest.raises(data_lib.DataError, match="expects 3x32x32"):
        Trainer(tiny(tmp_path, space="cifar-tiny"))
    outside = load_space("digits-tiny").max_arch().to_dict() | {"embed_dim": 40}
    with pytest.raises(ConfigError, match=r"eval_archs\[0\] is not an arch of space 'digits-tiny'.*embed_dim=40"):
        Trainer(tiny(tmp_path, eval_archs=[outside]))
    with pytest.raises(ConfigError, match="unknown search space"):
        Trainer(tiny(tmp_path, space="nowhere-space"))

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt"):
        Trainer(tiny(tmp_path), resume=str(corrupt))
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        Trainer(tiny(tmp_path, "empty"), resume=True)
    with pytest.raises(ConfigError, match="search_holdout=0 holds none out"):
        Trainer(tiny(tmp_path, sampler="learned", search_holdout=0))
    with pytest.raises(ConfigError, match="search_holdout=1438 leaves no images to train on"):
        Trainer(tiny(tmp_path, search_holdout=1438))
    with pytest.raises(ConfigError, match="search_holdout=-1 must be >= 0"):
        tiny(tmp_path, search_holdout=-1)
    train(tiny(tmp_path, "short", max_steps=2))
    with pytest.raises(CheckpointError, match=r"different config: lr: 0.003 -> 0.1"):
        Trainer(tiny(tmp_path, "short", max_steps=2, lr=0.1), resume=True)


def index_coded_digits(monkeypatch):
    """The built-in digits with each image's index written into its first two pixels, so that a batch of
    images tells which training images it holds."""
    real = data_lib.load_digits

    def coded(split, test_fraction=0.2):
        dataset = real(split, test_fraction)
        index = torch.arange(len(dataset))
        dataset.images = dataset.images.clone()
        dataset.images[:, 0, 0, 0] = (index // 256).to(torch.uint8)
        dataset.images[:, 0, 0, 1] = (index % 256).to(torch.uint8)
        return dataset

    monkeypatch.setattr(data_lib, "load_digits", coded)


def image_indices(images: torch.Tensor) -> list[int]:
    return (images[:, 0, 0, 0].long() * 256 + images[:, 0, 0, 1].long()).tolist()


def test_search_holdout_never_enters_a_training_batch(tmp_path, monkeypatch):
    index_coded_digits(monkeypatch)
    trained_on = []
    train_step = Trainer.train_step

    def recording(self, images, labels):
        trained_on.extend(image_indices(images))
        return train_step(self, images, labels)

    monkeypatch.setattr(Trainer, "train_step", recording)
    num_train = 1438  # 1797 digits less the fixed 20% test split
    held_out = np.random.default_rng(1).permutation(num_train)[:num_train // 5].tolist()  # the documented rule
    config = tiny(tmp_path, train_subset=None, batch_size=128, max_steps=18, sampler="learned", measure_images=40,
                  sampler_options={"policy_every": 9, "budgets_per_update": 1, "archs_per_budget": 2})
    trainer = Trainer(config)
    assert image_indices(trainer.data.measure[0]) == held_out[:40]  # the sampler measures on the same split
    trainer.fit()
    assert len(trained_on) == 18 * 128  # two epochs of (1438 - 287) // 128 = 9 steps
    assert not set(trained_on) & set(held_out)
    assert len(set(trained_on)) > 1000  # every image not held out is a candidate, not a small fixed few
    split = load_checkpoint(trainer.last_checkpoint)["search_split"]
    assert split == {"images": 287, "seed": 1, "of": num_train, "dataset": "digits"}


def test_ddp_two_processes_match_one_process_with_twice_the_batch(tmp_path):
    """Two gloo ranks with batch 16 each see, step by step, the same 32 images as one process with batch
    32 (DistributedSampler shards each batch), so with hand-averaged gradients the losses must agree."""
    common = ["max_steps=4", "train_subset=192", "test_subset=64", "warmup_steps=1", "log_every=1", "augment=false",
              "drop_path=0.0", "plot=false", "sampler=sandwich", "sampler_options={num_random: 1}"]
    command = TORCHRUN + ["--nproc_per_node", "2", "-m", "nas.train", "--no-progress", "--out-dir",
                          str(tmp_path / "ddp"), "--batch-size", "16"]
    command += [arg for item in common for arg in ("--set", item)]
    done = processes.run(command, tmp_path, timeout=120)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-2000:]}\nstderr:\n{done.stderr[-4000:]}"
    assert "test accuracy: smallest subnet" in done.stdout
    state = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "step_00000004.pt")
    assert state["world_size"] == 2 and len(state["rng"]["cpu"]) == 2
    assert not torch.equal(state["rng"]["cpu"][0], state["rng"]["cpu"][1])

    single = settings(common + [f"out_dir={tmp_path / 'one'}", "batch_size=32", "progress=false"])
    train(single)
    ddp, one = train_losses(tmp_path / "ddp"), train_losses(tmp_path / "one")
    assert sorted(ddp) == [1, 2, 3, 4]
    for step in ddp:
        assert ddp[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), step
    ddp_log = [r for r in read_log(tmp_path / "ddp" / "log.jsonl") if r["event"] == "train"]
    one_log = [r for r in read_log(tmp_path / "one" / "log.jsonl") if r["event"] == "train"]
    assert [r["archs"] for r in ddp_log] == [r["archs"] for r in one_log]


def test_torchrun_ending_on_a_checkpoint_step_finishes(tmp_path):
    """The last step is a checkpoint step. Every rank must agree that the final checkpoint is written: when only
    rank 0 knew, the other ranks saved again (a collective) while rank 0 evaluated (another), and both hung."""
    command = TORCHRUN + ["--nproc_per_node", "2", "-m", "nas.train", "--no-progress", "--out-dir",
                          str(tmp_path / "ddp"), "--steps", "4", "--ckpt-every", "2", "--batch-size", "16"]
    command += [arg for item in ("train_subset=64", "test_subset=32", "plot=false") for arg in ("--set", item)]
    done = processes.run(command, tmp_path, timeout=120)
    assert done.returncode == 0, f"stdout:\n{done.stdout[-2000:]}\nstderr:\n{done.stderr[-4000:]}"
    written = sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir())
    assert written == ["step_00000002.pt", "step_00000004.pt"]
    assert [r["step"] for r in read_log(tmp_path / "ddp" / "log.jsonl") if r["event"] == "final"] == [4]


@pytest.mark.skipif(not CIFAR10.is_dir(), reason=f"CIFAR-10 not found at {CIFAR10} (../shared/data from the repo root)")
def test_cifar10_short_run_beats_chance(tmp_path):
    space = tmp_path / "cifar-micro.yaml"
    space.write_text("name: cifar-micro\nembed_dims: [48, 64]\ndepths: [2, 3]\nnum_heads: [2, 4]\n"
                     "mlp_ratios: [2.0, 3.0]\nhead_dim: 16\npatch_sizes: [8]\nimg_size: 32\nin_chans: 3\n"
                     "num_classes: 10\n")
    config = TrainConfig(space=str(space), dataset="cifar10", data_dir=str(CIFAR10), train_subset=16000,
                           test_subset=1000, batch_size=64, epochs=2, lr=3e-3, warmup_steps=20, sampler="sandwich",
                           sampler_options={"num_random": 0}, augment=False, out_dir=str(tmp_path / "cifar"),
                           ckpt_every=0, progress=False, plot=False, log_every=20)
    result = train(config)
    print(f"CIFAR-10, {result.steps} steps: smallest {result.smallest:.3f}, largest {result.largest:.3f}, "
          f"{result.seconds:.1f} s")
    assert result.smallest > 0.25 and result.largest > 0.25  # chance is 0.10

"""The README's commands for image folders, latency models and export, run as written, with their sizes made small
(appended flags override the ones before them): a synthetic image folder stands in for ImageNet, a tiny space for
AutoFormer-T, and the search and export read the checkpoint the shortened training wrote."""
from __future__ import annotations

import json
import re
import shlex
import sys

import processes
import pytest
import torch
from test_imagefolder import SPACE_YAML, write_folder

from nas import costs
from nas.checkpoint import load_supernet
from nas.export import load_safetensors
from nas.spaces import load_space
from nas.vit.arch import Arch

MARKER = "<!-- run by tests/nas/test_readme.py -->"
SMALLER = {
    "nas.train": ["--space", "folder-tiny.yaml", "--steps", "2", "--batch-size", "8", "--num-workers", "1",
                  "--set", "search_holdout=16", "--eval-batch-size", "40", "--no-progress", "--no-plot"],
    "nas.search": ["--generations", "1", "--population", "4", "--parents", "2", "--mutations", "2", "--crossovers",
                   "2", "--test-images", "16", "--no-progress"],
    "nas.latency measure": ["--space", "digits-tiny", "--archs", "6", "--warmup", "1", "--repeats", "2"],
    "nas.latency validate": ["--archs", "2", "--warmup", "1", "--repeats", "2"],
}


def readme_commands() -> list[list[str]]:
    text = (processes.REPO / "README.md").read_text()
    commands = []
    for block in re.findall(re.escape(MARKER) + r"\n```bash\n(.*?)```", text, flags=re.S):
        commands += [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    return commands


def test_the_readme_has_its_commands_marked():
    programs = [" ".join(c[2:4]) if c[2] == "nas.latency" else c[2] for c in readme_commands()]
    assert programs == ["nas.train", "nas.search", "nas.latency measure", "nas.latency fit", "nas.latency validate",
                        "nas.export"]


@pytest.mark.slow
def test_the_readmes_commands_run(tmp_path, monkeypatch):
    """Each command exits 0 and does what the README says: the training writes its checkpoint, the search reports the
    best arch inside the budget at its exact MACs, the latency files hold what was asked, and the export's subnet (the
    smallest) computes the supernet's logits, checked here as well as by the command."""
    write_folder(tmp_path / "data" / "imagenet", {"train": 12, "val": 4})
    (tmp_path / "folder-tiny.yaml").write_text(SPACE_YAML)
    outputs = {}
    for command in readme_commands():
        assert command[:2] == ["python", "-m"], command
        program = " ".join(command[2:4]) if command[2] == "nas.latency" else command[2]
        args = [re.sub(r"step_\d+\.pt", "step_00000002.pt", arg) for arg in command[3:]]
        done = processes.run([sys.executable, "-m", command[2], *args, *SMALLER.get(program, [])], tmp_path, 300)
        assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        outputs[program] = done.stdout
    monkeypatch.chdir(tmp_path)  # the checkpoint names its space by the path the command was given
    supernet, space, state = load_supernet("runs/imagenet/checkpoints/step_00000002.pt")
    assert space.name == "folder-tiny" and state["step"] == 2

    summary = json.loads((tmp_path / "runs" / "imagenet-search" / "search.json").read_text())
    best = summary["best"]["macs=1.3G"]
    arch = Arch.from_dict(best["arch"])
    assert space.contains(arch) and best["macs"] == costs.macs(arch, space) <= 1.3e9
    assert best["top1"] == max(c["top1"] for c in summary["candidates"] if c["macs"] <= 1.3e9)
    assert summary["test_data"] == "16 test images"

    measured = json.loads((tmp_path / "latency" / "autoformer-t.json").read_text())
    timed = [Arch.from_dict(m["arch"]) for m in measured["measurements"]]  # 6 random ones, the smallest and largest
    assert measured["space"]["name"] == "digits-tiny" and len(set(timed)) == len(timed) <= 8
    assert {load_space("digits-tiny").min_arch(), load_space("digits-tiny").max_arch()} <= set(timed)
    assert all(m["seconds"] > 0 for m in measured["measurements"])
    assert (tmp_path / "latency" / "autoformer-t-model.json").exists()
    validated = re.search(r"\[latency\] (\d+) new subnets timed .*: relative error mean ([0-9.]+)%.* rank correlation "
                          r"(-?[0-9.]+)", outputs["nas.latency validate"])
    assert validated and int(validated[1]) >= 2 and -1 <= float(validated[3]) <= 1, outputs["nas.latency validate"]

    printed = outputs["nas.export"]
    differences = [float(d) for d in re.findall(r"largest relative difference (\S+)", printed)]
    assert len(differences) == 4 and max(differences) <= 1e-4, printed
    assert f"[export] subnet {space.min_arch().to_json()}" in printed
    model, exported_arch = load_safetensors(tmp_path / "runs" / "imagenet-export" / "safetensors")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), supernet(images, space.min_arch()), atol=1e-5, rtol=1e-5)
    assert exported_arch == space.min_arch()

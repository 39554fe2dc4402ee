"""The README's commands for image folders, latency models and export, run as written, with their sizes made small
(appended flags override the ones before them): a synthetic image folder stands in for ImageNet, a tiny space for
AutoFormer-T, and the search and export read the checkpoint the shortened training wrote."""
from __future__ import annotations

import re
import shlex
import sys

import processes
import pytest
from test_imagefolder import SPACE_YAML, write_folder

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
def test_the_readmes_commands_run(tmp_path):
    write_folder(tmp_path / "data" / "imagenet", {"train": 12, "val": 4})
    (tmp_path / "folder-tiny.yaml").write_text(SPACE_YAML)
    for command in readme_commands():
        assert command[:2] == ["python", "-m"], command
        program = " ".join(command[2:4]) if command[2] == "nas.latency" else command[2]
        args = [re.sub(r"step_\d+\.pt", "step_00000002.pt", arg) for arg in command[3:]]
        done = processes.run([sys.executable, "-m", command[2], *args, *SMALLER.get(program, [])], tmp_path, 300)
        assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    assert (tmp_path / "runs" / "imagenet-search" / "search.json").exists()
    assert (tmp_path / "runs" / "imagenet-export" / "safetensors" / "config.json").exists()
    assert (tmp_path / "latency" / "autoformer-t-model.json").exists()

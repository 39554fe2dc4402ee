"""nas.atomic: what every checkpoint, search state and result file relies on."""
import os
import shutil
import stat

import pytest
import torch
from hostile import fill_disk

from nas import atomic
from nas.errors import OutputError


def test_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "state.pt"
    atomic.atomic_torch_save({"step": torch.tensor(3)}, path)
    atomic.atomic_torch_save({"step": torch.tensor(4)}, path)
    assert torch.load(path, weights_only=True)["step"].item() == 4
    assert [p.name for p in path.parent.iterdir()] == ["state.pt"]


def test_a_crash_while_writing_keeps_the_old_file(tmp_path):
    path = tmp_path / "log.json"
    atomic.atomic_write_text(path, "old")
    with pytest.raises(KeyboardInterrupt):
        with atomic.atomic_open(path, "w") as handle:
            handle.write("half of the new")
            raise KeyboardInterrupt
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["log.json"]


@pytest.mark.parametrize("save", [
    lambda path: atomic.atomic_torch_save({"w": torch.zeros(10_000)}, path),  # torch says only "unexpected pos"
    lambda path: atomic.atomic_write_text(path, "x" * 10_000),
])
def test_a_full_disk_is_a_clear_error_and_keeps_the_old_file(tmp_path, monkeypatch, save):
    path = tmp_path / "state.pt"
    path.write_bytes(b"old")
    fill_disk(monkeypatch, room=1000)
    with pytest.raises(OutputError, match=f"cannot write '{path}': No space left on device$"):
        save(path)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_a_directory_that_cannot_be_written_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match=f"cannot write '{tmp_path / 'file' / 'x.json'}': "):
        atomic.atomic_write_text(tmp_path / "file" / "x.json", "{}")


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_get_the_permissions_of_any_new_file(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic.atomic_write_text(tmp_path / "a.json", "{}")
        (tmp_path / "plain").touch()  # what open() gives a new file: the oracle
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o666 & ~umask


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path):
    with pytest.raises(KeyboardInterrupt):  # a real temporary, left as a killed write leaves it
        with atomic.atomic_open(tmp_path / "state.pt") as handle:
            handle.write(b"half")
            stale = [p.name for p in tmp_path.iterdir()]
            shutil.copy(tmp_path / stale[0], tmp_path / "copy")
            raise KeyboardInterrupt
    (tmp_path / "copy").rename(tmp_path / stale[0])
    mine = [".notes.tmp", "state.pt.tmp", ".state.pt.tmp", "x.abcdefgh.tmp", ".x.abcdefgh.tmp.bak", ".x.abcdefgh.tmp",
            "x.nas-abcdefgh.tmp"]
    for name in mine:
        (tmp_path / name).write_text("user's")
    assert atomic.remove_stale_temporaries(tmp_path) == stale
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(mine)

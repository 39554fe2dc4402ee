"""nas.atomic: what every checkpoint, search state and result file relies on."""
import pytest
import torch

from nas import atomic


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

import os
from pathlib import Path

import pytest
import torch

import elastic_ops


@pytest.fixture(autouse=True)
def reference_backend_for_training():
    """Model-level tests run on the reference: the Triton kernels in the CPU interpreter are tested on
    their own in tests/kernels and are far too slow for whole networks. Tests of the native path
    force it explicitly."""
    with elastic_ops.use_backend("reference"):
        yield


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody may create files in: a temporary one without write permission, or for root, whom
    permissions do not stop, sysfs's /sys/kernel."""
    if os.geteuid() != 0:
        path = tmp_path / "read-only"
        path.mkdir(mode=0o555)
        yield path
        path.chmod(0o755)
        return
    if not os.path.isdir("/sys/kernel") or _can_create_in("/sys/kernel"):
        pytest.skip("running as root without a read-only directory to test with")
    yield Path("/sys/kernel")


def _can_create_in(directory: str) -> bool:
    try:
        os.close(os.open(os.path.join(directory, ".nas-write-probe"), os.O_CREAT | os.O_WRONLY))
    except OSError:
        return False
    os.unlink(os.path.join(directory, ".nas-write-probe"))
    return True


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: small convolutions on two threads of a busy machine wait on each other (the
    hybrid supernets' tests run ten times faster on one). Module-scoped, so that module-scoped fixtures get it too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

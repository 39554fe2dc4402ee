"""Fixtures of the Triton kernel tests; the shared checks are in kernel_checks.py."""
import pytest
import torch

import elastic_ops


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def triton_backend():
    """Force the Triton backend: a test fails loudly instead of silently running the reference."""
    with elastic_ops.use_backend("triton"):
        yield

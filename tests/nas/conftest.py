import pytest

import elastic_ops


@pytest.fixture(autouse=True)
def reference_backend_for_training():
    """Model-level tests run on the reference: the Triton kernels in the CPU interpreter are tested on
    their own in tests/kernels and are far too slow for whole networks. Tests of the native path
    force it explicitly."""
    with elastic_ops.use_backend("reference"):
        yield

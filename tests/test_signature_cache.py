"""The op calls' host path (DESIGN.md section 4): a call's checks and backend choice run once per signature, and a
call whose signature differs from every checked one is checked in full."""
import pytest
import torch

import elastic_ops
from elastic_ops import _validate, functional, reference

check_eps = _validate.check_eps

NATIVE = elastic_ops.backends()["native"].available
BACKENDS = ["reference", pytest.param("native", marks=pytest.mark.skipif(not NATIVE, reason="no native extension"))]


def _calls():
    """(op, elastic call, its reference on the same arguments) for each single-subnet op on small shapes."""
    x = torch.randn(2, 5, 12)
    w1, b1, w2, b2 = torch.randn(40, 16), torch.randn(40), torch.randn(16, 40), torch.randn(16)
    gamma, beta = torch.randn(16), torch.randn(16)
    qkv, qkv_b, proj, proj_b = torch.randn(3 * 4 * 8, 16), torch.randn(3 * 4 * 8), torch.randn(16, 32), torch.randn(16)
    return [
        ("linear", lambda: elastic_ops.elastic_linear(x, w1, b1, 30, "gelu"),
         lambda: reference.linear(x, w1, b1, 30, "gelu")),
        ("layer_norm", lambda: elastic_ops.elastic_layer_norm(x, gamma, beta),
         lambda: reference.layer_norm(x, gamma, beta)),
        ("mlp", lambda: elastic_ops.elastic_mlp(x, w1, b1, w2, b2, 30), lambda: reference.mlp(x, w1, b1, w2, b2, 30)),
        ("attention", lambda: elastic_ops.elastic_attention(x, qkv, qkv_b, proj, proj_b, 3, 8),
         lambda: reference.attention(x, qkv, qkv_b, proj, proj_b, 3, 8)),
    ]


@pytest.fixture
def counted(monkeypatch):
    """Counts of the calls into the checks of each op, the backend choice and the native kernels' own checks."""
    counts = {}

    def counting(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return original(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)

    for op in ("linear", "layer_norm", "mlp", "attention"):
        counting(_validate, f"check_{op}")
    counting(functional, "select")
    if NATIVE:
        from elastic_ops import _native

        counting(_native, "_check")
    monkeypatch.setattr(functional, "_plans", {})
    return counts


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_repeated_call_is_checked_and_dispatched_once(counted, backend):
    with torch.no_grad(), elastic_ops.use_backend(backend):
        for op, call, expected in _calls():
            first = call()
            checks = dict(counted)
            assert checks[f"check_{op}"] == 1 and checks["select"] >= 1
            plans = len(functional._plans)
            for _ in range(3):
                torch.testing.assert_close(call(), expected(), rtol=1e-4, atol=1e-4)
            assert counted == checks, f"{op}: a call of a checked signature ran checks again"
            assert len(functional._plans) == plans
            torch.testing.assert_close(first, expected(), rtol=1e-4, atol=1e-4)


def test_a_call_differing_from_a_checked_one_is_checked_in_full(counted):
    x, weight = torch.randn(3, 8), torch.randn(6, 8)
    elastic_ops.elastic_linear(x, weight, None, 1)
    with pytest.raises(TypeError, match="out_features must be an int"):
        elastic_ops.elastic_linear(x, weight, None, True)  # equal to 1 as a dictionary key, not a size
    with pytest.raises(TypeError, match="out_features must be an int"):
        elastic_ops.elastic_linear(x, weight, None, 1.0)
    with pytest.raises(ValueError, match="out_features=7 is outside 1..6"):
        elastic_ops.elastic_linear(x, weight, None, 7)
    with pytest.raises(ValueError, match="in_features"):
        elastic_ops.elastic_linear(torch.randn(3, 9), weight, None, 1)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        elastic_ops.elastic_linear(x.tolist(), weight, None, 1)
    with pytest.raises(TypeError, match="floating-point"):
        elastic_ops.elastic_linear(x.int(), weight, None, 1)
    with pytest.raises(ValueError, match="bias has 5 entries"):
        elastic_ops.elastic_linear(x, weight, torch.randn(5), 1)
    assert counted["check_linear"] == 8


@pytest.mark.skipif(not NATIVE, reason="no native extension")
def test_what_only_the_native_kernels_check_is_part_of_the_signature():
    x, weight = torch.randn(3, 8), torch.randn(6, 8)
    with torch.no_grad(), elastic_ops.use_backend("native"):
        elastic_ops.elastic_linear(x, weight, None, 6)
        for _ in range(2):  # a failed call leaves no plan behind
            with pytest.raises(ValueError, match="take float32, weight is torch.float64"):
                elastic_ops.elastic_linear(x, weight.double(), None, 6)
            with pytest.raises(ValueError, match="dense strided"):
                elastic_ops.elastic_linear(x.to_sparse(), weight, None, 6)
    with elastic_ops.use_backend("native"), pytest.raises(elastic_ops.BackendUnavailableError, match="forward-only"):
        elastic_ops.elastic_linear(x, weight.requires_grad_(), None, 6)


def test_a_layer_norm_eps_is_checked_once_per_value(counted, monkeypatch):
    """eps is part of LayerNorm's signature: a value not seen before is checked, whatever the tensors' signature."""
    checked_eps = []
    monkeypatch.setattr(_validate, "check_eps", lambda op, eps: (checked_eps.append(eps), check_eps(op, eps)))
    x, gamma = torch.randn(3, 8), torch.randn(8)
    for _ in range(3):
        torch.testing.assert_close(elastic_ops.elastic_layer_norm(x, gamma, None, 1e-5),
                                   reference.layer_norm(x, gamma, None, 1e-5))
    assert checked_eps == [1e-5] and counted["check_layer_norm"] == 1
    for _ in range(2):  # a failed call leaves no plan behind
        for bad in (0.0, -1e-5, float("nan"), float("inf"), True, "1e-5"):
            with pytest.raises(ValueError, match="eps must be a finite number > 0"):
                elastic_ops.elastic_layer_norm(x, gamma, None, bad)
    torch.testing.assert_close(elastic_ops.elastic_layer_norm(x, gamma, None, 1),  # an int eps is a number
                               reference.layer_norm(x, gamma, None, 1.0))
    assert len(checked_eps) == 1 + 2 * 6 + 1 and checked_eps[-1] == 1 and type(checked_eps[-1]) is int

"""Backend choice, forcing, and input validation (DESIGN.md section 4)."""
import os
import subprocess
import sys

import pytest
import torch

import elastic_ops
from elastic_ops import _backend


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    child_env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ELASTIC_OPS_BACKEND")}
    child_env.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env, timeout=120)


def test_backends_reports_every_backend_with_a_reason():
    report = elastic_ops.backends()
    assert set(report) == set(elastic_ops.BACKENDS)
    assert report["reference"].available
    assert all(status.reason for status in report.values())


@pytest.mark.skipif(not elastic_ops.backends()["native"].available, reason="the native extension is not built")
def test_forced_backend_that_cannot_run_says_why():
    x, w = torch.randn(3, 4, requires_grad=True), torch.randn(5, 4)
    with elastic_ops.use_backend("native"), pytest.raises(elastic_ops.BackendUnavailableError, match="gradients"):
        elastic_ops.elastic_linear(x, w, None, 5)
    with elastic_ops.use_backend("native"), pytest.raises(elastic_ops.BackendUnavailableError, match="float32"):
        elastic_ops.elastic_layer_norm(torch.randn(2, 4, dtype=torch.float64), None, None)
    with elastic_ops.use_backend("native"), pytest.raises(elastic_ops.BackendUnavailableError, match="run on the CPU"):
        _backend.select("linear", torch.device("meta"), torch.float32, False)


def test_cached_choice_follows_the_forced_backend():
    """The choice is made once per kind of call; forcing another backend is another kind of call."""
    cpu = torch.device("cpu")
    automatic = _backend.select("mlp", cpu, torch.float32, False)
    assert _backend.select("mlp", cpu, torch.float32, False) == automatic
    with elastic_ops.use_backend("reference"):
        assert _backend.select("mlp", cpu, torch.float32, False) == "reference"
    assert _backend.select("mlp", cpu, torch.float32, False) == automatic
    with elastic_ops.use_backend("triton"):  # the interpreter runs the tests on a CPU; compiled on a GPU only
        if _backend.triton_interpreting():
            assert _backend.select("grouped_mlp", cpu, torch.float32, False, triton_backward=False) == "triton"
        with pytest.raises(elastic_ops.BackendUnavailableError, match="forward-only"):
            _backend.select("grouped_mlp", cpu, torch.float32, True, triton_backward=False)


def test_forced_triton_without_gpu_or_interpreter_raises_clear_error():
    result = _run_python(
        "import torch, elastic_ops\n"
        "with elastic_ops.use_backend('triton'):\n"
        "    elastic_ops.elastic_linear(torch.randn(2, 3), torch.randn(4, 3))\n",
        TRITON_INTERPRET="0",
    )
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the Triton backend can run")
    assert result.returncode != 0
    assert "BackendUnavailableError" in result.stderr and "triton" in result.stderr


def test_environment_variable_forces_backend_and_rejects_unknown_names():
    ok = _run_python(
        "import torch, elastic_ops\n"
        "from elastic_ops import _backend\n"
        "print(_backend.select('linear', torch.device('cpu'), torch.float32, False))\n",
        ELASTIC_OPS_BACKEND="reference",
    )
    assert ok.returncode == 0 and ok.stdout.strip() == "reference", ok.stderr
    bad = _run_python("import torch, elastic_ops\nelastic_ops.elastic_linear(torch.randn(2, 3), torch.randn(4, 3))",
                      ELASTIC_OPS_BACKEND="cuda-magic")
    assert bad.returncode != 0 and "unknown backend 'cuda-magic'" in bad.stderr


def test_use_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown backend"):
        with elastic_ops.use_backend("fast"):
            pass


def test_automatic_choice_falls_back_without_crashing():
    x, w, b = torch.randn(3, 8), torch.randn(6, 10), torch.randn(6)
    expected = elastic_ops.reference.linear(x, w, b, 5)
    with elastic_ops.use_backend("auto"):
        for needs_grad in (False, True):
            with torch.set_grad_enabled(needs_grad):
                got = elastic_ops.elastic_linear(x, w.requires_grad_(needs_grad), b, 5)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # Without the interpreter, the automatic choice on the CPU is native for fp32 inference, reference otherwise.
    assert _backend.select("linear", torch.device("cpu"), torch.float64, False) in ("triton", "reference")


def test_package_imports_and_runs_without_triton_or_native_extension():
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['elastic_ops._C'] = None\n"
        "import torch, elastic_ops\n"
        "status = elastic_ops.backends()\n"
        "assert not status['triton'].available and 'not installed' in status['triton'].reason\n"
        "assert not status['native'].available and 'not built' in status['native'].reason\n"
        "y = elastic_ops.elastic_mlp(torch.randn(2, 3, 4), torch.randn(8, 6), None, torch.randn(6, 8), None, 5)\n"
        "print(tuple(y.shape))\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(2, 3, 4)"


def test_module_entry_point_lists_backends():
    result = _run_python("import runpy; runpy.run_module('elastic_ops', run_name='__main__')")
    assert result.returncode == 0, result.stderr
    assert {line.split()[0] for line in result.stdout.splitlines()} == set(elastic_ops.BACKENDS)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: elastic_ops.elastic_linear(torch.randn(2, 3), torch.randn(4, 3), None, 5),
         r"out_features=5 is outside 1..4"),
        (lambda: elastic_ops.elastic_linear(torch.randn(2, 6), torch.randn(4, 3)), r"in_features .* outside 1..3"),
        (lambda: elastic_ops.elastic_linear(torch.randn(2, 3), torch.randn(4, 3), torch.randn(3)),
         r"bias has 3 entries"),
        (lambda: elastic_ops.elastic_linear(torch.randint(0, 3, (2, 3)), torch.randn(4, 3)), r"floating-point"),
        (lambda: elastic_ops.elastic_linear([1.0, 2.0], torch.randn(4, 3)), r"must be a torch.Tensor"),
        (lambda: elastic_ops.elastic_linear(torch.randn(2, 3), torch.randn(4, 3, 1)), r"weight must have 2 dimensions"),
        (lambda: elastic_ops.elastic_linear(torch.randn(2, 3), torch.randn(4, 3), None, 0), r"out_features=0"),
        (lambda: elastic_ops.elastic_linear(torch.randn(2, 3), torch.randn(4, 3), None, 2, "relu"), r"activation"),
        (lambda: elastic_ops.elastic_layer_norm(torch.randn(2, 9), torch.randn(8), None), r"outside 1..8"),
        (lambda: elastic_ops.elastic_mlp(torch.randn(2, 4), torch.randn(8, 4), None, torch.randn(4, 8), None, 9),
         r"hidden_features=9 is outside 1..8"),
        (lambda: elastic_ops.elastic_attention(torch.randn(2, 5, 4), torch.randn(3 * 2 * 8, 4), None,
                                               torch.randn(4, 16), None, 3, 8), r"num_heads=3 is outside 1..2"),
        (lambda: elastic_ops.elastic_attention(torch.randn(2, 5, 4), torch.randn(40, 4), None,
                                               torch.randn(4, 16), None, 1, 8), r"not a multiple of 3 \* head_dim"),
        (lambda: elastic_ops.elastic_attention(torch.randn(5, 4), torch.randn(48, 4), None,
                                               torch.randn(4, 16), None, 1, 8), r"x must have 3 dimensions"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to mix devices")
def test_mixed_devices_raise_clear_error():
    with pytest.raises(ValueError, match="is on cpu but x is on cuda"):
        elastic_ops.elastic_linear(torch.randn(2, 3, device="cuda"), torch.randn(4, 3))


def test_a_head_dim_the_triton_kernels_cannot_tile_falls_back_automatically_and_fails_forced():
    """ViTAS's head dim 30 (not a power of two): the automatic choice runs another backend with the reference's
    result; forcing Triton names the head dim."""
    torch.manual_seed(0)
    heads, head_dim, embed = 2, 30, 48
    x = torch.randn(2, 5, embed)
    # Weights of a trained layer's scale (0.1), so that the softmax is not saturated by logits in the hundreds.
    qkv_weight, qkv_bias = 0.1 * torch.randn(3 * 4 * head_dim, embed), 0.1 * torch.randn(3 * 4 * head_dim)
    proj_weight, proj_bias = 0.1 * torch.randn(64, 4 * head_dim), 0.1 * torch.randn(64)
    args = (x, qkv_weight, qkv_bias, proj_weight, proj_bias, heads, head_dim)
    chosen = _backend.select("attention", x.device, x.dtype, False,
                             triton_shape_problem=_backend.triton_head_dim_problem(head_dim))
    assert chosen != "triton"
    torch.testing.assert_close(elastic_ops.elastic_attention(*args), elastic_ops.reference.attention(*args))
    assert _backend.triton_head_dim_problem(32) is None
    if _backend.triton_interpreting():
        with elastic_ops.use_backend("triton"), pytest.raises(elastic_ops.BackendUnavailableError,
                                                              match="head_dim that is a power of two .* got 30"):
            elastic_ops.elastic_attention(*args)

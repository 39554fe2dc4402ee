"""README: under ``torch.no_grad()`` nothing is kept for a backward. For every op and every backend that runs it: the
output has no autograd node, no tensor is saved for a backward, and the call leaves nothing alive but its output (the
profiler's allocation records, summed); on the Triton path the op's forward is asked to keep no residuals (the
pre-activation, LayerNorm's statistics, attention's log-sum-exp), which with gradients it is."""
from __future__ import annotations

import gc

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import elastic_ops
from elastic_ops.ops import attention, layernorm, linear, mlp


def _param(*shape):
    return torch.nn.Parameter(torch.randn(*shape) * shape[-1] ** -0.5)


X = torch.randn(2, 64, 48, requires_grad=True)
FC1_WEIGHT, FC1_BIAS, FC2_WEIGHT, FC2_BIAS = _param(160, 48), _param(160), _param(48, 160), _param(48)
NORM_WEIGHT, NORM_BIAS = _param(48), _param(48)
QKV_WEIGHT, QKV_BIAS = _param(3 * 4 * 16, 48), _param(3 * 4 * 16)
PROJ_WEIGHT, PROJ_BIAS = _param(48, 4 * 16), _param(48)
# op: (its call, the Triton path's forward that is told whether to keep residuals)
OPS = {
    "linear_gelu": (lambda: elastic_ops.elastic_linear(X, FC1_WEIGHT, FC1_BIAS, 150, "gelu"),
                    (linear, "linear_forward")),
    "layer_norm": (lambda: elastic_ops.elastic_layer_norm(X, NORM_WEIGHT, NORM_BIAS),
                   (layernorm, "layer_norm_forward")),
    "mlp": (lambda: elastic_ops.elastic_mlp(X, FC1_WEIGHT, FC1_BIAS, FC2_WEIGHT, FC2_BIAS, 150),
            (mlp, "mlp_forward")),
    "attention": (lambda: elastic_ops.elastic_attention(X, QKV_WEIGHT, QKV_BIAS, PROJ_WEIGHT, PROJ_BIAS, 3, 16),
                  (attention, "self_attention_forward")),
}
BACKENDS = [name for name in ("triton", "native", "reference") if elastic_ops.backends()[name].available]


def run_and_count(call) -> tuple[torch.Tensor, int, int]:
    """(output, tensors saved for a backward, bytes the call left allocated, its output included)."""
    saved = []
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = call()
        # Triton's interpreter keeps each launch's storages (attention's qkv, context and log-sum-exp) in reference
        # cycles of its own (GridExecutor's closures; the ops' code makes none: test_host_cycles.py), freed by the
        # next collection rather than on return: not kept for a backward, but counted here.
        gc.collect()
    left = sum(event.nbytes() for event in prof.profiler.kineto_results.events() if event.name() == "[memory]")
    return out, len(saved), left


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_nothing_is_kept_under_no_grad(op, backend, monkeypatch):
    call, (module, forward) = OPS[op]
    keeps = []
    real = getattr(module, forward)

    def spy(*args, keep_residuals, **kwargs):
        keeps.append(keep_residuals)
        return real(*args, keep_residuals=keep_residuals, **kwargs)

    monkeypatch.setattr(module, forward, spy)
    with elastic_ops.use_backend(backend):
        if backend != "native":  # the native kernels are forward-only
            out, saved, left = run_and_count(call)
            assert out.grad_fn is not None and saved > 0 and left > out.numel() * out.element_size()
            assert keeps == ([True] if backend == "triton" else [])
            keeps.clear()
        with torch.no_grad():
            out, saved, left = run_and_count(call)
    assert out.grad_fn is None and not out.requires_grad and saved == 0
    assert left == out.numel() * out.element_size(), "the call left more than its output alive"
    assert keeps == ([False] if backend == "triton" else [])

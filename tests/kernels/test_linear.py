"""Triton elastic linear against the PyTorch reference: outputs, dx, dW, db, slicing, accumulation, errors."""
from __future__ import annotations

import threading

import pytest
import torch
from kernel_checks import TOLERANCES, assert_grad_accumulated, kernel_dtypes, reference_copy, seed_grad, super_param

import elastic_ops
from elastic_ops import reference, weight_grads_in_place

# (batch, tokens, in_max, in, out_max, out): 197 tokens, prime widths, active 1, active = max, batch 1.
SHAPES = {
    "prime": (2, 197, 67, 61, 101, 97),
    "active_max": (1, 197, 48, 48, 80, 80),
    "active_one": (3, 17, 19, 1, 23, 1),
}


def _low_precision_bound(ref: torch.Tensor, torch_low: torch.Tensor, magnitude: torch.Tensor) -> float:
    """Allowed max error of a low-precision result against the fp32 reference: twice torch's own error on the
    same inputs, and never below one low-precision rounding of every term of the sum (``magnitude`` is the
    sum of the terms' absolute values). The floor matters where a few terms cancel (active size 1): there
    torch's error is a single lucky or unlucky draw."""
    eps = torch.finfo(torch_low.dtype).eps
    return max(2 * (torch_low.float() - ref).abs().max().item(), eps * magnitude.max().item())


def _magnitudes(x, weight, bias, activation, dy):
    """Sums of absolute terms behind (y, dx, dW, db), from fp32 ``x: [M, in]``, the weight block and ``dy``."""
    pre = torch.nn.functional.linear(x, weight, bias).requires_grad_(True)
    dz = torch.autograd.grad(torch.nn.functional.gelu(pre), pre, dy)[0] if activation == "gelu" else dy
    return (x.abs() @ weight.abs().T + bias.abs(), dz.abs() @ weight.abs(), dz.abs().T @ x.abs(), dz.abs().sum(0))


def _check(result: torch.Tensor, ref: torch.Tensor, torch_low: torch.Tensor | None, magnitude, name: str) -> None:
    if torch_low is None:
        torch.testing.assert_close(result.float(), ref, **TOLERANCES[torch.float32], msg=lambda m: f"{name}: {m}")
        return
    error = (result.float() - ref).abs().max().item()
    bound = _low_precision_bound(ref, torch_low, magnitude)
    assert error <= bound, f"{name}: max error {error:.3g} against fp32 exceeds {bound:.3g} (2x torch's own)"


def _grad_tolerance(before: torch.Tensor, ref: torch.Tensor, torch_low: torch.Tensor | None, magnitude) -> dict:
    """Tolerance on an accumulated gradient ``before + step``; in low precision the yardstick is torch adding its
    own low-precision step to the same existing gradient."""
    if torch_low is None:
        return TOLERANCES[torch.float32]
    block = before[tuple(slice(0, s) for s in ref.shape)]
    bound = _low_precision_bound(block.float() + ref, block.to(torch_low.dtype) + torch_low, block.abs() + magnitude)
    return dict(atol=bound, rtol=0)


def _reference_grads(x, weight_block, bias_block, activation, dy):
    """(y, dx, dW, db) of the reference on the given leaves."""
    y = reference.linear(x, weight_block, bias_block, weight_block.shape[0], activation)
    y.backward(dy)
    return y.detach(), x.grad, weight_block.grad, bias_block.grad


@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("dtype, weight_dtype", [(d, d) for d in kernel_dtypes()] + [(torch.float16, torch.float32)],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_forward_backward_match_reference(shape, dtype, weight_dtype, activation, device, triton_backend):
    batch, tokens, in_max, in_features, out_max, out_features = shape
    weight = super_param(out_max, in_max, active=(out_features, in_features), device=device, dtype=weight_dtype)
    bias = super_param(out_max, active=(out_features,), device=device, dtype=weight_dtype)
    weight_before, bias_before = seed_grad(weight), seed_grad(bias)
    x = torch.randn(batch, tokens, in_features, device=device).to(dtype).requires_grad_(True)

    y = elastic_ops.elastic_linear(x, weight, bias, out_features, activation)
    assert y.shape == (batch, tokens, out_features) and y.dtype == dtype
    dy = torch.randn_like(y) / (batch * tokens) ** 0.5  # a mean-reduced loss: dW and db of order one
    y.backward(dy)

    ref_weight, ref_bias = reference_copy(weight, (out_features, in_features)), reference_copy(bias, (out_features,))
    ref = _reference_grads(x.detach().float().requires_grad_(True), ref_weight, ref_bias, activation, dy.float())
    low = magnitude = (None,) * 4
    if dtype != torch.float32:  # torch's own error in this dtype, on the same values, is the yardstick
        low = _reference_grads(*(t.detach().to(dtype).requires_grad_(True) for t in (x, ref_weight, ref_bias)),
                               activation, dy)
        magnitude = _magnitudes(x.detach().float().reshape(-1, in_features), ref_weight.detach(), ref_bias.detach(),
                                activation, dy.float().reshape(-1, out_features))
    for name, result, i in (("y", y.detach(), 0), ("dx", x.grad, 1)):
        _check(result, ref[i], low[i], None if magnitude[i] is None else magnitude[i].view(ref[i].shape), name)
    # Gradients outside the slice stay bit-for-bit; inside they are the seeded ones plus this step's.
    for param, before, i in ((weight, weight_before, 2), (bias, bias_before, 3)):
        assert_grad_accumulated(param, before, ref[i], **_grad_tolerance(before, ref[i], low[i], magnitude[i]))


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_repeated_backward_accumulates(activation, device, triton_backend):
    weight = super_param(40, 50, active=(37, 29), device=device)
    x = torch.randn(3, 41, 29, device=device, requires_grad=True)
    grads = []
    for _ in range(2):
        y = elastic_ops.elastic_linear(x, weight, None, 37, activation)
        y.backward(torch.full_like(y, 1 / 123))  # the gradient of y.mean()
        grads.append(weight.grad.clone())
    ref_weight = reference_copy(weight, (37, 29))
    reference.linear(x.detach(), ref_weight, None, 37, activation).sum().div(123).backward()
    torch.testing.assert_close(grads[0][:37, :29], ref_weight.grad, **TOLERANCES[torch.float32])
    torch.testing.assert_close(grads[1][:37, :29], 2 * ref_weight.grad, **TOLERANCES[torch.float32])
    assert torch.all(grads[1][37:] == 0) and torch.all(grads[1][:, 29:] == 0), "gradient appeared outside the slice"


@pytest.mark.parametrize("layout", ["sliced_columns", "transposed_tokens"])
def test_non_contiguous_x(layout, device, triton_backend):
    weight = super_param(64, 96, active=(53, 43), device=device)
    bias = super_param(64, active=(53,), device=device)
    if layout == "sliced_columns":  # x[..., :43] of a wider activation: a strided view, no copy needed
        x = torch.randn(2, 197, 96, device=device)[..., :43]
    else:  # [tokens, batch, in] transposed to [batch, tokens, in]: rows cannot be flattened without a copy
        x = torch.randn(197, 2, 43, device=device).transpose(0, 1)
    assert not x.is_contiguous()
    x.requires_grad_(True)
    y = elastic_ops.elastic_linear(x, weight, bias, 53)
    dy = torch.randn_like(y) / (2 * 197) ** 0.5
    y.backward(dy)
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref, b_ref = reference_copy(weight, (53, 43)), reference_copy(bias, (53,))
    y_ref = reference.linear(x_ref, w_ref, b_ref, 53)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref, **TOLERANCES[torch.float32])
    torch.testing.assert_close(x.grad, x_ref.grad, **TOLERANCES[torch.float32])
    torch.testing.assert_close(weight.grad[:53, :43], w_ref.grad, **TOLERANCES[torch.float32])


def test_strided_bias_read_through_its_stride(device, triton_backend):
    """A bias that is a strided view (``b[::2]``) gives the reference's output, and its gradient lands in place in
    the viewed parameter's gradient, every other element untouched."""
    storage = torch.randn(2 * 70, device=device, requires_grad=True)
    bias = storage[::2]
    weight = torch.randn(70, 40, device=device) * 40 ** -0.5
    x = torch.randn(3, 17, 32, device=device)  # rows 16-byte aligned: the fused GEMM's path
    y = elastic_ops.elastic_linear(x, weight, bias, 48, "gelu")
    bias_ref = bias.detach()[:48].clone().requires_grad_(True)
    y_ref = reference.linear(x, weight, bias_ref, 48, "gelu")
    torch.testing.assert_close(y, y_ref, **TOLERANCES[torch.float32])
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(storage.grad[::2][:48], bias_ref.grad, **TOLERANCES[torch.float32])
    assert torch.all(storage.grad[1::2] == 0) and torch.all(storage.grad[::2][48:] == 0)
    with torch.no_grad():
        torch.testing.assert_close(elastic_ops.elastic_linear(x, weight, bias, 48, "gelu"), y_ref.detach(),
                                   **TOLERANCES[torch.float32])


def test_transposed_super_weight_read_through_strides(device, triton_backend):
    """A super weight stored column-major (strides (1, out_max)) is read in place, not made contiguous."""
    storage = torch.randn(70, 60, device=device, dtype=torch.float64).float()  # [in_max, out_max]
    weight = storage.t()  # [out_max, in_max] with strides (1, 60)
    x = torch.randn(4, 33, 31, device=device)
    y = elastic_ops.elastic_linear(x, weight, None, 47, "gelu")
    torch.testing.assert_close(y, reference.linear(x, weight, None, 47, "gelu"), **TOLERANCES[torch.float32])


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_gradcheck_float64(activation, device, triton_backend):
    weight = torch.randn(21, 19, device=device, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(21, device=device, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 5, 17, device=device, dtype=torch.float64, requires_grad=True)
    with weight_grads_in_place(False):
        assert torch.autograd.gradcheck(lambda x, w, b: elastic_ops.elastic_linear(x, w, b, 13, activation),
                                        (x, weight, bias), fast_mode=True)


def test_gradients_returned_when_backward_runs_on_another_thread(device, triton_backend):
    """Autograd runs a CUDA backward on a thread of its own, where the caller's context is not visible: turning
    in-place gradients off around the forward must still make autograd return the weight gradient."""
    weight = super_param(23, 19, active=(13, 17), device=device)
    x = torch.randn(2, 5, 17, device=device)
    with weight_grads_in_place(False):
        y = elastic_ops.elastic_linear(x, weight, None, 13)
    d_y = torch.randn_like(y)
    grads = []
    backward = threading.Thread(target=lambda: grads.extend(torch.autograd.grad(y, weight, d_y)))
    backward.start()
    backward.join()
    expected = torch.zeros_like(weight)
    expected[:13, :17] = d_y.reshape(-1, 13).T @ x.reshape(-1, 17)
    assert weight.grad is None, "the gradient went into weight.grad instead of being returned"
    torch.testing.assert_close(grads[0], expected, **TOLERANCES[torch.float32])


def test_bad_input_raises_clear_error(device, triton_backend):
    weight = torch.randn(8, 6, device=device)
    bias = torch.randn(8, device=device)
    x = torch.randn(3, 6, device=device)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        elastic_ops.elastic_linear(torch.ones(3, 6, dtype=torch.int64, device=device), weight, bias, 8)
    with pytest.raises(ValueError, match=r"in_features \(x.shape\[-1\]\)=7 is outside 1..6"):
        elastic_ops.elastic_linear(torch.randn(3, 7, device=device), weight, bias, 8)
    with pytest.raises(ValueError, match="out_features=9 is outside 1..8"):
        elastic_ops.elastic_linear(x, weight, bias, 9)
    with pytest.raises(ValueError, match="bias has 5 entries but its weight has 8 rows"):
        elastic_ops.elastic_linear(x, weight, torch.randn(5, device=device), 8)
    with pytest.raises(ValueError, match="weight must have 2 dimensions"):
        elastic_ops.elastic_linear(x, weight[0], bias, 8)
    with pytest.raises(ValueError, match="weight is on meta but x is on"):
        elastic_ops.elastic_linear(x, weight.to("meta"), None, 8)
    with pytest.raises(ValueError, match="activation must be None or 'gelu'"):
        elastic_ops.elastic_linear(x, weight, bias, 8, activation="relu")

"""Triton elastic LayerNorm against the PyTorch reference: output, dx, dgamma, dbeta, slicing, accumulation, errors."""
from __future__ import annotations

import pytest
import torch
from kernel_checks import TOLERANCES, assert_grad_accumulated, kernel_dtypes, reference_copy, seed_grad, super_param

import elastic_ops
from elastic_ops import reference, weight_grads_in_place

# (batch, tokens, D, d): 197 tokens, prime widths, active 1, active = max, batch 1.
SHAPES = {
    "prime": (2, 197, 67, 61),
    "active_max": (1, 197, 48, 48),
    "active_one": (3, 17, 19, 1),
}


def _low_precision_bound(ref: torch.Tensor, torch_low: torch.Tensor) -> float:
    """Twice torch's own error in the low-precision dtype, never below one rounding of the largest value."""
    eps = torch.finfo(torch_low.dtype).eps
    return max(2 * (torch_low.float() - ref).abs().max().item(), eps * ref.abs().max().item())


def _cancellation_floor(x, weight, dy, d: int) -> float:
    """One fp32 rounding of the terms of dx = rstd * (w*dy - mean(w*dy) - x_hat * mean(w*dy*x_hat)) that cancel.
    At d = 1 they cancel exactly; a compiler that fuses the product w*dy into the subtraction (an FMA, as on a GPU)
    leaves one rounding of it, scaled by rstd = 1/sqrt(eps)."""
    rstd = (x.detach().float().var(-1, unbiased=False) + 1e-5).rsqrt().max()
    w_dy = dy.float() * weight.detach()[:d].float()
    return (torch.finfo(torch.float32).eps * rstd * w_dy.abs().max()).item()


def _reference(x, weight, bias, dy):
    """(y, dx, dgamma, dbeta) of the reference on the given leaves."""
    y = reference.layer_norm(x, weight, bias)
    y.backward(dy)
    return y.detach(), x.grad, weight.grad, bias.grad


def _float64_leaf(param: torch.Tensor, d: int) -> torch.Tensor:
    return param.detach()[:d].double().requires_grad_(True)


def _fresh_x(batch, tokens, d, device, dtype):
    """Off-centre, scaled rows, so that the mean and variance both matter."""
    return (torch.randn(batch, tokens, d, device=device) * 2 + 0.5).to(dtype).requires_grad_(True)


@pytest.mark.parametrize("dtype, param_dtype", [(d, d) for d in kernel_dtypes()] + [(torch.float16, torch.float32)],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_forward_backward_match_reference(shape, dtype, param_dtype, device, triton_backend):
    batch, tokens, d_max, d = shape
    weight = super_param(d_max, active=(d,), device=device, dtype=param_dtype)
    bias = super_param(d_max, active=(d,), device=device, dtype=param_dtype)
    weight_before, bias_before = seed_grad(weight), seed_grad(bias)
    x = _fresh_x(batch, tokens, d, device, dtype)

    y = elastic_ops.elastic_layer_norm(x, weight, bias)
    assert y.shape == x.shape and y.dtype == dtype
    dy = torch.randn_like(y) / (batch * tokens) ** 0.5  # a mean-reduced loss: dgamma and dbeta of order one
    y.backward(dy)

    # An fp64 reference: at d = 1, x - mean is exactly zero, which fp32 torch gets only to rounding x 1/sqrt(eps).
    ref = _reference(x.detach().double().requires_grad_(True), _float64_leaf(weight, d), _float64_leaf(bias, d),
                     dy.double())
    ref = tuple(t.float() for t in ref)
    if dtype == torch.float32:
        torch.testing.assert_close(y.detach(), ref[0], **TOLERANCES[dtype])
        torch.testing.assert_close(x.grad, ref[1], **TOLERANCES[dtype])
        assert_grad_accumulated(weight, weight_before, ref[2], **TOLERANCES[dtype])
        assert_grad_accumulated(bias, bias_before, ref[3], **TOLERANCES[dtype])
        return
    # Low precision: torch's own error in this dtype on the same values is the yardstick.
    low = _reference(x.detach().clone().requires_grad_(True),
                     reference_copy(weight, (d,)).detach().to(dtype).requires_grad_(True),
                     reference_copy(bias, (d,)).detach().to(dtype).requires_grad_(True), dy)
    floors = {"y": 0.0, "dx": _cancellation_floor(x, weight, dy, d)}
    for name, result, i in (("y", y.detach(), 0), ("dx", x.grad, 1)):
        error = (result.float() - ref[i]).abs().max().item()
        bound = max(_low_precision_bound(ref[i], low[i]), floors[name])
        assert error <= bound, f"{name}: max error {error:.3g} against fp32 exceeds {bound:.3g} (2x torch's own)"
    for param, before, i in ((weight, weight_before, 2), (bias, bias_before, 3)):
        block = before[:d]
        bound = _low_precision_bound(block.float() + ref[i], block.to(dtype) + low[i])
        assert_grad_accumulated(param, before, ref[i], atol=bound, rtol=0)


def test_strided_affine_parameters_read_through_their_stride(device, triton_backend):
    """gamma and beta that are strided views (``p[::2]``) give the reference's output and input gradient."""
    weight, bias = torch.randn(2 * 40, device=device)[::2] + 1, torch.randn(2 * 40, device=device)[::2]
    x = _fresh_x(2, 33, 29, device, torch.float32)
    y = elastic_ops.elastic_layer_norm(x, weight, bias)
    dy = torch.randn_like(y)
    y.backward(dy)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = reference.layer_norm(x_ref, weight[:29].contiguous(), bias[:29].contiguous())
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref, **TOLERANCES[torch.float32])
    torch.testing.assert_close(x.grad, x_ref.grad, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("affine", ["weight_only", "bias_only", "none"])
def test_missing_affine_parameters(affine, device, triton_backend):
    weight = super_param(40, active=(29,), device=device) if affine == "weight_only" else None
    bias = super_param(40, active=(29,), device=device) if affine == "bias_only" else None
    x = _fresh_x(2, 33, 29, device, torch.float32)
    y = elastic_ops.elastic_layer_norm(x, weight, bias)
    dy = torch.randn_like(y) / 66 ** 0.5
    y.backward(dy)
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = reference_copy(weight, (29,)) if weight is not None else None
    b_ref = reference_copy(bias, (29,)) if bias is not None else None
    reference.layer_norm(x_ref, w_ref, b_ref).backward(dy)
    torch.testing.assert_close(y, reference.layer_norm(x_ref.detach(), w_ref, b_ref), **TOLERANCES[torch.float32])
    torch.testing.assert_close(x.grad, x_ref.grad, **TOLERANCES[torch.float32])
    for param, param_ref in ((weight, w_ref), (bias, b_ref)):
        if param is not None:
            torch.testing.assert_close(param.grad[:29], param_ref.grad, **TOLERANCES[torch.float32])
            assert torch.all(param.grad[29:] == 0), "gradient appeared outside the slice"


def test_repeated_backward_accumulates(device, triton_backend):
    weight = super_param(50, active=(37,), device=device)
    bias = super_param(50, active=(37,), device=device)
    x = _fresh_x(3, 41, 37, device, torch.float32)
    dy = torch.randn(3, 41, 37, device=device) / 123 ** 0.5
    for _ in range(2):
        elastic_ops.elastic_layer_norm(x, weight, bias).backward(dy)
    w_ref, b_ref = reference_copy(weight, (37,)), reference_copy(bias, (37,))
    reference.layer_norm(x.detach(), w_ref, b_ref).backward(dy)
    torch.testing.assert_close(weight.grad[:37], 2 * w_ref.grad, **TOLERANCES[torch.float32])
    torch.testing.assert_close(bias.grad[:37], 2 * b_ref.grad, **TOLERANCES[torch.float32])
    assert torch.all(weight.grad[37:] == 0) and torch.all(bias.grad[37:] == 0)


@pytest.mark.parametrize("layout", ["sliced_channels", "transposed_tokens"])
def test_non_contiguous_x(layout, device, triton_backend):
    weight = super_param(96, active=(43,), device=device)
    bias = super_param(96, active=(43,), device=device)
    if layout == "sliced_channels":  # the first 43 channels of a wider activation, read in place
        x = (torch.randn(2, 197, 96, device=device) * 2 + 0.5)[..., :43]
    else:
        x = (torch.randn(197, 2, 43, device=device) * 2 + 0.5).transpose(0, 1)
    assert not x.is_contiguous()
    x.requires_grad_(True)
    y = elastic_ops.elastic_layer_norm(x, weight, bias)
    dy = torch.randn_like(y) / (2 * 197) ** 0.5
    y.backward(dy)
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref, b_ref = reference_copy(weight, (43,)), reference_copy(bias, (43,))
    y_ref = reference.layer_norm(x_ref, w_ref, b_ref)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref, **TOLERANCES[torch.float32])
    torch.testing.assert_close(x.grad, x_ref.grad, **TOLERANCES[torch.float32])
    torch.testing.assert_close(weight.grad[:43], w_ref.grad, **TOLERANCES[torch.float32])
    torch.testing.assert_close(bias.grad[:43], b_ref.grad, **TOLERANCES[torch.float32])


def test_gradcheck_float64(device, triton_backend):
    weight = torch.randn(23, device=device, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(23, device=device, dtype=torch.float64, requires_grad=True)
    x = (torch.randn(2, 5, 17, device=device, dtype=torch.float64) * 2 + 0.5).requires_grad_(True)
    with weight_grads_in_place(False):
        assert torch.autograd.gradcheck(lambda x, w, b: elastic_ops.elastic_layer_norm(x, w, b, 1e-5),
                                        (x, weight, bias), fast_mode=True)


def test_bad_input_raises_clear_error(device, triton_backend):
    weight = torch.randn(8, device=device)
    bias = torch.randn(8, device=device)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        elastic_ops.elastic_layer_norm(torch.ones(3, 6, dtype=torch.int32, device=device), weight, bias)
    with pytest.raises(ValueError, match=r"x.shape\[-1\] against weight=9 is outside 1..8"):
        elastic_ops.elastic_layer_norm(torch.randn(3, 9, device=device), weight, bias)
    with pytest.raises(ValueError, match="bias must have 1 dimensions"):
        elastic_ops.elastic_layer_norm(torch.randn(3, 6, device=device), weight, bias[None])
    with pytest.raises(ValueError, match="weight is on meta but x is on"):
        elastic_ops.elastic_layer_norm(torch.randn(3, 6, device=device), weight.to("meta"), None)
    for eps in (-1.0, float("nan"), float("inf"), 0.0):  # every backend, the forced reference too
        with pytest.raises(ValueError, match=r"eps must be a finite number > 0"):
            elastic_ops.elastic_layer_norm(torch.randn(3, 6, device=device), weight, bias, eps=eps)

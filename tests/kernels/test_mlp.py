"""Triton elastic MLP (elastic_ops/ops/mlp.py) against the PyTorch reference, forward and backward."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from kernel_checks import TOLERANCES, assert_grad_accumulated, kernel_dtypes, reference_copy, seed_grad, super_param

import elastic_ops
from elastic_ops import reference, weight_grads_in_place


@dataclass(frozen=True)
class Case:
    batch: int
    tokens: int
    super_embed: int
    super_hidden: int
    embed: int
    hidden: int
    bias: bool = True


CASES = {
    # 3 x 197 tokens: a long token reduction, split across programs when the gradients are fp32.
    "prime_widths": Case(3, 197, 48, 160, 37, 101),
    "full_width": Case(1, 19, 32, 64, 32, 64),
    "hidden_1_no_bias": Case(2, 5, 40, 96, 17, 1, bias=False),
}


def _dtype_pairs():
    """(activation dtype, parameter dtype): plain, and fp32 master weights under fp16 activations."""
    pairs = [(dtype, dtype) for dtype in kernel_dtypes()] + [(torch.float16, torch.float32)]
    return pytest.mark.parametrize("x_dtype,param_dtype", pairs, ids=lambda d: str(d).removeprefix("torch."))


class MLPParams:
    """Super weights with NaN outside the active block, each with a random existing gradient."""

    def __init__(self, case: Case, device, dtype):
        e, h = case.embed, case.hidden
        self.case = case
        self.fc1_weight = super_param(case.super_hidden, case.super_embed, active=(h, e), device=device, dtype=dtype)
        self.fc2_weight = super_param(case.super_embed, case.super_hidden, active=(e, h), device=device, dtype=dtype)
        self.fc1_bias = super_param(case.super_hidden, active=(h,), device=device, dtype=dtype) if case.bias else None
        self.fc2_bias = super_param(case.super_embed, active=(e,), device=device, dtype=dtype) if case.bias else None
        self.active = {"fc1_weight": (h, e), "fc1_bias": (h,), "fc2_weight": (e, h), "fc2_bias": (e,)}
        self.grads_before = {name: seed_grad(param) for name, param in self.named()}

    def named(self):
        return [(name, getattr(self, name)) for name in self.active if getattr(self, name) is not None]

    def args(self):
        return self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias

    def reference_leaves(self, dtype=torch.float32):
        """Leaves holding the active blocks, for reference gradients with autograd."""
        leaves = {name: reference_copy(param, self.active[name]) for name, param in self.named()}
        return {name: leaf.detach().to(dtype).requires_grad_(True) for name, leaf in leaves.items()}


def _reference(x: torch.Tensor, leaves: dict, hidden: int) -> torch.Tensor:
    return reference.mlp(x, leaves["fc1_weight"], leaves.get("fc1_bias"), leaves["fc2_weight"], leaves.get("fc2_bias"),
                         hidden)


def _run(x, params: MLPParams, dy=None):
    y = elastic_ops.elastic_mlp(x, *params.args(), params.case.hidden)
    if dy is not None:
        y.backward(dy)
    return y


def _reference_run(x, params: MLPParams, dy, dtype) -> dict[str, torch.Tensor]:
    """The reference's output and gradients (as fp32) with activations in ``dtype``."""
    leaves = params.reference_leaves(torch.float64 if dtype == torch.float64 else torch.float32)
    x_ref = x.detach().to(dtype).requires_grad_(True)
    y_ref = _reference(x_ref, leaves, params.case.hidden)
    y_ref.backward(dy.to(dtype))
    grads = {name: leaf.grad.float() for name, leaf in leaves.items()}
    return dict(grads, y=y_ref.detach().float(), x=x_ref.grad.float())


def _expected(x, params: MLPParams, dy) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(fp64 reference results, a tolerance per output). Torch's own error in x's dtype on each output is that
    output's yardstick (reductions over hundreds of tokens round differently with another summation order, in fp32
    too): the weight gradients, sums over every token, err far more than y and dx, and must not loosen their bound."""
    oracle = _reference_run(x, params, dy, torch.float64)
    same_dtype = _reference_run(x, params, dy, x.dtype)
    tols = {}
    for name in oracle:
        torch_error = (same_dtype[name] - oracle[name]).abs().max().item()
        tols[name] = dict(TOLERANCES[x.dtype], atol=max(TOLERANCES[x.dtype]["atol"], 2 * torch_error))
    return oracle, tols


def _assert_param_grads(params: MLPParams, oracle: dict, tols: dict, names=None) -> None:
    for name, param in params.named():
        if names is None or name in names:
            assert_grad_accumulated(param, params.grads_before[name], oracle[name], **tols[name])


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@_dtype_pairs()
def test_forward_and_gradients_match_reference(triton_backend, device, case, x_dtype, param_dtype):
    params = MLPParams(case, device, param_dtype)
    x = torch.randn(case.batch, case.tokens, case.embed, device=device, dtype=x_dtype, requires_grad=True)
    dy = torch.randn(case.batch, case.tokens, case.embed, device=device, dtype=x_dtype)
    y = _run(x, params, dy)

    oracle, tols = _expected(x, params, dy)
    assert y.dtype == x_dtype and y.shape == x.shape
    torch.testing.assert_close(y.float(), oracle["y"], **tols["y"])
    torch.testing.assert_close(x.grad.float(), oracle["x"], **tols["x"])
    _assert_param_grads(params, oracle, tols)


@pytest.mark.parametrize("layout", ["sliced_last_dim", "transposed"])
def test_non_contiguous_input(triton_backend, device, layout):
    case = CASES["prime_widths"]
    params = MLPParams(case, device, torch.float32)
    if layout == "sliced_last_dim":  # evenly strided rows: the kernels read the view in place
        base = torch.randn(1, case.tokens, case.embed + 5, device=device, requires_grad=True)
        x = base[..., :case.embed]
    else:  # token-major storage: flattening [batch, tokens] needs a copy
        base = torch.randn(case.tokens, 2, case.embed, device=device, requires_grad=True)
        x = base.transpose(0, 1)
    assert not x.is_contiguous()
    dy = torch.randn(x.shape, device=device)
    y = _run(x, params, dy)

    oracle, tols = _expected(x, params, dy)
    expected_base_grad = torch.zeros_like(base)
    if layout == "sliced_last_dim":
        expected_base_grad[..., :case.embed] = oracle["x"]
    else:
        expected_base_grad.copy_(oracle["x"].transpose(0, 1))
    torch.testing.assert_close(y, oracle["y"], **tols["y"])
    torch.testing.assert_close(base.grad, expected_base_grad, **tols["x"])
    _assert_param_grads(params, oracle, tols)


def test_repeated_backward_accumulates(triton_backend, device):
    case = Case(2, 5, 40, 96, 17, 13)
    params = MLPParams(case, device, torch.float32)
    steps = []
    for _ in range(2):
        x = torch.randn(case.batch, case.tokens, case.embed, device=device)
        dy = torch.randn_like(x)
        _run(x, params, dy)
        steps.append(_expected(x, params, dy))
    (first, first_tols), (second, second_tols) = steps
    tols = {name: dict(tol, atol=tol["atol"] + second_tols[name]["atol"]) for name, tol in first_tols.items()}
    _assert_param_grads(params, {name: first[name] + second[name] for name in first}, tols)


def test_partial_gradients(triton_backend, device):
    """Frozen weights with trainable biases, and an input that needs no gradient."""
    case = CASES["prime_widths"]
    case = Case(1, case.tokens, case.super_embed, case.super_hidden, case.embed, case.hidden)
    params = MLPParams(case, device, torch.float32)
    for weight in (params.fc1_weight, params.fc2_weight):
        weight.requires_grad_(False)
        weight.grad = None
    x = torch.randn(case.batch, case.tokens, case.embed, device=device)
    dy = torch.randn_like(x)
    _run(x, params, dy)

    oracle, tols = _expected(x, params, dy)
    _assert_param_grads(params, oracle, tols, names=("fc1_bias", "fc2_bias"))
    assert params.fc1_weight.grad is None and params.fc2_weight.grad is None


def test_keeps_only_the_pre_activation(triton_backend, device):
    """The forward saves x and one [tokens, hidden] tensor; the reference keeps two hidden-sized tensors."""
    case = CASES["prime_widths"]
    params = MLPParams(case, device, torch.float32)
    x = torch.randn(1, case.tokens, case.embed, device=device, requires_grad=True)
    param_storage = {p.untyped_storage().data_ptr() for _, p in params.named()}

    def saved_activation_elements(fn) -> int:
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            fn()
        return sum(t.numel() for t in saved if t.untyped_storage().data_ptr() not in param_storage)

    ours = saved_activation_elements(lambda: _run(x, params))
    ref = saved_activation_elements(lambda: reference.mlp(x, *params.args(), case.hidden))
    assert ours == case.tokens * (case.embed + case.hidden)
    assert ref >= case.tokens * (case.embed + 2 * case.hidden)


def test_gradcheck_float64(triton_backend, device):
    case = Case(2, 5, 12, 20, 7, 11)
    torch.manual_seed(0)
    x = torch.randn(case.batch, case.tokens, case.embed, device=device, dtype=torch.float64, requires_grad=True)
    # Finite everywhere: gradcheck perturbs every element, also those outside the active block.
    fc1_weight = torch.randn(case.super_hidden, case.super_embed, device=device, dtype=torch.float64,
                             requires_grad=True)
    fc1_bias = torch.randn(case.super_hidden, device=device, dtype=torch.float64, requires_grad=True)
    fc2_weight = torch.randn(case.super_embed, case.super_hidden, device=device, dtype=torch.float64,
                             requires_grad=True)
    fc2_bias = torch.randn(case.super_embed, device=device, dtype=torch.float64, requires_grad=True)
    with weight_grads_in_place(False):
        assert torch.autograd.gradcheck(
            lambda *args: elastic_ops.elastic_mlp(*args, case.hidden),
            (x, fc1_weight, fc1_bias, fc2_weight, fc2_bias), fast_mode=True)


@pytest.mark.parametrize("change,error,message", [
    (dict(hidden=161), ValueError, "hidden_features=161 is outside 1..160"),
    (dict(hidden=0), ValueError, "hidden_features=0 is outside"),
    (dict(hidden=2.5), TypeError, "hidden_features must be an int"),
    (dict(embed=49), ValueError, r"embed dim \(x.shape\[-1\]\)=49 is outside 1..48"),
    (dict(fc1_bias_len=159), ValueError, "fc1_bias has 159 entries but its weight has 160 rows"),
    (dict(x_dtype=torch.int32), TypeError, "x must be a floating-point tensor"),
    (dict(fc2_weight_1d=True), ValueError, "fc2_weight must have 2 dimensions"),
])
def test_bad_inputs_raise_clear_errors(triton_backend, device, change, error, message):
    e = change.get("embed", 37)
    x = torch.randn(2, 3, e, device=device).to(change.get("x_dtype", torch.float32))
    fc1_weight = torch.randn(160, 48, device=device)
    fc1_bias = torch.randn(change.get("fc1_bias_len", 160), device=device)
    fc2_shape = (48 * 160,) if change.get("fc2_weight_1d") else (48, 160)
    fc2_weight = torch.randn(*fc2_shape, device=device)
    with pytest.raises(error, match=message):
        elastic_ops.elastic_mlp(x, fc1_weight, fc1_bias, fc2_weight, None, change.get("hidden", 101))

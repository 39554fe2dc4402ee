"""Triton elastic attention against the PyTorch reference: output and every gradient, awkward shapes,
NaN canaries around (and between) the three active qkv row blocks, in-place gradient accumulation."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from kernel_checks import (
    TOLERANCES,
    AttentionCase,
    assert_grad_accumulated,
    kernel_dtypes,
    reference_copy,
    seed_grad,
    super_param,
)

import elastic_ops
from elastic_ops import reference, weight_grads_in_place

pytestmark = pytest.mark.usefixtures("triton_backend")


MAIN = AttentionCase(batch=2, tokens=64, embed=40, max_embed=48, heads=2, max_heads=3, head_dim=64)
AWKWARD = {
    "197-tokens-prime-embed": AttentionCase(batch=1, tokens=197, embed=37, max_embed=41, heads=2, max_heads=3,
                                            head_dim=64),
    "one-head-prime-tokens": AttentionCase(batch=2, tokens=97, embed=24, max_embed=32, heads=1, max_heads=3,
                                           head_dim=16),
    "max-heads-max-embed": AttentionCase(batch=3, tokens=20, embed=32, max_embed=32, heads=2, max_heads=2, head_dim=32),
}


def make_params(case: AttentionCase, device, dtype, with_bias: bool = True) -> dict[str, torch.nn.Parameter | None]:
    """Super weights in the block layout, random in the active parts and NaN everywhere else, including the
    inactive rows between the q, k and v blocks."""
    qkv_weight = super_param(3, case.max_width, case.max_embed, active=(3, case.width, case.embed),
                             device=device, dtype=dtype)
    qkv_bias = super_param(3, case.max_width, active=(3, case.width), device=device, dtype=dtype)
    return dict(
        qkv_weight=torch.nn.Parameter(qkv_weight.detach().view(3 * case.max_width, case.max_embed)),
        qkv_bias=torch.nn.Parameter(qkv_bias.detach().view(-1)) if with_bias else None,
        proj_weight=super_param(case.max_embed, case.max_width, active=(case.embed, case.width), device=device,
                                dtype=dtype),
        proj_bias=super_param(case.max_embed, active=(case.embed,), device=device, dtype=dtype) if with_bias else None,
    )


def as_blocks(t: torch.Tensor, case: AttentionCase) -> torch.Tensor:
    """The qkv weight or bias (or its gradient) as ``[3, H_max*Dh, ...]``: the active part becomes a leading block."""
    return t.view(3, case.max_width, *t.shape[1:])


def check_against_reference(case: AttentionCase, x: torch.Tensor, params: dict, tol: dict,
                            backward_passes: int = 1) -> None:
    """Run the Triton op (forward, then ``backward_passes`` backward passes) and compare the output, dx and the
    in-place weight gradients with the fp32 reference; gradients outside the active parts must not change."""
    before = {name: seed_grad(p) for name, p in params.items() if p is not None}
    out = elastic_ops.elastic_attention(x, *params.values(), case.heads, case.head_dim)
    assert out.shape == (case.batch, case.tokens, case.embed) and out.dtype == x.dtype
    d_out = torch.randn_like(out)
    for _ in range(backward_passes):
        out.backward(d_out, retain_graph=backward_passes > 1)

    x_ref = x.detach().float().requires_grad_(x.requires_grad)
    refs = dict(
        qkv_weight=reference_copy(as_blocks(params["qkv_weight"], case), (3, case.width, case.embed)),
        qkv_bias=None if params["qkv_bias"] is None else reference_copy(as_blocks(params["qkv_bias"], case),
                                                                        (3, case.width)),
        proj_weight=reference_copy(params["proj_weight"], (case.embed, case.width)),
        proj_bias=None if params["proj_bias"] is None else reference_copy(params["proj_bias"], (case.embed,)),
    )
    expected = reference.attention(
        x_ref, refs["qkv_weight"].view(-1, case.embed), None if refs["qkv_bias"] is None else refs["qkv_bias"].view(-1),
        refs["proj_weight"], refs["proj_bias"], case.heads, case.head_dim)
    expected.backward(d_out.float() * backward_passes)

    torch.testing.assert_close(out.float(), expected, **tol)
    if x.requires_grad:
        torch.testing.assert_close(x.grad.float(), x_ref.grad, **tol)
    for name, param in params.items():
        if param is None:
            continue
        if name.startswith("qkv"):
            assert_grad_accumulated(SimpleNamespace(grad=as_blocks(param.grad, case)), as_blocks(before[name], case),
                                    refs[name].grad, **tol)
        else:
            assert_grad_accumulated(param, before[name], refs[name].grad, **tol)


@pytest.mark.parametrize("dtype", kernel_dtypes())
def test_matches_reference(dtype, device):
    """fp32 master weights; low-precision activations are compared with the fp32 reference."""
    x = torch.randn(MAIN.batch, MAIN.tokens, MAIN.embed, device=device, dtype=dtype, requires_grad=True)
    check_against_reference(MAIN, x, make_params(MAIN, device, torch.float32), TOLERANCES[dtype])


@pytest.mark.parametrize("case", AWKWARD.values(), ids=AWKWARD.keys())
def test_awkward_shapes(case, device):
    x = torch.randn(case.batch, case.tokens, case.embed, device=device, requires_grad=True)
    check_against_reference(case, x, make_params(case, device, torch.float32), TOLERANCES[torch.float32])


def test_weights_in_activation_dtype(device):
    """fp16 weights and fp16 activations: gradients are added in fp16 (no atomics) and still match."""
    case = AWKWARD["one-head-prime-tokens"]
    x = torch.randn(case.batch, case.tokens, case.embed, device=device, dtype=torch.float16, requires_grad=True)
    check_against_reference(case, x, make_params(case, device, torch.float16), TOLERANCES[torch.float16])


@pytest.mark.parametrize("layout", ["embed-slice", "transposed"])
def test_non_contiguous_x(layout, device):
    case = MAIN
    if layout == "embed-slice":  # the active embedding of a wider activation, as in the batched mode
        x = torch.randn(case.batch, case.tokens, case.max_embed, device=device)[..., :case.embed]
    else:
        x = torch.randn(case.tokens, case.batch, case.embed, device=device).transpose(0, 1)
    assert not x.is_contiguous()
    x.requires_grad_(True)
    check_against_reference(case, x, make_params(case, device, torch.float32), TOLERANCES[torch.float32])


def test_repeated_backward_accumulates(device):
    case = AWKWARD["max-heads-max-embed"]
    x = torch.randn(case.batch, case.tokens, case.embed, device=device, requires_grad=True)
    check_against_reference(case, x, make_params(case, device, torch.float32), TOLERANCES[torch.float32],
                            backward_passes=2)


@pytest.mark.parametrize("backend", elastic_ops.BACKENDS)
def test_a_batch_of_none_is_an_empty_output_on_every_backend(backend, device):
    """As elastic_linear and the other ops: shape [0, N, e] (the native and automatic choices raised an internal
    error); with gradients, every weight's stays as it was."""
    case = AWKWARD["one-head-prime-tokens"]
    params = make_params(case, device, torch.float32)
    x = torch.randn(0, case.tokens, case.embed, device=device)
    try:
        with elastic_ops.use_backend(backend), torch.no_grad():
            out = elastic_ops.elastic_attention(x, *params.values(), case.heads, case.head_dim)
    except RuntimeError as unavailable:  # a backend this machine cannot run (triton without a GPU or interpreter)
        pytest.skip(str(unavailable))
    assert out.shape == (0, case.tokens, case.embed)
    before = {name: seed_grad(p) for name, p in params.items() if p is not None}
    elastic_ops.elastic_attention(x.requires_grad_(), *params.values(), case.heads, case.head_dim).sum().backward()
    assert x.grad.shape == x.shape
    assert all(torch.equal(params[name].grad, grad) for name, grad in before.items())  # randn: no NaN


def test_no_bias_and_input_without_grad(device):
    """Only the weight gradients are asked for; without biases the kernels skip the bias terms."""
    case = AWKWARD["one-head-prime-tokens"]
    x = torch.randn(case.batch, case.tokens, case.embed, device=device)
    check_against_reference(case, x, make_params(case, device, torch.float32, with_bias=False),
                            TOLERANCES[torch.float32])


def test_frozen_weights_give_input_grad_only(device):
    case = AWKWARD["one-head-prime-tokens"]
    params = make_params(case, device, torch.float32)
    for p in params.values():
        p.requires_grad_(False)
    x = torch.randn(case.batch, case.tokens, case.embed, device=device, requires_grad=True)
    out = elastic_ops.elastic_attention(x, *params.values(), case.heads, case.head_dim)
    d_out = torch.randn_like(out)
    out.backward(d_out)
    x_ref = x.detach().clone().requires_grad_(True)
    reference.attention(x_ref, *params.values(), case.heads, case.head_dim).backward(d_out)
    torch.testing.assert_close(x.grad, x_ref.grad, **TOLERANCES[torch.float32])
    assert all(p.grad is None for p in params.values())


def test_gradcheck_float64(device):
    """Analytical against numerical gradients of every input; weight gradients returned through autograd."""
    heads, max_heads, head_dim, embed = 1, 2, 16, 6
    dtype = torch.float64
    inputs = (
        torch.randn(1, 5, embed, device=device, dtype=dtype),
        torch.randn(3 * max_heads * head_dim, embed + 1, device=device, dtype=dtype) * 0.3,
        torch.randn(3 * max_heads * head_dim, device=device, dtype=dtype),
        torch.randn(embed + 1, max_heads * head_dim, device=device, dtype=dtype) * 0.3,
        torch.randn(embed + 1, device=device, dtype=dtype),
    )
    inputs = tuple(t.requires_grad_(True) for t in inputs)
    with weight_grads_in_place(False):
        assert torch.autograd.gradcheck(
            lambda *t: elastic_ops.elastic_attention(*t, heads, head_dim), inputs, fast_mode=True)


# numpy warns about the padding rows of the last key block in the dk/dv kernel: exp2(0 - lse) overflows there, but
# those rows are never stored.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning",
                            "ignore:invalid value encountered in matmul:RuntimeWarning")
def test_scores_far_below_zero(device):
    """Softmax is shift-invariant, so it must survive every score of a row lying far below zero. Here they lie
    beyond where ``exp`` of minus the log-sum-exp overflows even float64, which runs the masking of the partial
    last key block; float64 keeps the reference exact at these magnitudes."""
    heads, head_dim, embed, dtype = 2, 16, 8, torch.float64
    width = heads * head_dim
    x = torch.randn(2, 5, embed, device=device, dtype=dtype)
    qkv_weight = torch.randn(3 * width, embed, device=device, dtype=dtype) * embed ** -0.5
    qkv_bias = torch.randn(3, width, device=device, dtype=dtype)
    qkv_bias[0] += 16.0  # q ~ +16 and k ~ -16 everywhere: q.k ~ -16**2 * head_dim, scaled ~ -1024
    qkv_bias[1] -= 16.0
    inputs = (x, qkv_weight, qkv_bias.view(-1), torch.randn(embed, width, device=device, dtype=dtype) * width ** -0.5,
              torch.randn(embed, device=device, dtype=dtype))
    inputs = tuple(t.requires_grad_(True) for t in inputs)
    q, k = (torch.nn.functional.linear(x, w, b).view(2, 5, heads, head_dim).transpose(1, 2)
            for w, b in zip(qkv_weight.detach().view(3, width, embed)[:2], qkv_bias[:2]))
    assert (q @ k.transpose(-2, -1)).max() * head_dim ** -0.5 < -720  # exp(720) overflows float64

    with weight_grads_in_place(False):
        out = elastic_ops.elastic_attention(*inputs, heads, head_dim)
        d_out = torch.randn_like(out)
        grads = torch.autograd.grad(out, inputs, d_out)
    expected = reference.attention(*inputs, heads, head_dim)
    expected_grads = torch.autograd.grad(expected, inputs, d_out)
    torch.testing.assert_close(out, expected)
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("change, error, match", [
    # The Triton kernels' own limit: forced, the backend cannot run and says why (automatic: another backend runs).
    (dict(head_dim=24), elastic_ops.BackendUnavailableError, "power of two from 16 to 128, got 24"),
    (dict(head_dim=8), elastic_ops.BackendUnavailableError, "power of two from 16 to 128, got 8"),
    (dict(num_heads=4), ValueError, "num_heads=4 is outside 1..3"),
    (dict(num_heads=0), ValueError, "num_heads=0"),
    (dict(x=torch.randn(64, 40)), ValueError, "x must have 3 dimensions"),
    (dict(x=torch.randn(2, 64, 49)), ValueError, "embed dim"),
    (dict(x=torch.ones(2, 64, 40, dtype=torch.int32)), TypeError, "floating-point"),
    (dict(qkv_weight=torch.randn(3 * 3 * 64 + 1, 48)), ValueError, "block layout"),
    (dict(qkv_bias=torch.randn(5)), ValueError, "qkv_bias has 5 entries"),
    (dict(proj_weight=torch.randn(48, 64)), ValueError, "fewer than num_heads \\* head_dim"),
])
def test_bad_inputs_raise_clear_errors(change, error, match, device):
    case = MAIN
    params = make_params(case, device, torch.float32)
    call = dict(x=torch.randn(case.batch, case.tokens, case.embed), **params, num_heads=case.heads,
                head_dim=case.head_dim)
    call.update(change)
    call = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in call.items()}
    if "head_dim" in change:  # keep the qkv weight a whole number of heads of the new head dim
        call["qkv_weight"] = torch.randn(3 * 2 * change["head_dim"], case.max_embed, device=device)
        call["qkv_bias"] = None
        call["proj_weight"] = torch.randn(case.max_embed, 2 * change["head_dim"], device=device)
    with pytest.raises(error, match=match):
        elastic_ops.elastic_attention(**call)

"""Triton grouped K-subnet kernels against two oracles: the grouped PyTorch ops of nas.vit.batched and the
single-subnet reference op looped over the subnets. K = 3 subnets, one at size 1 and one at the super size;
weights are NaN outside the group's widest active block and, for the ops that know each subnet's input size,
so is the input padding (a kernel must not read past a subnet's active channels)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from kernel_checks import TOLERANCES, kernel_dtypes, super_param

import elastic_ops
from elastic_ops import GroupSizes, reference
from elastic_ops.ops import grouped
from nas.evaluate import batched_forward

EMBEDS = [1, 29, 40]  # size 1, prime, the super embed dim of the MLP and attention tests


@pytest.fixture(autouse=True)
def _inference():
    with torch.no_grad():
        yield


def stacked(per_subnet: list[torch.Tensor], width: int, padding: float) -> torch.Tensor:
    """``[K, ..., width]``: each subnet's activations, then ``padding`` on the rest of the last dim."""
    out = torch.full((len(per_subnet), *per_subnet[0].shape[:-1], width), padding, dtype=per_subnet[0].dtype,
                     device=per_subnet[0].device)
    for k, x in enumerate(per_subnet):
        out[k, ..., : x.shape[-1]] = x
    return out


def pytorch_grouped(op: str, *args) -> torch.Tensor:
    """The grouped PyTorch reference of ``op``."""
    return getattr(reference, op)(*args)


def check(y: torch.Tensor, expected: list[torch.Tensor], grouped_fp32: torch.Tensor,
          grouped_low: torch.Tensor | None, roundings: int = 2) -> None:
    """Subnet k's active outputs match its single-subnet reference ``expected[k]`` (fp32) and the grouped PyTorch op;
    its padding is exactly zero. In low precision the bound is twice the grouped PyTorch op's own error in that
    dtype against the fp32 reference, and never below ``roundings`` half-ulps of the largest output: one for
    each tensor the op rounds to the low precision on the way (its input and output at least)."""
    assert y.shape == grouped_fp32.shape
    for k, ref in enumerate(expected):
        size = ref.shape[-1]
        padding = y[k, ..., size:]
        assert torch.equal(padding, torch.zeros_like(padding)), f"subnet {k}: padding is not zero"
        active = y[k, ..., :size].float()
        if grouped_low is None:
            torch.testing.assert_close(active, ref, **TOLERANCES[torch.float32], msg=lambda m: f"subnet {k}: {m}")
            torch.testing.assert_close(active, grouped_fp32[k, ..., :size], **TOLERANCES[torch.float32],
                                       msg=lambda m: f"subnet {k} against the grouped PyTorch op: {m}")
        else:
            torch_error = (grouped_low[k, ..., :size].float() - ref).abs().max().item()
            bound = max(2 * torch_error, roundings * torch.finfo(grouped_low.dtype).eps / 2 * ref.abs().max().item())
            for name, oracle in (("reference", ref), ("grouped PyTorch op", grouped_fp32[k, ..., :size])):
                error = (active - oracle).abs().max().item()
                assert error <= bound, f"subnet {k}: max error {error:.3g} against the {name} exceeds {bound:.3g}"


def run_both(op: str, x_zero_padded: torch.Tensor, *args) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(grouped PyTorch op on fp32 copies, the same in x's dtype if that is low precision, else None)."""
    as_fp32 = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    fp32 = pytorch_grouped(op, x_zero_padded.float(), *as_fp32)
    low = pytorch_grouped(op, x_zero_padded, *args) if x_zero_padded.dtype != torch.float32 else None
    return fp32, low


DTYPES = [(d, d) for d in kernel_dtypes()] + [(torch.float16, torch.float32)]
def dtype_ids(dtype) -> str:
    return str(dtype).replace("torch.", "")


@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("dtype, weight_dtype", DTYPES, ids=dtype_ids)
def test_grouped_linear(dtype, weight_dtype, activation, device):
    outs = [1, 67, 100]  # 100 is the super out size; input width 40 of 48 leaves NaN columns
    weight = super_param(100, 48, active=(100, max(EMBEDS)), device=device, dtype=weight_dtype)
    bias = super_param(100, active=(100,), device=device, dtype=weight_dtype)
    xs = [torch.randn(2, 7, e, device=device).to(dtype) for e in EMBEDS]
    x = stacked(xs, max(EMBEDS), 0.0)  # grouped_linear has no input sizes: its padding must be zero
    sizes = GroupSizes(outs, device)

    y = grouped.grouped_linear(x, weight, bias, sizes, activation)
    assert y.dtype == dtype and y.shape == (3, 2, 7, 100)
    expected = [reference.linear(xk.float(), weight.float(), bias.float(), o, activation) for xk, o in zip(xs, outs)]
    check(y, expected, *run_both("grouped_linear", x, weight, bias, sizes, activation))


def test_grouped_ops_read_strided_vectors_through_their_stride(device):
    """A bias, gamma or beta that is a strided view (``b[::2]``) gives the single-subnet reference's outputs."""
    def strided(n):
        return torch.randn(2 * n, device=device)[::2]

    weight, bias = torch.randn(100, 48, device=device) * 48 ** -0.5, strided(100)
    xs = [torch.randn(2, 7, e, device=device) for e in EMBEDS]
    outs = [1, 67, 100]
    y = grouped.grouped_linear(stacked(xs, max(EMBEDS), 0.0), weight, bias, GroupSizes(outs, device), "gelu")
    check(y, [reference.linear(xk, weight, bias, o, "gelu") for xk, o in zip(xs, outs)],
          *run_both("grouped_linear", stacked(xs, max(EMBEDS), 0.0), weight, bias.contiguous(),
                    GroupSizes(outs, device), "gelu"))
    gamma, beta = strided(48) + 1, strided(48)
    sizes = GroupSizes(EMBEDS, device)
    y = grouped.grouped_layer_norm(stacked(xs, max(EMBEDS), float("nan")), sizes, gamma, beta, 1e-5)
    check(y, [reference.layer_norm(xk, gamma, beta) for xk in xs],
          *run_both("grouped_layer_norm", stacked(xs, max(EMBEDS), 0.0), sizes, gamma.contiguous(), beta.contiguous(),
                    1e-5))


@pytest.mark.parametrize("super_width", [40, 48], ids=["active_max", "nan_past_40"])
@pytest.mark.parametrize("dtype", kernel_dtypes(), ids=dtype_ids)
def test_grouped_layer_norm_over_each_subnets_channels(dtype, super_width, device):
    weight = super_param(super_width, active=(max(EMBEDS),), device=device, dtype=dtype) + 1.0
    bias = super_param(super_width, active=(max(EMBEDS),), device=device, dtype=dtype)
    # A large offset makes statistics over the wrong channel count visibly wrong.
    xs = [(torch.randn(3, 5, e, device=device) * 3 + 4).to(dtype) for e in EMBEDS]
    sizes = GroupSizes(EMBEDS, device)

    y = grouped.grouped_layer_norm(stacked(xs, max(EMBEDS), float("nan")), sizes, weight, bias, 1e-5)
    assert y.dtype == dtype
    expected = [reference.layer_norm(xk.float(), weight.float(), bias.float()) for xk in xs]
    check(y, expected, *run_both("grouped_layer_norm", stacked(xs, max(EMBEDS), 0.0), sizes, weight, bias, 1e-5))


@pytest.mark.parametrize("dtype, weight_dtype", DTYPES, ids=dtype_ids)
def test_grouped_mlp(dtype, weight_dtype, device):
    hidden = [4, 100, 61]  # of 128: rows past 100 of W1 and columns of W2 are NaN
    fc1_w = super_param(128, 40, active=(100, 40), device=device, dtype=weight_dtype)
    fc1_b = super_param(128, active=(100,), device=device, dtype=weight_dtype)
    fc2_w = super_param(40, 128, active=(40, 100), device=device, dtype=weight_dtype)
    fc2_b = super_param(40, active=(40,), device=device, dtype=weight_dtype)
    xs = [torch.randn(2, 5, e, device=device).to(dtype) for e in EMBEDS]
    sizes, hidden_sizes = GroupSizes(EMBEDS, device), GroupSizes(hidden, device)
    params = (fc1_w, fc1_b, fc2_w, fc2_b)

    y = grouped.grouped_mlp(stacked(xs, 40, float("nan")), sizes, *params, hidden_sizes)
    assert y.dtype == dtype
    expected = [reference.mlp(xk.float(), *(p.float() for p in params), h) for xk, h in zip(xs, hidden)]
    check(y, expected, *run_both("grouped_mlp", stacked(xs, 40, 0.0), sizes, *params, hidden_sizes))


@pytest.mark.parametrize("tokens", [70, 5], ids=["two_key_blocks", "one_partial_block"])
@pytest.mark.parametrize("dtype, weight_dtype", DTYPES, ids=dtype_ids)
def test_grouped_attention(dtype, weight_dtype, tokens, device):
    head_dim, max_heads = 16, 4
    heads = [3, 1, 2]  # the widest is below the supernet's 4: every block's rows of head 4 are NaN
    width = max(heads) * head_dim
    qkv_w = torch.full((3 * max_heads * head_dim, 40), float("nan"), device=device, dtype=weight_dtype)
    qkv_b = torch.full((3 * max_heads * head_dim,), float("nan"), device=device, dtype=weight_dtype)
    for j in range(3):
        rows = slice(j * max_heads * head_dim, j * max_heads * head_dim + width)
        qkv_w[rows] = (torch.randn(width, 40, device=device) * 0.3).to(weight_dtype)
        qkv_b[rows] = torch.randn(width, device=device).to(weight_dtype)
    proj_w = super_param(40, max_heads * head_dim, active=(40, width), device=device, dtype=weight_dtype)
    proj_b = super_param(40, active=(40,), device=device, dtype=weight_dtype)
    xs = [torch.randn(2, tokens, e, device=device).to(dtype) for e in EMBEDS]
    sizes, head_counts = GroupSizes(EMBEDS, device), GroupSizes(heads, device)
    params = (qkv_w, qkv_b, proj_w, proj_b)

    y = grouped.grouped_attention(stacked(xs, 40, float("nan")), sizes, *params, head_counts, head_dim)
    assert y.dtype == dtype
    expected = [reference.attention(xk.float(), *(p.float() for p in params), h, head_dim) for xk, h in zip(xs, heads)]
    # Flash attention rounds its input, q/k/v, the probabilities, the context and its output to x's dtype;
    # torch's CPU attention keeps the middle three in fp32, so its own error is no yardstick for them.
    check(y, expected, *run_both("grouped_attention", stacked(xs, 40, 0.0), sizes, *params, head_counts, head_dim),
          roundings=5)


def test_registered_kernels_run_the_batched_supernet(device):
    """Through the grouped "triton" backend, a batched pass of the digits-tiny supernet gives each subnet's logits
    of the single-subnet forward."""
    from nas.spaces import load_space
    from nas.vit.supernet import SupernetConfig, VisionTransformerSupernet

    space = load_space("digits-tiny")
    model = VisionTransformerSupernet(SupernetConfig.from_space(dataclasses.replace(space, num_classes=7)))
    model = model.to(device).eval()
    for name, param in model.named_parameters():
        param.normal_(1.0 if "norm" in name else 0.0, param.shape[-1] ** -0.5 if param.dim() > 1 else 0.2)
    archs = [space.min_arch(), space.sample_many(np.random.default_rng(0), 1).archs()[0], space.max_arch()]
    images = torch.randn(2, 1, 8, 8, device=device)
    with elastic_ops.use_backend("reference"):
        singles = torch.stack([model(images, arch) for arch in archs])
    with elastic_ops.use_backend("triton"), torch.no_grad():
        logits = batched_forward(model, images, archs)
    torch.testing.assert_close(logits, singles, atol=1e-4, rtol=1e-4)
    assert (singles[0] - singles[-1]).abs().max() > 1e-2, "subnets should differ; the check would be vacuous"


@pytest.mark.parametrize("backend", ["triton", "native", "reference"])
def test_bad_input_is_named_before_launch(backend):
    if not elastic_ops.backends()[backend].available:
        pytest.skip(str(elastic_ops.backends()[backend]))
    weight, bias = torch.randn(32, 24), torch.randn(32)
    x = torch.randn(3, 2, 5, 24)
    sizes = GroupSizes([4, 24, 1], "cpu")
    with elastic_ops.use_backend(backend):
        with pytest.raises(ValueError, match="out_sizes has 2 subnets but x stacks 3"):
            elastic_ops.grouped_linear(x, weight, bias, GroupSizes([4, 8], "cpu"))
        with pytest.raises(ValueError, match=r"smaller than the active block \[40, 24\]"):
            elastic_ops.grouped_linear(x, weight, bias, GroupSizes([4, 40, 1], "cpu"))
        with pytest.raises(ValueError, match="activation must be None or 'gelu'"):
            elastic_ops.grouped_linear(x, weight, bias, sizes, "relu")
        with pytest.raises(ValueError, match="x has 24 channels but the widest subnet of sizes has 20"):
            elastic_ops.grouped_layer_norm(x, GroupSizes([4, 20, 1], "cpu"), None, None)
        with pytest.raises(TypeError, match="must be a GroupSizes"):
            elastic_ops.grouped_layer_norm(x, [4, 24, 1], None, None)
        with pytest.raises(ValueError, match="qkv_weight holds 2"):
            elastic_ops.grouped_attention(x, sizes, torch.randn(96, 24), None, torch.randn(24, 48), None,
                                          GroupSizes([1, 3, 2], "cpu"), 16)
    if backend == "triton":  # the Triton kernels' own limit: forced, the backend cannot run and says why
        with elastic_ops.use_backend(backend), pytest.raises(elastic_ops.BackendUnavailableError,
                                                             match="power of two from 16 to 128, got 24"):
            elastic_ops.grouped_attention(x, sizes, torch.randn(72, 24), None, torch.randn(24, 24), None,
                                          GroupSizes([1, 1, 1], "cpu"), 24)
    if backend != "reference":  # forward-only kernels: asked for a gradient, they refuse and say why
        with torch.enable_grad(), elastic_ops.use_backend(backend), \
                pytest.raises(elastic_ops.BackendUnavailableError, match="forward-only"):
            elastic_ops.grouped_linear(x, weight.requires_grad_(), bias, sizes)

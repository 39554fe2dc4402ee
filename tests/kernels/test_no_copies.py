"""The GPU path reads the active block of a super weight in place and writes its gradient in place: no copy of a
weight slice, forward or backward (DESIGN.md sections 2 and 4). Checked by the allocations an op makes, with super
weights of megabytes and activations of kilobytes, so that any copy of a weight block stands out."""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import elastic_ops

pytestmark = pytest.mark.usefixtures("triton_backend")


def largest_allocation(fn, device: torch.device) -> int:
    """Bytes of the largest single allocation ``fn`` makes: on the CPU each allocation the profiler records (its
    memory records, one per allocation and one per free: a copy made and freed inside one op counts in full, not
    netted out within the op's event), on a GPU the peak growth of allocated memory."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        live = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - live
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = [event for event in prof.profiler.kineto_results.events() if event.name() == "[memory]"]
    assert records, "the profiler recorded no allocation at all"
    return max(event.nbytes() for event in records)


def params_with_grads(*shapes, device) -> list[torch.nn.Parameter]:
    """Parameters whose ``.grad`` already exists, as after the first step: a backward must only add into it."""
    params = [torch.nn.Parameter(torch.randn(*shape, device=device) * shape[-1] ** -0.5) for shape in shapes]
    for p in params:
        p.grad = torch.zeros_like(p)
    return params


def block_bytes(rows: int, cols: int) -> int:
    return rows * cols * 4


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_linear_copies_no_weight_block(activation, device):
    weight, bias = params_with_grads((2048, 1536), (2048,), device=device)
    x = torch.randn(2, 8, 1400, device=device, requires_grad=True)

    def step():
        elastic_ops.elastic_linear(x, weight, bias, 1900, activation).backward(torch.randn(2, 8, 1900, device=device))

    step()  # compile and allocate whatever is allocated once
    assert largest_allocation(step, device) < block_bytes(1900, 1400) / 8
    assert weight.grad[1900:].abs().sum() == 0 and weight.grad[:, 1400:].abs().sum() == 0
    assert weight.grad[:1900, :1400].abs().sum() > 0


def test_mlp_copies_no_weight_block(device):
    fc1_weight, fc1_bias, fc2_weight, fc2_bias = params_with_grads((2048, 1536), (2048,), (1536, 2048), (1536,),
                                                                   device=device)
    x = torch.randn(2, 8, 1400, device=device, requires_grad=True)

    def step():
        elastic_ops.elastic_mlp(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, 1900).backward(torch.randn_like(x))

    step()
    assert largest_allocation(step, device) < block_bytes(1900, 1400) / 8


def test_attention_copies_no_weight_block(device):
    heads, head_dim, embed = 8, 64, 1536
    qkv_weight, qkv_bias, proj_weight, proj_bias = params_with_grads(
        (3 * heads * head_dim, embed), (3 * heads * head_dim,), (embed, heads * head_dim), (embed,), device=device)
    x = torch.randn(2, 8, 1400, device=device, requires_grad=True)

    def step():
        elastic_ops.elastic_attention(x, qkv_weight, qkv_bias, proj_weight, proj_bias, 7, head_dim).backward(
            torch.randn_like(x))

    step()
    assert largest_allocation(step, device) < block_bytes(7 * head_dim, 1400) / 8


def test_first_backward_allocates_the_full_gradient_once(device):
    """Without an existing ``.grad``, the one full-size allocation is the gradient itself (zero outside the block)."""
    weight = torch.nn.Parameter(torch.randn(2048, 1536, device=device))
    x = torch.randn(2, 8, 1400, device=device, requires_grad=True)
    elastic_ops.elastic_linear(x, weight, None, 1900).backward(torch.randn(2, 8, 1900, device=device))
    assert weight.grad.shape == weight.shape
    assert weight.grad[1900:].abs().sum() == 0 and weight.grad[:, 1400:].abs().sum() == 0


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_a_trailing_block_copies_nothing_and_its_gradient_lands_in_place(activation, device):
    """Two-sided width sharing: the right-side block ``W[-1900:, -1400:]`` is a strided view with an offset; the op
    reads it in place and adds its gradient into the same view of ``weight.grad``, the leading rows and columns
    untouched."""
    weight, bias = params_with_grads((2048, 1536), (2048,), device=device)
    x = torch.randn(2, 8, 1400, device=device, requires_grad=True)

    def step():
        y = elastic_ops.elastic_linear(x, weight[-1900:, -1400:], bias[-1900:], 1900, activation)
        y.backward(torch.randn(2, 8, 1900, device=device))

    step()
    assert largest_allocation(step, device) < block_bytes(1900, 1400) / 8
    assert weight.grad[:148].abs().sum() == 0 and weight.grad[:, :136].abs().sum() == 0
    assert weight.grad[148:, 136:].abs().sum() > 0 and bias.grad[:148].abs().sum() == 0


def test_a_trailing_mlp_block_copies_no_weight_block(device):
    fc1_weight, fc1_bias, fc2_weight, fc2_bias = params_with_grads((2048, 1536), (2048,), (1536, 2048), (1536,),
                                                                   device=device)
    x = torch.randn(2, 8, 1400, device=device, requires_grad=True)

    def step():
        elastic_ops.elastic_mlp(x, fc1_weight[-1900:, -1400:], fc1_bias[-1900:], fc2_weight[-1400:, -1900:],
                                fc2_bias[-1400:], 1900).backward(torch.randn_like(x))

    step()
    assert largest_allocation(step, device) < block_bytes(1900, 1400) / 8
    assert fc1_weight.grad[:148].abs().sum() == 0 and fc2_weight.grad[:, :148].abs().sum() == 0
    assert fc1_weight.grad[148:, 136:].abs().sum() > 0

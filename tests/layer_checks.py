"""Checks shared by the tests of the elastic layers: an active configuration against the plain module it extracts,
with NaN outside the active slices and gradients compared slice by slice (DESIGN.md sections 2, 3 and 5). A plain
module, not conftest, so that test files import it by a name no other test directory uses."""
from __future__ import annotations

import torch
from torch import nn

TOL = dict(atol=1e-5, rtol=1e-5)


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to fp32 rounding relative to the largest entry: gradients sum over the batch and the tokens in another
    order on each side (fused attention against a plain softmax), and reach the hundreds on random weights."""
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * max(1.0, expected.abs().max().item()))


def randomize(module: nn.Module) -> nn.Module:
    """Random values in every parameter (norms start at ones/zeros, which would hide slicing mistakes)."""
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
    return module


def assert_extract_matches(layer: nn.Module, inputs: torch.Tensor) -> nn.Module:
    extracted = layer.extract()
    torch.testing.assert_close(extracted(inputs), layer(inputs), **TOL)
    return extracted


def assert_state_dict_round_trip(elastic: nn.Module, make_plain, inputs: torch.Tensor) -> None:
    """Plain -> elastic and elastic -> plain at full width give the same keys and the same outputs."""
    source = randomize(make_plain()).eval()
    elastic.eval().load_state_dict(source.state_dict())
    torch.testing.assert_close(elastic(inputs), source(inputs), **TOL)
    randomize(elastic)
    target = make_plain().eval()
    target.load_state_dict(elastic.state_dict())
    torch.testing.assert_close(target(inputs), elastic(inputs), **TOL)


def active_region(super_shape: torch.Size, shape: torch.Size) -> tuple[slice, ...]:
    """Where a tensor of ``shape`` extracted from one of ``super_shape`` sits: the leading block, and for a conv
    weight ``[out, in, k, k]`` the centre ``k x k`` of the kernel."""
    region = [slice(0, size) for size in shape]
    if len(shape) == 4:
        start = (super_shape[-1] - shape[-1]) // 2
        region[2:] = [slice(start, start + shape[-1])] * 2
    return tuple(region)


def active_regions(layer: nn.Module, extracted: nn.Module, by_hand: tuple[str, ...] = ()) -> dict:
    """The active region of each floating-point tensor of ``layer``'s state_dict, read off the shapes of the
    extracted module's tensor of the same name; None where the extraction has none (a part the configuration does
    not use). Names starting with one of ``by_hand`` are left to the test (blocks of rows, grid blocks)."""
    extracted_state = extracted.state_dict()
    regions = {}
    for name, tensor in layer.state_dict().items():
        if tensor.is_floating_point() and not name.startswith(by_hand):
            regions[name] = (active_region(tensor.shape, extracted_state[name].shape) if name in extracted_state
                             else None)
    return regions


def keep_only(tensor: torch.Tensor, region: tuple | None) -> None:
    """NaN everywhere in ``tensor`` but ``tensor[region]`` (everywhere if region is None)."""
    with torch.no_grad():
        kept = None if region is None else tensor[region].clone()
        tensor.fill_(float("nan"))
        if region is not None:
            tensor[region] = kept


def poison_inactive(layer: nn.Module, regions: dict) -> None:
    tensors = layer.state_dict(keep_vars=True)
    for name, region in regions.items():
        keep_only(tensors[name], region)


def assert_grad_in(param: torch.Tensor, region: tuple | None, expected: torch.Tensor | None = None) -> None:
    """``param.grad`` is ``expected`` in ``region`` (just nonzero somewhere if None) and exactly zero outside it."""
    grad = param.grad
    if region is None:
        assert grad is None or torch.count_nonzero(grad) == 0, "a part the configuration does not use got a gradient"
        return
    if expected is None:
        assert grad[region].abs().sum() > 0
    else:
        assert_close_to_scale(grad[region], expected)
    outside = grad.clone()
    outside[region] = 0
    assert torch.count_nonzero(outside) == 0, "a gradient reached the weights outside the active slice"


def check_against_extracted(layer: nn.Module, make_input, by_hand: tuple[str, ...] = ()) -> nn.Module:
    """The active configuration of ``layer`` against its extracted plain module, in training and in eval mode:
    NaN everywhere outside the active slices of the super weights and buffers (outputs must stay finite), equal
    outputs, equal gradients of the input and of every active weight slice, and exactly zero gradients outside them.
    Returns the extracted module; ``by_hand``: names the test checks itself (see :func:`active_regions`)."""
    extracted = layer.extract()
    regions = active_regions(layer, extracted, by_hand)
    poison_inactive(layer, regions)
    x = make_input().requires_grad_()
    x_plain = x.detach().clone().requires_grad_()
    layer.train(), extracted.train()
    y, y_plain = layer(x), extracted(x_plain)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_plain, **TOL)
    upstream = torch.randn_like(y)
    y.backward(upstream)
    y_plain.backward(upstream)
    assert_close_to_scale(x.grad, x_plain.grad)
    params, plain_state = dict(layer.named_parameters()), extracted.state_dict(keep_vars=True)
    buffers = dict(layer.named_buffers())
    for name, region in regions.items():
        if name in params:
            assert_grad_in(params[name], region, None if region is None else plain_state[name].grad)
        elif region is not None:  # running statistics: the step updated the active channels and nothing else
            torch.testing.assert_close(buffers[name][region], plain_state[name], **TOL)
            outside = buffers[name].clone()
            outside[region] = float("nan")
            assert outside.isnan().all()
    layer.eval(), extracted.eval()
    with torch.no_grad():
        y = layer(x)
        assert torch.isfinite(y).all()
        torch.testing.assert_close(y, extracted(x), **TOL)
    return extracted

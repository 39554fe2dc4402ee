"""The hybrid presets' supernets, shared by the hybrid tests (building the ImageNet ones takes about a second): every
norm weight, bias, layer scale and running statistic random, so that a slicing mistake in any of them shows (the
initial ones, zero BatchNorm weights and 1e-6 layer scales, would hide whole branches). Built once per session; a
test may set archs and modes, and restores any weight or statistic it changes. A plain module, not conftest, so that
test files import it by a name no other test directory uses."""
from __future__ import annotations

import functools

import torch

from nas.hybrid.supernet import HybridSupernet, HybridSupernetConfig
from nas.spaces import load_space


@functools.cache
def supernet(name: str) -> HybridSupernet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = HybridSupernet(HybridSupernetConfig(load_space(name)))
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if param.dim() == 1:
                    is_scale = param_name.endswith(("weight", "gamma"))
                    param.copy_(torch.rand_like(param) + 0.5 if is_scale else torch.randn_like(param) * 0.1)
            randomise_running_statistics(model)
    return model.eval()


def randomise_running_statistics(model: torch.nn.Module) -> None:
    """BatchNorm running means ~ N(0, 0.1) and variances ~ U(0.5, 2): the initial 0 and 1 would hide a statistic read
    from the wrong channels."""
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)

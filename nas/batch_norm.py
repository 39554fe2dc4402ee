"""The running statistics of a model's BatchNorms, kept and put back: a supernet with BatchNorm (``Family.batch_norm``)
evaluates each subnet with statistics re-estimated for it (DESIGN.md section 9)."""
from __future__ import annotations

import torch
from torch import nn

from elastic_ops.conv import ElasticBatchNorm2d

BATCH_NORMS = (ElasticBatchNorm2d, nn.modules.batchnorm._BatchNorm)


class BatchNormStats:
    """The running statistics of every BatchNorm of ``model`` (copies), to load back into the model, whole or for the
    BatchNorms inside one of its modules."""

    def __init__(self, model: nn.Module):
        self.values = {norm: (norm.running_mean.clone(), norm.running_var.clone(), norm.num_batches_tracked.clone())
                       for norm in model.modules() if isinstance(norm, BATCH_NORMS)}

    @torch.no_grad()
    def load(self, module: nn.Module) -> None:
        """Put the statistics back into the BatchNorms inside ``module`` (a part of the model or all of it)."""
        for norm in module.modules():
            saved = self.values.get(norm)
            if saved is not None:
                for buffer, value in zip((norm.running_mean, norm.running_var, norm.num_batches_tracked), saved):
                    buffer.copy_(value)


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(module, BATCH_NORMS) for module in model.modules())


__all__ = ["BATCH_NORMS", "BatchNormStats", "has_batch_norm"]

"""Several processes (``torchrun --nproc_per_node N -m nas.train`` or ``-m nas.search``): the process group, and what
the ranks exchange by hand.

Every rank builds the same model and the same sampler, reads its own shard of each batch, and the gradients are
all-reduced after backward (:func:`all_reduce_gradients`). The model is not wrapped in DistributedDataParallel: the
Triton ops add weight gradients into slices of ``param.grad`` in place, which DDP's autograd hooks would never see.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


@dataclass
class Distributed:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_kind: str) -> Distributed:
    """From torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); one process when absent."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_reduce_gradients(params: Sequence[nn.Parameter], world_size: int, bucket_elements: int = 1 << 24) -> None:
    """Average ``param.grad`` over ranks: flattened buckets of one dtype, one all_reduce per bucket.
    Every rank trained the same archs, so the same parameters have gradients everywhere."""
    grads = [p.grad for p in params if p.grad is not None]
    buckets: dict[torch.dtype, list[list[Tensor]]] = {}
    for grad in grads:
        chain = buckets.setdefault(grad.dtype, [[]])
        if chain[-1] and sum(g.numel() for g in chain[-1]) + grad.numel() > bucket_elements:
            chain.append([])
        chain[-1].append(grad)
    for chain in buckets.values():
        for bucket in chain:
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat)
            flat /= world_size
            for grad, synced in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                grad.copy_(synced)


def broadcast_parameters(module: nn.Module) -> None:
    for tensor in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(tensor.data, src=0)


def sum_over_ranks(values: Tensor, ranks: Distributed) -> Tensor:
    """``values`` summed over the ranks, on every rank (itself with one process). A CPU tensor: gloo's and NCCL's
    shared ground is the host for the few numbers exchanged here."""
    if ranks.enabled:
        dist.all_reduce(values)
    return values


def gather_rng_states(ranks: Distributed, device: torch.device) -> dict[str, list[Tensor]]:
    """The global torch RNG states (CPU, and CUDA where used) of every rank, on rank 0."""
    mine = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    if not ranks.enabled:
        return {kind: [state] for kind, state in mine.items()}
    everyone: list[dict] = [None] * ranks.world_size
    dist.all_gather_object(everyone, mine)
    return {kind: [states[kind] for states in everyone] for kind in mine}


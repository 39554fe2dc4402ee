"""Hybrid conv / attention / MLP search spaces and supernets (ElasticViT, UniNet; DESIGN.md section 9), one module a
concern: ``arch`` (a subnet: stages and a resolution), ``style`` (how the two families' blocks differ), ``space`` (the
choices, validation, sampling, evolution operators), ``cost`` (exact params and MACs), ``supernet`` (the supernet and
its BatchNorm recalibration), ``batched`` (subnets of one layout in one pass, BatchNorm statistics per subnet),
``scaling`` (UniNet's compound scaling of a searched arch into a family), ``export`` (a saved subnet rebuilt).

The modules are imported by name, not from here, so that the spaces and the cost model load without the supernet.
"""
from .uninet import uninet_model

__all__ = ["uninet_model"]

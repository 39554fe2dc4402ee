"""elastic-ops: elastic-width kernels that run on slices of a supernet's weights, with no copies.

Ops (``elastic_linear``, ``elastic_layer_norm``, ``elastic_mlp``, ``elastic_attention``) dispatch per
call to Triton (GPU, or the CPU interpreter), native C++ kernels (CPU inference) or the PyTorch
reference; see ``backends()`` and ``use_backend``. ``grouped_*`` run K subnets in one call (``GroupSizes``).
"""
from . import reference
from ._backend import BACKENDS, BackendStatus, BackendUnavailableError, backends, forced_backend, use_backend
from ._weight_grads import weight_grads_in_place
from .functional import (
    elastic_attention,
    elastic_layer_norm,
    elastic_linear,
    elastic_mlp,
    grouped_attention,
    grouped_layer_norm,
    grouped_linear,
    grouped_mlp,
)
from .group_sizes import GroupSizes
from .nn import ElasticAttention, ElasticBlock, ElasticLayerNorm, ElasticLinear, ElasticMlp, ElasticPatchEmbed

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendStatus",
    "BackendUnavailableError",
    "ElasticAttention",
    "ElasticBlock",
    "ElasticLayerNorm",
    "ElasticLinear",
    "ElasticMlp",
    "ElasticPatchEmbed",
    "GroupSizes",
    "backends",
    "elastic_attention",
    "elastic_layer_norm",
    "elastic_linear",
    "elastic_mlp",
    "forced_backend",
    "grouped_attention",
    "grouped_layer_norm",
    "grouped_linear",
    "grouped_mlp",
    "reference",
    "use_backend",
    "weight_grads_in_place",
]

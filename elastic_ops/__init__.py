"""elastic-ops: elastic-width kernels that run on slices of a supernet's weights, with no copies.

Ops (``elastic_linear``, ``elastic_layer_norm``, ``elastic_mlp``, ``elastic_attention``) dispatch per
call to Triton (GPU, or the CPU interpreter), native C++ kernels (CPU inference) or the PyTorch
reference; see ``backends()`` and ``use_backend``. ``grouped_*`` run K subnets in one call (``GroupSizes``).
Layers: ``elastic_ops.nn`` (ViT), ``elastic_ops.conv`` (conv, BatchNorm, SE, MBConv, stem, head) and
``elastic_ops.hybrid`` (token-mixing MLP, attention blocks, downsampling modules); what they extract to: ``plain`` and
``plain_hybrid``.
"""
from . import reference
from ._backend import BACKENDS, BackendStatus, BackendUnavailableError, backends, forced_backend, use_backend
from ._weight_grads import weight_grads_in_place
from .conv import (
                         ElasticBatchNorm2d,
                         ElasticClassifierHead,
                         ElasticConv2d,
                         ElasticConvNormAct,
                         ElasticDepthwiseConv2d,
                         ElasticInvertedResidual,
                         ElasticSqueezeExcite,
                         make_divisible,
                         recalibrate_batch_norm,
)
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
from .hybrid import (
                         ElasticGlobalDSM,
                         ElasticLocalDSM,
                         ElasticLocalGlobalDSM,
                         ElasticMixerBlock,
                         ElasticPositionalAttentionBlock,
                         ElasticSampleLayerNorm,
                         ElasticSeparableDownsample,
                         ElasticVScaleAttention,
                         ElasticVScaleBlock,
)
from .nn import (
                         ElasticAttention,
                         ElasticBlock,
                         ElasticLayerNorm,
                         ElasticLayerScale,
                         ElasticLinear,
                         ElasticMlp,
                         ElasticPatchEmbed,
)
from .plain_hybrid import to_grid, to_tokens

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendStatus",
    "BackendUnavailableError",
    "ElasticAttention",
    "ElasticBatchNorm2d",
    "ElasticClassifierHead",
    "ElasticBlock",
    "ElasticConv2d",
    "ElasticConvNormAct",
    "ElasticDepthwiseConv2d",
    "ElasticGlobalDSM",
    "ElasticInvertedResidual",
    "ElasticLayerNorm",
    "ElasticLayerScale",
    "ElasticLinear",
    "ElasticLocalDSM",
    "ElasticLocalGlobalDSM",
    "ElasticMixerBlock",
    "ElasticMlp",
    "ElasticPatchEmbed",
    "ElasticPositionalAttentionBlock",
    "ElasticSampleLayerNorm",
    "ElasticSeparableDownsample",
    "ElasticSqueezeExcite",
    "ElasticVScaleAttention",
    "ElasticVScaleBlock",
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
    "make_divisible",
    "recalibrate_batch_norm",
    "reference",
    "to_grid",
    "to_tokens",
    "use_backend",
    "weight_grads_in_place",
]

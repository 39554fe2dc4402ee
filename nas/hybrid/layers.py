"""The stem and the head of a hybrid supernet, elastic, built from ``elastic_ops``' conv layers; they extract to
``elastic_ops.plain_hybrid.ConvNormAct`` and ``ClassifierHead``."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from elastic_ops import plain_hybrid
from elastic_ops.conv import ElasticBatchNorm2d, ElasticComposite, ElasticConv2d
from elastic_ops.nn import ElasticLinear, empty_module
from elastic_ops.plain import make_activation


class ElasticConvNormAct(ElasticComposite):
    """A conv without bias (``kernel_size``, ``stride``), BatchNorm and ``activation``, elastic over its channels."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, activation: str):
        super().__init__()
        self.kernel_size, self.stride, self.activation = kernel_size, stride, activation
        self.conv = ElasticConv2d(in_channels, out_channels, kernel_size, stride, bias=False)
        self.bn = ElasticBatchNorm2d(out_channels)
        self.act = make_activation(activation)
        self.active = self.max_config()

    def max_config(self) -> dict[str, int]:
        in_channels, out_channels = self.conv.max_config()["in_channels"], self.conv.max_config()["out_channels"]
        return {"in_channels": in_channels, "out_channels": out_channels}

    def child_configs(self, config: dict[str, int]) -> dict[str, dict[str, int]]:
        return {"conv": {**config, "kernel_size": self.kernel_size}, "bn": {"num_features": config["out_channels"]}}

    def forward(self, x: Tensor) -> Tensor:
        children = self.child_configs(self.active)
        return self.act(self.bn(self.conv(x, **children["conv"]), **children["bn"]))

    def extract(self) -> plain_hybrid.ConvNormAct:
        return self.extract_children(empty_module(lambda: plain_hybrid.ConvNormAct(
            self.active["in_channels"], self.active["out_channels"], self.kernel_size, self.stride, self.activation),
            self.conv.weight))


class ElasticClassifierHead(ElasticComposite):
    """:class:`elastic_ops.plain_hybrid.ClassifierHead`, elastic over its ``in_channels``: a 1x1 conv to ``features``
    channels, or with ``expansion`` > 0 to ``expansion * in_channels`` (ElasticViT's ``classifier_mul``), BatchNorm and
    the activation, average pooling, the pre-logits layer (``pre_logits`` > 0), dropout (in training) and the
    classifier."""

    def __init__(self, in_channels: int, num_classes: int, features: int = 0, expansion: int = 0, pre_logits: int = 0,
                 activation: str = "gelu", dropout: float = 0.0):
        super().__init__()
        if (features > 0) == (expansion > 0):
            raise ValueError(f"ElasticClassifierHead: set one of features and expansion, got {features}, {expansion}")
        self.in_channels, self.fixed_features, self.expansion = in_channels, features, expansion
        self.pre_logits_width, self.activation, self.dropout = pre_logits, activation, dropout
        widest = self.features(in_channels)
        self.conv = ElasticConv2d(in_channels, widest, bias=False)
        self.bn = ElasticBatchNorm2d(widest)
        self.act = make_activation(activation)
        self.pre_logits = ElasticLinear(widest, pre_logits) if pre_logits else None
        self.classifier = ElasticLinear(pre_logits or widest, num_classes)
        self.active = self.max_config()

    def features(self, in_channels: int) -> int:
        return self.fixed_features or self.expansion * in_channels

    def max_config(self) -> dict[str, int]:
        return {"in_channels": self.in_channels}

    def child_configs(self, config: dict[str, int]) -> dict[str, dict[str, int]]:
        features = self.features(config["in_channels"])
        children = {"conv": {"in_channels": config["in_channels"], "out_channels": features},
                    "bn": {"num_features": features}, "pre_logits": {"in_features": features},
                    "classifier": {"in_features": self.pre_logits_width or features}}
        return {name: child for name, child in children.items() if getattr(self, name) is not None}

    def forward(self, x: Tensor) -> Tensor:
        children = self.child_configs(self.active)
        pooled = self.act(self.bn(self.conv(x, **children["conv"]), **children["bn"])).mean((2, 3))
        if self.pre_logits is not None:
            pooled = self.act(self.pre_logits(pooled, **children["pre_logits"]))
        pooled = F.dropout(pooled, self.dropout, self.training)
        return self.classifier(pooled, **children["classifier"])

    def extract(self) -> plain_hybrid.ClassifierHead:
        in_channels = self.active["in_channels"]
        return self.extract_children(empty_module(lambda: plain_hybrid.ClassifierHead(
            in_channels, self.features(in_channels), self.classifier.out_features, self.pre_logits_width,
            self.activation, self.dropout), self.conv.weight))


__all__ = ["ElasticClassifierHead", "ElasticConvNormAct"]

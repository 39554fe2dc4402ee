"""Elastic convolution layers: conv, depthwise conv, BatchNorm, squeeze-and-excitation, the inverted residual
(MBConv) block, a conv-BatchNorm-activation stem and a classifier head, on feature maps ``[B, C, H, W]`` (DESIGN.md
section 9).

A conv weight ``[C_out_max, C_in_max / groups, K, K]`` is used through its leading channels and the centre
``k x k`` of its kernel: a smaller kernel is the centre of the largest one, as in once-for-all (OFA). OFA also learns a
transformation matrix per kernel step that maps the centre to the smaller kernel; that is not done here, the centre
is used as it is. Conv and BatchNorm run in torch (cuDNN, oneDNN) on views of the weights (a cast to the input dtype
copies only the active slice); activations are never copied. BatchNorm keeps running statistics of the super size;
:func:`recalibrate_batch_norm` re-estimates them for one subnet before it is evaluated or exported.

``extract()`` returns ``nn.Conv2d``, ``nn.BatchNorm2d`` or a module of ``elastic_ops.plain_hybrid`` holding copies of
the active weights; parameter names follow torch and timm, so at full width a state_dict loads both ways.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import plain_hybrid
from .nn import ElasticLinear, ElasticModule, drop_path, empty_module
from .plain import make_activation


def make_divisible(value: float, divisor: int = 8) -> int:
    """``value`` rounded to a multiple of ``divisor`` (at least ``divisor``), never more than 10% below ``value``:
    the channel rounding of MobileNet, OFA and UniNet (``make_divisible``)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def check_kernel_size(module: ElasticModule, kernel_size: int) -> None:
    """A smaller kernel is the centre of the largest: only odd sizes have a centre."""
    if kernel_size % 2 == 0:
        raise ValueError(f"{type(module).__name__}: kernel_size={kernel_size} must be odd (the centre of the largest "
                         f"kernel, {module.max_config()['kernel_size']})")


class _ElasticConv(ElasticModule):
    """What the conv layers share: the weight ``[out_max, in_max / groups, K, K]``, an optional bias, a fixed stride
    and the padding ``k // 2`` that keeps the size at stride 1."""

    def __init__(self, out_channels: int, group_channels: int, kernel_size: int, stride: int, bias: bool,
                 device=None, dtype=None):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"{type(self).__name__}: kernel_size must be odd (smaller kernels are its centre), "
                             f"got {kernel_size}")
        self.stride = stride
        self.weight = nn.Parameter(torch.empty(out_channels, group_channels, kernel_size, kernel_size, device=device,
                                               dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The initialisation of ``nn.Conv2d``."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.weight[0].numel())
            nn.init.uniform_(self.bias, -bound, bound)

    def resolve(self, **overrides: int | None) -> dict[str, int]:
        config = super().resolve(**overrides)
        check_kernel_size(self, config["kernel_size"])
        return config

    def active_weight(self, out_channels: int, group_channels: int, kernel_size: int) -> Tensor:
        """The view ``weight[:out, :in, c:c + k, c:c + k]`` with ``c = (K - k) // 2``: the kernel's centre."""
        start = (self.weight.shape[-1] - kernel_size) // 2
        return self.weight[:out_channels, :group_channels, start:start + kernel_size, start:start + kernel_size]

    def conv(self, x: Tensor, out_channels: int, kernel_size: int, groups: int) -> Tensor:
        weight = self.active_weight(out_channels, x.shape[1] // groups, kernel_size).to(x.dtype)
        bias = None if self.bias is None else self.bias[:out_channels].to(x.dtype)
        return F.conv2d(x, weight, bias, self.stride, kernel_size // 2, groups=groups)

    def extract_conv(self, in_channels: int, out_channels: int, kernel_size: int, groups: int) -> nn.Conv2d:
        conv = empty_module(lambda: nn.Conv2d(in_channels, out_channels, kernel_size, self.stride, kernel_size // 2,
                                              groups=groups, bias=self.bias is not None), self.weight)
        with torch.no_grad():
            conv.weight.copy_(self.active_weight(out_channels, in_channels // groups, kernel_size))
            if self.bias is not None:
                conv.bias.copy_(self.bias[:out_channels])
        return conv


class ElasticConv2d(_ElasticConv):
    """``nn.Conv2d`` (groups 1, padding ``k // 2``) over ``weight[:out_channels, :in_channels]`` and the centre
    ``k x k`` of its ``kernel_size x kernel_size`` kernel (any odd ``k`` up to it), and ``bias[:out_channels]``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, bias: bool = True,
                 device=None, dtype=None):
        super().__init__(out_channels, in_channels, kernel_size, stride, bias, device, dtype)
        self.active = self.max_config()

    def max_config(self) -> dict[str, int]:
        out_channels, in_channels, kernel_size, _ = self.weight.shape
        return {"in_channels": in_channels, "out_channels": out_channels, "kernel_size": kernel_size}

    def forward(self, x: Tensor, in_channels: int | None = None, out_channels: int | None = None,
                kernel_size: int | None = None) -> Tensor:
        config = self.resolve(in_channels=in_channels, out_channels=out_channels, kernel_size=kernel_size)
        self.check_channels(x, config["in_channels"], "in_channels")
        return self.conv(x, config["out_channels"], config["kernel_size"], groups=1)

    def extract(self) -> nn.Conv2d:
        return self.extract_conv(self.active["in_channels"], self.active["out_channels"], self.active["kernel_size"], 1)


class ElasticDepthwiseConv2d(_ElasticConv):
    """Depthwise ``nn.Conv2d`` (groups = channels, padding ``k // 2``) over ``weight[:channels]`` (``[C_max, 1, K, K]``)
    and the centre ``k x k`` of its kernel, and ``bias[:channels]``."""

    def __init__(self, channels: int, kernel_size: int = 3, stride: int = 1, bias: bool = False, device=None,
                 dtype=None):
        super().__init__(channels, 1, kernel_size, stride, bias, device, dtype)
        self.active = self.max_config()

    def max_config(self) -> dict[str, int]:
        return {"channels": self.weight.shape[0], "kernel_size": self.weight.shape[-1]}

    def forward(self, x: Tensor, channels: int | None = None, kernel_size: int | None = None) -> Tensor:
        config = self.resolve(channels=channels, kernel_size=kernel_size)
        self.check_channels(x, config["channels"], "channels")
        return self.conv(x, config["channels"], config["kernel_size"], groups=config["channels"])

    def extract(self) -> nn.Conv2d:
        channels = self.active["channels"]
        return self.extract_conv(channels, channels, self.active["kernel_size"], groups=channels)


class ElasticBatchNorm2d(ElasticModule):
    """``nn.BatchNorm2d`` over the first ``num_features`` channels, with running statistics of the super size.

    In training, the batch statistics of the active channels normalise, and only the active channels' running
    statistics are updated (``F.batch_norm`` on views of the buffers); in eval, the active channels' running
    statistics normalise. ``momentum=None`` makes the running statistics a cumulative average, as in torch.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, device=None, dtype=None):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))
        self.register_buffer("running_mean", torch.zeros(num_features, device=device, dtype=dtype))
        self.register_buffer("running_var", torch.ones(num_features, device=device, dtype=dtype))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        self.active = self.max_config()

    def max_config(self) -> dict[str, int]:
        return {"num_features": self.weight.shape[0]}

    def reset_running_stats(self) -> None:
        """Running mean 0, variance 1 and no batches tracked, for every channel (as torch's BatchNorm)."""
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def forward(self, x: Tensor, num_features: int | None = None) -> Tensor:
        channels = self.resolve(num_features=num_features)["num_features"]
        self.check_channels(x, channels, "num_features")
        factor = 0.0
        if self.training:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return F.batch_norm(x, self.running_mean[:channels], self.running_var[:channels], self.weight[:channels],
                            self.bias[:channels], self.training, factor, self.eps)

    def extract(self) -> nn.BatchNorm2d:
        channels = self.active["num_features"]
        norm = empty_module(lambda: nn.BatchNorm2d(channels, eps=self.eps, momentum=self.momentum), self.weight)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(norm, name).copy_(getattr(self, name)[:channels])
            norm.num_batches_tracked.copy_(self.num_batches_tracked)
        return norm


_BATCH_NORMS = (ElasticBatchNorm2d, nn.modules.batchnorm._BatchNorm)


@torch.no_grad()
def recalibrate_batch_norm(model: nn.Module, batches: Iterable, forward: Callable | None = None) -> nn.Module:
    """Re-estimate the running statistics of every BatchNorm in ``model`` (elastic or torch's) for its active subnet.

    The statistics are reset and re-accumulated as a cumulative average (``momentum=None``) over forward passes of
    ``forward(batch)`` (default ``model(batch)``) for each batch of ``batches``, as OFA's
    ``set_running_statistics`` and AttentiveNAS do: afterwards each running mean is the mean of the per-batch means and
    each running variance the mean of the per-batch (unbiased) variances of the subnet's activations. Only the
    BatchNorms run in training mode meanwhile, so dropout and drop-path stay off. The momenta and the train/eval
    mode of every module are restored afterwards; returns ``model``.
    """
    norms = [module for module in model.modules() if isinstance(module, _BATCH_NORMS)]
    modes = [(module, module.training) for module in model.modules()]
    momenta = [norm.momentum for norm in norms]
    try:
        model.eval()
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
            norm.train()
        for batch in batches:
            (model if forward is None else forward)(batch)
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        for module, training in modes:
            module.train(training)
    return model


class ElasticComposite(ElasticModule):
    """An elastic layer made of elastic layers. :meth:`child_configs` says which configuration each child runs for a
    configuration of this layer, so that ``set_active``, ``forward`` and ``extract`` wire the children the same way."""

    def child_configs(self, config: dict[str, int]) -> dict[str, dict[str, int]]:
        """Child name -> its configuration when this layer runs ``config`` (children that are None are left out)."""
        raise NotImplementedError

    def set_active(self, **config: int | None):
        super().set_active(**config)
        for name, child_config in self.child_configs(self.active).items():
            getattr(self, name).set_active(**child_config)
        return self

    def extract_children(self, module: nn.Module) -> nn.Module:
        """Fill the plain ``module`` of the active configuration (built with ``empty_module``) with the children's
        extractions; its ``nn.Identity`` parts stand for what the active configuration does not use."""
        self.set_active()
        for name in self.child_configs(self.active):
            if not isinstance(getattr(module, name), nn.Identity):
                setattr(module, name, getattr(self, name).extract())
        return module


class ElasticSqueezeExcite(ElasticComposite):
    """Squeeze-and-excitation (:class:`elastic_ops.plain_hybrid.SqueezeExcite`) on ``channels`` of the super size.

    The reduced width is ``make_divisible(channels // reduction, divisor)`` of the active channels, as in OFA and
    UniNet (``divisor=1`` is ElasticViT's plain ``channels // reduction``); the reduce and expand convs use the
    leading units ``conv_reduce.weight[:reduced, :channels]`` and ``conv_expand.weight[:channels, :reduced]``.
    """

    def __init__(self, channels: int, reduction: int = 4, divisor: int = 8, device=None, dtype=None):
        super().__init__()
        self.channels, self.reduction, self.divisor = channels, reduction, divisor
        reduced = self.reduced_channels(channels)
        self.conv_reduce = ElasticConv2d(channels, reduced, device=device, dtype=dtype)
        self.conv_expand = ElasticConv2d(reduced, channels, device=device, dtype=dtype)
        self.active = self.max_config()

    def reduced_channels(self, channels: int) -> int:
        return make_divisible(channels // self.reduction, self.divisor)

    def max_config(self) -> dict[str, int]:
        return {"channels": self.channels}

    def child_configs(self, config: dict[str, int]) -> dict[str, dict[str, int]]:
        channels = config["channels"]
        reduced = self.reduced_channels(channels)
        return {"conv_reduce": {"in_channels": channels, "out_channels": reduced},
                "conv_expand": {"in_channels": reduced, "out_channels": channels}}

    def forward(self, x: Tensor, channels: int | None = None) -> Tensor:
        config = self.resolve(channels=channels)
        self.check_channels(x, config["channels"], "channels")
        children = self.child_configs(config)
        squeezed = F.relu(self.conv_reduce(x.mean((2, 3), keepdim=True), **children["conv_reduce"]))
        return x * F.hardsigmoid(self.conv_expand(squeezed, **children["conv_expand"]))

    def extract(self) -> plain_hybrid.SqueezeExcite:
        channels = self.active["channels"]
        return self.extract_children(empty_module(
            lambda: plain_hybrid.SqueezeExcite(channels, self.reduced_channels(channels)), self.conv_reduce.weight))


SHORTCUT_POOLS = ("none", "max", "avg")


class ElasticInvertedResidual(ElasticComposite):
    """MobileNetV2's inverted residual (MBConv, :class:`elastic_ops.plain_hybrid.InvertedResidual`, timm's names) with
    elastic ``in_channels``, ``out_channels``, ``expand_ratio`` and depthwise ``kernel_size``; feature maps in and out.

    The hidden width is ``in_channels * expand_ratio`` of the active configuration. Expansion ratio 1 has no expand
    conv, as in MobileNetV2 and UniNet: a supernet whose largest ratio is above 1 holds ``conv_pw`` and uses it for
    every ratio above 1, and at ratio 1 the depthwise conv reads the block's input directly. So a ratio-1 subnet is
    exactly MobileNetV2's block (not one with an extra square 1x1 conv), at the price that its depthwise conv sees
    unexpanded features through weights trained mostly on expanded ones.

    ``activation``: a name of ``plain.ACTIVATIONS`` (ReLU6 MobileNetV2, Hardswish MobileNetV3/ElasticViT, GELU UniNet,
    SiLU EfficientNet); ``se_reduction``: the :class:`ElasticSqueezeExcite` reduction on the hidden width (0: no SE),
    ``se_divisor`` its rounding; ``input_norm``: UniNet's BatchNorm ``bn_in`` before the expand conv. The residual is
    the identity when the active configuration keeps the shape (stride 1, ``in_channels == out_channels``); otherwise
    ``shortcut_pool`` decides (``"none"``: no residual; ``"max"``: UniNet's max-pool + 1x1 conv with bias; ``"avg"``:
    ElasticViT's average pool + bias-free 1x1 conv), with the 1x1 conv ``shortcut`` elastic over ``in_channels`` and
    ``out_channels``. ``drop_path``: stochastic depth of the residual branch in training.
    """

    def __init__(self, in_channels: int, out_channels: int, expand_ratio: int, kernel_size: int = 3, stride: int = 1,
                 activation: str = "relu6", se_reduction: int = 0, se_divisor: int = 8, input_norm: bool = False,
                 shortcut_pool: str = "none", drop_path: float = 0.0, device=None, dtype=None):
        super().__init__()
        if shortcut_pool not in SHORTCUT_POOLS:
            raise ValueError(f"ElasticInvertedResidual: shortcut_pool must be one of {SHORTCUT_POOLS}, "
                             f"got {shortcut_pool!r}")
        if shortcut_pool == "avg" and stride > 2:
            raise ValueError(f"ElasticInvertedResidual: the 'avg' shortcut pools 2x2, so stride must be 1 or 2, "
                             f"got {stride}")
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"ElasticInvertedResidual: drop_path must be in [0, 1), got {drop_path}")
        factory = dict(device=device, dtype=dtype)
        hidden = in_channels * expand_ratio
        self.in_channels, self.out_channels, self.expand_ratio = in_channels, out_channels, expand_ratio
        self.stride, self.activation, self.input_norm = stride, activation, input_norm
        self.shortcut_pool, self.drop_path = shortcut_pool, drop_path
        self.bn_in = self.conv_pw = self.bn1 = self.se = self.shortcut = None
        if expand_ratio > 1:
            self.bn_in = ElasticBatchNorm2d(in_channels, **factory) if input_norm else None
            self.conv_pw = ElasticConv2d(in_channels, hidden, bias=False, **factory)
            self.bn1 = ElasticBatchNorm2d(hidden, **factory)
        self.act = make_activation(activation)
        self.conv_dw = ElasticDepthwiseConv2d(hidden, kernel_size, stride, **factory)
        self.bn2 = ElasticBatchNorm2d(hidden, **factory)
        if se_reduction:
            self.se = ElasticSqueezeExcite(hidden, se_reduction, se_divisor, **factory)
        self.conv_pwl = ElasticConv2d(hidden, out_channels, bias=False, **factory)
        self.bn3 = ElasticBatchNorm2d(out_channels, **factory)
        if shortcut_pool != "none":
            self.shortcut = ElasticConv2d(in_channels, out_channels, bias=shortcut_pool == "max", **factory)
        self.active = self.max_config()

    def max_config(self) -> dict[str, int]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels, "expand_ratio": self.expand_ratio,
                "kernel_size": self.conv_dw.max_config()["kernel_size"]}

    def resolve(self, **overrides: int | None) -> dict[str, int]:
        config = super().resolve(**overrides)
        check_kernel_size(self, config["kernel_size"])
        return config

    def child_configs(self, config: dict[str, int]) -> dict[str, dict[str, int]]:
        in_channels, out_channels = config["in_channels"], config["out_channels"]
        hidden = in_channels * config["expand_ratio"]
        children = {
            "bn_in": {"num_features": in_channels},
            "conv_pw": {"in_channels": in_channels, "out_channels": hidden},
            "bn1": {"num_features": hidden},
            "conv_dw": {"channels": hidden, "kernel_size": config["kernel_size"]},
            "bn2": {"num_features": hidden},
            "se": {"channels": hidden},
            "conv_pwl": {"in_channels": hidden, "out_channels": out_channels},
            "bn3": {"num_features": out_channels},
            "shortcut": {"in_channels": in_channels, "out_channels": out_channels},
        }
        return {name: child for name, child in children.items() if getattr(self, name) is not None}

    def forward(self, x: Tensor, in_channels: int | None = None, out_channels: int | None = None,
                expand_ratio: int | None = None, kernel_size: int | None = None) -> Tensor:
        config = self.resolve(in_channels=in_channels, out_channels=out_channels, expand_ratio=expand_ratio,
                              kernel_size=kernel_size)
        self.check_channels(x, config["in_channels"], "in_channels")
        children = self.child_configs(config)
        h = x
        if config["expand_ratio"] > 1:
            if self.bn_in is not None:
                h = self.bn_in(h, **children["bn_in"])
            h = self.act(self.bn1(self.conv_pw(h, **children["conv_pw"]), **children["bn1"]))
        h = self.act(self.bn2(self.conv_dw(h, **children["conv_dw"]), **children["bn2"]))
        if self.se is not None:
            h = self.se(h, **children["se"])
        h = self.bn3(self.conv_pwl(h, **children["conv_pwl"]), **children["bn3"])
        shortcut = self._shortcut(x, config, children)
        return h if shortcut is None else shortcut + drop_path(h, self.drop_path, self.training)

    def _shortcut(self, x: Tensor, config: dict[str, int], children: dict[str, dict[str, int]]) -> Tensor | None:
        """What the residual adds to the branch (None: no residual)."""
        same_width = config["in_channels"] == config["out_channels"]
        if self.stride == 1 and same_width:
            return x
        if self.shortcut_pool == "none":
            return None
        if self.shortcut_pool == "max":
            return self.shortcut(plain_hybrid.max_pool(x, self.stride), **children["shortcut"])
        pooled = x if self.stride == 1 else plain_hybrid.avg_pool(x)
        return pooled if same_width else self.shortcut(pooled, **children["shortcut"])

    def extract(self) -> plain_hybrid.InvertedResidual:
        config = self.active
        se_channels = 0 if self.se is None else self.se.reduced_channels(config["in_channels"] * config["expand_ratio"])
        return self.extract_children(empty_module(lambda: plain_hybrid.InvertedResidual(
            config["in_channels"], config["out_channels"], config["expand_ratio"], config["kernel_size"], self.stride,
            self.activation, se_channels, self.input_norm, self.shortcut_pool), self.conv_dw.weight))


class ElasticConvNormAct(ElasticComposite):
    """A conv without bias (``kernel_size``, padding ``kernel_size // 2``, ``stride``), BatchNorm and ``activation``
    (a name of ``plain.ACTIVATIONS``), elastic over its channels: :class:`elastic_ops.plain_hybrid.ConvNormAct`, the
    stem of UniNet and ElasticViT."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 activation: str = "relu", device=None, dtype=None):
        super().__init__()
        self.kernel_size, self.stride, self.activation = kernel_size, stride, activation
        self.conv = ElasticConv2d(in_channels, out_channels, kernel_size, stride, bias=False, device=device,
                                  dtype=dtype)
        self.bn = ElasticBatchNorm2d(out_channels, device=device, dtype=dtype)
        self.act = make_activation(activation)
        self.active = self.max_config()

    def max_config(self) -> dict[str, int]:
        out_channels, in_channels = self.conv.weight.shape[:2]
        return {"in_channels": in_channels, "out_channels": out_channels}

    def child_configs(self, config: dict[str, int]) -> dict[str, dict[str, int]]:
        return {"conv": {**config, "kernel_size": self.kernel_size}, "bn": {"num_features": config["out_channels"]}}

    def forward(self, x: Tensor, in_channels: int | None = None, out_channels: int | None = None) -> Tensor:
        config = self.resolve(in_channels=in_channels, out_channels=out_channels)
        self.check_channels(x, config["in_channels"], "in_channels")
        children = self.child_configs(config)
        return self.act(self.bn(self.conv(x, **children["conv"]), **children["bn"]))

    def extract(self) -> plain_hybrid.ConvNormAct:
        return self.extract_children(empty_module(lambda: plain_hybrid.ConvNormAct(
            self.active["in_channels"], self.active["out_channels"], self.kernel_size, self.stride, self.activation),
            self.conv.weight))


class ElasticClassifierHead(ElasticComposite):
    """The classifier head of a conv network (:class:`elastic_ops.plain_hybrid.ClassifierHead`), elastic over its
    ``in_channels``: a 1x1 conv to ``features`` channels, or with ``expansion`` > 0 to ``expansion * in_channels``
    (ElasticViT's ``classifier_mul``), BatchNorm and the activation, average pooling, the pre-logits layer
    (``pre_logits`` > 0: MobileNetV3, ElasticViT), dropout (in training) and the classifier; feature map in, logits
    out."""

    def __init__(self, in_channels: int, num_classes: int, features: int = 0, expansion: int = 0, pre_logits: int = 0,
                 activation: str = "gelu", dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        if (features > 0) == (expansion > 0):
            raise ValueError(f"ElasticClassifierHead: set one of features and expansion, got {features}, {expansion}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"ElasticClassifierHead: dropout must be in [0, 1), got {dropout}")
        factory = dict(device=device, dtype=dtype)
        self.in_channels, self.fixed_features, self.expansion = in_channels, features, expansion
        self.pre_logits_width, self.activation, self.dropout = pre_logits, activation, dropout
        widest = self.features(in_channels)
        self.conv = ElasticConv2d(in_channels, widest, bias=False, **factory)
        self.bn = ElasticBatchNorm2d(widest, **factory)
        self.act = make_activation(activation)
        self.pre_logits = ElasticLinear(widest, pre_logits, **factory) if pre_logits else None
        self.classifier = ElasticLinear(pre_logits or widest, num_classes, **factory)
        self.active = self.max_config()

    def features(self, in_channels: int) -> int:
        """The conv's width for ``in_channels`` input channels."""
        return self.fixed_features or self.expansion * in_channels

    def max_config(self) -> dict[str, int]:
        return {"in_channels": self.in_channels}

    def child_configs(self, config: dict[str, int]) -> dict[str, dict[str, int]]:
        features = self.features(config["in_channels"])
        children = {"conv": {"in_channels": config["in_channels"], "out_channels": features},
                    "bn": {"num_features": features}, "pre_logits": {"in_features": features},
                    "classifier": {"in_features": self.pre_logits_width or features}}
        return {name: child for name, child in children.items() if getattr(self, name) is not None}

    def forward(self, x: Tensor, in_channels: int | None = None) -> Tensor:
        config = self.resolve(in_channels=in_channels)
        self.check_channels(x, config["in_channels"], "in_channels")
        children = self.child_configs(config)
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

"""Ways in for the hybrid families' weights (re-exported by ``nas.convert``): UniNet's released models
(Sense-X/UniNet ``uninet.py``) and ElasticViT's supernet (microsoft/Moonlit ``ElasticViT/models``).

UniNet (``VisionTransformer`` of ``uninet.py``) numbers its stages' modules one after another in ``blocks``: per stage
its DSM (but the first stage's) and then its blocks. :func:`uninet_module_names` pairs each of those modules with this
library's (``stages.<i>.dsm.<kind>``, ``stages.<i>.blocks.<op>.<j>``); a tensor keeps its own name below its module.
The last 1x1 conv of each conv block (``b2.4``) has a bias that feeds a BatchNorm (``b2.5``): in eval mode
``bn(conv(x) + b)`` is ``bn(conv(x))`` with running mean ``mean - b``, so the bias is folded into the running mean (in
training mode the batch statistics cancel it either way).

ElasticViT (``FusedSuperNet`` of ``models/model.py``, LayerNorm transformers as its released config trains them:
``norm_layer: LN``, ``pre_norm: True``) is the supernet of the ``elasticvit-mobile`` preset, whose stage 0 is its
``conv_stem`` and stages 1-6 its ``feature_exactor`` stages; :func:`elasticvit_module_names` pairs their modules.
Where the layouts differ:

- its attention reads its heads from the qkv output per head (``qkv.view(B, N, heads, -1)``) and its LayerNorms
  (``LNSuper``) normalise each sample over its tokens and channels: the converted space has ``qkv_layout: per_head``
  and ``norm: sample``. Its q, k and v row blocks are ours as they are.
- its ``MobileBlock`` sizes every tensor by the block's output width, also in the first block of a stage and in the
  reduction block that opens a transformer stage, whose input is the previous stage's narrower output; it reads only
  the leading ``in_channels * ratio`` hidden units (and ``in_channels`` input channels), which are ours. The rows
  beyond, which no subnet reads, are left out.
- it holds a shortcut conv in every ``MobileBlock``, which the blocks that keep their shape never read (reported
  redundant), and each attention layer's relative position index as a buffer, which this supernet derives alike
  (checked equal, redundant).
- its head's first linear layer has a bias that feeds a BatchNorm: folded into the running mean, as UniNet's.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from elastic_ops.plain_hybrid import relative_position_index

from ..spaces import load_space
from ..state_dicts import Conversion, load_converted
from .arch import HybridArch, Stage
from .space import HybridSpace
from .supernet import HybridSupernet, HybridSupernetConfig
from .uninet import model_key, uninet_model

# UniNet's modules of each kind and ours, relative to the module (``{r}``: the shortcut conv's index, 1 after a
# max-pool, 0 where the stride is 1 and there is none).
UNINET_CONV_BLOCK = {"residual.1": "shortcut", "b1.0": "bn_in", "b1.1": "conv_pw", "b1.2": "bn1", "b2.0": "conv_dw",
                     "b2.1": "bn2", "b2.3.fc1": "se.conv_reduce", "b2.3.fc2": "se.conv_expand", "b2.4": "conv_pwl",
                     "b2.5": "bn3"}
UNINET_ATTENTION_BLOCK = {"norm1": "norm1", "pos_embed": "pos_embed", "attn.qkv": "attn.qkv", "attn.proj": "attn.proj",
                          "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
UNINET_LAYER_SCALES = {"gamma_1": "ls1.gamma", "gamma_2": "ls2.gamma"}  # parameters of the block itself
UNINET_SEPARABLE = {"0": "conv_dw", "1": "bn", "2": "conv_pw"}  # a DSM's downsample (local) or q (local-global) path
UNINET_GLOBAL_PARTS = ("q_norm", "kv_norm", "kv", "proj")
UNINET_ENDS = {"stem.0": "stem.conv", "stem.1": "stem.bn", "head.0": "head.conv", "head.1": "head.bn",
               "classifier": "head.classifier"}
UNINET_FOLDED = ("b2.4", "b2.5")  # (conv whose bias is folded, the BatchNorm it feeds), in a conv block


def uninet_module_names(arch: HybridArch, strides) -> tuple[dict[str, str], dict[str, str]]:
    """UniNet's module names mapped to ours for the model ``arch`` (stage ``strides``), and the convs whose bias is
    folded mapped to our BatchNorm that takes it."""
    modules, folds = dict(UNINET_ENDS), {}
    index = 0
    for i, (stage, stride) in enumerate(zip(arch.stages, strides)):
        if stage.dsm != "none":
            theirs, ours = f"blocks.{index}", f"stages.{i}.dsm.{stage.dsm}"
            path = "downsample" if stage.dsm == "local" else "q"
            modules[f"{theirs}.residual.{0 if stride == 1 else 1}"] = f"{ours}.shortcut"
            modules.update({f"{theirs}.{path}.{k}": f"{ours}.{path}.{v}" for k, v in UNINET_SEPARABLE.items()})
            if stage.dsm == "local-global":
                modules.update({f"{theirs}.{part}": f"{ours}.{part}" for part in UNINET_GLOBAL_PARTS})
            index += 1
        for j in range(stage.depth):
            theirs, ours = f"blocks.{index}", f"stages.{i}.blocks.{stage.op}.{j}"
            parts = UNINET_CONV_BLOCK if stage.op == "conv" else {**UNINET_ATTENTION_BLOCK, **UNINET_LAYER_SCALES}
            modules.update({f"{theirs}.{k}": f"{ours}.{v}" for k, v in parts.items()})
            if stage.op == "conv":
                conv, norm = UNINET_FOLDED
                folds[f"{theirs}.{conv}"] = f"{ours}.{UNINET_CONV_BLOCK[norm]}"
            index += 1
    return modules, folds


def _renamed(name: str, modules: Mapping[str, str]) -> str | None:
    """``name`` under our module names: its longest module prefix renamed (a parameter of a module's own, such as a
    layer scale, is a module name itself)."""
    if name in modules:
        return modules[name]
    prefix, _, leaf = name.rpartition(".")
    while prefix:
        if prefix in modules:
            return f"{modules[prefix]}.{leaf}"
        prefix, _, rest = prefix.rpartition(".")
        leaf = f"{rest}.{leaf}"
    return None


def _float_dtype(state_dict: Mapping[str, Tensor]) -> torch.dtype:
    """The dtype of the weights (the first floating tensor's): a supernet built in it holds them exactly."""
    return next((t.dtype for t in state_dict.values() if t.is_floating_point()), torch.get_default_dtype())


def from_uninet_state_dict(state_dict: Mapping[str, Tensor], name: str) -> tuple[HybridSupernet, HybridArch]:
    """The supernet of UniNet's released model ``name`` (``B0`` .. ``B6``; ``nas.hybrid.uninet_model``) holding the
    model's weights and BatchNorm statistics in their dtype (its ``state_dict``, or a checkpoint whose ``"model"``
    entry is one), and the model's arch: in eval mode the subnet gives the model's logits. Raises ValueError naming
    unexpected, missing or mis-shaped tensors."""
    conversion = convert_uninet(state_dict, name)
    return conversion.supernet, conversion.arch


def convert_uninet(state_dict: Mapping[str, Tensor], name: str, *, allow_unused: bool = False) -> Conversion:
    """:func:`from_uninet_state_dict` with its :class:`~nas.state_dicts.Conversion` record; ``allow_unused``: tensors
    with no counterpart are left out (listed as unused) rather than refused."""
    state_dict = state_dict.get("model", state_dict)
    space, arch = uninet_model(name)
    modules, folds = uninet_module_names(arch, [stage.stride for stage in space.stages])
    model = HybridSupernet(HybridSupernetConfig(space)).to(_float_dtype(state_dict))
    conversion = Conversion(model, arch)
    converted, biases = {}, {}
    for source, tensor in state_dict.items():
        module, _, leaf = source.rpartition(".")
        if module in folds and leaf == "bias":
            biases[folds[module]] = tensor
            conversion.folded[source] = f"{folds[module]}.running_mean"
            continue
        ours = _renamed(source, modules)
        if ours is None:
            conversion.unused.append(source)
        else:
            converted[ours] = tensor
            conversion.mapped[source] = ours
    for norm, bias in biases.items():
        mean = f"{norm}.running_mean"
        if mean in converted:  # a missing one is reported by load_converted
            converted[mean] = converted[mean] - bias
    load_converted(model, converted, [] if allow_unused else conversion.unused,
                   f"from_uninet_state_dict (UniNet-{model_key(name).upper()})")
    model.set_arch(arch)
    return conversion


# -- ElasticViT ----------------------------------------------------------------------------------------------------

# ElasticViT's modules of each kind and ours, relative to the module.
ELASTICVIT_MOBILE_BLOCK = {"pw_conv": "conv_pw", "pw_bn": "bn1", "dw_conv": "conv_dw", "dw_bn": "bn2",
                           "se_conv1": "se.conv_reduce", "se_conv2": "se.conv_expand", "pwl_conv": "conv_pwl",
                           "pwl_bn": "bn3", "shortcut_conv": "shortcut"}
ELASTICVIT_ATTENTION = {"norm1": "norm1", "qkv": "attn.qkv", "dw_v_conv": "attn.v_conv", "proj": "attn.proj",
                        "attention_bias": "attn.rel_pos_bias.table"}
ELASTICVIT_FFN = {"norm1": "norm2", "fc1": "mlp.fc1", "fc2": "mlp.fc2"}
ELASTICVIT_ENDS = {"first_conv": "stem.conv", "first_conv_bn": "stem.bn", "pre_head_0": "head.conv",
                   "pre_head_norm_0": "head.bn", "pre_head_1": "head.pre_logits", "classifer": "head.classifier"}
ELASTICVIT_FOLDED = ("pre_head_0.bias", "head.bn.running_mean")  # the head's linear bias, the BatchNorm it feeds
# FusedSuperNet.set_arch's parameters, in order: a subnet config's fields
ELASTICVIT_ARCH_FIELDS = ("res", "channels", "depths", "conv_ratio", "kr_size", "mlp_ratio", "num_heads", "window_size",
                          "qk_scale", "v_scale")
ELASTICVIT_SPACE = "elasticvit-mobile"  # the preset of ElasticViT's released supernet (configs/final_3min_space.yaml)


def elasticvit_space(space: HybridSpace | None = None) -> HybridSpace:
    """``space`` (default: the ``elasticvit-mobile`` preset) with ElasticViT's own LayerNorm and qkv layout; raises
    ValueError for a space whose stages ElasticViT's supernet cannot have (each stage one operator, conv stages
    entered by their first block, transformer stages by a reduction block, and its head)."""
    space = load_space(ELASTICVIT_SPACE) if space is None else space
    if not isinstance(space, HybridSpace) or space.style != "elasticvit":
        raise ValueError(f"ElasticViT's supernet is a hybrid space of the elasticvit style, not {space.name!r}")
    entries = {"conv": ("none",), "attention": ("mbconv",)}
    for i, stage in enumerate(space.stages):
        if len(stage.ops) != 1 or entries.get(stage.ops[0]) != stage.dsms:
            raise ValueError(f"space {space.name!r} stage {i}: ElasticViT's stages are conv stages (dsms: [none]) or "
                             f"transformer stages (dsms: [mbconv]), one operator each; got ops {list(stage.ops)}, "
                             f"dsms {list(stage.dsms)}")
    if space.stages[0].ops != ("conv",) or space.stages[0].stride != 1 or space.stem_channels is not None \
            or not space.head_expansion or not space.pre_logits:
        raise ValueError(f"space {space.name!r}: ElasticViT's stage 0 is its conv stem's blocks (conv, stride 1, at "
                         "the stem's width: stem_channels null) and its head widens by head_expansion to pre_logits")
    return dataclasses.replace(space, norm="sample", qkv_layout="per_head")


def elasticvit_module_names(space: HybridSpace) -> tuple[dict[str, str], list[str], dict[str, str]]:
    """ElasticViT's module (or parameter) names mapped to ours for a supernet of ``space``; our modules whose input is
    the previous stage's (ElasticViT sizes them by their output); and ElasticViT's tensors that carry nothing, with
    why."""
    modules, entries, redundant = dict(ELASTICVIT_ENDS), [], {}
    for i, stage in enumerate(space.stages):
        stage_name, op = "conv_stem" if i == 0 else f"feature_exactor.{i - 1}", stage.ops[0]
        for j in range(max(stage.depths)):
            ours = f"stages.{i}.blocks.{op}.{j}"
            if op == "conv":
                theirs = f"{stage_name}.layers.{j}.0"
                modules.update({f"{theirs}.{k}": f"{ours}.{v}" for k, v in ELASTICVIT_MOBILE_BLOCK.items()
                                if j == 0 or k != "shortcut_conv"})
                if j == 0:
                    entries.append(ours)
                else:
                    redundant[f"{theirs}.shortcut_conv.weight"] = "never read: the block keeps its shape"
                continue
            attention, ffn = f"{stage_name}.layers.{2 * j}", f"{stage_name}.layers.{2 * j + 1}"
            modules.update({f"{attention}.{k}": f"{ours}.{v}" for k, v in ELASTICVIT_ATTENTION.items()})
            modules.update({f"{ffn}.{k}": f"{ours}.{v}" for k, v in ELASTICVIT_FFN.items()})
            redundant[f"{attention}.relative_position_index"] = ("derived: the offsets of the largest grid, equal to "
                                                                 "this supernet's")
            if j == 0:
                dsm = f"stages.{i}.dsm.mbconv"
                modules.update({f"{attention}.reduction.{k}": f"{dsm}.{v}" for k, v in ELASTICVIT_MOBILE_BLOCK.items()})
                entries.append(dsm)
    return modules, entries, redundant


def _leading(tensor: Tensor, shape: torch.Size) -> Tensor:
    """The leading ``shape[:2]`` channels of ``tensor`` where it is at least as wide there and alike beyond (a kernel
    is never cut); else ``tensor`` as it is, for ``load_converted`` to report."""
    fits = tensor.dim() == len(shape) and all(a >= b for a, b in zip(tensor.shape[:2], shape[:2])) \
        and tensor.shape[2:] == shape[2:]
    return tensor[tuple(slice(0, n) for n in shape[:2])] if fits else tensor


def _check_position_index(name: str, index: Tensor) -> None:
    side = math.isqrt(math.isqrt(index.numel()))
    if index.shape != (side * side, side * side) or not torch.equal(index, relative_position_index(side, side,
                                                                                                      index.device)):
        raise ValueError(f"from_elasticvit_state_dict: {name!r} is not ElasticViT's relative position index of a "
                         "square grid")


def from_elasticvit_state_dict(state_dict: Mapping[str, Tensor], space: HybridSpace | None = None) -> HybridSupernet:
    """A supernet holding ElasticViT's supernet weights and BatchNorm statistics in their dtype (its ``state_dict``,
    or a checkpoint whose ``"state_dict"`` or ``"model"`` entry is one), of ``space`` (default: ``elasticvit-mobile``,
    the space of its released config) with ElasticViT's LayerNorm and qkv layout: in eval mode every subnet
    (:func:`arch_from_elasticvit`) gives ElasticViT's logits. Raises ValueError naming unexpected, missing or
    mis-shaped tensors."""
    return convert_elasticvit(state_dict, space).supernet


def convert_elasticvit(state_dict: Mapping[str, Tensor], space: HybridSpace | None = None, *,
                       allow_unused: bool = False) -> Conversion:
    """:func:`from_elasticvit_state_dict` with its :class:`~nas.state_dicts.Conversion` record; ``allow_unused``:
    tensors with no counterpart are left out (listed as unused) rather than refused."""
    state_dict = next((state_dict[k] for k in ("state_dict", "model") if isinstance(state_dict.get(k), Mapping)),
                      state_dict)
    space = elasticvit_space(space)
    modules, entries, never_read = elasticvit_module_names(space)
    model = HybridSupernet(HybridSupernetConfig(space)).to(_float_dtype(state_dict))
    target = model.state_dict()
    conversion = Conversion(model)
    converted = {}
    for source, tensor in state_dict.items():
        if source in never_read:
            if source.endswith("relative_position_index"):
                _check_position_index(source, tensor)
            conversion.redundant[source] = never_read[source]
            continue
        if source == ELASTICVIT_FOLDED[0]:
            conversion.folded[source] = ELASTICVIT_FOLDED[1]
            continue
        ours = _renamed(source, modules)
        if ours is None:
            conversion.unused.append(source)
            continue
        if ours == "head.conv.weight":  # a linear layer on tokens is a 1x1 conv on the grid
            tensor = tensor[..., None, None]
        elif ours in target and any(ours.startswith(entry + ".") for entry in entries):
            tensor = _leading(tensor, target[ours].shape)
        converted[ours] = tensor
        conversion.mapped[source] = ours
    bias, mean = ELASTICVIT_FOLDED
    if bias in state_dict and mean in converted:  # a missing one is reported by load_converted
        if state_dict[bias].shape != converted[mean].shape:
            raise ValueError(f"from_elasticvit_state_dict: {bias!r} has shape {tuple(state_dict[bias].shape)}, the "
                             f"running mean it folds into {tuple(converted[mean].shape)}")
        converted[mean] = converted[mean] - state_dict[bias]
    load_converted(model, converted, [] if allow_unused else conversion.unused, "from_elasticvit_state_dict")
    return conversion


def _per_stage(what: str, values: Sequence, depths: Sequence[int]) -> list:
    """ElasticViT's per-layer ``values`` as one value per stage of ``depths`` layers (it samples them per stage)."""
    values = list(values)
    if len(values) != sum(depths):
        raise ValueError(f"arch_from_elasticvit: {what} has {len(values)} values for {sum(depths)} layers")
    per_stage, start = [], 0
    for depth in depths:
        layers = values[start:start + depth]
        if len(set(layers)) != 1:
            raise ValueError(f"arch_from_elasticvit: {what} differs between the layers of one stage ({layers}); "
                             "ElasticViT's supernet samples it per stage")
        per_stage.append(layers[0])
        start += depth
    return per_stage


def _whole(what: str, value) -> int:
    if isinstance(value, bool) or not float(value).is_integer():
        raise ValueError(f"arch_from_elasticvit: {what} {value!r} is not a whole number")
    return int(value)


def arch_from_elasticvit(config: Sequence | Mapping, space: HybridSpace | None = None) -> HybridArch:
    """The arch of an ElasticViT subnet: ``config`` is the tuple its code samples and passes to ``set_arch`` (its
    ``arch_sampling``, its search, the archs in its configs): ``(res, channels, depths, conv_ratio, kr_size, mlp_ratio,
    num_heads, window_size, qk_scale, v_scale)``, or a mapping of ``set_arch``'s parameters by those names; channels
    and depths per stage (the conv stem first), conv ratios and kernel sizes per conv layer (the stem's first) and the
    rest per transformer layer. ``space``: as :func:`from_elasticvit_state_dict`'s. Raises ValueError for a config that
    is not a subnet of the space (heads other than channels // head dim, windows or a qk scale other than 1, values
    that differ within a stage)."""
    space = elasticvit_space(space)
    if isinstance(config, Mapping) and set(config) == set(ELASTICVIT_ARCH_FIELDS):
        config = [config[name] for name in ELASTICVIT_ARCH_FIELDS]
    if isinstance(config, (str, bytes, Mapping)) or not isinstance(config, Sequence) or len(config) != 10:
        raise ValueError("arch_from_elasticvit: expected ElasticViT's arch tuple "
                         f"({', '.join(ELASTICVIT_ARCH_FIELDS)}) or a mapping of those names")
    res, channels, depths, conv_ratio, kr_size, mlp_ratio, num_heads, window_size, qk_scale, v_scale = config
    channels, depths = [_whole("channels", c) for c in channels], [_whole("depths", d) for d in depths]
    if len(channels) != space.num_stages or len(depths) != space.num_stages:
        raise ValueError(f"arch_from_elasticvit: {len(channels)} channels and {len(depths)} depths for the "
                         f"{space.num_stages} stages of space {space.name!r}")
    conv = [i for i, stage in enumerate(space.stages) if stage.ops[0] == "conv"]
    attention = [i for i in range(space.num_stages) if i not in conv]
    conv_depths, attention_depths = [depths[i] for i in conv], [depths[i] for i in attention]
    heads = _per_stage("num_heads", num_heads, attention_depths)
    expected = [channels[i] // space.head_dim for i in attention]
    if heads != expected:
        raise ValueError(f"arch_from_elasticvit: num_heads {heads} per transformer stage, but ElasticViT's heads are "
                         f"channels // head_dim, {expected}")
    for what, values in (("window_size", window_size), ("qk_scale", qk_scale)):
        if any(v != 1 for v in _per_stage(what, values, attention_depths)):
            raise ValueError(f"arch_from_elasticvit: {what} other than 1 (ElasticViT's released space has none)")
    sizes = {i: (_whole("conv_ratio", e), _whole("kr_size", k), 0) for i, e, k in zip(
        conv, _per_stage("conv_ratio", conv_ratio, conv_depths), _per_stage("kr_size", kr_size, conv_depths))}
    sizes.update({i: (_whole("mlp_ratio", e), 0, _whole("v_scale", v)) for i, e, v in zip(
        attention, _per_stage("mlp_ratio", mlp_ratio, attention_depths),
        _per_stage("v_scale", v_scale, attention_depths))})
    stages = tuple(Stage(stage.ops[0], depths[i], channels[i], *sizes[i], dsm=stage.dsms[0])
                   for i, stage in enumerate(space.stages))
    arch = HybridArch(_whole("res", res), stages)
    space.validate(arch)
    return arch


__all__ = ["arch_from_elasticvit", "convert_elasticvit", "convert_uninet", "elasticvit_module_names",
           "elasticvit_space", "from_elasticvit_state_dict", "from_uninet_state_dict", "uninet_module_names"]

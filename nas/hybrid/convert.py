"""Ways in for the hybrid families' weights (re-exported by ``nas.convert``): UniNet's released models
(Sense-X/UniNet ``uninet.py``).

UniNet (``VisionTransformer`` of ``uninet.py``) numbers its stages' modules one after another in ``blocks``: per stage
its DSM (but the first stage's) and then its blocks. :func:`uninet_module_names` pairs each of those modules with this
library's (``stages.<i>.dsm.<kind>``, ``stages.<i>.blocks.<op>.<j>``); a tensor keeps its own name below its module.
The last 1x1 conv of each conv block (``b2.4``) has a bias that feeds a BatchNorm (``b2.5``): in eval mode
``bn(conv(x) + b)`` is ``bn(conv(x))`` with running mean ``mean - b``, so the bias is folded into the running mean (in
training mode the batch statistics cancel it either way).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..state_dicts import load_converted
from .arch import HybridArch
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
    state_dict = state_dict.get("model", state_dict)
    space, arch = uninet_model(name)
    modules, folds = uninet_module_names(arch, [stage.stride for stage in space.stages])
    converted, unexpected, biases = {}, [], {}
    for source, tensor in state_dict.items():
        module, _, leaf = source.rpartition(".")
        if module in folds and leaf == "bias":
            biases[folds[module]] = tensor
            continue
        ours = _renamed(source, modules)
        if ours is None:
            unexpected.append(source)
        else:
            converted[ours] = tensor
    for norm, bias in biases.items():
        mean = f"{norm}.running_mean"
        if mean in converted:  # a missing one is reported by load_converted
            converted[mean] = converted[mean] - bias
    model = HybridSupernet(HybridSupernetConfig(space)).to(_float_dtype(state_dict))
    load_converted(model, converted, unexpected, f"from_uninet_state_dict (UniNet-{model_key(name).upper()})")
    model.set_arch(arch)
    return model, arch


__all__ = ["from_uninet_state_dict", "uninet_module_names"]

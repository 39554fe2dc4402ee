"""Ways in from other code: AutoFormer's supernet checkpoints (both ways), timm VisionTransformer state dicts, and a
timm VisionTransformer in memory; ElasticViT's supernet and UniNet's models (``nas.hybrid.convert``, re-exported here).
``python -m nas.convert`` (``__main__``) writes a converted supernet as a checkpoint; the ``convert_*`` functions
return a :class:`Conversion`, the supernet with the fate of every source tensor.

AutoFormer (microsoft/Cream ``AutoFormer/model``, ``Vision_TransformerSuper`` trained with ``--change_qkv``, as its
released supernets are) names and lays out its weights differently (:data:`AUTOFORMER_NAMES`):

- qkv rows are interleaved per channel: AutoFormer's ``qkv_super`` gathers the q, k, v rows of ``h`` heads as rows
  ``3u, 3u + 1, 3u + 2`` for ``u < h * 64``; here they are blocks (q rows, then k rows, then v rows; DESIGN.md section
  2). :func:`interleaved_to_blocks` and :func:`blocks_to_interleaved` permute the rows.
- its qkv bias is sliced as one leading block, ``bias[:3 * h * 64]``, while the weight rows are gathered: with ``h``
  heads the k and v units ``u`` take ``bias[h * 64 + u]`` and ``bias[2 * h * 64 + u]``. The bias is kept as it is,
  and the supernet reads it where AutoFormer does (the space's ``qkv_bias_layout="autoformer"``), so every subnet,
  fewer heads included, computes AutoFormer's.
- its supernets store weights wider than the search space's largest choices (``SearchSpace.supernet``, the YAML's
  SUPERNET section; the ``autoformer-t/s/b`` presets hold them).
- relative position tables (``rel_pos_embed_{k,v}.embeddings_table_{v,h}``: vertical = rows, horizontal = columns)
  are ``blocks.i.attn.rel_pos.{k,v}_{rows,cols}`` here, indexed alike.
- LayerNorms have torch's default eps 1e-5, and the released models classify the mean of the patch tokens (``--gp``):
  :func:`from_autoformer_state_dict` builds the supernet so by default.

timm: :func:`convert_timm_state_dict` (``nas.vit.supernet.from_timm_state_dict``) maps a state dict by name into a
supernet of a space that gives timm's head count; :func:`convert_timm_vit` swaps a timm ``VisionTransformer``'s
blocks, final norm and head for the elastic layers in place, sharing the parameters (no copy, as Liger-Kernel patches a
model), and returns a supernet built around the same parameters, which runs any subnet of the space the model implies
(:func:`timm_space`). The timm model's own forward keeps working at full width.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from elastic_ops.nn import ElasticBlock, ElasticLayerNorm, ElasticLinear

from ..hybrid.convert import (  # noqa: F401 (re-exported: the hybrid families' converters)
    arch_from_elasticvit,
    convert_elasticvit,
    convert_uninet,
    from_elasticvit_state_dict,
    from_uninet_state_dict,
)
from ..state_dicts import Conversion, load_converted
from ..vit.space import SearchSpace
from ..vit.supernet import LAYER_SCALE_INIT, SupernetConfig, VisionTransformerSupernet

AUTOFORMER_HEAD_DIM = 64  # AutoFormer's qkv_super: sample_q_embed_dim = heads * 64

# AutoFormer's names and this library's: ``{i}`` a block index, ``{p}`` weight or bias.
AUTOFORMER_NAMES = (
    ("patch_embed_super.proj.{p}", "patch_embed.proj.{p}"),
    ("cls_token", "cls_token"),
    ("pos_embed", "pos_embed"),
    ("blocks.{i}.attn_layer_norm.{p}", "blocks.{i}.norm1.{p}"),
    ("blocks.{i}.attn.qkv.{p}", "blocks.{i}.attn.qkv.{p}"),
    ("blocks.{i}.attn.proj.{p}", "blocks.{i}.attn.proj.{p}"),
    ("blocks.{i}.attn.rel_pos_embed_k.embeddings_table_v", "blocks.{i}.attn.rel_pos.k_rows"),
    ("blocks.{i}.attn.rel_pos_embed_k.embeddings_table_h", "blocks.{i}.attn.rel_pos.k_cols"),
    ("blocks.{i}.attn.rel_pos_embed_v.embeddings_table_v", "blocks.{i}.attn.rel_pos.v_rows"),
    ("blocks.{i}.attn.rel_pos_embed_v.embeddings_table_h", "blocks.{i}.attn.rel_pos.v_cols"),
    ("blocks.{i}.ffn_layer_norm.{p}", "blocks.{i}.norm2.{p}"),
    ("blocks.{i}.fc1.{p}", "blocks.{i}.mlp.fc1.{p}"),
    ("blocks.{i}.fc2.{p}", "blocks.{i}.mlp.fc2.{p}"),
    ("norm.{p}", "norm.{p}"),
    ("head.{p}", "head.{p}"),
)


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)"))


def renamed(name: str, autoformer_to_ours: bool = True) -> str | None:
    """``name`` in the other naming (AutoFormer's to this library's, or back), or None where it has no counterpart."""
    for autoformer, ours in AUTOFORMER_NAMES:
        source, target = (autoformer, ours) if autoformer_to_ours else (ours, autoformer)
        match = _pattern(source).fullmatch(name)
        if match:
            return target.format(**match.groupdict())
    return None


def interleaved_to_blocks(rows: Tensor) -> Tensor:
    """AutoFormer's qkv rows (``[3 * W, ...]``, rows ``3u + j`` for channel ``u`` of q, k, v) in the block layout."""
    return rows.reshape(-1, 3, *rows.shape[1:]).transpose(0, 1).reshape(rows.shape)


def blocks_to_interleaved(rows: Tensor) -> Tensor:
    """The inverse of :func:`interleaved_to_blocks`."""
    return rows.reshape(3, -1, *rows.shape[1:]).transpose(0, 1).reshape(rows.shape)


def from_autoformer_state_dict(state_dict: Mapping[str, Tensor], space: SearchSpace, *, global_pool: str = "avg",
                               layer_norm_eps: float = 1e-5) -> VisionTransformerSupernet:
    """A supernet of ``space`` holding an AutoFormer supernet's weights (its ``state_dict``, or a checkpoint whose
    ``"model"`` entry is one); every subnet gives AutoFormer's logits. ``space`` must store AutoFormer's supernet
    sizes (``space.supernet_sizes()``) with head dim 64; it gets AutoFormer's qkv bias layout, ``global_pool`` and
    ``layer_norm_eps`` (its released supernets': ``--gp`` and torch's default), and the relative position distance read
    from the tables, if there are any (``model.config.space`` is the space used). Raises ValueError naming missing,
    unexpected or mis-shaped tensors."""
    return convert_autoformer(state_dict, space, global_pool=global_pool, layer_norm_eps=layer_norm_eps).supernet


def convert_autoformer(state_dict: Mapping[str, Tensor], space: SearchSpace, *, global_pool: str = "avg",
                       layer_norm_eps: float = 1e-5, allow_unused: bool = False) -> Conversion:
    """:func:`from_autoformer_state_dict` with its :class:`Conversion` record; ``allow_unused``: tensors with no
    counterpart are left out (listed as unused) rather than refused."""
    if isinstance(state_dict, Mapping) and isinstance(state_dict.get("model"), Mapping):
        state_dict = state_dict["model"]
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"from_autoformer_state_dict: expected a state dict (a mapping of names to tensors), got "
                         f"{type(state_dict).__name__}")
    for name, tensor in state_dict.items():
        if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
            kind = tensor.dtype if isinstance(tensor, Tensor) else type(tensor).__name__
            raise ValueError(f"from_autoformer_state_dict: {name!r} is {kind}, not a floating-point tensor")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"from_autoformer_state_dict: {name!r} holds NaN or infinite values")
        if "qkv" in str(name) and (tensor.dim() == 0 or tensor.shape[0] % 3):
            raise ValueError(f"from_autoformer_state_dict: {name!r} has shape {tuple(tensor.shape)}, not q, k and v "
                             "rows (a first dimension divisible by 3)")
    if space.head_dim != AUTOFORMER_HEAD_DIM:
        raise ValueError(f"from_autoformer_state_dict: AutoFormer's heads have {AUTOFORMER_HEAD_DIM} channels, the "
                         f"space {space.name!r} {space.head_dim}")
    tables = [t for name, t in state_dict.items() if name.endswith("embeddings_table_v")]
    if tables:
        distance = (tables[0].shape[0] - 2) // 2
        if space.relative_position not in (0, distance):
            raise ValueError(f"from_autoformer_state_dict: the relative position tables reach distance {distance}, "
                             f"the space {space.name!r} {space.relative_position}")
        space = dataclasses.replace(space, relative_position=distance)
    space = dataclasses.replace(space, qkv_bias_layout="autoformer", global_pool=global_pool,
                                layer_norm_eps=layer_norm_eps)
    converted, mapped, unused = {}, {}, []
    for name, tensor in state_dict.items():
        ours = renamed(name)
        if ours is None:
            unused.append(name)
        else:
            mapped[name] = ours
            converted[ours] = interleaved_to_blocks(tensor) if ours.endswith("attn.qkv.weight") else tensor
    model = VisionTransformerSupernet(SupernetConfig.from_space(space))
    load_converted(model, converted, [] if allow_unused else unused, "from_autoformer_state_dict")
    return Conversion(model, mapped=mapped, unused=unused)


def to_autoformer_state_dict(model: VisionTransformerSupernet) -> dict[str, Tensor]:
    """The supernet's weights with AutoFormer's names and layout (they load into AutoFormer's
    ``Vision_TransformerSuper`` with ``change_qkv=True``); the inverse of :func:`from_autoformer_state_dict`. Refused
    for a supernet whose subnets with fewer heads read their q, k, v biases in the block layout, which AutoFormer's
    cannot express."""
    space, config = model.config.space, model.config
    if config.qkv_bias_layout != "autoformer" and (space is None or len(space.num_heads) > 1):
        raise ValueError("to_autoformer_state_dict: the supernet's subnets with fewer heads read their q, k, v biases "
                         "in the block layout, which AutoFormer's qkv bias cannot hold (convert a supernet of a space "
                         "with qkv_bias_layout: autoformer)")
    out = {}
    for name, tensor in model.state_dict().items():
        theirs = renamed(name, autoformer_to_ours=False)
        if theirs is None:
            raise ValueError(f"to_autoformer_state_dict: {name!r} has no AutoFormer counterpart (AutoFormer has one "
                             "patch size and no private class tokens or q/k projections)")
        out[theirs] = blocks_to_interleaved(tensor) if name.endswith("attn.qkv.weight") else tensor.detach()
    return out


# -- timm ----------------------------------------------------------------------------------------------------------

def from_timm_state_dict(state_dict: Mapping[str, Tensor],
                         config: SupernetConfig | SearchSpace) -> VisionTransformerSupernet:
    """A supernet holding a timm VisionTransformer's weights: its largest subnet computes the timm model.

    ``state_dict`` uses timm's names (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.i.*``,
    ``norm``, ``head``); every tensor must have the shape of the supernet's (timm's qkv ``[3 * dim, dim]``
    is the block layout when ``num_heads * head_dim == dim``). With several patch sizes the timm patch
    size is read from its kernel; its position embedding goes to that patch size. Private q/k projections
    of smaller head counts (ViTAS) keep their initialisation; relative position tables (timm has none) are zeroed,
    so that the largest subnet still computes the timm model.
    Layer scale (``blocks.i.ls1.gamma``) gives the supernet layer scale. Raises ValueError listing missing,
    unexpected or mis-shaped tensors, and for a distilled DeiT (:func:`convert_timm_state_dict`).
    """
    return convert_timm_state_dict(state_dict, config).supernet


def convert_timm_state_dict(state_dict: Mapping[str, Tensor], config: SupernetConfig | SearchSpace, *,
                            allow_unused: bool = False) -> Conversion:
    """``nas.vit.supernet.from_timm_state_dict`` with its :class:`Conversion` record. Every timm layout either converts
    exactly or is refused here, before any forward: names and shapes must fit the supernet (the space gives timm's
    head count, which its weights do not record), layer scale is taken, and a distilled DeiT (a distillation token
    and a second head) is refused. ``allow_unused``: tensors with no counterpart are left out (listed as unused)
    rather than refused."""
    distilled = sorted(name for name in state_dict if name == "dist_token" or name.startswith("head_dist."))
    if distilled:
        raise ValueError(f"from_timm_state_dict: a distilled DeiT ({', '.join(distilled)}) reads a distillation token "
                         "through a second head, which this supernet has not; convert its non-distilled sibling")
    config = SupernetConfig.of(config)
    if "blocks.0.ls1.gamma" in state_dict and config.layer_scale is None:
        space = config.space and dataclasses.replace(config.space, layer_scale=True)
        config = dataclasses.replace(config, layer_scale=LAYER_SCALE_INIT, space=space)
    model = VisionTransformerSupernet(config)
    target = model.state_dict()
    if "patch_embed.proj.weight" not in state_dict:
        raise ValueError("from_timm_state_dict: no 'patch_embed.proj.weight'; is this a timm VisionTransformer state "
                         "dict?")
    patch = str(state_dict["patch_embed.proj.weight"].shape[-1])
    renamed = {}
    for name, tensor in state_dict.items():
        prefix = name.split(".")[0]
        if prefix == "patch_embed" and isinstance(model.patch_embed, nn.ModuleDict):
            name = f"patch_embed.{patch}.{name.split('.', 1)[1]}"
        elif name == "cls_token" and isinstance(model.cls_token, nn.ParameterDict):
            name = f"cls_token.{patch}"
        elif name == "pos_embed" and isinstance(model.pos_embed, nn.ParameterDict):
            name = f"pos_embed.{patch}"
        renamed[name] = tensor
    unused = sorted(set(renamed) - set(target))
    unexpected = [] if allow_unused else unused
    shapes = sorted(f"{name}: timm {tuple(t.shape)} vs supernet {tuple(target[name].shape)}"
                    for name, t in renamed.items() if name in target and t.shape != target[name].shape)
    parts = {"patch_embed": model.patch_embed, "cls_token": model.cls_token, "pos_embed": model.pos_embed}
    per_patch = {name for name, part in parts.items() if isinstance(part, (nn.ModuleDict, nn.ParameterDict))}
    # Parts private to the other patch sizes, and the private q/k of smaller head counts, keep their initialisation.
    missing = sorted(name for name in set(target) - set(renamed)
                     if (name.split(".")[0] not in per_patch or name.split(".")[1] == patch)
                     and ".attn.private_qk." not in name and ".attn.rel_pos." not in name)
    if unexpected or shapes or missing:
        problems = [f"unexpected (unsupported timm parts): {unexpected}"] if unexpected else []
        problems += [f"shape mismatch: {shapes}"] if shapes else []
        problems += [f"missing: {missing}"] if missing else []
        raise ValueError("from_timm_state_dict: the state dict does not fit this supernet; " + "; ".join(problems))
    with torch.no_grad():
        for name, tensor in renamed.items():
            if name in target:
                target[name].copy_(tensor)
        for name, tensor in target.items():
            if ".attn.rel_pos." in name:
                tensor.zero_()
    mapped = {source: ours for source, ours in zip(state_dict, renamed) if ours in target}
    return Conversion(model, mapped=mapped, unused=unused)


def timm_space(model: nn.Module, name: str = "timm") -> SearchSpace:
    """The search space a timm ViT implies: its own sizes are the largest choices, and below them AutoFormer-like
    steps: embed dims in steps of the head dim down to half, depths down to half, head counts down to half, and MLP
    ratios of 1/2, 3/4 and all of the model's."""
    sizes = _timm_sizes(model)
    embed, head_dim, depth, heads = sizes["embed_dim"], sizes["head_dim"], sizes["depth"], sizes["num_heads"]
    ratio = sizes["hidden_features"] / embed
    return SearchSpace(name=name, embed_dims=range(embed - head_dim * ((embed // 2) // head_dim), embed + 1, head_dim),
                       depths=range(math.ceil(depth / 2), depth + 1), num_heads=range(math.ceil(heads / 2), heads + 1),
                       mlp_ratios=(ratio / 2, 3 * ratio / 4, ratio), head_dim=head_dim, patch_sizes=(sizes["patch"],),
                       img_size=sizes["img_size"], in_chans=sizes["in_chans"], num_classes=sizes["num_classes"],
                       layer_norm_eps=sizes["eps"], layer_scale=sizes["layer_scale"])


def _is_identity(module: nn.Module | None) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _timm_sizes(model: nn.Module) -> dict:
    """The sizes of a timm VisionTransformer, after checking that it is one this library can run: a class token, no
    register tokens, the class token classified (``global_pool="token"``), no pre-norm or fc-norm, no q/k norm, exact
    GELU MLPs."""
    problems = []
    for part in ("patch_embed", "cls_token", "pos_embed", "blocks", "norm", "head"):
        if getattr(model, part, None) is None:
            problems.append(f"it has no {part}")
    if problems:
        raise ValueError(f"convert_timm_vit: not a timm VisionTransformer with a class token ({'; '.join(problems)})")
    if getattr(model, "global_pool", "token") != "token":
        problems.append(f"global_pool={model.global_pool!r} (only 'token')")
    if getattr(model, "dist_token", None) is not None or getattr(model, "head_dist", None) is not None:
        problems.append("a distillation token and second head (a distilled DeiT)")
    if getattr(model, "reg_token", None) is not None or getattr(model, "no_embed_class", False):
        problems.append("register tokens or a position embedding without the class token")
    if getattr(model, "dynamic_img_size", False):
        problems.append("dynamic_img_size")
    for part in ("norm_pre", "fc_norm"):
        if not _is_identity(getattr(model, part, None)):
            problems.append(f"a {part} layer")
    if not _is_identity(getattr(model.patch_embed, "norm", None)):
        problems.append("a norm in the patch embedding")
    first = model.blocks[0]
    for i, block in enumerate(model.blocks):
        if not all(_is_identity(getattr(block.attn, norm, None)) for norm in ("q_norm", "k_norm")):
            problems.append(f"block {i}: q/k norms")
        act = getattr(block.mlp, "act", None)
        if not (isinstance(act, nn.GELU) and act.approximate == "none"):
            problems.append(f"block {i}: MLP activation {type(act).__name__} (only exact GELU)")
        if type(block.ls1) is not type(first.ls1) or block.attn.num_heads != first.attn.num_heads \
                or block.mlp.fc1.out_features != first.mlp.fc1.out_features:
            problems.append(f"block {i} differs from block 0 in heads, MLP width or layer scale")
    if not isinstance(model.head, nn.Linear):
        problems.append("no classifier (num_classes=0)")
    if problems:
        raise ValueError("convert_timm_vit: unsupported timm ViT: " + "; ".join(problems))
    proj = model.patch_embed.proj
    embed = model.cls_token.shape[-1]
    heads = first.attn.num_heads
    grid = round(math.sqrt(model.pos_embed.shape[1] - 1))
    return {"embed_dim": embed, "depth": len(model.blocks), "num_heads": heads,
            "head_dim": getattr(first.attn, "head_dim", embed // heads), "hidden_features": first.mlp.fc1.out_features,
            "patch": proj.kernel_size[0], "img_size": grid * proj.kernel_size[0], "in_chans": proj.in_channels,
            "num_classes": model.head.out_features, "eps": model.norm.eps, "layer_scale": not _is_identity(first.ls1)}


def _share(target: nn.Module, source: nn.Module, names: tuple[str, ...] = ("weight", "bias")) -> None:
    """``target``'s parameters ``names`` become ``source``'s (the same tensors)."""
    for name in names:
        setattr(target, name, getattr(source, name))


def _elastic_block(block: nn.Module, sizes: dict, space: SearchSpace) -> ElasticBlock:
    """An ElasticBlock holding a timm Block's parameters."""
    attn, mlp = block.attn, block.mlp
    layer_scale = None if _is_identity(block.ls1) else 1.0
    drop = getattr(block, "drop_path1", None)
    with torch.device("meta"):
        elastic = ElasticBlock(sizes["embed_dim"], sizes["num_heads"], sizes["hidden_features"],
                               head_dim=sizes["head_dim"], eps=block.norm1.eps, qkv_bias=attn.qkv.bias is not None,
                               drop_path=getattr(drop, "drop_prob", 0.0), layer_scale=layer_scale)
    _share(elastic.norm1, block.norm1)
    _share(elastic.norm2, block.norm2)
    _share(elastic.attn.qkv, attn.qkv, ("weight",) + (("bias",) if attn.qkv.bias is not None else ()))
    _share(elastic.attn.proj, attn.proj)
    _share(elastic.mlp.fc1, mlp.fc1)
    _share(elastic.mlp.fc2, mlp.fc2)
    if layer_scale is not None:
        _share(elastic.ls1, block.ls1, ("gamma",))
        _share(elastic.ls2, block.ls2, ("gamma",))
    return elastic


@torch.no_grad()
def convert_timm_vit(model: nn.Module, space: SearchSpace | None = None) -> VisionTransformerSupernet:
    """Swap a timm ``VisionTransformer``'s blocks, final norm and head for elastic layers in place, sharing its
    parameters (no copy), and return the supernet of ``space`` (default: :func:`timm_space`) built around the same
    parameters: ``supernet(images, arch)`` runs any subnet, and its largest computes the timm model. The timm model's
    own forward keeps working while the largest subnet is the active one (``supernet.set_arch(space.max_arch())``).
    Raises ValueError for a model or space that does not fit (see :func:`_timm_sizes`)."""
    sizes = _timm_sizes(model)
    space = dataclasses.replace(space or timm_space(model), layer_norm_eps=sizes["eps"],
                                layer_scale=sizes["layer_scale"])
    config = SupernetConfig.from_space(space)
    largest = (config.embed_dim, config.depth, config.num_heads, config.head_dim, config.hidden_features,
               config.patch_sizes, config.img_size, config.in_chans, config.num_classes)
    expected = (sizes["embed_dim"], sizes["depth"], sizes["num_heads"], sizes["head_dim"], sizes["hidden_features"],
                (sizes["patch"],), sizes["img_size"], sizes["in_chans"], sizes["num_classes"])
    if largest != expected or space.relative_position or space.private_qk:
        raise ValueError(f"convert_timm_vit: the largest subnet of space {space.name!r} (embed, depth, heads, head "
                         f"dim, hidden, patch sizes, image, channels, classes {largest}) is not the timm model "
                         f"{expected}, or the space asks for relative position or private q/k projections, which timm "
                         "has not")
    with torch.device("meta"):
        supernet = VisionTransformerSupernet(config)
    for i, block in enumerate(model.blocks):
        model.blocks[i] = _elastic_block(block, sizes, space)
    supernet.blocks = nn.ModuleList(model.blocks)
    with torch.device("meta"):
        norm, head = ElasticLayerNorm(sizes["embed_dim"], eps=sizes["eps"]), ElasticLinear(sizes["embed_dim"],
                                                                                            sizes["num_classes"])
    _share(norm, model.norm)
    _share(head, model.head)
    model.norm, model.head = supernet.norm, supernet.head = norm, head
    supernet.patch_embed.proj = model.patch_embed.proj
    supernet.cls_token, supernet.pos_embed = model.cls_token, model.pos_embed
    left = [name for name, p in supernet.named_parameters() if p.is_meta]
    if left:
        raise AssertionError(f"convert_timm_vit: parameters left unshared: {left}")
    supernet.set_arch(space.max_arch())
    return supernet.train(model.training)

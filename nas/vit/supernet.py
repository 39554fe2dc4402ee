"""The ViT supernet: timm's VisionTransformer built from the elastic layers, running any subnet of its space.

Parameter names follow timm (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.i.norm1``,
``blocks.i.attn.qkv``, ``blocks.i.attn.proj``, ``blocks.i.norm2``, ``blocks.i.mlp.fc1``, ``blocks.i.mlp.fc2``,
``norm``, ``head``), so a timm ViT's state dict converts by name (``nas.convert.from_timm_state_dict``).

Patch sizes: the number of tokens depends on the patch size, so with several patch sizes the position
embedding is one per patch size (``pos_embed.<p>``). The patch embedding and class token are shared,
a smaller patch using the leading ``p x p`` block of the largest kernel, unless the space has private
class tokens (ViTAS): then each patch size has its own (``patch_embed.<p>``, ``cls_token.<p>``).

Private q/k (ViTAS): a space with ``private_qk`` gives every head count its own q and k projections, while
v and the output projection stay shared. The largest head count's are the q and k blocks of the shared
``blocks.i.attn.qkv`` (no smaller head count reads them); each smaller one has ``blocks.i.attn.private_qk.<h>``.
So no weight is dead, and the largest subnet is still a timm ViT.

Attention widths (ViTAS): where the space chooses each layer's q/k/v width as a gene of its own (``Arch.attn_dim``), a
layer reads the leading ``attn_dim`` rows of each of the q, k and v blocks and columns of the output projection, with
``attn_dim // num_heads`` channels a head (``elastic_ops.nn.ElasticAttention``); private q/k projections then hold the
full stored width for every head count, as ViTAS's do.

Two-sided width sharing (BCNet, ViTAS): an arch with ``side="right"`` reads every width (embed dim, heads, MLP
hidden units) from the trailing channels of the super weights, the patch embedding, class token and position
embedding included; the head's classes are always all of them.

Relative position (AutoFormer): ``relative_position > 0`` gives every block's attention the 2D relative position
tables ``blocks.i.attn.rel_pos`` (``elastic_ops.plain.RelativePosition2D``); the absolute position embedding stays,
as in AutoFormer. The tables are indexed by distance, so all patch sizes share them.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from elastic_ops.nn import ElasticBlock, ElasticLayerNorm, ElasticLinear, ElasticPatchEmbed, side_span
from elastic_ops.plain import dense_logits

from .arch import Arch

if TYPE_CHECKING:
    from .space import SearchSpace


GLOBAL_POOLS = ("token", "avg", "dense")
LAYER_SCALE_INIT = 1e-5  # timm's init_values for the ViTs trained with layer scale (DeiT III)


def pool(tokens: Tensor, global_pool: str) -> Tensor:
    """What the head reads from normalised tokens ``[..., N, E]``: the class token, the patch tokens' mean, or
    (``"dense"``) every patch token."""
    if global_pool == "dense":
        return tokens[..., 1:, :]
    return tokens[..., 0, :] if global_pool == "token" else tokens[..., 1:, :].mean(dim=-2)


@dataclass
class SupernetConfig:
    """Sizes of the super weights (``hidden_features``: the widest MLP); ``private_qk_heads``: head counts with their
    own q/k projections (``ElasticAttention``); ``relative_position``: the maximum distance of the 2D relative
    position, 0 for none; ``qkv_bias_layout``: where the q, k, v biases of fewer heads are
    (``elastic_ops.nn.ElasticAttention``); ``layer_scale``: the initial value of each branch's LayerScale (timm's),
    None for none; ``global_pool``: what the classifier reads after the final norm, the class
    token (``"token"``) or the mean of the patch tokens (``"avg"``, AutoFormer's ``--gp``), or, for segmentation
    (``"dense"``, one patch size), every patch token, mapped to the logits of its pixels; ``attn_dim_gene``: the
    attention width is a gene of the archs (``Arch.attn_dim``), so private q/k projections hold ``num_heads * head_dim``
    rows a block for every head count; ``space``, if given, is what :meth:`VisionTransformerSupernet.set_arch`
    validates archs against."""

    img_size: int
    patch_sizes: tuple[int, ...]
    in_chans: int
    num_classes: int
    embed_dim: int
    depth: int
    num_heads: int
    head_dim: int
    hidden_features: int
    private_class_tokens: bool = False
    private_qk_heads: tuple[int, ...] = ()
    relative_position: int = 0
    qkv_bias_layout: str = "blocks"
    layer_scale: float | None = None
    drop_path_rate: float = 0.0
    layer_norm_eps: float = 1e-6
    global_pool: str = "token"
    attn_dim_gene: bool = False
    space: SearchSpace | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.patch_sizes = tuple(sorted(int(p) for p in self.patch_sizes))
        self.private_qk_heads = tuple(sorted({int(h) for h in self.private_qk_heads}))
        if not self.patch_sizes:
            raise ValueError("SupernetConfig: patch_sizes is empty")
        bad = [p for p in self.patch_sizes if self.img_size % p]
        if bad:
            raise ValueError(f"SupernetConfig: img_size {self.img_size} is not a multiple of patch size(s) {bad}")
        if self.private_class_tokens and len(self.patch_sizes) == 1:
            raise ValueError("SupernetConfig: private_class_tokens keeps the tokens of each patch size apart, but "
                             f"there is one patch size, {self.patch_sizes[0]}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"SupernetConfig: drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.global_pool not in GLOBAL_POOLS:
            raise ValueError(f"SupernetConfig: global_pool must be one of {GLOBAL_POOLS}, got {self.global_pool!r}")
        if self.global_pool == "dense" and len(self.patch_sizes) > 1:
            raise ValueError(f"SupernetConfig: a dense head predicts the pixels of one patch size, got "
                             f"{self.patch_sizes}")
        if not isinstance(self.relative_position, int) or isinstance(self.relative_position, bool) \
                or self.relative_position < 0:
            raise ValueError(f"SupernetConfig: relative_position must be an int >= 0 (0: none), "
                             f"got {self.relative_position!r}")

    @classmethod
    def of(cls, config_or_space: "SupernetConfig | SearchSpace") -> "SupernetConfig":
        """``config_or_space`` itself if it is a config, else the config of the supernet of that space."""
        return config_or_space if isinstance(config_or_space, cls) else cls.from_space(config_or_space)

    @classmethod
    def from_space(cls, space: SearchSpace, drop_path_rate: float = 0.0,
                   layer_norm_eps: float | None = None) -> "SupernetConfig":
        """The supernet holding every subnet of ``space``: its stored sizes (``space.supernet_sizes()``), qkv bias
        layout, pooling and LayerNorm eps (unless ``layer_norm_eps`` is given). With ``space.private_qk`` every head
        count but the largest gets private q/k projections (the largest uses the shared qkv's q/k blocks); the relative
        position is ``space.relative_position``, so that ``nas.vit.cost`` counts what the supernet holds."""
        sizes = space.supernet_sizes()
        return cls(
            img_size=space.img_size, patch_sizes=tuple(space.patch_sizes), in_chans=space.in_chans,
            num_classes=space.num_classes, embed_dim=sizes.embed_dim, depth=sizes.depth, num_heads=sizes.num_heads,
            head_dim=space.head_dim, hidden_features=sizes.hidden_features, qkv_bias_layout=space.qkv_bias_layout,
            layer_scale=LAYER_SCALE_INIT if space.layer_scale else None,
            private_class_tokens=bool(space.private_class_tokens),
            private_qk_heads=tuple(space.num_heads[:-1]) if space.private_qk else (),
            relative_position=space.relative_position, drop_path_rate=drop_path_rate,
            layer_norm_eps=space.layer_norm_eps if layer_norm_eps is None else layer_norm_eps,
            global_pool="dense" if space.task == "segmentation" else space.global_pool,
            attn_dim_gene=bool(space.attn_dims), space=space,
        )

    def num_tokens(self, patch_size: int) -> int:
        return (self.img_size // patch_size) ** 2 + 1

    @property
    def head_outputs(self) -> int:
        """Outputs of the head: the classes, or with a dense head the classes of each of a patch's pixels."""
        return self.num_classes * (self.patch_sizes[0] ** 2 if self.global_pool == "dense" else 1)

    def read_out(self, head_outputs: Tensor) -> Tensor:
        """The logits from the head's outputs: as they are, or a dense head's ``[..., N, C * p * p]`` as per-pixel
        logits ``[..., C, H, W]``."""
        if self.global_pool != "dense":
            return head_outputs
        return dense_logits(head_outputs, self.patch_sizes[0], self.num_classes)


class VisionTransformerSupernet(nn.Module):
    """A pre-norm ViT whose active subnet is an :class:`~nas.vit.arch.Arch` (``set_arch`` or ``forward(images, arch)``).

    Layers with ``arch.layer_on[i]`` False are skipped (identity). Drop-path on the residual branches
    rises linearly to ``config.drop_path_rate`` over the layers and acts in training only.
    With gradients off and float32 CPU tensors the elastic ops pick the native kernels by themselves.
    """

    family: ClassVar[str] = "vit"

    def __init__(self, config: SupernetConfig):
        super().__init__()
        self.config = config
        c = config
        multi_patch = len(c.patch_sizes) > 1
        if c.private_class_tokens and multi_patch:
            self.patch_embed = nn.ModuleDict({str(p): ElasticPatchEmbed(p, c.in_chans, c.embed_dim)
                                              for p in c.patch_sizes})
            self.cls_token = nn.ParameterDict({str(p): nn.Parameter(torch.zeros(1, 1, c.embed_dim))
                                               for p in c.patch_sizes})
        else:
            self.patch_embed = ElasticPatchEmbed(max(c.patch_sizes), c.in_chans, c.embed_dim)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        if multi_patch:
            self.pos_embed = nn.ParameterDict({str(p): nn.Parameter(torch.zeros(1, c.num_tokens(p), c.embed_dim))
                                               for p in c.patch_sizes})
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, c.num_tokens(c.patch_sizes[0]), c.embed_dim))
        drop_paths = torch.linspace(0, c.drop_path_rate, c.depth, device="cpu").tolist()  # also under a meta device
        self.blocks = nn.ModuleList([
            ElasticBlock(c.embed_dim, c.num_heads, c.hidden_features, head_dim=c.head_dim, eps=c.layer_norm_eps,
                         drop_path=rate, private_qk_heads=c.private_qk_heads, relative_position=c.relative_position,
                         qkv_bias_layout=c.qkv_bias_layout, layer_scale=c.layer_scale,
                         private_qk_width=c.num_heads * c.head_dim if c.attn_dim_gene else None)
            for rate in drop_paths
        ])
        self.norm = ElasticLayerNorm(c.embed_dim, eps=c.layer_norm_eps)
        self.head = ElasticLinear(c.embed_dim, c.head_outputs)
        self.reset_parameters()
        self.arch: Arch = self.max_arch()
        self.set_arch(self.arch)

    def reset_parameters(self) -> None:
        """timm's ViT initialisation: truncated normal (std 0.02) for linear weights and tokens, zero linear biases;
        LayerNorms at ones and zeros, the patch embedding at torch's Conv2d default; relative position tables
        truncated normal (std 0.02), as AutoFormer."""
        for module in self.modules():
            if isinstance(module, ElasticLinear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for name, param in self.named_parameters():
            if name.startswith(("cls_token", "pos_embed")) or ".attn.rel_pos." in name:
                nn.init.trunc_normal_(param, std=0.02)

    def max_arch(self) -> Arch:
        """The largest subnet: every layer on at full width."""
        c = self.config
        if c.space is not None:
            return c.space.max_arch()
        ratio = c.hidden_features / c.embed_dim
        return Arch(c.embed_dim, (c.num_heads,) * c.depth, (ratio,) * c.depth, (True,) * c.depth,
                    max(c.patch_sizes) if len(c.patch_sizes) > 1 else None)

    def check_arch(self, arch: Arch) -> None:
        """Raise ValueError naming the problem if ``arch`` is not a subnet of this supernet (and of its space)."""
        if not isinstance(arch, Arch):
            raise TypeError(f"VisionTransformerSupernet: arch must be a nas.vit.arch.Arch, got {type(arch).__name__}")
        c = self.config
        if c.space is not None:
            c.space.validate(arch)
        problems = []
        if arch.max_depth != c.depth:
            problems.append(f"it has {arch.max_depth} layers, the supernet {c.depth}")
        if not 1 <= arch.embed_dim <= c.embed_dim:
            problems.append(f"embed_dim {arch.embed_dim} is outside 1..{c.embed_dim}")
        if arch.patch_size is None and len(c.patch_sizes) > 1:
            problems.append(f"patch_size is None but the supernet has several patch sizes {c.patch_sizes}")
        if arch.patch_size is not None and arch.patch_size not in c.patch_sizes:
            problems.append(f"patch_size {arch.patch_size} is not one of {c.patch_sizes}")
        for i, (heads, on) in enumerate(zip(arch.num_heads, arch.layer_on)):
            if on and not 1 <= heads <= c.num_heads:
                problems.append(f"layer {i} has {heads} heads, outside 1..{c.num_heads}")
            width = arch.attention_width(i, c.head_dim)
            if on and arch.attn_dim is not None and not (1 <= width <= c.num_heads * c.head_dim and width % heads == 0):
                problems.append(f"layer {i} has an attention width of {width}, not a multiple of its {heads} heads in "
                                f"1..{c.num_heads * c.head_dim}")
            if on and not 1 <= arch.hidden_features(i) <= c.hidden_features:
                problems.append(f"layer {i} has {arch.hidden_features(i)} MLP hidden units, outside "
                                f"1..{c.hidden_features}")
        if problems:
            raise ValueError(f"VisionTransformerSupernet: arch is not a subnet of this supernet: {'; '.join(problems)}")

    def patch_size(self, arch: Arch) -> int:
        return self.config.patch_sizes[0] if arch.patch_size is None else arch.patch_size

    def set_arch(self, arch: Arch) -> None:
        """Make ``arch`` the active subnet (validated first; a rejected arch changes nothing)."""
        self.check_arch(arch)
        embed_dim, patch = arch.embed_dim, self.patch_size(arch)
        self.token_layers(patch)[0].set_active(embed_dim=embed_dim, patch_size=patch).set_side(embed_dim=arch.side)
        for i, block in enumerate(self.blocks):
            if arch.layer_on[i]:
                block.set_active(embed_dim=embed_dim, num_heads=arch.num_heads[i],
                                 hidden_features=arch.hidden_features(i), attn_dim=self.attn_dim(arch, i))
            block.set_side(arch.side)  # every block: a batched pass after this arch may run those it switched off
        self.norm.set_active(dim=embed_dim).set_side(arch.side)
        self.head.set_active(in_features=embed_dim).set_side(in_features=arch.side)
        self.arch = arch

    @staticmethod
    def attn_dim(arch: Arch, layer: int) -> int | None:
        """The attention width gene of ``layer`` as the blocks take it: None where the width is heads x head dim."""
        return None if arch.attn_dim is None else arch.attn_dim[layer]

    def embed_channels(self, embed_dim: int, side: str = "left") -> slice:
        """The channels of the class token and position embedding that ``embed_dim`` on ``side`` reads."""
        return side_span(embed_dim, self.config.embed_dim, side)

    def token_layers(self, patch_size: int) -> tuple[ElasticPatchEmbed, Tensor, Tensor]:
        """The patch embedding, class token ``[1, 1, E]`` and position embedding ``[1, N, E]`` used with
        ``patch_size``."""
        key = str(patch_size)
        patch_embed = self.patch_embed[key] if isinstance(self.patch_embed, nn.ModuleDict) else self.patch_embed
        cls_token = self.cls_token[key] if isinstance(self.cls_token, nn.ParameterDict) else self.cls_token
        pos_embed = self.pos_embed[key] if isinstance(self.pos_embed, nn.ParameterDict) else self.pos_embed
        return patch_embed, cls_token, pos_embed

    def embed_tokens(self, images: Tensor, embed_dim: int, patch_size: int) -> Tensor:
        """Tokens ``[B, N, embed_dim]`` of ``images``: the class token, then the patches, plus the position embedding.
        A batched pass asks for its widest embed dim once: a narrower subnet's tokens are the leading channels."""
        patch_embed, cls_token, pos_embed = self.token_layers(patch_size)
        x = patch_embed(images, embed_dim=embed_dim, patch_size=patch_size)
        channels = self.embed_channels(embed_dim, patch_embed.side("embed_dim"))
        cls = cls_token[..., channels].to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1) + pos_embed[..., channels].to(x.dtype)

    def forward(self, images: Tensor, arch: Arch | None = None) -> Tensor:
        """Logits ``[B, num_classes]`` (dense: ``[B, num_classes, H, W]``) of the subnet ``arch`` (which becomes the
        active one) or of the active subnet."""
        if arch is not None:
            self.set_arch(arch)
        c, arch = self.config, self.arch
        expected = (c.in_chans, c.img_size, c.img_size)
        if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != expected:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"VisionTransformerSupernet: expected images [batch, {', '.join(map(str, expected))}], "
                             f"got {shape}")
        x = self.embed_tokens(images, arch.embed_dim, self.patch_size(arch))
        for i, (block, on) in enumerate(zip(self.blocks, arch.layer_on)):
            if on:  # sizes passed as arguments: a compiled block traces them as symbols (see compile)
                x = block(x, embed_dim=arch.embed_dim, num_heads=arch.num_heads[i],
                          hidden_features=arch.hidden_features(i), attn_dim=self.attn_dim(arch, i))
        return c.read_out(self.head(pool(self.norm(x), c.global_pool)))

    def compile(self, **options) -> None:
        """``torch.compile`` the transformer blocks (``options`` as torch.compile's), where the time goes.

        The blocks are compiled, not the whole forward: which layers a subnet runs is Python control flow on its
        arch, which a whole-model graph would have to specialise (a recompile per depth pattern), while one block
        graph serves every layer and, once its sizes have changed once and become symbols, every subnet. The token
        embedding, the final norm and the head, a small share of the work, stay eager. ``dynamic`` defaults to True:
        the sizes are symbols from the first trace, so ten subnets of AutoFormer-T run on one block graph (with
        torch's automatic dynamic shapes, each size would first cost a recompile of its own).
        """
        options.setdefault("dynamic", True)
        for block in self.blocks:
            block.compile(**options)

    # --- importance reordering (OFA, SuperSAM) ----------------------------------------------------

    @torch.no_grad()
    def mlp_importance(self, method: str = "magnitude", batches: Iterable | None = None) -> list[Tensor]:
        """Importance of each MLP hidden unit, one tensor ``[hidden_features]`` per layer.

        ``"magnitude"``: L1 norm of the unit's outgoing weights ``fc2.weight[:, j]`` (OFA).
        ``"activation"``: mean absolute GELU output of the unit on ``batches`` (images, or tuples whose
        first item is the images) through the largest subnet, in eval mode.
        """
        if method == "magnitude":
            return [block.mlp.fc2.weight.abs().sum(dim=0) for block in self.blocks]
        if method != "activation":
            raise ValueError(f"mlp_importance: method must be 'magnitude' or 'activation', got {method!r}")
        if batches is None:
            raise ValueError("mlp_importance: method='activation' needs batches of images")
        totals = [torch.zeros(self.config.hidden_features, dtype=torch.float64) for _ in self.blocks]
        counts = [0] * len(self.blocks)

        def record(i: int):
            def hook(module, inputs):
                fc1 = module.fc1
                hidden = F.gelu(F.linear(inputs[0], fc1.weight.to(inputs[0].dtype),
                                         None if fc1.bias is None else fc1.bias.to(inputs[0].dtype)))
                totals[i] += hidden.abs().flatten(0, -2).sum(dim=0).double().cpu()
                counts[i] += hidden[..., 0].numel()
            return hook

        previous, was_training = self.arch, self.training
        handles = [block.mlp.register_forward_pre_hook(record(i)) for i, block in enumerate(self.blocks)]
        try:
            self.eval()
            max_arch = self.max_arch()
            for batch in batches:
                self(batch[0] if isinstance(batch, (tuple, list)) else batch, max_arch)
        finally:
            for handle in handles:
                handle.remove()
            self.train(was_training)
            self.set_arch(previous)
        if min(counts) == 0:
            raise ValueError("mlp_importance: batches was empty (or the largest subnet switches a layer off)")
        return [(total / count).to(block.mlp.fc1.weight.device)
                for total, count, block in zip(totals, counts, self.blocks)]

    @torch.no_grad()
    def reorder_mlp_importance(self, method: str = "magnitude", batches: Iterable | None = None,
                               optimizer: torch.optim.Optimizer | None = None) -> list[Tensor]:
        """Permute the MLP hidden units of every layer, most important first, so that leading slices keep them.

        The permutation is applied consistently to ``fc1`` rows, ``fc1`` bias, ``fc2`` columns, their
        ``.grad`` and, if given, the ``optimizer``'s per-parameter state (e.g. Adam moments): so every
        subnet that uses all hidden units of a layer computes exactly what it did before, and the next
        optimizer step is the same as without reordering. Smaller MLP widths now keep the most important
        units. Returns the permutation of each layer (``new unit j`` = ``old unit perm[j]``).
        """
        permutations = []
        for block, importance in zip(self.blocks, self.mlp_importance(method, batches)):
            perm = torch.argsort(importance, descending=True, stable=True).to(block.mlp.fc1.weight.device)
            mlp = block.mlp
            for param, dim in ((mlp.fc1.weight, 0), (mlp.fc1.bias, 0), (mlp.fc2.weight, 1)):
                if param is None:
                    continue
                tensors = [param, param.grad]
                if optimizer is not None:
                    tensors += [v for v in optimizer.state.get(param, {}).values()
                                if isinstance(v, Tensor) and v.shape == param.shape]
                for tensor in tensors:
                    if tensor is not None:
                        tensor.copy_(tensor.index_select(dim, perm))
            permutations.append(perm)
        return permutations


__all__ = ["SupernetConfig", "VisionTransformerSupernet"]

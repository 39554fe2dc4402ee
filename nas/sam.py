"""SAM's image encoder (Segment Anything, Kirillov et al. 2023) as a supernet: SuperSAM's starting point.

SAM's ``ImageEncoderViT`` differs from a timm ViT in four ways, which :class:`SamEncoderSupernet` keeps:

- no class token, and a 2D absolute position embedding ``[1, g, g, E]`` (here flattened to ``[1, g * g, E]``);
- windowed attention (``window_size``, zero-padded to a multiple as SAM pads) in every layer but the
  ``global_layers``, which attend over the whole ``g x g`` grid;
- the decomposed 2D relative position of every layer (``rel_pos_h``/``rel_pos_w``, ``[2 s - 1, head_dim]``, ``s`` the
  window's or the grid's side), added to the attention logits (``elastic_ops.nn.ElasticAttention``);
- no final norm but a neck: 1x1 conv (no bias) to ``out_chans``, LayerNorm2d, 3x3 conv (no bias), LayerNorm2d; its
  output ``[B, out_chans, g, g]`` is what the encoder returns. With ``num_classes > 0`` a dense head maps each
  position of it to the logits of its ``p x p`` pixels (``[B, num_classes, H, W]``).

Every layer is elastic as in :class:`~nas.vit.supernet.VisionTransformerSupernet` (embed dim, heads, MLP width, and
layers on or off, as SuperSAM drops them), and the MLP importance reordering is the same. :func:`from_sam_state_dict`
converts SAM's weights (``image_encoder.*`` of a SAM checkpoint, or an encoder's own state dict), inferring the
sizes from them; :func:`read_sam_weights` reads a file the user passes (``weights_only=True``; nothing is downloaded).
What this supernet does not do yet: batched evaluation (``nas.vit.batched``), export to ``elastic_ops.plain`` and the
cost model of windowed attention; ``nas.train`` and ``nas.search`` build ViT supernets of their spaces.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from elastic_ops.conv import ElasticConv2d
from elastic_ops.nn import ElasticBlock, ElasticLinear, ElasticPatchEmbed
from elastic_ops.plain import dense_logits

from .checkpoint import read_torch_file
from .convert import load_converted
from .errors import CheckpointError
from .vit.arch import Arch
from .vit.space import SearchSpace
from .vit.supernet import SupernetConfig, VisionTransformerSupernet


@dataclass
class SamEncoderConfig(SupernetConfig):
    """A :class:`SupernetConfig` (one patch size, no class token) plus SAM's window size, global layers and neck."""

    window_size: int = 14
    global_layers: tuple[int, ...] = ()
    out_chans: int = 256

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_sizes[0]

    def num_tokens(self, patch_size: int) -> int:
        return (self.img_size // patch_size) ** 2


class LayerNorm2d(nn.Module):
    """SAM's LayerNorm over the channels of ``[B, C, H, W]``."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.bias, self.eps = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels)), eps

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class SamNeck(nn.Module):
    """SAM's neck on the encoder's ``[B, e, g, g]`` tokens; the first conv reads the active embed dim."""

    def __init__(self, embed_dim: int, out_chans: int):
        super().__init__()
        self.conv1 = ElasticConv2d(embed_dim, out_chans, 1, bias=False)
        self.norm1 = LayerNorm2d(out_chans)
        self.conv2 = ElasticConv2d(out_chans, out_chans, 3, bias=False)
        self.norm2 = LayerNorm2d(out_chans)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm2(self.conv2(self.norm1(self.conv1(x, in_channels=x.shape[1]))))


class SamEncoderSupernet(VisionTransformerSupernet):
    """SAM's image encoder with every subnet of ``config.space`` (see the module's description). Arch handling and
    MLP importance reordering are :class:`VisionTransformerSupernet`'s; the layers, tokens and output are SAM's."""

    def __init__(self, config: SamEncoderConfig):
        nn.Module.__init__(self)
        self.config = c = config
        if len(c.patch_sizes) != 1:
            raise ValueError(f"SamEncoderSupernet: one patch size, got {c.patch_sizes}")
        self.patch_embed = ElasticPatchEmbed(c.patch_sizes[0], c.in_chans, c.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, c.grid * c.grid, c.embed_dim))
        drop_paths = torch.linspace(0, c.drop_path_rate, c.depth, device="cpu").tolist()
        self.blocks = nn.ModuleList([
            ElasticBlock(c.embed_dim, c.num_heads, c.hidden_features, head_dim=c.head_dim, eps=c.layer_norm_eps,
                         drop_path=rate, grid=c.grid, window_size=0 if i in c.global_layers else c.window_size,
                         decomposed_rel_pos=True)
            for i, rate in enumerate(drop_paths)
        ])
        self.neck = SamNeck(c.embed_dim, c.out_chans)
        self.head = ElasticLinear(c.out_chans, c.num_classes * c.patch_sizes[0] ** 2) if c.num_classes else None
        self.reset_parameters()
        self.arch = self.max_arch()
        self.set_arch(self.arch)

    def set_arch(self, arch: Arch) -> None:
        self.check_arch(arch)
        self.patch_embed.set_active(embed_dim=arch.embed_dim)
        for i, block in enumerate(self.blocks):
            if arch.layer_on[i]:
                block.set_active(embed_dim=arch.embed_dim, num_heads=arch.num_heads[i],
                                 hidden_features=arch.hidden_features(i))
        self.arch = arch

    def embed_tokens(self, images: Tensor, embed_dim: int, patch_size: int) -> Tensor:
        """The patch tokens ``[B, g * g, embed_dim]`` plus the position embedding (no class token)."""
        x = self.patch_embed(images, embed_dim=embed_dim, patch_size=patch_size)
        return x + self.pos_embed[..., :embed_dim].to(x.dtype)

    def forward(self, images: Tensor, arch: Arch | None = None) -> Tensor:
        """The neck's features ``[B, out_chans, g, g]`` of the subnet ``arch`` (or the active one); with a dense head
        the per-pixel logits ``[B, num_classes, H, W]``."""
        if arch is not None:
            self.set_arch(arch)
        c, arch = self.config, self.arch
        if not isinstance(images, Tensor) or images.dim() != 4 or tuple(images.shape[1:]) != (c.in_chans, c.img_size,
                                                                                            c.img_size):
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"SamEncoderSupernet: expected images [batch, {c.in_chans}, {c.img_size}, "
                             f"{c.img_size}], got {shape}")
        x = self.embed_tokens(images, arch.embed_dim, c.patch_sizes[0])
        for i, (block, on) in enumerate(zip(self.blocks, arch.layer_on)):
            if on:
                x = block(x, embed_dim=arch.embed_dim, num_heads=arch.num_heads[i],
                          hidden_features=arch.hidden_features(i))
        features = self.neck(x.transpose(1, 2).reshape(x.shape[0], arch.embed_dim, c.grid, c.grid))
        if self.head is None:
            return features
        return dense_logits(self.head(features.flatten(2).transpose(1, 2)), c.patch_sizes[0], c.num_classes)


# -- conversion ------------------------------------------------------------------------------------------------------

SAM_NAMES = (  # SAM's ImageEncoderViT names -> this supernet's; {i} a block, {p} weight or bias
    ("patch_embed.proj.{p}", "patch_embed.proj.{p}"),
    ("blocks.{i}.norm1.{p}", "blocks.{i}.norm1.{p}"),
    ("blocks.{i}.attn.qkv.{p}", "blocks.{i}.attn.qkv.{p}"),  # rows (3, heads, head_dim): the block layout
    ("blocks.{i}.attn.proj.{p}", "blocks.{i}.attn.proj.{p}"),
    ("blocks.{i}.attn.rel_pos_h", "blocks.{i}.attn.rel_pos_h"),
    ("blocks.{i}.attn.rel_pos_w", "blocks.{i}.attn.rel_pos_w"),
    ("blocks.{i}.norm2.{p}", "blocks.{i}.norm2.{p}"),
    ("blocks.{i}.mlp.lin1.{p}", "blocks.{i}.mlp.fc1.{p}"),
    ("blocks.{i}.mlp.lin2.{p}", "blocks.{i}.mlp.fc2.{p}"),
    ("neck.0.weight", "neck.conv1.weight"),
    ("neck.1.{p}", "neck.norm1.{p}"),
    ("neck.2.weight", "neck.conv2.weight"),
    ("neck.3.{p}", "neck.norm2.{p}"),
)


def _renamed(name: str) -> str | None:
    for theirs, ours in SAM_NAMES:
        pattern = re.escape(theirs).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
        match = re.fullmatch(pattern, name)
        if match:
            return ours.format(**match.groupdict())
    return None


def read_sam_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """The image encoder's tensors in a SAM checkpoint (``image_encoder.*``) or an encoder's own state dict, read
    with ``weights_only=True``; a one-line CheckpointError for anything else."""
    path = Path(path)
    state = read_torch_file(path, "SAM weights")
    if not isinstance(state, Mapping):
        raise CheckpointError(f"SAM weights: {str(path)!r} holds a {type(state).__name__}, not a state dict")
    return sam_encoder_state(state, str(path))


def sam_encoder_state(state: Mapping[str, Tensor], source: str = "the state dict") -> dict[str, Tensor]:
    """The encoder's tensors of a whole SAM state dict (``image_encoder.`` stripped) or of an encoder's own."""
    prefix = "image_encoder."
    if any(name.startswith(prefix) for name in state):
        state = {name[len(prefix):]: t for name, t in state.items() if name.startswith(prefix)}
    if "patch_embed.proj.weight" not in state or "pos_embed" not in state:
        raise CheckpointError(f"SAM weights: {source} has no patch_embed.proj.weight and pos_embed; is it SAM's image "
                              "encoder (or a SAM checkpoint)?")
    bad = [name for name, t in state.items() if not isinstance(t, Tensor)
           or (t.is_floating_point() and not torch.isfinite(t).all())]
    if bad:
        raise CheckpointError(f"SAM weights: {source} holds non-tensors or NaN/infinite values in {bad[:3]}")
    return dict(state)


def sam_config(state: Mapping[str, Tensor], layer_norm_eps: float = 1e-6) -> SamEncoderConfig:
    """The encoder's sizes, read from its weights: embed dim, patch size, grid, depth, MLP width, head dim (from the
    relative position tables, which SAM's released encoders have), window size and global layers (the layers whose
    tables span the grid), neck channels."""
    try:
        embed, in_chans, patch, _ = state["patch_embed.proj.weight"].shape
        _, grid, grid_w, _ = state["pos_embed"].shape
        depth = 1 + max(int(m.group(1)) for name in state if (m := re.match(r"blocks\.(\d+)\.", name)))
        hidden = state["blocks.0.mlp.lin1.weight"].shape[0]
        sides = [(state[f"blocks.{i}.attn.rel_pos_h"].shape[0] + 1) // 2 for i in range(depth)]
        head_dim = state["blocks.0.attn.rel_pos_h"].shape[1]
        out_chans = state["neck.0.weight"].shape[0]
    except (KeyError, ValueError, AttributeError) as error:
        raise CheckpointError(f"SAM weights: cannot read the encoder's sizes ({error!r} missing or mis-shaped); SAM "
                              "encoders with relative position (use_rel_pos=True, as released) are supported"
                              ) from error
    if grid != grid_w or embed % head_dim or state["blocks.0.attn.qkv.weight"].shape != (3 * embed, embed):
        raise CheckpointError(f"SAM weights: inconsistent sizes (grid {grid}x{grid_w}, embed {embed}, head dim "
                              f"{head_dim}, qkv {tuple(state['blocks.0.attn.qkv.weight'].shape)})")
    global_layers = tuple(i for i, side in enumerate(sides) if side == grid)
    windows = {side for side in sides if side != grid}
    if len(windows) > 1:
        raise CheckpointError(f"SAM weights: the windowed layers' relative position tables have several sizes "
                              f"{sorted(windows)}")
    heads = embed // head_dim
    space = SearchSpace(
        name="sam", embed_dims=range(embed - head_dim * ((embed // 2) // head_dim), embed + 1, head_dim),
        depths=range(math.ceil(depth / 2), depth + 1), num_heads=range(math.ceil(heads / 2), heads + 1),
        mlp_ratios=(hidden / embed / 2, 3 * hidden / embed / 4, hidden / embed), head_dim=head_dim,
        patch_sizes=(patch,), img_size=grid * patch, in_chans=in_chans, num_classes=0, identity_layers=True)
    return SamEncoderConfig(img_size=grid * patch, patch_sizes=(patch,), in_chans=in_chans, num_classes=0,
                            embed_dim=embed, depth=depth, num_heads=heads, head_dim=head_dim, hidden_features=hidden,
                            layer_norm_eps=layer_norm_eps, space=space, window_size=windows.pop() if windows else 0,
                            global_layers=global_layers, out_chans=out_chans)


@torch.no_grad()
def from_sam_state_dict(state: Mapping[str, Tensor], layer_norm_eps: float = 1e-6) -> SamEncoderSupernet:
    """A supernet holding SAM's image encoder: its largest subnet computes the encoder (``layer_norm_eps``: SAM's
    blocks use 1e-6). Its space (``config.space``, :func:`sam_config`) drops layers and narrows every width down to
    about half. Raises CheckpointError naming missing, unexpected or mis-shaped tensors."""
    state = sam_encoder_state(state)
    model = SamEncoderSupernet(sam_config(state, layer_norm_eps))
    converted, unexpected = {}, []
    for name, tensor in state.items():
        ours = "pos_embed" if name == "pos_embed" else _renamed(name)
        if ours is None:
            unexpected.append(name)
        else:
            converted[ours] = tensor.flatten(1, 2) if name == "pos_embed" else tensor
    load_converted(model, converted, unexpected, "SAM weights", CheckpointError)
    return model.eval()


__all__ = ["LayerNorm2d", "SamEncoderConfig", "SamEncoderSupernet", "SamNeck", "from_sam_state_dict",
           "read_sam_weights", "sam_config", "sam_encoder_state"]

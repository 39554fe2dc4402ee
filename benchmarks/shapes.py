"""Shapes shared by the benchmarks: the AutoFormer supernets (DESIGN.md section 7) and one subnet of each.

Images are 224 px with 16 px patches: 196 patches + the class token = 197 tokens. Head dim is 64.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

BATCH = 128
TOKENS = 197
HEAD_DIM = 64


@dataclass(frozen=True)
class SupernetShape:
    """A supernet's largest sizes and the subnet benchmarked on its weight slices."""

    name: str
    super_embed: int
    embed: int
    super_heads: int
    heads: int
    mlp_ratio: float = 3.5  # the benchmarked subnet's ratio (issue: S at embed 384, 6 heads, ratio 3.5)
    super_mlp_ratio: float = 4.0  # AutoFormer's largest ratio

    @property
    def super_hidden(self) -> int:
        return int(self.super_embed * self.super_mlp_ratio)

    @property
    def hidden(self) -> int:
        return int(self.embed * self.mlp_ratio)


ALL_SHAPES = {
    "T": SupernetShape("T", super_embed=256, embed=192, super_heads=4, heads=3),
    "S": SupernetShape("S", super_embed=448, embed=384, super_heads=7, heads=6),
    "B": SupernetShape("B", super_embed=640, embed=576, super_heads=10, heads=9),
}
# BENCH_SHAPES=S (comma-separated) benchmarks a subset, for a short session on a lent GPU.
SHAPES = {name: ALL_SHAPES[name] for name in os.environ.get("BENCH_SHAPES", "T,S,B").split(",")}

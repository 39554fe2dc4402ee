"""The size table of K subnets run together (DESIGN.md section 3, batched mode)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class GroupSizes:
    """Active size of one elastic dimension for each of K subnets.

    ``values``: host tuple; ``width``: the largest (the padded width of the stacked activations);
    ``table``: int32 tensor ``[K]`` on the device, for grouped kernels.
    """

    def __init__(self, values: Sequence[int], device: torch.device | str):
        values = tuple(int(v) for v in values)
        if not values or min(values) < 1:
            raise ValueError(f"GroupSizes: every subnet needs an active size >= 1, got {values}")
        self._set(values, torch.tensor(values, dtype=torch.int32, device=device))

    @classmethod
    def with_table(cls, values: Sequence[int], table: Tensor) -> "GroupSizes":
        """Sizes whose device table exists already (``table`` holds ``values``): no host-to-device copy."""
        sizes = cls.__new__(cls)
        sizes._set(tuple(int(v) for v in values), table)
        return sizes

    def _set(self, values: tuple[int, ...], table: Tensor) -> None:
        self.values = values
        self.width = max(values)
        self.uniform = min(values) == self.width
        self.table = table
        self._masks: dict[tuple[torch.dtype, int], Tensor] = {}
        self._scaled: dict[int, GroupSizes] = {}

    def __len__(self) -> int:
        return len(self.values)

    def __repr__(self) -> str:
        return f"GroupSizes({list(self.values)})"

    def scaled(self, factor: int) -> "GroupSizes":
        """Sizes in units ``factor`` times smaller: heads -> channels of the attention context."""
        if factor not in self._scaled:
            self._scaled[factor] = GroupSizes([v * factor for v in self.values], self.table.device)
        return self._scaled[factor]

    def mask(self, dtype: torch.dtype, ndim: int) -> Tensor:
        """1 on each subnet's active channels, 0 on its padding; shape ``[K, 1, ..., 1, width]`` (``ndim`` dims)."""
        key = (dtype, ndim)
        if key not in self._masks:
            channels = torch.arange(self.width, device=self.table.device)
            active = (channels[None, :] < self.table[:, None]).to(dtype)
            self._masks[key] = active.view(len(self), *([1] * (ndim - 2)), self.width)
        return self._masks[key]

"""PyramidKV (Cai et al., 2024): SnapKV's scores with pyramidal budgets, lower layers keeping more."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from effivlm.methods.kv.select import pyramid_capacities
from effivlm.methods.kv.snapkv import SnapKV
from effivlm.methods.registry import register_method


@register_method
@dataclass(frozen=True)
class PyramidKV(SnapKV):
    """Layer l keeps window + a linearly decreasing share of the non-window budget: 2 * heavy - heavy / beta in
    the first layer down to heavy / beta in the last, heavy = capacity - window (the mean stays the budget)."""

    beta: float = 20.0

    name: ClassVar[str] = "pyramidkv"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.beta, bool) or not isinstance(self.beta, int | float) or self.beta < 1:
            raise ValueError(f"method '{self.name}': beta must be a number >= 1, got {self.beta!r}")

    def layer_capacities(self, length: int, n_layers: int, sparsity: list[float] | None) -> list[int]:
        capacity = self.capacity(length)
        window = self.window_size(capacity)
        return pyramid_capacities(capacity - window, window, length, n_layers, self.beta)

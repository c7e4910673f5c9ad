"""FastV (Chen et al., 2024): drop the visual tokens that receive the least attention, inside the language model.

Layers before ``layer`` (K, default 2) run on the whole prompt; at layer K, every image segment keeps its
ceil(budget * N) visual tokens that received the most attention in layer K - 1, averaged over heads, and layers
K and later run on the shorter sequence with the kept tokens' original positions. ``ranking`` picks whose
attention counts: ``last`` (the last prompt token's, as the FastV paper) or ``mean`` (the mean over all prompt
tokens, as EffiVLM-Bench). The engine (``effivlm.layer_pruning``) computes only those rows, under sdpa.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from effivlm.methods.base import LayerTokenMethod
from effivlm.methods.registry import register_method

RANKINGS = {"last": "last", "mean": "all"}


@register_method
@dataclass(frozen=True)
class FastV(LayerTokenMethod):
    ranking: str = "mean"

    name: ClassVar[str] = "fastv"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ranking not in RANKINGS:
            raise ValueError(
                f"method 'fastv': ranking must be one of {sorted(RANKINGS)}, got {self.ranking!r}"
            )

    @property
    def score_queries(self) -> str:
        return RANKINGS[self.ranking]

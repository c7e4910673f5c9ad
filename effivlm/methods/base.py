"""Base classes of compression methods.

A method is a frozen dataclass: its fields are its hyperparameters, ``budget`` is the share of the compressed
resource that is kept (visual tokens for token methods). Methods never test model classes; what they need to
know about a backbone comes from its family adapter.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import ClassVar

import torch


def kept_count(budget: float, n: int) -> int:
    """Number of items kept out of ``n`` at keep ratio ``budget``: ceil(budget * n), at least 1.

    The product is rounded to 9 decimals first so that 0.3 * 10 keeps 3, not 4.
    """
    if n <= 0:
        return 0
    return min(n, max(1, math.ceil(round(budget * n, 9))))


@dataclass(frozen=True)
class Method:
    """A compression method. ``kind`` says where it acts: ``none``, ``visual`` (tokens before the LLM), ``layer``
    (visual tokens inside the LLM, from one decoder layer on)."""

    budget: float = 1.0

    name: ClassVar[str] = ""
    kind: ClassVar[str] = "none"
    #: families the method can serve; None means every family.
    families: ClassVar[frozenset[str] | None] = None

    def __post_init__(self) -> None:
        if isinstance(self.budget, bool) or not isinstance(self.budget, int | float):
            raise ValueError(f"method '{self.name}': budget must be a number in (0, 1], got {self.budget!r}")
        if not 0.0 < float(self.budget) <= 1.0:
            raise ValueError(f"method '{self.name}': budget {self.budget} is outside (0, 1]")

    @classmethod
    def params(cls) -> dict[str, type]:
        """Hyperparameters other than the budget, with their types."""
        hints = typing.get_type_hints(cls)
        return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name != "budget"}

    def check_family(self, family: str) -> None:
        if self.families is not None and family not in self.families:
            raise ValueError(
                f"method '{self.name}' cannot serve family '{family}'; it serves: {', '.join(sorted(self.families))}"
            )

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.kind, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class Reduction:
    """What a visual-token method keeps of one image segment.

    ``positions``: indices (sorted, into the segment's N tokens) whose sequence slots the kept tokens occupy, so
    that position ids stay those of the original prompt. ``features``: the kept tokens' embeddings, (k, D); a
    merging method may return features that differ from the originals at those positions.
    """

    positions: torch.Tensor  # (k,) long, sorted
    features: torch.Tensor  # (k, D)


@dataclass(frozen=True)
class SegmentContext:
    """What a visual-token method may know about one image segment (an image, crop or tile)."""

    features: torch.Tensor  # (N, D) projected visual tokens, as they enter the language model
    grid: tuple[int, int] | None  # (rows, cols) of the segment's token grid when it is a full grid
    sample_index: int  # index of the prompt within its own request (not the batch), for seeding
    image_index: int  # image number within the prompt
    segment_index: int  # crop/tile number within the image
    #: attention each token received in the vision encoder's feature layer (its class-token row where the tower
    #: has one, else the mean over all queries), float32 (N,); only for methods with ``needs_vision_attention``
    attention: torch.Tensor | None = None
    #: the tokens' keys in that layer, averaged over heads, float32 (N, d)
    keys: torch.Tensor | None = None


@dataclass(frozen=True)
class VisualTokenMethod(Method):
    """Reduces each image segment's visual tokens before they enter the language model."""

    kind: ClassVar[str] = "visual"
    #: whether ``reduce`` reads ``SegmentContext.attention`` and ``keys`` (recorded during the vision forward)
    needs_vision_attention: ClassVar[bool] = False

    def reduce(self, ctx: SegmentContext) -> Reduction:
        raise NotImplementedError


@dataclass(frozen=True)
class LayerTokenMethod(Method):
    """Drops visual tokens inside the language model: decoder layers before ``layer`` see the whole prompt,
    layers from ``layer`` on see the kept tokens only, ranked by the attention they received in layer
    ``layer - 1``. ``score_queries`` says which queries' attention counts (``all`` or ``last``)."""

    layer: int = 2

    kind: ClassVar[str] = "layer"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 1:
            raise ValueError(f"method '{self.name}': layer must be an integer >= 1, got {self.layer!r}")

    @property
    def score_queries(self) -> str:
        raise NotImplementedError

    def check_depth(self, n_layers: int) -> None:
        """Fail when ``layer`` is not a decoder layer after the first of an ``n_layers``-layer language model."""
        if not 1 <= self.layer <= n_layers - 1:
            raise ValueError(
                f"method '{self.name}': layer {self.layer} is outside [1, {n_layers - 1}] "
                f"for a language model of {n_layers} layers"
            )

    def select(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        """Sorted indices of the ``k`` highest of one segment's ``scores`` (N,)."""
        return torch.topk(scores, k).indices.sort().values

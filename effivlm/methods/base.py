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


def kv_capacity(budget: float, length: int) -> int:
    """Cache entries a layer keeps of an ``length``-token prompt at budget ``budget``: max(1, floor(budget * L)).

    The product is rounded to 9 decimals first so that 0.1 * 30 keeps 3, not 2.
    """
    return min(length, max(1, int(round(budget * length, 9))))


@dataclass(frozen=True)
class KVContext:
    """What a KV-cache method may know of one layer's prompt cache for one sample (padding removed)."""

    keys: torch.Tensor  # (KVH, L, d) post-rope keys, as stored in the cache
    values: torch.Tensor  # (KVH, L, d)
    #: attention each entry received from the method's query rows, summed over them and over each KV head's
    #: group of query heads, float32 (KVH, L); None for methods that need no scores
    scores: torch.Tensor | None
    is_image: torch.Tensor  # (L,) bool: the entry is a visual token
    capacity: int  # entries this layer keeps, window included
    window: int  # most recent entries always kept
    layer_index: int


@dataclass(frozen=True)
class KVSelection:
    """What a KV-cache method keeps of one layer: ``indices`` (KVH, k), sorted per head, into the prompt's L
    entries; a merging method also returns the kept entries' new ``keys`` and ``values`` (KVH, k, d)."""

    indices: torch.Tensor
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None


@dataclass(frozen=True)
class KVCacheMethod(Method):
    """Compresses the prompt's KV cache once, at the end of the prefill; decoding appends to the kept entries.

    ``budget``: share of the prompt's L entries each layer keeps on average (capacity max(1, floor(budget * L)));
    ``window``: share of the capacity given to the most recent entries. ``query_rows`` says whose attention the
    engine sums into ``KVContext.scores``: ``none``, ``all`` (every prompt token), ``window`` (the last
    ``window`` tokens, SnapKV's observation window) or ``post_vision`` (the tokens after the last image token).
    """

    window: float = 0.1

    kind: ClassVar[str] = "kv"
    query_rows: ClassVar[str] = "none"
    #: VL-Cache: the engine also measures each layer's attention sparsity over the query rows, the share of
    #: entries below this fraction of their row's maximum (None: no sparsity)
    sparsity_threshold: ClassVar[float | None] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.window, bool) or not isinstance(self.window, int | float):
            raise ValueError(f"method '{self.name}': window must be a number in [0, 1], got {self.window!r}")
        if not 0.0 <= float(self.window) <= 1.0:
            raise ValueError(
                f"method '{self.name}': window {self.window} is larger than the budget "
                "(it is a share of the budget, in [0, 1])"
                if self.window > 1
                else f"method '{self.name}': window {self.window} is outside [0, 1]"
            )

    def capacity(self, length: int) -> int:
        return kv_capacity(self.budget, length)

    def window_size(self, capacity: int) -> int:
        """Recent entries kept out of ``capacity``: floor(window * capacity), at least one when window > 0."""
        if self.window == 0:
            return 0
        return min(capacity, max(1, int(round(self.window * capacity, 9))))

    def layer_capacities(self, length: int, n_layers: int, sparsity: list[float] | None) -> list[int]:
        """Entries each layer keeps of an ``length``-token prompt (uniform unless a method allocates)."""
        return [self.capacity(length)] * n_layers

    def query_mask(self, is_image: torch.Tensor) -> torch.Tensor | None:
        """Which of one sample's L prompt tokens (``is_image`` (L,) bool) count as queries for the scores."""
        length = is_image.shape[0]
        if self.query_rows == "none":
            return None
        if self.query_rows == "all":
            return torch.ones(length, dtype=torch.bool, device=is_image.device)
        if self.query_rows == "window":
            rows = torch.zeros(length, dtype=torch.bool, device=is_image.device)
            rows[length - max(1, self.window_size(self.capacity(length))) :] = True
            return rows
        if self.query_rows == "post_vision":
            images = is_image.nonzero()
            start = int(images[-1]) + 1 if images.numel() and int(images[-1]) + 1 < length else 0
            rows = torch.zeros(length, dtype=torch.bool, device=is_image.device)
            rows[start:] = True
            return rows
        raise ValueError(f"method '{self.name}': unknown query_rows {self.query_rows!r}")

    def select(self, ctx: KVContext) -> KVSelection:
        raise NotImplementedError

"""LOOK-M (Wan et al., 2024): text-prior KV eviction for multimodal prompts, with merging of what is evicted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from effivlm.methods.base import KVCacheMethod, KVContext, KVSelection
from effivlm.methods.kv.select import MERGES, merge_evicted, text_prior, top_with_window
from effivlm.methods.registry import register_method


@register_method
@dataclass(frozen=True)
class LookM(KVCacheMethod):
    """Each KV head keeps the recent window and capacity - window heavy hitters (attention summed over every
    prompt query), text entries before any image entry. ``merge``: ``none`` drops the evicted entries;
    ``average`` and ``pivotal`` merge each into its most key-similar kept entry (see ``merge_evicted``)."""

    merge: str = "pivotal"

    name: ClassVar[str] = "lookm"
    query_rows: ClassVar[str] = "all"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.merge not in MERGES:
            raise ValueError(
                f"method '{self.name}': unknown merge {self.merge!r}; allowed: {', '.join(MERGES)}"
            )

    def select(self, ctx: KVContext) -> KVSelection:
        assert ctx.scores is not None
        kept = top_with_window(text_prior(ctx.scores, ctx.is_image), ctx.capacity, ctx.window)
        keys, values = merge_evicted(ctx.keys, ctx.values, kept.contiguous(), self.merge)
        return KVSelection(kept, keys, values)

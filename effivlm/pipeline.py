"""The generation engine: a backbone, a compression method and greedy decoding.

Prefill embeds the prompt, scatters every image's visual tokens into it, lets the method reduce each image
segment, and repacks the batch (left padding) keeping every kept token's original position ids, so later layers
and the decode phase see positions consistent with the uncompressed prompt (3-D rope for the Qwen-VL families).
Dense runs the very same path with nothing removed, so a method at budget 1.0 reproduces dense exactly.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from effivlm.attention import (
    head_mean_keys,
    plain_attention,
    probe_attention,
    received_attention,
    received_attention_and_output,
)
from effivlm.backbones.loading import Backbone, load_backbone
from effivlm.kv_cache import KVCompression, entry_bytes
from effivlm.layer_pruning import LayerPruning, SegmentSlots, repack_left
from effivlm.methods import KVCacheMethod, Method, SegmentContext, VisualTokenMethod, build_method
from effivlm.methods.base import LayerTokenMethod


@dataclass(frozen=True)
class Prompt:
    images: list[Any]  # PIL images, in the order they appear in the prompt
    text: str


@dataclass
class Generation:
    text: str
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Prefill:
    """The language model's prefill inputs after the method ran."""

    inputs_embeds: torch.Tensor  # (B, L', D)
    attention_mask: torch.Tensor  # (B, L')
    position_ids: torch.Tensor  # (B, L') or (3, B, L')
    stats: list[dict[str, Any]]
    #: per sample: its image segments' kept visual tokens, in (B, L') coordinates
    segments: list[list[SegmentSlots]]

    def image_mask(self) -> torch.Tensor:
        """(B, L') bool: the prefill entries that are visual tokens."""
        mask = torch.zeros(self.attention_mask.shape, dtype=torch.bool, device=self.attention_mask.device)
        for b, segments in enumerate(self.segments):
            for seg in segments:
                mask[b, seg.slots.to(mask.device)] = True
        return mask


def _compression_summary(metadata: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a compressed checkpoint's metadata says about the whole model (its per-layer figures stay there)."""
    if metadata is None:
        return None
    keys = (
        "weights",
        "method",
        "summary",
        "parameters",
        "dense_parameters",
        "size_bytes",
        "dense_bytes",
    )
    return {key: metadata.get(key) for key in keys}


class Pipeline:
    def __init__(self, backbone: Backbone, method: Method, seed: int = 0) -> None:
        method.check_family(backbone.adapter.family)
        if isinstance(method, LayerTokenMethod):
            method.check_depth(len(backbone.adapter.decoder_layers(backbone.model)))
        self.backbone = backbone
        self.method = method
        self.seed = seed

    @classmethod
    def from_spec(
        cls,
        model_path: str,
        family: str,
        method: str,
        method_params: dict[str, Any] | None = None,
        budget: float = 1.0,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        attn_implementation: str = "sdpa",
        seed: int = 0,
        revision: str | None = None,
    ) -> Pipeline:
        built = build_method(method, budget, method_params)  # fails on bad input before any weight is loaded
        built.check_family(family)
        backbone = load_backbone(
            model_path,
            family,
            dtype=dtype,
            device=device,
            attn_implementation=attn_implementation,
            revision=revision,
        )
        return cls(backbone, built, seed=seed)

    def describe(self) -> dict[str, Any]:
        model = self.backbone.model
        return {
            "model_path": self.backbone.path,
            "family": self.backbone.adapter.family,
            "model_class": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()),
            "attn_implementation": self.backbone.adapter.text_config(model)._attn_implementation,
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "method": self.method.describe(),
            "compression": _compression_summary(self.backbone.compression),
        }

    # ------------------------------------------------------------------ inputs
    def encode(self, prompts: list[Prompt]) -> dict[str, Any]:
        processor = self.backbone.processor
        texts = []
        for p in prompts:
            content = [{"type": "image"} for _ in p.images] + [{"type": "text", "text": p.text}]
            texts.append(
                processor.apply_chat_template(
                    [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
                )
            )
        images = [list(p.images) for p in prompts]
        kwargs: dict[str, Any] = {"text": texts, "padding": True, "return_tensors": "pt"}
        if any(images):
            kwargs["images"] = images
        inputs = dict(processor(**kwargs))
        inputs["batch_num_images"] = torch.tensor([len(p.images) for p in prompts])
        device = self.backbone.device
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    def prefill_inputs(self, inputs: dict[str, Any]) -> Prefill:
        """Embed the prompt, insert visual tokens, apply the method, repack."""
        model, adapter = self.backbone.model, self.backbone.adapter
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        embeds = adapter.input_embeddings(model)(input_ids)  # (B, L, D)
        positions = adapter.position_ids(model, inputs)  # (B, L) or (3, B, L)
        keep = attention_mask.bool().clone()  # (B, L)
        n_images = inputs["batch_num_images"].tolist()
        stats: list[dict[str, Any]] = [{"visual_tokens": [], "visual_kept": []} for _ in n_images]
        kept_slots: list[list[tuple[int, torch.Tensor]]] = [[] for _ in n_images]  # (image, slots) in (B, L)
        if sum(n_images):
            features, signals = self._image_features(inputs)
            is_image = input_ids == adapter.image_token_id(model)  # (B, L)
            image_index = 0
            for b, count in enumerate(n_images):
                slots = is_image[b].nonzero().squeeze(-1)  # sequence positions of this sample's visual tokens
                offset = 0
                for i in range(count):
                    feats = features[image_index].to(embeds.dtype)  # (N_i, D)
                    image_slots = slots[offset : offset + feats.shape[0]]
                    image_signals = signals[image_index] if signals is not None else None
                    image_kept = self._reduce_image(
                        inputs, b, i, image_index, feats, image_signals, image_slots, embeds, keep
                    )
                    kept_slots[b].extend((i, seg_slots) for seg_slots in image_kept)
                    stats[b]["visual_tokens"].append(int(feats.shape[0]))
                    stats[b]["visual_kept"].append(sum(int(s.numel()) for s in image_kept))
                    offset += feats.shape[0]
                    image_index += 1
                if offset != slots.numel():
                    raise RuntimeError(
                        f"sample {b}: {slots.numel()} image tokens but {offset} visual features"
                    )
        rows = [keep[b].nonzero().squeeze(-1) for b in range(keep.shape[0])]
        new_embeds = repack_left([embeds[b, r] for b, r in enumerate(rows)], 0.0)
        new_mask = repack_left([attention_mask[b, r] for b, r in enumerate(rows)], 0)
        if positions.ndim == 3:  # (3, B, L): repack each rope axis
            new_positions = torch.stack(
                [
                    repack_left([positions[a, b, r] for b, r in enumerate(rows)], 1)
                    for a in range(positions.shape[0])
                ]
            )
        else:
            new_positions = repack_left([positions[b, r] for b, r in enumerate(rows)], 1)
        segments: list[list[SegmentSlots]] = []
        for b, r in enumerate(rows):
            stats[b]["prompt_tokens"] = int(attention_mask[b].sum())
            stats[b]["prefill_tokens"] = int(r.numel())
            # where each kept original slot lands after left repacking
            moved = torch.full((keep.shape[1],), -1, dtype=torch.long, device=r.device)
            moved[r] = torch.arange(r.numel(), device=r.device) + (new_mask.shape[1] - r.numel())
            segments.append([SegmentSlots(i, moved[s]) for i, s in kept_slots[b]])
        return Prefill(new_embeds, new_mask, new_positions, stats, segments)

    def _image_features(self, inputs: dict[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Every image's visual tokens, and, for methods that need them, their vision-attention signals (N_i, C):
        channel 0 the attention received in the vision feature layer, the rest the head-averaged keys."""
        model, adapter = self.backbone.model, self.backbone.adapter
        if not (isinstance(self.method, VisualTokenMethod) and self.method.needs_vision_attention):
            return adapter.image_features(model, inputs), None
        recorded: list[torch.Tensor] = []
        queries = "first" if adapter.vision_cls_token else "all"

        def record(module, query, key, value, attention_mask, kwargs) -> torch.Tensor | None:
            output = None
            if queries == "all" and attention_mask is None and plain_attention(kwargs):
                # every query's row is needed: the scoring pass computes the layer's attention output too
                attention, output = received_attention_and_output(
                    query, key, value, causal=False, scaling=kwargs.get("scaling")
                )
            else:
                attention = received_attention(query, key, queries=queries, scaling=kwargs.get("scaling"))
            recorded.append(torch.cat([attention[..., None], head_mean_keys(key)], dim=-1))  # (n, P, 1 + d)
            return output

        with probe_attention([adapter.vision_attention(model)], record):
            features = adapter.image_features(model, inputs)
        return features, adapter.vision_token_signals(model, inputs, recorded)

    def _reduce_image(
        self, inputs, b, i, image_index, feats, signals, image_slots, embeds, keep
    ) -> list[torch.Tensor]:
        """Write image ``i`` of sample ``b`` into ``embeds``; mark dropped slots in ``keep``. Returns the slots
        of each segment's kept tokens."""
        model = self.backbone.model
        segments = self.backbone.adapter.image_segments(model, inputs, image_index, feats.shape[0])
        if not isinstance(self.method, VisualTokenMethod):
            embeds[b, image_slots] = feats
            return [image_slots[seg.start : seg.start + seg.length] for seg in segments]
        kept = []
        keep[b, image_slots] = False
        for s, seg in enumerate(segments):
            part = slice(seg.start, seg.start + seg.length)
            ctx = SegmentContext(
                features=feats[part],
                grid=seg.grid,
                sample_index=b,
                image_index=i,
                segment_index=s,
                attention=signals[part, 0] if signals is not None else None,
                keys=signals[part, 1:] if signals is not None else None,
            )
            red = self.method.reduce(ctx)
            seg_slots = image_slots[seg.start + red.positions.to(image_slots.device)]
            embeds[b, seg_slots] = red.features.to(embeds.dtype)
            keep[b, seg_slots] = True
            kept.append(seg_slots)
        return kept

    # ------------------------------------------------------------------ decoding
    @torch.inference_mode()
    def generate(self, prompts: list[Prompt], max_new_tokens: int = 8) -> list[Generation]:
        if not prompts:
            return []
        model, adapter = self.backbone.model, self.backbone.adapter
        tokenizer = self.backbone.processor.tokenizer
        pre = self.prefill_inputs(self.encode(prompts))
        with ExitStack() as scope:
            pruning = kv = None
            if isinstance(self.method, KVCacheMethod):
                kv = scope.enter_context(
                    KVCompression(
                        adapter.decoder_layers(model),
                        adapter.self_attention,
                        self.method,
                        pre.attention_mask,
                        pre.image_mask(),
                        adapter.text_config(model)._attn_implementation,
                    )
                )
            if isinstance(self.method, LayerTokenMethod):
                pruning = scope.enter_context(
                    LayerPruning(
                        adapter.decoder_layers(model),
                        adapter.self_attention,
                        self.method,
                        pre.attention_mask,
                        pre.segments,
                        adapter.text_config(model)._attn_implementation,
                    )
                )
            tokens, layer_bytes = self._decode(pre, max_new_tokens, pruning, kv)
        eos = tokenizer.eos_token_id
        n_layers = len(adapter.decoder_layers(model))
        results = []
        for b, sample in enumerate(tokens):
            ids = sample[: sample.index(eos)] if eos in sample else sample
            text = tokenizer.decode(ids, skip_special_tokens=True).strip()
            stats = {**pre.stats[b], "new_tokens": len(sample)}
            # what every decoder layer saw: the prompt after the method, or FastV's full-then-short sequence
            if pruning is not None:
                stats["visual_kept"] = pruning.kept[b]
                stats["layer_tokens"] = pruning.layer_tokens(b)
                stats["layer_visual"] = pruning.layer_visual(b)
            else:
                stats["layer_tokens"] = [stats["prefill_tokens"]] * n_layers
                stats["layer_visual"] = [sum(stats["visual_kept"])] * n_layers
            # the prompt's KV cache after the prefill (and compression), against the uncompressed prompt's
            stats["kv_tokens"] = kv.kv_tokens(b) if kv is not None else list(stats["layer_tokens"])
            stats["kv_bytes"] = sum(t * e for t, e in zip(stats["kv_tokens"], layer_bytes, strict=True))
            stats["kv_bytes_dense"] = stats["prompt_tokens"] * sum(layer_bytes)
            results.append(Generation(text=text, stats=stats))
        return results

    def _decode(
        self, pre: Prefill, max_new_tokens: int, pruning: LayerPruning | None, kv: KVCompression | None
    ) -> tuple[list[list[int]], list[int]]:
        """Prefill then greedy decoding: the new tokens of every sample, eos included, and the bytes one prompt
        token takes in each layer's cache."""
        model, adapter = self.backbone.model, self.backbone.adapter
        language_model, lm_head = adapter.language_model(model), adapter.lm_head(model)
        embed = adapter.input_embeddings(model)
        cache = DynamicCache(config=adapter.text_config(model))
        out = language_model(
            inputs_embeds=pre.inputs_embeds,
            attention_mask=pre.attention_mask,
            position_ids=pre.position_ids,
            past_key_values=cache,
            use_cache=True,
        )
        if pruning is not None:
            pruning.finish_prefill()
        mask = pre.attention_mask
        if kv is not None:
            mask = kv.compress(cache)
        layer_bytes = entry_bytes(cache)
        # next position of every sample: one past the largest position of its prompt, on every rope axis
        valid = pre.attention_mask.bool()
        pos = pre.position_ids if pre.position_ids.ndim == 3 else pre.position_ids[None]
        next_pos = pos.masked_fill(~valid[None], -1).amax(dim=(0, 2)) + 1  # (B,)
        eos = self.backbone.processor.tokenizer.eos_token_id
        batch = pre.attention_mask.shape[0]
        tokens: list[list[int]] = [[] for _ in range(batch)]
        done = torch.zeros(batch, dtype=torch.bool, device=mask.device)
        for step in range(max_new_tokens):
            next_token = lm_head(out.last_hidden_state[:, -1]).argmax(-1)  # (B,)
            for b in range(batch):
                if not done[b]:
                    tokens[b].append(int(next_token[b]))
            done |= next_token == eos
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            step_pos = (next_pos + step)[:, None]  # (B, 1)
            if pre.position_ids.ndim == 3:
                step_pos = step_pos[None].expand(pre.position_ids.shape[0], -1, -1)  # (3, B, 1)
            out = language_model(
                inputs_embeds=embed(next_token[:, None]),
                attention_mask=mask,
                position_ids=step_pos,
                past_key_values=cache,
                use_cache=True,
            )
        return tokens, layer_bytes

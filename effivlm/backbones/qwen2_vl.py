"""Qwen2-VL and Qwen2.5-VL: native-resolution ViT with a 2x2 patch merger and 3-D multimodal rope."""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
)
from transformers.vision_utils import get_vision_window_index

from effivlm.backbones.base import (
    FamilyAdapter,
    Segment,
    TinySizes,
    merge_patch_signals,
    qwen2_text_config,
    register_adapter,
)

PATCH = 8
MERGE = 2


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies over (temporal, height, width) like Qwen2-VL's 16/24/24 of 64."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


@register_adapter
class Qwen2VLAdapter(FamilyAdapter):
    family = "qwen2_vl"
    model_class = Qwen2VLForConditionalGeneration
    processor_class = Qwen2VLProcessor
    image_processor_class = Qwen2VLImageProcessor
    image_placeholder = "<|vision_start|><|image_pad|><|vision_end|>"
    special_tokens = {
        "image_token": "<|image_pad|>",
        "video_token": "<|video_pad|>",
        "vision_start_token": "<|vision_start|>",
        "vision_end_token": "<|vision_end|>",
    }

    def vision_tower(self, model):
        return model.model.visual

    def projector(self, model):
        return model.model.visual.merger

    def image_features(self, model, inputs: dict[str, Any]) -> list[torch.Tensor]:
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        return list(out.pooler_output)

    def vision_attention(self, model):
        return model.model.visual.blocks[-1].attn

    def _patch_order(self, model, grid_thw: torch.Tensor) -> torch.Tensor | None:
        """Merge-unit order of the vision blocks' sequence relative to the output's, None when the same."""
        return None

    def vision_token_signals(self, model, inputs: dict[str, Any], patch_signals: list[torch.Tensor]):
        # the attention runs once per image over its patches, ordered so that each 2 x 2 merge group is contiguous
        grid_thw = inputs["image_grid_thw"]
        group = model.config.vision_config.spatial_merge_size**2
        signals = torch.cat([s[0] for s in patch_signals], dim=0)  # (patches, C)
        tokens = merge_patch_signals(signals.reshape(-1, group, signals.shape[-1]))  # (tokens, C)
        order = self._patch_order(model, grid_thw)
        if order is not None:
            tokens = tokens[torch.argsort(order.to(tokens.device))]
        return list(torch.split(tokens, (grid_thw.prod(-1) // group).tolist()))

    def image_segments(self, model, inputs: dict[str, Any], image_index: int, n_tokens: int) -> list[Segment]:
        t, h, w = (int(x) for x in inputs["image_grid_thw"][image_index])
        merge = model.config.vision_config.spatial_merge_size
        return [Segment(0, n_tokens, (t * h // merge, w // merge))]

    def position_ids(self, model, inputs: dict[str, Any]) -> torch.Tensor:
        position_ids, _ = model.model.get_rope_index(
            inputs["input_ids"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs.get("image_grid_thw"),
            attention_mask=inputs["attention_mask"],
        )
        return position_ids  # (3, B, L): temporal, height, width

    def _text_config(self, vocab_size, token_ids, sizes: TinySizes) -> dict:
        head_dim = sizes.text_hidden // sizes.text_heads
        return {
            **qwen2_text_config(vocab_size, token_ids, sizes),
            "rope_scaling": {"type": "mrope", "mrope_section": _mrope_section(head_dim)},
        }

    def _token_config(self, token_ids) -> dict:
        return dict(
            image_token_id=token_ids["<|image_pad|>"],
            video_token_id=token_ids["<|video_pad|>"],
            vision_start_token_id=token_ids["<|vision_start|>"],
            vision_end_token_id=token_ids["<|vision_end|>"],
            tie_word_embeddings=False,
        )

    def tiny_config(self, vocab_size, token_ids, image_size, sizes: TinySizes):
        return Qwen2VLConfig(
            text_config=self._text_config(vocab_size, token_ids, sizes),
            vision_config=dict(
                depth=sizes.vision_layers,
                embed_dim=sizes.vision_hidden,
                hidden_size=sizes.text_hidden,
                num_heads=sizes.vision_heads,
                mlp_ratio=sizes.vision_intermediate // sizes.vision_hidden,
                patch_size=PATCH,
                spatial_merge_size=MERGE,
                temporal_patch_size=2,
                in_channels=3,
            ),
            **self._token_config(token_ids),
        )

    def tiny_image_processor(self, image_size: int):
        pixels = image_size * image_size
        return Qwen2VLImageProcessor(
            min_pixels=pixels, max_pixels=pixels, patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2
        )


@register_adapter
class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    model_class = Qwen2_5_VLForConditionalGeneration
    processor_class = Qwen2_5_VLProcessor

    def vision_attention(self, model):
        visual = model.model.visual
        last = len(visual.blocks) - 1
        if last not in visual.fullatt_block_indexes:
            raise ValueError(
                f"the last vision block ({last}) uses window attention; VisionZip scores need a full one"
            )
        return visual.blocks[last].attn

    def _patch_order(self, model, grid_thw: torch.Tensor) -> torch.Tensor:
        # Qwen2.5-VL runs its blocks over merge units sorted by attention window, and undoes it after the merger
        visual = model.model.visual
        window_index, _ = get_vision_window_index(
            grid_thw,
            spatial_merge_size=visual.spatial_merge_size,
            window_size=visual.window_size,
            patch_size=visual.patch_size,
        )
        return window_index

    def tiny_config(self, vocab_size, token_ids, image_size, sizes: TinySizes):
        return Qwen2_5_VLConfig(
            text_config=self._text_config(vocab_size, token_ids, sizes),
            vision_config=dict(
                depth=sizes.vision_layers,
                hidden_size=sizes.vision_hidden,
                intermediate_size=sizes.vision_intermediate,
                out_hidden_size=sizes.text_hidden,
                num_heads=sizes.vision_heads,
                patch_size=PATCH,
                spatial_merge_size=MERGE,
                temporal_patch_size=2,
                window_size=PATCH * MERGE * 2,
                fullatt_block_indexes=[sizes.vision_layers - 1],
                in_channels=3,
            ),
            **self._token_config(token_ids),
        )

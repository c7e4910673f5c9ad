"""InternVL (transformers-native, "-hf" checkpoints): InternViT, pixel-shuffle MLP projector, Qwen2 LLM, tiles."""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import (
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
)

from effivlm.backbones.base import (
    FamilyAdapter,
    Segment,
    TinySizes,
    contiguous_runs,
    feature_layer_index,
    merge_patch_signals,
    qwen2_text_config,
    register_adapter,
)

PATCH = 8


@register_adapter
class InternVLAdapter(FamilyAdapter):
    family = "internvl"
    model_class = InternVLForConditionalGeneration
    processor_class = InternVLProcessor
    image_processor_class = GotOcr2ImageProcessor
    image_placeholder = "<IMG_CONTEXT>\n"
    special_tokens = {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    }

    def vision_tower(self, model):
        return model.model.vision_tower

    def projector(self, model):
        return model.model.multi_modal_projector

    def tokens_per_tile(self, model) -> int:
        cfg = model.config
        side = cfg.vision_config.image_size[0] // cfg.vision_config.patch_size[0]
        return int(side * cfg.downsample_ratio) ** 2  # pixel shuffle folds 2x2 patches into one token

    def image_features(self, model, inputs: dict[str, Any]) -> list[torch.Tensor]:
        cfg = model.config
        tiles = model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
        ).pooler_output  # (num_tiles, tokens_per_tile, D)
        return self._per_image(model, inputs, tiles)

    def _per_image(self, model, inputs: dict[str, Any], tiles: torch.Tensor) -> list[torch.Tensor]:
        """(tiles, tokens per tile, ...) -> one (tokens, ...) tensor per image.

        The processor does not return tiles per image; each image is one run of context tokens between
        <img> and </img>, so the runs' lengths give them.
        """
        is_image = inputs["input_ids"] == self.image_token_id(model)
        per_image = [n // tiles.shape[1] for row in is_image for n in contiguous_runs(row)]
        return [t.flatten(0, 1) for t in torch.split(tiles, per_image)]

    vision_cls_token = True

    def vision_attention(self, model):
        layers = model.model.vision_tower.encoder.layer
        return layers[feature_layer_index(model.config.vision_feature_layer, len(layers))].attention

    def vision_token_signals(self, model, inputs: dict[str, Any], patch_signals: list[torch.Tensor]):
        # the same class-token drop and pixel shuffle as get_image_features: a token's 4C channels are the C
        # channels of its 2 x 2 patches, one after the other
        signals = torch.cat(patch_signals, dim=0)[:, 1:]  # (tiles, P, C)
        tiles, patches, channels = signals.shape
        side = math.isqrt(patches)
        shuffled = model.model.pixel_shuffle(
            signals.reshape(tiles, side, side, channels), scale_factor=model.config.downsample_ratio
        )
        group = shuffled.shape[-1] // channels
        per_tile = merge_patch_signals(shuffled.reshape(tiles, -1, group, channels))  # (tiles, N_tile, C)
        return self._per_image(model, inputs, per_tile)

    def image_segments(self, model, inputs: dict[str, Any], image_index: int, n_tokens: int) -> list[Segment]:
        per_tile = self.tokens_per_tile(model)
        side = math.isqrt(per_tile)
        grid = (side, side) if side * side == per_tile else None
        return [Segment(start, per_tile, grid) for start in range(0, n_tokens, per_tile)]

    def tiny_config(self, vocab_size, token_ids, image_size, sizes: TinySizes):
        return InternVLConfig(
            text_config={"model_type": "qwen2", **qwen2_text_config(vocab_size, token_ids, sizes)},
            vision_config=dict(
                hidden_size=sizes.vision_hidden,
                intermediate_size=sizes.vision_intermediate,
                num_hidden_layers=sizes.vision_layers,
                num_attention_heads=sizes.vision_heads,
                image_size=[image_size, image_size],
                patch_size=[PATCH, PATCH],
            ),
            image_token_id=token_ids["<IMG_CONTEXT>"],
            downsample_ratio=0.5,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            tie_word_embeddings=False,
        )

    def tiny_image_processor(self, image_size: int):
        return GotOcr2ImageProcessor(
            size={"height": image_size, "width": image_size}, crop_to_patches=False, max_patches=1
        )

    def tiny_processor_kwargs(self, image_size: int, sizes: TinySizes) -> dict[str, Any]:
        return {"image_seq_length": (image_size // PATCH) ** 2 // 4}

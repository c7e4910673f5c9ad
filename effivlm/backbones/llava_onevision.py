"""LLaVA-OneVision: SigLIP tower, 2-layer MLP projector, Qwen2 language model, AnyRes crops with newline tokens."""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
)
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

from effivlm.backbones.base import (
    FamilyAdapter,
    Segment,
    TinySizes,
    feature_layer_index,
    qwen2_text_config,
    register_adapter,
)


@register_adapter
class LlavaOnevisionAdapter(FamilyAdapter):
    family = "llava_onevision"
    model_class = LlavaOnevisionForConditionalGeneration
    processor_class = LlavaOnevisionProcessor
    image_processor_class = LlavaOnevisionImageProcessor
    image_placeholder = "<image>\n"
    special_tokens = {"image_token": "<image>", "video_token": "<video>"}
    # AnyRes crops only single-image prompts; the forward needs the images per prompt to tell
    forward_takes_batch_num_images = True

    def vision_tower(self, model):
        return model.model.vision_tower

    def projector(self, model):
        return model.model.multi_modal_projector

    def image_features(self, model, inputs: dict[str, Any]) -> list[torch.Tensor]:
        cfg = model.config
        image_sizes = inputs["image_sizes"]
        # One image per prompt gets AnyRes crops; prompts with several images use the base view only.
        batch_num_images = inputs.get("batch_num_images")
        out = model.model.get_image_features(
            pixel_values=inputs["pixel_values"],
            image_sizes=image_sizes,
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            vision_aspect_ratio=cfg.vision_aspect_ratio,
            batch_num_images=batch_num_images,
        )
        return list(out.pooler_output)

    def vision_attention(self, model):
        tower = model.model.vision_tower
        layers = getattr(tower, "vision_model", tower).encoder.layers
        return layers[feature_layer_index(model.config.vision_feature_layer, len(layers))].self_attn

    def vision_token_signals(self, model, inputs: dict[str, Any], patch_signals: list[torch.Tensor]):
        # the same crop split and AnyRes packing as get_image_features, applied to the signals; the newline
        # tokens closing each row of crops get zeros
        cfg = model.config
        signals = torch.cat(patch_signals, dim=0)  # (crops, P, C)
        if cfg.vision_feature_select_strategy == "default":
            signals = signals[:, 1:]
        need_crops = [n == 1 for n in inputs["batch_num_images"].tolist() for _ in range(n)]
        crops = [
            image_size_to_num_patches(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            if crop
            else 1
            for size, crop in zip(inputs["image_sizes"], need_crops, strict=True)
        ]
        packed, _ = model.model.pack_image_features(
            torch.split(signals, crops),
            inputs["image_sizes"],
            image_newline=signals.new_zeros(signals.shape[-1]),
            vision_aspect_ratio=cfg.vision_aspect_ratio,
        )
        return list(packed)

    def base_tokens(self, model_or_config) -> int:
        cfg = getattr(model_or_config, "config", model_or_config)
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        return side * side - (1 if cfg.vision_feature_select_strategy == "default" else 0)

    def image_segments(self, model, inputs: dict[str, Any], image_index: int, n_tokens: int) -> list[Segment]:
        # pack_image_features puts the base (resized whole image) view first, then the AnyRes crops unpadded
        # into one grid with a newline token closing each row.
        base = self.base_tokens(model)
        side = math.isqrt(base)
        grid = (side, side) if side * side == base else None
        if n_tokens <= base:
            return [Segment(0, n_tokens, grid)]
        return [Segment(0, base, grid), Segment(base, n_tokens - base, None)]

    def tiny_config(self, vocab_size, token_ids, image_size, sizes: TinySizes):
        patch = 16
        return LlavaOnevisionConfig(
            text_config={"model_type": "qwen2", **qwen2_text_config(vocab_size, token_ids, sizes)},
            vision_config=dict(
                model_type="siglip_vision_model",
                hidden_size=sizes.vision_hidden,
                intermediate_size=sizes.vision_intermediate,
                num_hidden_layers=sizes.vision_layers,
                num_attention_heads=sizes.vision_heads,
                image_size=image_size,
                patch_size=patch,
            ),
            image_token_id=token_ids["<image>"],
            video_token_id=token_ids["<video>"],
            image_grid_pinpoints=[[image_size, image_size]],
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            vision_aspect_ratio="anyres_max_9",
            tie_word_embeddings=False,
        )

    def tiny_image_processor(self, image_size: int):
        return LlavaOnevisionImageProcessor(
            size={"height": image_size, "width": image_size},
            crop_size={"height": image_size, "width": image_size},
            image_grid_pinpoints=[[image_size, image_size]],
            do_pad=True,
        )

    def tiny_processor_kwargs(self, image_size: int, sizes: TinySizes) -> dict[str, Any]:
        side = image_size // 16
        return {"num_image_tokens": side * side, "vision_feature_select_strategy": "full"}

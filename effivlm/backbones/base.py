"""The family adapter: everything effivlm knows about one model family, in one place.

Methods and the generation engine ask the adapter where the decoder layers, vision tower, projector and image
tokens are, how one image's visual tokens split into crops or tiles, and how position ids are computed. They
never test model classes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.processing_utils import ProcessorMixin

from effivlm.backbones.sizes import TinySizes
from effivlm.registry import Registry

#: A minimal chat template in the families' ChatML format, for the small backbones; real checkpoints ship their own.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ IMAGE }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

COMMON_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


@dataclass(frozen=True)
class Segment:
    """A crop, tile or base view inside one image's run of visual tokens."""

    start: int  # offset within the image's visual tokens
    length: int
    grid: tuple[int, int] | None  # (rows, cols) when the segment is a full token grid


def qwen2_text_config(vocab_size: int, token_ids: dict[str, int], sizes: TinySizes) -> dict[str, Any]:
    """The Qwen2 language model that every supported family's small backbone uses, as config kwargs."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": sizes.text_hidden,
        "intermediate_size": sizes.text_intermediate,
        "num_hidden_layers": sizes.text_layers,
        "num_attention_heads": sizes.text_heads,
        "num_key_value_heads": sizes.text_kv_heads,
        "max_position_embeddings": sizes.max_positions,
        "tie_word_embeddings": False,
        "bos_token_id": None,
        "eos_token_id": token_ids["<|im_end|>"],
        "pad_token_id": token_ids["<|endoftext|>"],
    }


class FamilyAdapter(ABC):
    family: ClassVar[str]
    model_class: ClassVar[type[PreTrainedModel]]
    processor_class: ClassVar[type[ProcessorMixin]]
    image_processor_class: ClassVar[type]
    #: what a chat template writes where an image goes (the processor expands it into the visual tokens)
    image_placeholder: ClassVar[str]
    #: special tokens of this family besides the ChatML ones, as attribute name -> token
    special_tokens: ClassVar[dict[str, str]]

    # ----------------------------------------------------------------- structure
    def language_model(self, model: PreTrainedModel) -> nn.Module:
        """The decoder stack that takes ``inputs_embeds`` (no LM head)."""
        return model.model.language_model

    def decoder_layers(self, model: PreTrainedModel) -> nn.ModuleList:
        return self.language_model(model).layers

    def lm_head(self, model: PreTrainedModel) -> nn.Module:
        return model.lm_head

    def input_embeddings(self, model: PreTrainedModel) -> nn.Module:
        return self.language_model(model).get_input_embeddings()

    @abstractmethod
    def vision_tower(self, model: PreTrainedModel) -> nn.Module: ...

    @abstractmethod
    def projector(self, model: PreTrainedModel) -> nn.Module: ...

    def image_token_id(self, model: PreTrainedModel) -> int:
        return int(model.config.image_token_id)

    def text_config(self, model: PreTrainedModel) -> PretrainedConfig:
        return model.config.text_config

    # ----------------------------------------------------------------- inputs
    #: whether the model's own forward takes ``batch_num_images`` (images per prompt), which the engine always adds
    forward_takes_batch_num_images: ClassVar[bool] = False

    def forward_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The engine's encoded inputs as the model's own ``forward``/``generate`` takes them."""
        if self.forward_takes_batch_num_images:
            return dict(inputs)
        return {k: v for k, v in inputs.items() if k != "batch_num_images"}

    @abstractmethod
    def image_features(self, model: PreTrainedModel, inputs: dict[str, Any]) -> list[torch.Tensor]:
        """Projected visual tokens of every image in the batch, in prompt order: a list of (N_i, D)."""

    def image_segments(
        self, model: PreTrainedModel, inputs: dict[str, Any], image_index: int, n_tokens: int
    ) -> list[Segment]:
        """How image ``image_index``'s ``n_tokens`` visual tokens split into crops or tiles (default: one)."""
        return [Segment(0, n_tokens, None)]

    # ----------------------------------------------------------------- attention scores
    #: whether the vision tower prepends a class token, whose attention row then ranks the patches
    vision_cls_token: ClassVar[bool] = False

    def self_attention(self, layer: nn.Module) -> nn.Module:
        """The attention module of one decoder layer."""
        return layer.self_attn

    def scaling_groups(self, layer: nn.Module) -> list[tuple[nn.Module, list[nn.Module]]]:
        """The linear layers of one decoder layer that read the same input, each group with the module whose
        output that input is, when a per-channel scale on it can be folded into that module's weights (AWQ):
        the norms before attention and MLP, v_proj before o_proj (unless grouped-query attention repeats
        its heads), up_proj before down_proj. In the order the layer runs them."""
        attn, mlp = layer.self_attn, layer.mlp
        groups = [(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])]
        if attn.v_proj.out_features == attn.o_proj.in_features:
            groups.append((attn.v_proj, [attn.o_proj]))
        groups += [
            (layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj]),
            (mlp.up_proj, [mlp.down_proj]),
        ]
        return groups

    @abstractmethod
    def vision_attention(self, model: PreTrainedModel) -> nn.Module:
        """The attention module of the vision layer whose output feeds the projector: where VisionZip and
        PruMerge+ read the attention each patch receives and the patches' keys."""

    @abstractmethod
    def vision_token_signals(
        self, model: PreTrainedModel, inputs: dict[str, Any], patch_signals: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Per-patch signals recorded at ``vision_attention`` -> one (N_i, C) tensor per image, row for row
        aligned with ``image_features``.

        ``patch_signals`` holds one (n, P, C) tensor per call of the attention function, in call order: channel 0
        is the attention a patch received, the others its key. A visual token made of several patches sums their
        attention and averages their keys (``merge_patch_signals``); a token not made of patches (a newline)
        gets zeros.
        """

    def position_ids(self, model: PreTrainedModel, inputs: dict[str, Any]) -> torch.Tensor:
        """Position ids of the prompt, (B, L); left padding is skipped."""
        mask = inputs["attention_mask"]
        return (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, L)

    # ----------------------------------------------------------------- the embedded default
    @abstractmethod
    def tiny_config(
        self, vocab_size: int, token_ids: dict[str, int], image_size: int, sizes: TinySizes
    ) -> Any:
        """A small config of this family's real model class."""

    @abstractmethod
    def tiny_image_processor(self, image_size: int) -> Any: ...

    def tiny_processor_kwargs(self, image_size: int, sizes: TinySizes) -> dict[str, Any]:
        """Arguments of the processor class besides image processor, tokenizer and chat template."""
        return {}

    def tiny_chat_template(self) -> str:
        return CHAT_TEMPLATE.replace("{{ IMAGE }}", self.image_placeholder)


def merge_patch_signals(signals: torch.Tensor) -> torch.Tensor:
    """(..., g, C) signals of the g patches forming one token -> (..., C): attention (channel 0) summed, keys
    averaged."""
    return torch.cat([signals[..., :1].sum(-2), signals[..., 1:].mean(-2)], dim=-1)


def feature_layer_index(vision_feature_layer: int, n_layers: int) -> int:
    """The encoder layer whose output is ``hidden_states[vision_feature_layer]`` (index 0 is the embeddings)."""
    index = vision_feature_layer % (n_layers + 1) - 1
    if not 0 <= index < n_layers:
        raise ValueError(
            f"vision_feature_layer {vision_feature_layer} selects no layer of a {n_layers}-layer tower"
        )
    return index


def contiguous_runs(mask: torch.Tensor) -> list[int]:
    """Lengths of the runs of True in a 1-D boolean tensor, in order."""
    padded = torch.cat([mask.new_zeros(1), mask, mask.new_zeros(1)]).int()
    edges = padded.diff()
    starts, ends = (edges == 1).nonzero().squeeze(-1), (edges == -1).nonzero().squeeze(-1)
    return (ends - starts).tolist()


ADAPTERS: Registry[type[FamilyAdapter]] = Registry("family")


def register_adapter(cls: type[FamilyAdapter]) -> type[FamilyAdapter]:
    ADAPTERS.register(cls.family)(cls)
    return cls

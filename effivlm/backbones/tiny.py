"""Small backbones of the real model classes, for the embedded default: a local tokenizer and a small config."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedModel, PreTrainedTokenizerFast
from transformers.processing_utils import ProcessorMixin

from effivlm.backbones.base import COMMON_SPECIAL_TOKENS, FamilyAdapter, TinySizes
from effivlm.backbones.processor import build_processor, save_processor


def train_tokenizer(
    corpus: Iterable[str], adapter: FamilyAdapter, vocab_size: int = 512
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``corpus``, with the ChatML tokens and the family's own specials."""
    specials = list(COMMON_SPECIAL_TOKENS) + list(dict.fromkeys(adapter.special_tokens.values()))
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(sorted(set(corpus)), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        extra_special_tokens=dict(adapter.special_tokens),
    )


def build_tiny(
    adapter: FamilyAdapter, corpus: Iterable[str], image_size: int, sizes: TinySizes, seed: int
) -> tuple[PreTrainedModel, ProcessorMixin, dict[str, Any]]:
    """A randomly initialised small backbone of ``adapter``'s family and its processor."""
    tokenizer = train_tokenizer(corpus, adapter)
    token_ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in tokenizer.all_special_tokens}
    config = adapter.tiny_config(len(tokenizer), token_ids, image_size, sizes)
    torch.manual_seed(seed)
    model = adapter.model_class(config)
    model.eval()
    processor_kwargs = adapter.tiny_processor_kwargs(image_size, sizes)
    processor = build_processor(
        adapter.processor_class,
        adapter.tiny_image_processor(image_size),
        tokenizer,
        chat_template=adapter.tiny_chat_template(),
        **processor_kwargs,
    )
    return model, processor, processor_kwargs


def save_backbone(
    model: PreTrainedModel, processor: ProcessorMixin, processor_kwargs: dict[str, Any], out_dir: Path
) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    save_processor(processor, out_dir, processor_kwargs)

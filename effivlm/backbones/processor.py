"""Processor loading, with the one fix for machines without torchvision.

transformers 5 processors of every supported family hold a video processor, which needs torchvision; on a CPU
machine without torchvision they can neither be constructed nor loaded. effivlm only feeds images, so when the
native processor cannot be loaded it builds the same processor class with no video processor. Token counting,
prompt expansion and image preprocessing stay transformers' own code.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from transformers import AutoProcessor, AutoTokenizer
from transformers.processing_utils import ProcessorMixin

PROCESSOR_CONFIG = "processor_config.json"
CHAT_TEMPLATE = "chat_template.jinja"


@functools.cache
def image_only(processor_class: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """A subclass of ``processor_class`` that accepts ``video_processor=None``."""

    class ImageOnly(processor_class):  # type: ignore[misc, valid-type]
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    ImageOnly.__name__ = ImageOnly.__qualname__ = f"ImageOnly{processor_class.__name__}"
    return ImageOnly


def build_processor(
    processor_class: type[ProcessorMixin], image_processor: Any, tokenizer: Any, **kwargs: Any
) -> ProcessorMixin:
    return image_only(processor_class)(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=None, **kwargs
    )


def save_processor(processor: ProcessorMixin, out_dir: Path, processor_kwargs: dict[str, Any]) -> None:
    """Save the parts of an image-only processor so that :func:`load_processor` rebuilds it."""
    out_dir = Path(out_dir)
    processor.image_processor.save_pretrained(out_dir)
    processor.tokenizer.save_pretrained(out_dir)
    if processor.chat_template:
        (out_dir / CHAT_TEMPLATE).write_text(processor.chat_template)
    base = type(processor).__mro__[1] if type(processor).__name__.startswith("ImageOnly") else type(processor)
    (out_dir / PROCESSOR_CONFIG).write_text(
        json.dumps({"processor_class": base.__name__, **processor_kwargs}, indent=2, sort_keys=True)
    )


def load_processor(
    path: str,
    processor_class: type[ProcessorMixin],
    image_processor_class: type,
    revision: str | None = None,
    **overrides: Any,
) -> ProcessorMixin:
    """Load a family's processor from a local folder or hub id; falls back to the image-only processor."""
    try:
        return AutoProcessor.from_pretrained(path, revision=revision, **overrides)
    except (ImportError, TypeError, ValueError, OSError, AttributeError):
        pass
    # the family class, not AutoImageProcessor: the latter needs torchvision, the former falls back to PIL
    image_processor = image_processor_class.from_pretrained(path, revision=revision)
    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    kwargs: dict[str, Any] = {}
    local = Path(path)
    if (local / PROCESSOR_CONFIG).is_file():
        saved = json.loads((local / PROCESSOR_CONFIG).read_text())
        accepted = set(processor_class.__init__.__code__.co_varnames)
        kwargs = {
            k: v for k, v in saved.items() if k in accepted and k not in ("image_processor", "tokenizer")
        }
    if (local / CHAT_TEMPLATE).is_file():
        kwargs["chat_template"] = (local / CHAT_TEMPLATE).read_text()
    kwargs.update(overrides)
    return build_processor(processor_class, image_processor, tokenizer, **kwargs)

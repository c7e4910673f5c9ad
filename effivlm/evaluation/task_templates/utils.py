"""Document functions of the effivlm synthetic tasks, referenced by ``synthetic.yaml``.

A document is one JSONL record ``{"id", "task", "question", "answer", "image"}`` with the image a base64 PNG
(see :mod:`effivlm.data.synthetic`). Scoring is exact match after the same normalisation as loyalty uses.
"""

from __future__ import annotations

from PIL import Image

from effivlm.data.synthetic import decode_image
from effivlm.metrics.loyalty import normalise_prediction


def doc_to_visual(doc: dict) -> list[Image.Image]:
    return [decode_image(doc["image"])]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    # The pipeline applies the model family's prompt template; the context is the bare question.
    return doc["question"]


def doc_to_target(doc: dict) -> str:
    return str(doc["answer"])


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    prediction = results[0] if results else ""
    return {
        "exact_match": float(normalise_prediction(prediction) == normalise_prediction(str(doc["answer"])))
    }

"""Metrics of EffiVLM-Bench: retained ratio, OP, OG, OL and loyalty."""

from effivlm.metrics.loyalty import loyalty, normalise_prediction
from effivlm.metrics.paper import (
    overall_generalization,
    overall_loyalty,
    overall_performance,
    retained_ratio,
)

__all__ = [
    "loyalty",
    "normalise_prediction",
    "overall_generalization",
    "overall_loyalty",
    "overall_performance",
    "retained_ratio",
]

"""Metrics of EffiVLM-Bench: retained ratio, OP, OG, OL and loyalty, with bootstrap intervals and flips."""

from effivlm.metrics.loyalty import loyalty, normalise_prediction
from effivlm.metrics.paper import (
    overall_generalization,
    overall_loyalty,
    overall_performance,
    retained_ratio,
)
from effivlm.metrics.stats import (
    flip_counts,
    is_right,
    loyalty_interval,
    loyalty_replicates,
    overall_loyalty_interval,
    overall_performance_interval,
    paired_bootstrap,
    ratio_interval,
    ratio_replicates,
)

__all__ = [
    "flip_counts",
    "is_right",
    "loyalty",
    "loyalty_interval",
    "loyalty_replicates",
    "normalise_prediction",
    "overall_generalization",
    "overall_loyalty",
    "overall_loyalty_interval",
    "overall_performance",
    "overall_performance_interval",
    "paired_bootstrap",
    "ratio_interval",
    "ratio_replicates",
    "retained_ratio",
]

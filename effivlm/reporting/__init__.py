"""Tables and figures from evaluation jobs."""

from effivlm.reporting.aggregate import (
    Job,
    aggregate,
    build_metrics_table,
    build_summary_table,
    load_job,
    summary_markdown,
)
from effivlm.reporting.figures import plot_retained, plot_task_ratios

__all__ = [
    "Job",
    "aggregate",
    "build_metrics_table",
    "build_summary_table",
    "load_job",
    "plot_retained",
    "plot_task_ratios",
    "summary_markdown",
]

"""Evaluation through lmms-eval: the ``effivlm`` lmms-eval model, synthetic task YAMLs and the job runner.

``run_evaluation`` and ``write_synthetic_task`` are imported lazily: lmms-eval (and torch) load only when used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_evaluation", "write_synthetic_task"]


def __getattr__(name: str) -> Any:
    if name == "run_evaluation":
        from effivlm.evaluation.runner import run_evaluation

        return run_evaluation
    if name == "write_synthetic_task":
        from effivlm.evaluation.tasks import write_synthetic_task

        return write_synthetic_task
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""rule evaluate: one (model, method variant, budget, task) -> metrics.json and predictions.jsonl."""
# ruff: noqa: F821  (`snakemake` is defined by the preamble Snakemake prepends to this script)

import os

os.environ["OMP_NUM_THREADS"] = str(snakemake.threads)  # torch reads it at import: honour `threads:`

from effivlm.evaluation.runner import run_evaluation  # noqa: E402

p = snakemake.params
run_evaluation(
    p.out_dir,
    model=dict(p.model),
    method=snakemake.wildcards.variant,
    method_name=p.method_name,
    method_params=dict(p.method_params),
    budget=p.budget,
    task=dict(p.task),
    seed=p.seed,
    batch_size=p.batch_size,
    limit=p.limit,
    max_new_tokens=p.max_new_tokens,
    dtype=p.dtype,
    device=p.device,
    attn_implementation=p.attn_implementation,
    log=snakemake.log[0],
)

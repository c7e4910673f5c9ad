"""rule efficiency: one (model, method variant, budget) -> efficiency/<model>/<variant>/<budget>.json."""
# ruff: noqa: F821  (`snakemake` is defined by the preamble Snakemake prepends to this script)

import os

os.environ["OMP_NUM_THREADS"] = str(snakemake.threads)  # torch reads it at import: honour `threads:`

from effivlm.efficiency.job import run_efficiency  # noqa: E402

p = snakemake.params
run_efficiency(
    snakemake.output[0],
    model=dict(p.model),
    method=snakemake.wildcards.variant,
    method_name=p.method_name,
    method_params=dict(p.method_params),
    budget=p.budget,
    weights=None if p.weights is None else dict(p.weights),
    settings=dict(p.settings),
    seed=p.seed,
    dtype=p.dtype,
    device=p.device,
    attn_implementation=p.attn_implementation,
    log_file=snakemake.log[0],
)

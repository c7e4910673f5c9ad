"""rule figure_retained: metrics.csv -> retained_vs_budget.png and .svg."""
# ruff: noqa: F821  (`snakemake` is defined by the preamble Snakemake prepends to this script)

import contextlib

with open(snakemake.log[0], "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
    from effivlm.reporting.figures import plot_retained

    plot_retained(snakemake.input[0], snakemake.output.png, snakemake.output.svg)

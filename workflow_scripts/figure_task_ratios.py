"""rule figure_task_ratios: metrics.csv -> task_ratios.png and .svg."""
# ruff: noqa: F821  (`snakemake` is defined by the preamble Snakemake prepends to this script)

import contextlib

with open(snakemake.log[0], "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
    from effivlm.reporting.figures import plot_task_ratios

    plot_task_ratios(snakemake.input[0], snakemake.output.png, snakemake.output.svg)

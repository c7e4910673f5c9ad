"""rule figure_task_ratios: metrics.csv -> task_ratios.png and .svg."""
# ruff: noqa: F821  (`snakemake` is defined by the preamble Snakemake prepends to this script)

from effivlm.io import log_to_file

# the log records start, end and duration, and what the libraries print
with log_to_file(snakemake.log[0], "figure task_ratios", capture_output=True):
    from effivlm.reporting.figures import plot_task_ratios

    plot_task_ratios(snakemake.input[0], snakemake.output.png, snakemake.output.svg)

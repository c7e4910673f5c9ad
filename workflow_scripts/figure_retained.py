"""rule figure_retained: metrics.csv -> retained_vs_budget.png and .svg."""
# ruff: noqa: F821  (`snakemake` is defined by the preamble Snakemake prepends to this script)

from effivlm.io import log_to_file

# the log records start, end and duration, and what the libraries print
with log_to_file(snakemake.log[0], "figure retained_vs_budget", capture_output=True):
    from effivlm.reporting.figures import plot_retained

    plot_retained(snakemake.input[0], snakemake.output.png, snakemake.output.svg)

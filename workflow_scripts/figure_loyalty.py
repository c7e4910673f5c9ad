"""rule figure_loyalty: metrics.csv -> loyalty_heatmap.png and .svg."""
# ruff: noqa: F821  (`snakemake` is defined by the preamble Snakemake prepends to this script)

from effivlm.io import log_to_file

with log_to_file(snakemake.log[0], "figure loyalty_heatmap", capture_output=True):
    from effivlm.reporting.figures import plot_loyalty_heatmap

    plot_loyalty_heatmap(snakemake.input[0], snakemake.output.png, snakemake.output.svg)

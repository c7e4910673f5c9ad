"""rule figure_pareto: pareto.csv -> pareto_<quality>.png and .svg."""
# ruff: noqa: F821  (`snakemake` is defined by the preamble Snakemake prepends to this script)

from effivlm.io import log_to_file

with log_to_file(snakemake.log[0], f"figure pareto_{snakemake.wildcards.quality}", capture_output=True):
    from effivlm.reporting.figures import plot_pareto

    plot_pareto(snakemake.input[0], snakemake.wildcards.quality, snakemake.output.png, snakemake.output.svg)

"""rule paper_tables: metrics.csv, summary.csv, efficiency.csv -> tables/paper/<name>.csv, .md and .tex."""
# ruff: noqa: F821  (`snakemake` is defined by the preamble Snakemake prepends to this script)

from effivlm.io import log_to_file

with log_to_file(snakemake.log[0], "paper tables", capture_output=True):
    from effivlm.reporting.tables import write_paper_tables

    i = snakemake.input
    write_paper_tables(i.metrics, i.summary, i.efficiency, snakemake.params.out_dir)

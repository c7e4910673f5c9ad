"""rule aggregate: every job folder and efficiency record -> the tables (metrics, summary, efficiency, pareto)."""
# ruff: noqa: F821  (`snakemake` is defined by the preamble Snakemake prepends to this script)

import os

from effivlm.io import log_to_file

# the log records start, end and duration, and what the libraries print
with log_to_file(snakemake.log[0], "aggregate", capture_output=True):
    from effivlm.reporting.aggregate import aggregate

    aggregate(
        [os.path.dirname(path) for path in snakemake.input.jobs],
        snakemake.params.tables_dir,
        efficiency_files=list(snakemake.input.efficiency),
        code_version=snakemake.params.code_version,
    )

"""rule aggregate: every job folder -> metrics.csv, summary.csv and summary.md."""
# ruff: noqa: F821  (`snakemake` is defined by the preamble Snakemake prepends to this script)

import contextlib
import os

with open(snakemake.log[0], "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
    from effivlm.reporting.aggregate import aggregate

    aggregate([os.path.dirname(path) for path in snakemake.input], snakemake.params.tables_dir)

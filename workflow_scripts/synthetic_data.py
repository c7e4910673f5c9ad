"""rule synthetic_data: write the embedded synthetic suite (train/test of every task and a manifest)."""
# ruff: noqa: F821  (`snakemake` is defined by the preamble Snakemake prepends to this script)

import contextlib

with open(snakemake.log[0], "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
    from effivlm.data.synthetic import write_suite

    write_suite(
        out_dir=snakemake.params.out_dir,
        tasks=snakemake.params.tasks,
        n_train=snakemake.params.n_train,
        n_test=snakemake.params.n_test,
        image_size=snakemake.params.image_size,
        seed=snakemake.params.seed,
    )

"""rule backbone: train (or load the prebuilt copy of) the tiny backbone of an embedded model."""
# ruff: noqa: F821  (`snakemake` is defined by the preamble Snakemake prepends to this script)

import os

os.environ["OMP_NUM_THREADS"] = str(snakemake.threads)  # torch reads it at import: honour `threads:`

from effivlm.backbones.train import train_backbone  # noqa: E402

train_backbone(
    family=snakemake.params.family,
    data_dir=snakemake.params.data_dir,
    out_dir=snakemake.output[0],
    spec=dict(snakemake.params.spec),
    seed=snakemake.params.seed,
    prebuilt_dir=snakemake.input.get("prebuilt"),
    log_path=snakemake.log[0],
)

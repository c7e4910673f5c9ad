"""effivlm: a reproducible pipeline for training-free acceleration of large vision-language models."""

__version__ = "0.1.0"

# Bumped by hand whenever a change in the library changes a result (predictions, metrics or timings).
# Every job receives it through ``params:``, so Snakemake reruns exactly the jobs whose results it can change.
CODE_VERSION = "1"

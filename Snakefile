# effivlm: the EffiVLM-Bench study as a Snakemake DAG.
#   snakemake --cores 2                                   the embedded default (config.yaml), no weights needed
#   snakemake --configfile configs/paper.yaml --profile slurm   the paper's grid on a GPU cluster
# A --configfile replaces config.yaml instead of merging into it (see rules/common.smk).

from snakemake.utils import min_version

min_version("9.0")


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/backbones.smk"
include: "rules/compress.smk"
include: "rules/evaluate.smk"
include: "rules/efficiency.smk"
include: "rules/aggregate.smk"


# Before the first job: a read-only or full results folder fails here with one line, not in a job after
# Snakemake has deleted that job's old outputs. Not run by a dry run.
onstart:
    try:
        check_writable(RESULTS)
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


# Tables and figures read the jobs' small outputs and need no GPU: under a cluster executor they run on the
# submitting node instead of waiting in the queue.
localrules:
    all,
    aggregate,
    paper_tables,
    figure_retained,
    figure_task_ratios,
    figure_loyalty,
    figure_pareto,


rule all:
    default_target: True
    input:
        final_outputs(),

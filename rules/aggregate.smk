rule aggregate:
    """Every job's metrics -> metrics.csv (one row per job, with ratio and loyalty) and the summaries."""
    input:
        all_metrics(),
    output:
        metrics=f"{RESULTS}/tables/metrics.csv",
        summary=f"{RESULTS}/tables/summary.csv",
        summary_md=f"{RESULTS}/tables/summary.md",
    log:
        f"{RESULTS}/logs/aggregate.log",
    params:
        tables_dir=lambda wildcards, output: os.path.dirname(output.metrics),
        code_version=effivlm.CODE_VERSION,
    threads: 1
    resources:
        **scaled(mem_mb=4000, runtime=30),
    conda:
        "../environment.yml"
    script:
        "../workflow_scripts/aggregate.py"


rule figure_retained:
    """Retained score (ratio to dense) against budget, one line per method and model."""
    input:
        f"{RESULTS}/tables/metrics.csv",
    output:
        png=f"{RESULTS}/figures/retained_vs_budget.png",
        svg=f"{RESULTS}/figures/retained_vs_budget.svg",
    log:
        f"{RESULTS}/logs/figures/retained_vs_budget.log",
    params:
        code_version=effivlm.CODE_VERSION,
    threads: 1
    resources:
        **scaled(mem_mb=2000, runtime=10),
    conda:
        "../environment.yml"
    script:
        "../workflow_scripts/figure_retained.py"


rule figure_task_ratios:
    """Retained ratio per task, for every method and budget."""
    input:
        f"{RESULTS}/tables/metrics.csv",
    output:
        png=f"{RESULTS}/figures/task_ratios.png",
        svg=f"{RESULTS}/figures/task_ratios.svg",
    log:
        f"{RESULTS}/logs/figures/task_ratios.log",
    params:
        code_version=effivlm.CODE_VERSION,
    threads: 1
    resources:
        **scaled(mem_mb=2000, runtime=10),
    conda:
        "../environment.yml"
    script:
        "../workflow_scripts/figure_task_ratios.py"

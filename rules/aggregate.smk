# Tables and figures. Every output a reader looks at is a report() item: `snakemake --report report.html`
# gathers them, by category, into one self-contained HTML file.


rule aggregate:
    """Every job's metrics and every efficiency record -> metrics.csv (one row per evaluation, with ratio and
    loyalty), summary.csv/.md (OP, OG, OL with intervals, and OE), efficiency.csv and pareto.csv."""
    input:
        jobs=all_metrics(),
        efficiency=all_efficiency(),
    output:
        metrics=report(f"{RESULTS}/tables/metrics.csv", category="3. Tables", labels={"table": "metrics"}),
        summary=report(f"{RESULTS}/tables/summary.csv", category="3. Tables", labels={"table": "summary"}),
        summary_md=f"{RESULTS}/tables/summary.md",
        efficiency=report(
            f"{RESULTS}/tables/efficiency.csv", category="3. Tables", labels={"table": "efficiency"}
        ),
        pareto=report(f"{RESULTS}/tables/pareto.csv", category="3. Tables", labels={"table": "pareto"}),
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


rule paper_tables:
    """The paper's tables (per-benchmark scores, OP, OG/OL, parameter compression, efficiency) as CSV,
    Markdown and LaTeX."""
    input:
        metrics=f"{RESULTS}/tables/metrics.csv",
        summary=f"{RESULTS}/tables/summary.csv",
        efficiency=f"{RESULTS}/tables/efficiency.csv",
    output:
        **{
            f"{name}_{ext}": report(
                f"{RESULTS}/tables/paper/{name}.{ext}",
                category="4. Paper tables",
                labels={"table": name, "format": ext},
            )
            for name in PAPER_TABLES
            for ext in ("csv", "md", "tex")
        },
    log:
        f"{RESULTS}/logs/paper_tables.log",
    params:
        out_dir=lambda wildcards, output: os.path.dirname(output[0]),
        code_version=effivlm.CODE_VERSION,
    threads: 1
    resources:
        **scaled(mem_mb=2000, runtime=10),
    conda:
        "../environment.yml"
    script:
        "../workflow_scripts/paper_tables.py"


rule figure_retained:
    """Retained score (OP) against budget, one line per method, one panel per model and overall."""
    input:
        f"{RESULTS}/tables/metrics.csv",
    output:
        png=report(
            f"{RESULTS}/figures/retained_vs_budget.png",
            caption="../report/retained.rst",
            category="1. Performance",
            labels={"figure": "OP against budget"},
        ),
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
        png=report(
            f"{RESULTS}/figures/task_ratios.png",
            caption="../report/task_ratios.rst",
            category="1. Performance",
            labels={"figure": "retained ratio per task"},
        ),
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


rule figure_loyalty:
    """Loyalty heatmap: (method, budget) x task, mean over models, with OL."""
    input:
        f"{RESULTS}/tables/metrics.csv",
    output:
        png=report(
            f"{RESULTS}/figures/loyalty_heatmap.png",
            caption="../report/loyalty.rst",
            category="1. Performance",
            labels={"figure": "loyalty heatmap"},
        ),
        svg=f"{RESULTS}/figures/loyalty_heatmap.svg",
    log:
        f"{RESULTS}/logs/figures/loyalty_heatmap.log",
    params:
        code_version=effivlm.CODE_VERSION,
    threads: 1
    resources:
        **scaled(mem_mb=2000, runtime=10),
    conda:
        "../environment.yml"
    script:
        "../workflow_scripts/figure_loyalty.py"


rule figure_pareto:
    """Quality (OP or OL) against every cost axis, per model and overall, with the Pareto frontier."""
    input:
        f"{RESULTS}/tables/pareto.csv",
    output:
        png=report(
            f"{RESULTS}/figures/pareto_{{quality}}.png",
            caption="../report/pareto.rst",
            category="2. Trade-offs",
            labels={"figure": "Pareto frontier", "quality": "{quality}"},
        ),
        svg=f"{RESULTS}/figures/pareto_{{quality}}.svg",
    log:
        f"{RESULTS}/logs/figures/pareto_{{quality}}.log",
    wildcard_constraints:
        quality="OP|OL",
    params:
        code_version=effivlm.CODE_VERSION,
    threads: 1
    resources:
        **scaled(mem_mb=2000, runtime=10),
    conda:
        "../environment.yml"
    script:
        "../workflow_scripts/figure_pareto.py"

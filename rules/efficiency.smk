rule efficiency:
    """One (model, method variant, budget), independent of tasks: time to first token, decode time per token,
    tokens per second, peak memory, KV-cache bytes and analytic FLOPs on fixed synthetic inputs.

    The job claims every core Snakemake may use, so that no other local job runs beside it and skews its
    timings. With efficiency.backbone "random" it needs no trained weights and no checkpoint (the variant's
    weights entry is applied to the random model), so it runs as soon as the DAG starts.
    """
    input:
        unpack(efficiency_inputs),
    output:
        f"{RESULTS}/efficiency/{{model}}/{{variant}}/{{budget}}.json",
    log:
        f"{RESULTS}/logs/efficiency/{{model}}/{{variant}}/{{budget}}.log",
    params:
        model=lambda wildcards: model_spec(CFG, wildcards.model, wildcards.variant),
        method_name=lambda wildcards: CFG["methods"][wildcards.variant]["method"],
        method_params=lambda wildcards: method_params_of(CFG, wildcards.variant),
        budget=lambda wildcards: float(wildcards.budget),
        weights=lambda wildcards: variant_weights(wildcards.variant),
        settings=efficiency_settings(CFG),
        seed=CFG["seed"],
        dtype=CFG["dtype"],
        device=CFG["device"],
        attn_implementation=CFG["attn_implementation"],
        code_version=effivlm.CODE_VERSION,
    threads: every_core
    resources:
        **gpu_resources(mem_mb_cpu=16000, mem_mb_gpu=96000, runtime_cpu=60, runtime_gpu=60),
    conda:
        "../environment.yml"
    script:
        "../workflow_scripts/efficiency.py"

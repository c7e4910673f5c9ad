rule backbone:
    """Train the tiny backbone of an embedded model on the synthetic suite (or start from its prebuilt copy)."""
    input:
        unpack(backbone_inputs),
    output:
        directory(f"{RESULTS}/backbones/{{model}}"),
    log:
        f"{RESULTS}/logs/backbones/{{model}}.log",
    params:
        data_dir=lambda wildcards, input: os.path.dirname(input.manifest),
        family=lambda wildcards: CFG["models"][wildcards.model]["family"],
        spec=lambda wildcards: train_spec(CFG, wildcards.model),
        seed=CFG["seed"],
        code_version=effivlm.CODE_VERSION,
    wildcard_constraints:
        model=choice_pattern(embedded_models(CFG)),
    threads: 2
    resources:
        **gpu_resources(mem_mb_cpu=4000, mem_mb_gpu=16000, runtime_cpu=60, runtime_gpu=60),
    conda:
        "../environment.yml"
    script:
        "../workflow_scripts/backbone.py"

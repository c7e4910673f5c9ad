rule calibration_set:
    """The calibration set of parameter compression: drawn from the synthetic suite, or converted from the
    local file the config names (ShareGPT4V-style JSON or effivlm JSONL)."""
    input:
        unpack(calibration_set_inputs),
    output:
        calibration_file(CFG),
    log:
        f"{RESULTS}/logs/data/calibration.log",
    params:
        samples=CFG["calibration"]["samples"],
        path=CFG["calibration"].get("path"),
        image_root=CFG["calibration"].get("image_root"),
        synthetic_dir=synthetic_dir(CFG),
        tasks=synthetic_suite(CFG),
        code_version=effivlm.CODE_VERSION,
    threads: 1
    resources:
        **scaled(mem_mb=2000, runtime=30),
    conda:
        "../environment.yml"
    script:
        "../workflow_scripts/calibration_set.py"


rule calibrate:
    """One pass of the calibration set through a dense model: the activation statistics (and Hessians, when a
    configured method reads them) that every weight method of this model shares."""
    input:
        unpack(calibrate_inputs),
    output:
        f"{RESULTS}/calibration/{{model}}/statistics.safetensors",
    log:
        f"{RESULTS}/logs/calibration/{{model}}.log",
    params:
        model=lambda wildcards: model_spec(CFG, wildcards.model),
        hessians=lambda wildcards: "hessian" in weight_needs(CFG, wildcards.model),
        batch_size=CFG["calibration"]["batch_size"],
        dtype=CFG["dtype"],
        device=CFG["device"],
        attn_implementation=CFG["attn_implementation"],
        code_version=effivlm.CODE_VERSION,
    threads: 4 if CUDA else 2
    resources:
        **gpu_resources(mem_mb_cpu=8000, mem_mb_gpu=200000, runtime_cpu=60, runtime_gpu=240),
    conda:
        "../environment.yml"
    script:
        "../workflow_scripts/calibrate.py"


rule compress:
    """One (model, weights entry): compress the dense model and save the checkpoint every variant on top of it
    evaluates (safetensors + effivlm_compression.json)."""
    input:
        unpack(compress_inputs),
    output:
        directory(f"{RESULTS}/compressed/{{model}}/{{weights}}"),
    log:
        f"{RESULTS}/logs/compressed/{{model}}/{{weights}}.log",
    params:
        model=lambda wildcards: model_spec(CFG, wildcards.model),
        weights=lambda wildcards: weights_spec(CFG, wildcards.weights),
        batch_size=CFG["calibration"]["batch_size"],
        seed=CFG["seed"],
        dtype=CFG["dtype"],
        device=CFG["device"],
        attn_implementation=CFG["attn_implementation"],
        code_version=effivlm.CODE_VERSION,
    threads: 4 if CUDA else 2
    resources:
        **gpu_resources(mem_mb_cpu=8000, mem_mb_gpu=200000, runtime_cpu=120, runtime_gpu=720),
    conda:
        "../environment.yml"
    script:
        "../workflow_scripts/compress.py"

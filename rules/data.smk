rule synthetic_data:
    """The embedded synthetic image-question suite: train and test splits of every task, and a manifest."""
    output:
        train=synthetic_files("train"),
        test=synthetic_files("test"),
        manifest=f"{RESULTS}/data/synthetic/manifest.json",
    log:
        f"{RESULTS}/logs/data/synthetic.log",
    params:
        out_dir=lambda wildcards, output: os.path.dirname(output.manifest),
        tasks=synthetic_suite(CFG),
        n_train=CFG.get("synthetic", {}).get("n_train"),
        n_test=CFG.get("synthetic", {}).get("n_test"),
        image_size=CFG.get("synthetic", {}).get("image_size"),
        seed=CFG["seed"],
        code_version=effivlm.CODE_VERSION,
    threads: 1
    resources:
        **scaled(mem_mb=2000, runtime=30),
    conda:
        "../environment.yml"
    script:
        "../workflow_scripts/synthetic_data.py"

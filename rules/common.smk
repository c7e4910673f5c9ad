# Config loading and validation, and the functions the rules share. Nothing here runs a job.
import os
import sys

import effivlm
from effivlm.config import (
    BUDGET_PATTERN,
    ConfigError,
    backbone_dir,
    choice_pattern,
    embedded_models,
    eval_jobs,
    job_dir,
    load_config,
    method_params_of,
    model_spec,
    synthetic_dir,
    synthetic_suite,
    task_spec,
    train_spec,
)


# Snakemake merges --configfile into the configfile directive's dict, which would add the paper's models to
# the embedded default ones; load the repository's config.yaml only when no --configfile was given.
if not workflow.config_settings.configfiles:

    configfile: os.path.join(workflow.basedir, "config.yaml")


# Schema + semantic checks (effivlm.config), defaults filled, before any job: one line and a non-zero exit.
try:
    CFG = load_config(config)
except ConfigError as err:
    print(err, file=sys.stderr)
    raise SystemExit(1) from None

RESULTS = CFG["results"]
CUDA = CFG["device"] == "cuda"


wildcard_constraints:
    model=choice_pattern(list(CFG["models"])),
    variant=choice_pattern(list(CFG["methods"])),
    budget=BUDGET_PATTERN,
    task=choice_pattern(list(CFG["tasks"])),


# ---------------------------------------------------------------------------------------------- targets


def final_outputs():
    return [
        *tables(),
        *(f"{RESULTS}/figures/{name}.{ext}" for name in ("retained_vs_budget", "task_ratios") for ext in ("png", "svg")),
    ]


def tables():
    return [f"{RESULTS}/tables/{name}" for name in ("metrics.csv", "summary.csv", "summary.md")]


def all_metrics():
    return [f"{job_dir(CFG, job)}/metrics.json" for job in eval_jobs(CFG)]


# ------------------------------------------------------------------------------------------ synthetic data


def synthetic_files(kind):
    return [f"{synthetic_dir(CFG)}/{task}/{kind}.jsonl" for task in synthetic_suite(CFG)]


def backbone_inputs(wildcards):
    """The whole synthetic suite, and the prebuilt checkpoint when the model may start from one."""
    inputs = {
        "train": synthetic_files("train"),
        "test": synthetic_files("test"),
        "manifest": f"{synthetic_dir(CFG)}/manifest.json",
    }
    prebuilt = prebuilt_dir(wildcards.model)
    if prebuilt is not None:
        inputs["prebuilt"] = prebuilt
    return inputs


def prebuilt_dir(model):
    """assets/backbones/<model> of the repository, when the config allows it and it exists."""
    if not CFG["models"][model]["train"]["prebuilt"]:
        return None
    path = os.path.join(workflow.basedir, "assets", "backbones", model)
    return os.path.relpath(path) if os.path.isdir(path) else None


# -------------------------------------------------------------------------------------------- evaluation


def eval_inputs(wildcards):
    """The trained backbone of an embedded model and the data of a synthetic task; real weights are params."""
    inputs = {}
    if CFG["models"][wildcards.model]["source"] == "embedded":
        inputs["backbone"] = backbone_dir(CFG, wildcards.model)
    task = task_spec(CFG, wildcards.task)
    if task["kind"] == "synthetic":
        inputs["test"] = f"{task['data']}/test.jsonl"
    return inputs


# ------------------------------------------------------------------------------------ resources (SLURM hints)


def gpu_resources(mem_mb_cpu, mem_mb_gpu, runtime_cpu, runtime_gpu):
    """A GPU request only when the config asks for CUDA (gpu=1 becomes --gpus=1 under the SLURM executor)."""
    if CUDA:
        return {"gpu": 1, "mem_mb": mem_mb_gpu, "runtime": runtime_gpu}
    return {"mem_mb": mem_mb_cpu, "runtime": runtime_cpu}

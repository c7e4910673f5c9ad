# Config loading and validation, and the functions the rules share. Nothing here runs a job.
import os
import sys

from snakemake.exceptions import WorkflowError

import effivlm
from effivlm.io import check_writable
from effivlm.reporting.tables import TABLES
from effivlm.config import (
    BUDGET_PATTERN,
    ConfigError,
    backbone_dir,
    calibration_file,
    choice_pattern,
    compressed_dir,
    efficiency_file,
    efficiency_jobs,
    efficiency_settings,
    embedded_models,
    eval_jobs,
    job_dir,
    load_config,
    method_params_of,
    model_spec,
    statistics_file,
    synthetic_dir,
    synthetic_suite,
    task_spec,
    train_spec,
    weight_entry_needs,
    weight_jobs,
    weight_needs,
    weights_spec,
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
    weights=choice_pattern(list(CFG["weights"])),


# ---------------------------------------------------------------------------------------------- targets


PAPER_TABLES = TABLES
FIGURES = ("retained_vs_budget", "task_ratios", "loyalty_heatmap", "pareto_OP", "pareto_OL")


def final_outputs():
    return [
        *tables(),
        *(f"{RESULTS}/tables/paper/{name}.{ext}" for name in PAPER_TABLES for ext in ("csv", "md", "tex")),
        *(f"{RESULTS}/figures/{name}.{ext}" for name in FIGURES for ext in ("png", "svg")),
    ]


def tables():
    names = ("metrics.csv", "summary.csv", "summary.md", "efficiency.csv", "pareto.csv")
    return [f"{RESULTS}/tables/{name}" for name in names]


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


def variant_model(model, variant):
    """The model folder a variant's jobs load, as an input: its compressed checkpoint, the trained backbone of
    an embedded model, or nothing (real weights are params)."""
    weights = CFG["methods"][variant].get("weights")
    if weights is not None:
        return {"compressed": compressed_dir(CFG, model, weights)}
    if CFG["models"][model]["source"] == "embedded":
        return {"backbone": backbone_dir(CFG, model)}
    return {}


def eval_inputs(wildcards):
    """The trained backbone of an embedded model (or the compressed checkpoint the variant runs on) and the
    data of a synthetic task; real weights are params."""
    inputs = variant_model(wildcards.model, wildcards.variant)
    task = task_spec(CFG, wildcards.task)
    if task["kind"] == "synthetic":
        inputs["test"] = f"{task['data']}/test.jsonl"
    return inputs


# ------------------------------------------------------------------------------------ parameter compression


def embedded_backbone(model):
    """The trained backbone folder of an embedded model as an input ({} for weights given by path or hub)."""
    if CFG["models"][model]["source"] == "embedded":
        return {"backbone": backbone_dir(CFG, model)}
    return {}


def calibration_set_inputs(wildcards):
    """The synthetic suite for the embedded set; a local calibration file is a param, like real weights, so
    that the paper's grid plans on a machine without the data (its job fails naming a missing file)."""
    if CFG["calibration"].get("path") is not None:
        return {}
    return {"manifest": f"{synthetic_dir(CFG)}/manifest.json", "train": synthetic_files("train")}


def calibrate_inputs(wildcards):
    return {"calibration": calibration_file(CFG), **embedded_backbone(wildcards.model)}


def compress_inputs(wildcards):
    """The model, its calibration statistics when the method reads any, the set when it runs batches."""
    needs = weight_entry_needs(CFG, wildcards.weights)
    inputs = embedded_backbone(wildcards.model)
    if needs - {"batches"}:
        inputs["statistics"] = statistics_file(CFG, wildcards.model)
    if "batches" in needs:
        inputs["calibration"] = calibration_file(CFG)
    return inputs


# ------------------------------------------------------------------------------------------------ efficiency


def all_efficiency():
    return [efficiency_file(CFG, *job) for job in efficiency_jobs(CFG)]


def variant_weights(variant):
    """The weights entry a variant runs on, or None."""
    weights = CFG["methods"][variant].get("weights")
    return None if weights is None else weights_spec(CFG, weights)


def efficiency_inputs(wildcards):
    """Nothing for a random backbone; otherwise the model the variant's evaluations load."""
    if CFG["efficiency"]["backbone"] == "random":
        return {}
    return variant_model(wildcards.model, wildcards.variant)


def compressed_checkpoints():
    return [compressed_dir(CFG, model, weights) for model, weights in weight_jobs(CFG)]


# ------------------------------------------------------------------------------------ resources (SLURM hints)


def scaled(mem_mb, runtime, **extra):
    """Memory (MB) and runtime (minutes) that grow with each retry: attempt k asks for k times the base, so a
    job SLURM killed for memory or time comes back with more (the profile sets the number of retries)."""
    return {
        "mem_mb": lambda wildcards, attempt: mem_mb * attempt,
        "runtime": lambda wildcards, attempt: runtime * attempt,
        **extra,
    }


def every_core(wildcards):
    """threads of a timing job: every core Snakemake may use (--cores), so that no other local job runs
    beside it; 1 where no --cores is given (--report, --lint)."""
    try:
        return workflow.cores
    except WorkflowError:
        return 1


def gpu_resources(mem_mb_cpu, mem_mb_gpu, runtime_cpu, runtime_gpu):
    """A GPU request only when the config asks for CUDA (gpu=1 becomes --gpus=1 under the SLURM executor);
    memory and runtime grow with each retry."""
    if CUDA:
        return scaled(mem_mb_gpu, runtime_gpu, gpu=1)
    return scaled(mem_mb_cpu, runtime_cpu)

"""Plain helpers shared by test modules (pytest puts tests/ on sys.path: ``from helpers import ...``)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from effivlm import attention
from effivlm.methods import build_method
from effivlm.pipeline import Pipeline

ROOT = Path(__file__).resolve().parents[1]
REPO = ROOT


# ---------------------------------------------------------------------------- the workflow
DRY = ("--dry-run", "--cores", "2")


def command(workdir: Path, *args: str) -> list[str]:
    """The repository's workflow, run with its own working directory (its .snakemake/ stays out of the repo)."""
    snakefile = str(REPO / "Snakefile")
    return [sys.executable, "-m", "snakemake", "--snakefile", snakefile, "--directory", str(workdir), *args]


def snakemake(
    workdir: Path, *args: str, timeout: float = 900, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run Snakemake; ``env`` adds to (never replaces) this process's environment."""
    return subprocess.run(
        command(workdir, *args),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=None if env is None else {**os.environ, **env},
    )


def job_counts(stdout: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run: rule -> number of jobs."""
    table = stdout.split("Job stats:", 1)[1]
    return {m["rule"]: int(m["count"]) for m in re.finditer(r"^(?P<rule>\w+)\s+(?P<count>\d+)$", table, re.M)}


@dataclass(frozen=True)
class TestRun:
    """A finished local run of configs/test.yaml: its Snakemake working directory (with .snakemake/), its
    results folder and the completed process. Shared by the whole session: copy it before changing it."""

    __test__ = False  # not a test class

    workdir: Path
    results: Path
    result: subprocess.CompletedProcess[str]

    def config_args(self) -> tuple[str, ...]:
        return ("--configfile", str(REPO / "configs/test.yaml"), "--config", f"results={self.results}")


# ---------------------------------------------------------------------------- benchmarks
def load_benchmark(name: str) -> ModuleType:
    """The script ``benchmarks/<name>.py``, imported as the module ``<name>_bench``."""
    spec = importlib.util.spec_from_file_location(f"{name}_bench", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def table_rows(text: str, title: str) -> list[list[str]]:
    """Body rows of the Markdown table that follows the heading ``title``."""
    section = text.split(title, 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


# ---------------------------------------------------------------------------- methods
def hook_count(model: torch.nn.Module) -> int:
    """Forward and forward-pre hooks registered on all of ``model``'s modules."""
    return sum(
        len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._forward_pre_hooks_with_kwargs)
        for m in model.modules()
    )


def assert_method_leaves_the_model_as_it_was(backbone, prompts, method: str, new_tokens: int) -> None:
    """Generating with ``method`` at budget 0.1 leaves the model's logits, parameters, configs and hooks as they
    were, and no attention probe active."""
    model = backbone.model
    params = {k: v.clone() for k, v in model.state_dict().items()}
    configs = {id(m): m.config for m in model.modules() if hasattr(m, "config")}
    inputs = Pipeline(backbone, build_method("dense")).encode(prompts)
    with torch.inference_mode():
        before = model(**backbone.adapter.forward_inputs(inputs)).logits
        hooks = hook_count(model)  # after a first forward: transformers installs its own hooks lazily
        Pipeline(backbone, build_method(method, 0.1)).generate(prompts, new_tokens)
        after = model(**backbone.adapter.forward_inputs(inputs)).logits
    assert torch.equal(before, after)
    assert all(torch.equal(v, params[k]) for k, v in model.state_dict().items())
    assert {id(m): m.config for m in model.modules() if hasattr(m, "config")} == configs
    assert hook_count(model) == hooks
    assert not attention._ACTIVE

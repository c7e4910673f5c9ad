"""One evaluation job: a (model, method, budget, task) combination through lmms-eval.

The job writes ``predictions.jsonl`` (one line per sample) and ``metrics.json`` into its folder, each under a
temporary name first and renamed when complete, ``metrics.json`` last: a folder holding ``metrics.json`` is a
finished job. Every failure (an unknown task, no samples, an error inside the model or lmms-eval) raises.

While it runs, the job appends each finished batch's answers to ``.answers-<key>.jsonl`` in its folder (not a
declared output, so Snakemake leaves it in place when it cleans up a killed job); a rerun of the same job
resumes from it, and it is removed once ``metrics.json`` is written. ``<key>`` hashes everything that can
change an answer (see :func:`resume_key`), so a changed configuration, model or data never resumes from
stale answers.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from numbers import Number
from pathlib import Path
from typing import Any

import effivlm
from effivlm.evaluation.lmms_model import MODEL_NAME
from effivlm.evaluation.tasks import write_synthetic_task
from effivlm.io import file_sha256, log_to_file, write_text_atomic

logger = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"
ANSWERS_GLOB = ".answers-*.jsonl"
TASK_KINDS = ("synthetic", "lmms")


def _require(mapping: dict, keys: Iterable[str], what: str) -> None:
    missing = [key for key in keys if key not in mapping]
    if missing:
        raise ValueError(f"{what} is missing {missing}: {mapping!r}")


def _unknown_task_error(name: str, known: list[str]) -> ValueError:
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    return ValueError(f"unknown lmms-eval task {name!r}{hint}")


def _metric_value(task_results: dict, metric: str) -> tuple[str, float]:
    """The aggregated value of ``metric`` (lmms-eval keys it ``"<metric>,<filter>"``), preferring filter ``none``."""
    keys = [key for key in task_results if key.split(",", 1)[0] == metric and "," in key]
    if not keys:
        raise RuntimeError(f"lmms-eval reported no value for metric {metric!r}: {sorted(task_results)}")
    key = f"{metric},none" if f"{metric},none" in keys else keys[0]
    value = task_results[key]
    if not isinstance(value, Number) or isinstance(value, bool):
        raise RuntimeError(f"metric {key!r} is not a number: {value!r}")
    return key, float(value)


def _prediction(sample: dict) -> Any:
    prediction = sample["filtered_resps"][0]
    # Without a filter lmms-eval logs the list of responses of the request.
    if isinstance(prediction, list) and len(prediction) == 1:
        prediction = prediction[0]
    return prediction


def _sum_counts(rows: list[dict], key: str) -> int | None:
    values = [row[key] for row in rows if key in row]
    if not values:
        return None
    return int(sum(sum(v) if isinstance(v, (list, tuple)) else v for v in values))


def _find_task_yaml(name: str, roots: list[str]) -> Path | None:
    """The first YAML under ``roots`` that defines task ``name`` as a plain ``task: name`` line.

    A text scan takes ~0.2 s where lmms-eval's TaskManager parses all its ~2,000 task YAMLs in ~5 s.
    """
    pattern = re.compile(rf"^task:\s*[\"']?{re.escape(name)}[\"']?\s*(#.*)?$", re.MULTILINE)
    for root in roots:
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            for file in sorted(files):
                if file.endswith(".yaml"):
                    path = Path(folder) / file
                    if pattern.search(path.read_text(errors="replace")):
                        return path
    return None


def _task_manager(task: dict, work_dir: Path, max_new_tokens: int):
    """An lmms-eval TaskManager that knows ``task``, and the lmms-eval task name to ask it for."""
    import lmms_eval.tasks
    from lmms_eval.tasks import TaskManager

    kind = task["kind"]
    if kind == "synthetic":
        _require(task, ("data",), "synthetic task")
        task_dir = work_dir / "tasks"
        name = write_synthetic_task(
            task["name"],
            _data_file(task),
            task_dir,
            max_new_tokens=max_new_tokens,
            cache_dir=work_dir / "hf",
        )
        manager = TaskManager(verbosity="WARNING", include_path=str(task_dir), include_defaults=False)
    elif kind == "lmms":
        name = task.get("lmms_task", task["name"])
        include_path = task.get("include_path") or []
        include_paths = [include_path] if isinstance(include_path, str) else list(include_path)
        # lmms-eval's own tasks take precedence over include_path ones, as in its TaskManager.
        roots = [os.path.dirname(lmms_eval.tasks.__file__), *include_paths]
        found = _find_task_yaml(name, roots)
        if found is not None:
            manager = TaskManager(verbosity="WARNING", include_path=str(found.parent), include_defaults=False)
        if found is None or name not in manager.all_tasks:
            manager = TaskManager(verbosity="WARNING", include_path=include_paths or None)
    else:
        raise ValueError(f"unknown task kind {kind!r} (expected one of {TASK_KINDS})")
    if name not in manager.all_tasks:
        raise _unknown_task_error(name, manager.all_tasks)
    kind_of_name = manager.task_index[name]["type"]
    if kind_of_name not in ("task", "python_task"):
        raise ValueError(f"{name!r} is an lmms-eval {kind_of_name}, not a task; evaluate one task per job")
    return manager, name


@contextmanager
def _job_log(log: str | Path | Callable[[str], None] | None) -> Iterator[Callable[[str], None]]:
    """A function to log the job's progress with; a path also receives effivlm's log records and any error."""
    if log is None or callable(log):
        yield log or logger.info
        return
    with log_to_file(log, "evaluation"):
        yield logger.info


def _data_file(task: dict) -> Path:
    """A synthetic task's JSONL: ``data`` is the file itself or the task's folder holding ``test.jsonl``."""
    data = Path(task["data"])
    return data / "test.jsonl" if data.is_dir() else data


def _folder_signature(path: str) -> list | str:
    """What identifies a model's files without reading them: each file's name, size and modification time
    (a retrained or recompressed model has new ones); a hub id (or a path not there) is its own signature."""
    root = Path(path)
    if not root.is_dir():
        return str(path)
    files = sorted(file for file in root.rglob("*") if file.is_file())
    return [[str(file.relative_to(root)), file.stat().st_size, file.stat().st_mtime_ns] for file in files]


def resume_key(settings: dict[str, Any], model: dict, task: dict) -> str:
    """A hash of everything that can change an answer: the job's settings (method, budget, seed, batch size,
    limit, dtype, ...), the code and lmms-eval versions, the model's files and a synthetic task's data."""
    from importlib.metadata import version

    data = _data_file(task) if task["kind"] == "synthetic" and task.get("data") else None
    identity = {
        **settings,
        "model": {**model, "files": _folder_signature(str(model["path"]))},
        "task": task,
        "data": file_sha256(data) if data is not None and data.is_file() else None,
        "code_version": effivlm.CODE_VERSION,
        "effivlm_version": effivlm.__version__,
        "lmms_eval_version": version("lmms_eval"),
    }
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def run_evaluation(
    out_dir: Path,
    model: dict,
    method: str,
    method_name: str,
    method_params: dict,
    budget: float,
    task: dict,
    *,
    seed: int = 0,
    batch_size: int = 16,
    limit: int | None = None,
    max_new_tokens: int = 8,
    dtype: str = "float32",
    device: str = "cpu",
    attn_implementation: str = "sdpa",
    log: str | Path | Callable[[str], None] | None = None,
) -> dict:
    """Evaluate one (model, method, budget, task) and write ``predictions.jsonl`` and ``metrics.json``.

    ``model`` is ``{"name", "family", "path"}`` (optionally ``revision``). ``method`` is the configured variant
    (a label such as ``fastv_last``) and ``method_name`` the registered method it runs (``fastv``), built with
    ``method_params`` at ``budget``. ``task`` is ``{"name", "kind": "synthetic", "data"}`` with ``data`` the
    JSONL file or the task's folder holding ``test.jsonl``, or ``{"name", "kind": "lmms"}`` for a registered
    lmms-eval task (optionally with ``include_path``, and ``lmms_task`` when its lmms-eval name differs).
    ``max_new_tokens`` sets synthetic tasks' answer length; lmms-eval tasks keep their own. ``log`` is a
    function or a log file path. Returns the metrics written to ``metrics.json``.

    A run killed before it finished resumes from the answers it had logged (see the module docstring).
    """
    started = time.perf_counter()
    _require(model, ("name", "family", "path"), "model")
    _require(task, ("name", "kind"), "task")
    out_dir = Path(out_dir)
    with _job_log(log) as say:
        out_dir.mkdir(parents=True, exist_ok=True)
        # A metrics.json left by an earlier run must not survive a failure of this one.
        (out_dir / METRICS).unlink(missing_ok=True)
        settings = {
            "method_name": method_name,
            "method_params": method_params,
            "budget": budget,
            "seed": seed,
            "batch_size": batch_size,
            "limit": limit,
            "max_new_tokens": max_new_tokens,
            "dtype": dtype,
            "device": device,
            "attn_implementation": attn_implementation,
        }
        answers_file = out_dir / ANSWERS_GLOB.replace("*", resume_key(settings, model, task))
        for stale in out_dir.glob(ANSWERS_GLOB):  # answers of another configuration are never used again
            if stale != answers_file:
                stale.unlink()

        from lmms_eval import evaluator
        from lmms_eval.models import get_model

        with tempfile.TemporaryDirectory(prefix="effivlm-eval-") as tmp:
            manager, task_name = _task_manager(task, Path(tmp), max_new_tokens)
            say(
                f"evaluating {model['name']} / {method} ({method_name} @ {budget}) on {task_name}, limit {limit}"
            )
            lm = get_model(MODEL_NAME)(
                model_path=model["path"],
                family=model["family"],
                revision=model.get("revision"),
                method=method_name,
                budget=budget,
                method_params=method_params,
                dtype=dtype,
                device=device,
                attn_implementation=attn_implementation,
                batch_size=batch_size,
                seed=seed,
                max_new_tokens=max_new_tokens,
                answers_file=str(answers_file),
            )
            # Before evaluating: lmms-eval's clean-up drops the model's torch modules once it is done.
            description = lm.describe()
            results = evaluator.simple_evaluate(
                model=lm,
                tasks=[task_name],
                task_manager=manager,
                batch_size=batch_size,
                device=device,
                limit=limit,
                log_samples=True,
                bootstrap_iters=0,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
                verbosity="WARNING",
            )
        metrics = _write_outputs(
            out_dir,
            results,
            lm.sample_stats,
            task_name,
            {
                "model": model["name"],
                "family": model["family"],
                "model_path": str(model["path"]),
                "revision": model.get("revision"),
                "weights": model.get("weights"),
                "method": method,
                "method_name": method_name,
                "method_params": method_params,
                "budget": budget,
                "task": task["name"],
                "lmms_task": task_name,
                "limit": limit,
                "seed": seed,
                "batch_size": batch_size,
                "max_new_tokens": max_new_tokens,
                "dtype": dtype,
                "device": device,
                "attn_implementation": attn_implementation,
                "effivlm_version": effivlm.__version__,
                "code_version": effivlm.CODE_VERSION,
                "pipeline": description,
            },
            started,
        )
        answers_file.unlink(missing_ok=True)
        say(
            f"{task_name}: {metrics['metric']} = {metrics['score']:.4f} over {metrics['n']} samples in {metrics['seconds']:.1f} s"
        )
    return metrics


def _write_outputs(
    out_dir: Path, results: dict | None, sample_stats: dict, task_name: str, header: dict, started: float
) -> dict:
    """Check lmms-eval's results, then write predictions.jsonl and (last) metrics.json; returns the metrics."""
    if not results or "samples" not in results:
        raise RuntimeError(f"lmms-eval returned no results for {task_name!r}")
    evaluated = sorted(results["samples"])
    if evaluated != [task_name]:
        raise ValueError(
            f"{task_name!r} is a group of lmms-eval tasks {evaluated}; evaluate one task per job"
        )
    samples = results["samples"][task_name]
    expected = results["n-samples"][task_name]["effective"]
    if not samples or len(samples) != expected:
        raise RuntimeError(f"lmms-eval scored {len(samples)} samples of {task_name!r}, expected {expected}")

    metric = results["configs"][task_name]["metric_list"][0]["metric"]
    _, score = _metric_value(results["results"][task_name], metric)

    rows = []
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        stats = sample_stats.get((task_name, sample["doc_id"]))
        if stats is None:
            raise RuntimeError(f"no pipeline statistics for {task_name!r} doc {sample['doc_id']}")
        rows.append(
            {
                **stats,
                "doc_id": sample["doc_id"],
                "target": sample["target"],
                "prediction": _prediction(sample),
                "score": sample[metric],
            }
        )

    metrics = {
        **header,
        "metric": metric,
        "score": score,
        "n": len(rows),
        "visual_tokens": {
            "total": _sum_counts(rows, "visual_tokens"),
            "kept": _sum_counts(rows, "visual_kept"),
        },
        # the prompts' KV cache after the prefill (and any compression), against the uncompressed prompts'
        "kv_cache": {
            "dense_bytes": _sum_counts(rows, "kv_bytes_dense"),
            "bytes": _sum_counts(rows, "kv_bytes"),
        },
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_text_atomic(
        out_dir / PREDICTIONS,
        "".join(json.dumps(row, default=str, ensure_ascii=False) + "\n" for row in rows),
    )
    write_text_atomic(out_dir / METRICS, json.dumps(metrics, indent=2, default=str) + "\n")
    return metrics

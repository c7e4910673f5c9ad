"""lmms-eval task YAMLs for the effivlm synthetic tasks.

A synthetic task is a JSONL file of ``{"id", "task", "question", "answer", "image"}`` records. lmms-eval reads
local tasks from YAML files in an ``include_path`` folder; :func:`write_synthetic_task` writes one that
includes ``task_templates/synthetic.yaml`` (document functions, metric) and sets the data file and decoding.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

TEMPLATE = Path(__file__).parent / "task_templates" / "synthetic.yaml"
TASK_PREFIX = "effivlm_"
_TASK_NAME = re.compile(r"^[a-z0-9][a-z0-9_]*$")
# Greedy, short answers, stop at the end of the first line (the template leaves these to this module).
GENERATION_KWARGS = {"temperature": 0, "do_sample": False, "until": ["\n"]}
#: the fields of a record that the template's document functions read
RECORD_FIELDS = ("question", "answer", "image")


def synthetic_task_name(task: str) -> str:
    """The lmms-eval task name of a synthetic task: ``color`` -> ``effivlm_color``."""
    if not _TASK_NAME.match(task):
        raise ValueError(f"synthetic task name must match {_TASK_NAME.pattern}, got {task!r}")
    return TASK_PREFIX + task


def _check_records(data_file: Path) -> None:
    """Every line is a JSON object with the fields the template reads, and there is one at least: a bad file
    would otherwise surface as an opaque retry error deep inside lmms-eval's loader."""
    records = 0
    with data_file.open(encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:
                raise ValueError(
                    f"synthetic task data file {data_file} line {number}: not JSON ({err})"
                ) from None
            missing = [key for key in RECORD_FIELDS if not isinstance(record, dict) or key not in record]
            if missing:
                raise ValueError(
                    f"synthetic task data file {data_file} line {number}: no {', '.join(missing)}"
                )
            records += 1
    if not records:
        raise ValueError(f"synthetic task data file has no records: {data_file}")


def write_synthetic_task(
    task: str,
    data_file: Path,
    out_dir: Path,
    *,
    max_new_tokens: int = 8,
    cache_dir: Path | None = None,
) -> str:
    """Write ``out_dir/effivlm_<task>.yaml`` for the JSONL ``data_file``; returns the lmms-eval task name.

    ``cache_dir`` is where the datasets library caches the parsed file (default: its own cache in the
    user's home); pass a private folder to keep concurrent jobs apart.
    """
    name = synthetic_task_name(task)
    data_file = Path(data_file).resolve()
    if not data_file.is_file():
        raise FileNotFoundError(f"synthetic task data file not found: {data_file}")
    _check_records(data_file)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    dataset_kwargs: dict = {"data_files": {"train": str(data_file)}}
    generation_kwargs = {"max_new_tokens": max_new_tokens, **GENERATION_KWARGS}
    if cache_dir is not None:
        dataset_kwargs["cache_dir"] = str(Path(cache_dir).resolve())
    # JSON is valid YAML, and json.dumps quotes paths and names safely.
    lines = [
        f"include: {json.dumps(str(TEMPLATE))}",
        f"task: {json.dumps(name)}",
        f"dataset_kwargs: {json.dumps(dataset_kwargs)}",
        f"generation_kwargs: {json.dumps(generation_kwargs)}",
    ]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.yaml").write_text("\n".join(lines) + "\n")
    return name

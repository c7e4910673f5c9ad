"""Calibration sets: the image-text pairs whose activations parameter-compression methods read.

One format inside effivlm, a JSONL file of ``{"id", "image", "prompt", "caption"}`` records (``image`` a
base64 PNG), so that a calibration set is one file with one digest. Two ways to get one:

- the embedded default draws it from the synthetic suite's train splits (each image with its question as the
  prompt and its answer as the caption: the distribution the small backbones were trained on), round-robin
  over the tasks;
- a real run converts a local ShareGPT4V-style file (a JSON list of ``{"image": relative path,
  "conversations": [{"from": "human", "value": "<image>..."}, {"from": "gpt", "value": caption}]}``, as
  ShareGPT4V-COCO ships) or an effivlm JSONL file, taking the first ``samples`` records.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

from PIL import Image

from effivlm.data import synthetic
from effivlm.io import file_sha256, write_text_atomic

FORMAT = "effivlm-calibration-v1"
DEFAULT_PROMPT = "Describe the image."


class CalibrationError(ValueError):
    """A calibration file that cannot be used; the message names the file and what is wrong."""


def _record(rid: str, image_b64: str, prompt: str, caption: str) -> dict[str, str]:
    return {"id": rid, "image": image_b64, "prompt": prompt, "caption": caption}


def embedded_records(data_dir: Path, tasks: list[str], samples: int) -> list[dict[str, str]]:
    """``samples`` records drawn round-robin over the tasks' train splits (first records first)."""
    if samples < 1:
        raise CalibrationError(f"calibration samples must be >= 1, got {samples}")
    splits = {task: synthetic.read_split(Path(data_dir) / task / "train.jsonl") for task in tasks}
    records: list[dict[str, str]] = []
    index = 0
    while len(records) < samples:
        progressed = False
        for task in tasks:
            if index < len(splits[task]) and len(records) < samples:
                r = splits[task][index]
                records.append(_record(r["id"], r["image"], r["question"], r["answer"]))
                progressed = True
        if not progressed:
            raise CalibrationError(
                f"the synthetic train splits under {data_dir} hold {len(records)} records, fewer than the "
                f"{samples} calibration samples asked for"
            )
        index += 1
    return records


def _sharegpt_record(path: Path, i: int, item: Any, image_root: Path) -> dict[str, str]:
    where = f"{path}: record {i}"
    if not isinstance(item, dict) or "image" not in item or "conversations" not in item:
        raise CalibrationError(f"{where}: expected an object with 'image' and 'conversations'")
    turns = item["conversations"]
    human = next((t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "human"), None)
    gpt = next((t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "gpt"), None)
    if not isinstance(gpt, str) or not gpt.strip():
        raise CalibrationError(f"{where}: no 'gpt' turn with a caption")
    prompt = (human or DEFAULT_PROMPT).replace("<image>", "").strip() or DEFAULT_PROMPT
    image_path = image_root / item["image"]
    try:
        with Image.open(image_path) as img:
            png = io.BytesIO()
            img.convert("RGB").save(png, format="PNG")
    except (OSError, ValueError) as err:
        raise CalibrationError(f"{where}: cannot read image {image_path}: {err}") from None
    return _record(str(item.get("id", i)), base64.b64encode(png.getvalue()).decode("ascii"), prompt, gpt)


def file_records(path: Path, samples: int, image_root: Path | None = None) -> list[dict[str, str]]:
    """The first ``samples`` records of a ShareGPT4V-style JSON list or an effivlm calibration JSONL file."""
    path = Path(path)
    if samples < 1:
        raise CalibrationError(f"calibration samples must be >= 1, got {samples}")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise CalibrationError(f"calibration file {path} cannot be read: {err.strerror or err}") from None
    records: list[dict[str, str]] = []
    if path.suffix == ".jsonl":
        for i, line in enumerate(row for row in text.splitlines() if row.strip()):
            if len(records) == samples:
                break
            try:
                item = json.loads(line)
            except ValueError:
                raise CalibrationError(f"{path}: line {i + 1} is not JSON") from None
            missing = [k for k in ("image", "caption") if not isinstance(item.get(k), str)]
            if missing:
                raise CalibrationError(f"{path}: line {i + 1} lacks {', '.join(missing)}")
            records.append(
                _record(
                    str(item.get("id", i)), item["image"], item.get("prompt", DEFAULT_PROMPT), item["caption"]
                )
            )
    else:
        try:
            items = json.loads(text)
        except ValueError as err:
            raise CalibrationError(f"calibration file {path} is not valid JSON: {err}") from None
        if not isinstance(items, list):
            raise CalibrationError(f"calibration file {path}: expected a JSON list of records")
        root = Path(image_root) if image_root is not None else path.parent
        records = [_sharegpt_record(path, i, item, root) for i, item in enumerate(items[:samples])]
    if len(records) < samples:
        raise CalibrationError(f"calibration file {path} holds {len(records)} records, fewer than {samples}")
    return records


def write_calibration(path: Path, records: list[dict[str, str]]) -> str:
    """Write the records as JSONL (atomically); returns the file's sha256, the calibration digest."""
    lines = [json.dumps(r, separators=(",", ":"), sort_keys=True) + "\n" for r in records]
    write_text_atomic(Path(path), lines)
    return file_sha256(path)


def read_calibration(path: Path) -> list[dict[str, str]]:
    """The records of an effivlm calibration JSONL file (as written by :func:`write_calibration`)."""
    return file_records(Path(path), samples=_count_lines(Path(path)))


def _count_lines(path: Path) -> int:
    try:
        with open(path, encoding="utf-8") as f:
            n = sum(1 for line in f if line.strip())
    except OSError as err:
        raise CalibrationError(f"calibration file {path} cannot be read: {err.strerror or err}") from None
    if n == 0:
        raise CalibrationError(f"calibration file {path} is empty")
    return n


def decode(record: dict[str, str]) -> Image.Image:
    return synthetic.decode_image(record["image"])

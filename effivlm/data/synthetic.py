"""The synthetic image-question suite that the embedded default trains and evaluates on.

Four tasks with different visual demands, so that dropping visual tokens hurts them differently:

- ``color``: one named cell of a 2x2 grid (a quarter of the visual tokens matter);
- ``count``: every cell (all tokens matter, but only coarsely: is the cell empty?);
- ``spatial``: the relation between two cells (two quarters, and where they are);
- ``read``: one large digit whose identity lies in a few bitmap pixels (fine detail everywhere).

Images are clean so tiny models can learn them in minutes: black background, saturated colours, shapes
centred in grid cells (with a jitter of a few whole pixels), binary masks without anti-aliasing, digits
from the hand-written bitmap font in :mod:`effivlm.data.font`. PNGs are encoded here (not by Pillow) so the
bytes depend only on the pixels and zlib; everything is seeded through ``np.random.default_rng`` with
crc32 of the names, so the same inputs give byte-identical files.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from effivlm.data.font import GLYPH_COLS, GLYPH_ROWS, N_VARIANTS, glyph
from effivlm.io import file_sha256, write_text_atomic
from effivlm.registry import closest_hint

FORMAT = "effivlm-synthetic-v1"

# Colours the questions can name; also the colours of every shape.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
}


def _random_ink(rng: np.random.Generator) -> tuple[int, int, int]:
    """A bright ink of any hue for the read task, which never names its colour.

    Drawing the ink from a continuum (rather than a few named colours) makes nearly every training image
    distinct, so the held-out split tests reading the glyph, not recalling a seen (glyph, colour) pair.
    """
    hue = float(rng.random()) * 6.0
    sector, frac = int(hue) % 6, hue - int(hue)
    low = 64 + int(rng.integers(64))  # the weakest channel: saturated, never black
    rise, fall = low + round((255 - low) * frac), 255 - round((255 - low) * frac)
    channels = [
        (255, rise, low),
        (fall, 255, low),
        (low, 255, rise),
        (low, fall, 255),
        (rise, low, 255),
        (255, low, fall),
    ][sector]
    return channels


SHAPES = ("square", "circle", "triangle")
# Cell index = 2 * row + col.
POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right")
COUNT_WORDS = ("one", "two", "three", "four")
# Digits, not "zero".."nine": those would collide with the count task's answers.
DIGIT_ANSWERS = tuple(str(d) for d in range(10))
# Shape side as a fraction of the cell side (~70%).
SHAPE_FRACTIONS = (0.625, 0.6875, 0.75)
# The read task's canvas is READ_GRID x READ_GRID bitmap pixels of image_size // READ_GRID image pixels.
READ_GRID = 8


@dataclass(frozen=True)
class TaskSpec:
    """One task: how it asks, what it may answer, and every question it can produce."""

    name: str
    question_templates: tuple[str, ...]
    answers: tuple[str, ...]
    needs_image: bool
    description: str
    questions: tuple[str, ...]


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    question: str
    answer: str


_COLOR_QUESTION = "what color is the shape?"
_COUNT_QUESTION = "how many shapes are there?"
_WHERE_QUESTION = "where is the shape?"
_READ_QUESTION = "what digit is written?"

TASKS: dict[str, TaskSpec] = {
    "color": TaskSpec(
        name="color",
        question_templates=(_COLOR_QUESTION,),
        answers=tuple(COLORS),
        needs_image=True,
        description="colour of the one shape, in a random cell of a 2x2 grid (local: one quarter of the image)",
        questions=(_COLOR_QUESTION,),
    ),
    "count": TaskSpec(
        name="count",
        question_templates=(_COUNT_QUESTION,),
        answers=COUNT_WORDS,
        needs_image=True,
        description="number of filled cells (1-4) in a 2x2 grid (global: every cell matters)",
        questions=(_COUNT_QUESTION,),
    ),
    "spatial": TaskSpec(
        name="spatial",
        question_templates=(_WHERE_QUESTION,),
        answers=POSITIONS,
        needs_image=True,
        description="which cell of a 2x2 grid holds the one shape (spatial: where the content is, not what)",
        questions=(_WHERE_QUESTION,),
    ),
    "read": TaskSpec(
        name="read",
        question_templates=(_READ_QUESTION,),
        answers=DIGIT_ANSWERS,
        needs_image=True,
        description="one large 5x7 bitmap digit (fine-grained: a few bitmap pixels tell digits apart)",
        questions=(_READ_QUESTION,),
    ),
}

_SPLIT_RE = re.compile(r"[a-z0-9_]+")


# ---------------------------------------------------------------- validation


def _check_task(task: str) -> TaskSpec:
    if task not in TASKS:
        known = sorted(TASKS)
        raise ValueError(f"unknown task '{task}'{closest_hint(task, known)}; known: {', '.join(known)}")
    return TASKS[task]


def _check_image_size(image_size: int) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int | np.integer):
        raise ValueError(f"image_size must be an int, got {image_size!r}")
    if image_size < 32 or image_size % 16:
        raise ValueError(f"image_size must be a multiple of 16 and at least 32, got {image_size}")


def _check_count(name: str, n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n <= 0:
        raise ValueError(f"{name} must be a positive int, got {n!r}")


def _check_split(split: str) -> None:
    if not isinstance(split, str) or not _SPLIT_RE.fullmatch(split):
        raise ValueError(f"split must be a lowercase name such as 'train' or 'test', got {split!r}")


# ---------------------------------------------------------------- drawing


@cache
def _shape_mask(shape: str, side: int) -> np.ndarray:
    """(side, side) boolean mask of `shape`, sampled at pixel centres; binary, so no anti-aliasing."""
    c = (np.arange(side) + 0.5) / side  # pixel centres in [0, 1]
    v, u = np.meshgrid(c, c, indexing="ij")  # (side, side): v down, u right
    if shape == "square":
        mask = np.ones((side, side), dtype=bool)
    elif shape == "circle":
        mask = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    elif shape == "triangle":  # apex at the top, base along the bottom
        mask = np.abs(u - 0.5) <= v / 2
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    mask.setflags(write=False)
    return mask


def _draw_random_shape(
    canvas: np.ndarray, cell: int, rng: np.random.Generator, color: tuple[int, int, int]
) -> None:
    """Paint a random shape, centred (give or take a few pixels) in grid cell `cell`, in `color`."""
    cell_px = canvas.shape[0] // 2
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    side = round(cell_px * SHAPE_FRACTIONS[int(rng.integers(len(SHAPE_FRACTIONS)))])
    jitter = cell_px // 16
    dy, dx = (int(j) for j in rng.integers(-jitter, jitter + 1, size=2))
    top = (cell // 2) * cell_px + (cell_px - side) // 2 + dy
    left = (cell % 2) * cell_px + (cell_px - side) // 2 + dx
    canvas[top : top + side, left : left + side][_shape_mask(shape, side)] = color


def _random_color(rng: np.random.Generator) -> str:
    return tuple(COLORS)[int(rng.integers(len(COLORS)))]


def _distinct(rng: np.random.Generator, n: int, k: int) -> list[int]:
    """k distinct values from range(n), uniformly (partial Fisher-Yates through rng.integers only)."""
    pool = list(range(n))
    for i in range(k):
        j = i + int(rng.integers(n - i))
        pool[i], pool[j] = pool[j], pool[i]
    return pool[:k]


def _render_color(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str, str]:
    canvas = np.zeros((size, size, 3), dtype=np.uint8)  # (H, W, RGB)
    name = _random_color(rng)
    _draw_random_shape(canvas, int(rng.integers(4)), rng, COLORS[name])
    return canvas, _COLOR_QUESTION, name


def _render_count(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str, str]:
    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    k = 1 + int(rng.integers(4))
    for cell in sorted(_distinct(rng, 4, k)):
        _draw_random_shape(canvas, cell, rng, COLORS[_random_color(rng)])
    return canvas, _COUNT_QUESTION, COUNT_WORDS[k - 1]


def _render_spatial(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str, str]:
    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    cell = int(rng.integers(4))
    _draw_random_shape(canvas, cell, rng, COLORS[_random_color(rng)])
    return canvas, _WHERE_QUESTION, POSITIONS[cell]


def _render_read(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str, str]:
    digit = int(rng.integers(10))
    mask = glyph(digit, int(rng.integers(N_VARIANTS)))  # (7, 5)
    color = _random_ink(rng)
    dy = int(rng.integers(READ_GRID - GLYPH_ROWS + 1))  # shift by whole bitmap pixels
    dx = int(rng.integers(READ_GRID - GLYPH_COLS + 1))
    grid = np.zeros((READ_GRID, READ_GRID), dtype=bool)
    grid[dy : dy + GLYPH_ROWS, dx : dx + GLYPH_COLS] = mask
    scale = size // READ_GRID
    ink = np.kron(grid, np.ones((scale, scale), dtype=bool))  # (size, size)
    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    canvas[ink] = color
    return canvas, _READ_QUESTION, DIGIT_ANSWERS[digit]


_RENDERERS = {
    "color": _render_color,
    "count": _render_count,
    "spatial": _render_spatial,
    "read": _render_read,
}


def make_sample(task: str, rng: np.random.Generator, image_size: int = 64) -> Sample:
    """Draw one sample of `task` from `rng`: an RGB image of image_size x image_size, a question, an answer."""
    _check_task(task)
    _check_image_size(image_size)
    pixels, question, answer = _RENDERERS[task](rng, int(image_size))
    return Sample(image=Image.fromarray(pixels, mode="RGB"), question=question, answer=answer)


# ---------------------------------------------------------------- encoding


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_bytes(pixels: np.ndarray) -> bytes:
    """Encode an (H, W, 3) uint8 array as an 8-bit RGB PNG; the bytes depend only on the pixels and zlib."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got {pixels.shape} {pixels.dtype}")
    h, w, _ = pixels.shape
    raw = np.zeros((h, 1 + 3 * w), dtype=np.uint8)  # (H, filter byte + W * RGB); filter 0 = none
    raw[:, 1:] = pixels.reshape(h, 3 * w)
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit, colour type 2 (RGB), no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), 9))
        + _png_chunk(b"IEND", b"")
    )


def encode_image(img: Image.Image | np.ndarray) -> str:
    """Base64 of the PNG of `img` (a PIL image, converted to RGB, or an (H, W, 3) uint8 array)."""
    pixels = np.asarray(img.convert("RGB")) if isinstance(img, Image.Image) else np.asarray(img)
    return base64.b64encode(png_bytes(pixels)).decode("ascii")


def decode_image(b64: str) -> Image.Image:
    """The RGB image of a base64 PNG written by :func:`encode_image`."""
    with Image.open(io.BytesIO(base64.b64decode(b64, validate=True))) as img:
        return img.convert("RGB")


def content_key(image_b64: str, question: str) -> str:
    """sha256 of the PNG bytes followed by the question: two records with the same key are the same item."""
    return hashlib.sha256(base64.b64decode(image_b64) + question.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- files


def _rng_for(seed: int, task: str, split: str) -> np.random.Generator:
    # crc32 of the names, never hash(): stable across processes and machines, and adding a task or a split
    # does not reseed the others.
    return np.random.default_rng([seed, zlib.crc32(task.encode()), zlib.crc32(split.encode())])


def write_split(
    path: Path,
    task: str,
    split: str,
    n: int,
    seed: int,
    image_size: int,
    exclude: set[str] | None = None,
) -> list[str]:
    """Write `n` samples of `task` to the JSONL file `path`; return their content keys in order.

    Samples whose content key is in `exclude` are redrawn, so a train split written with the test split's
    keys shares no (image, question) with it.
    """
    _check_task(task)
    _check_split(split)
    _check_count("n", n)
    _check_image_size(image_size)
    rng = _rng_for(int(seed), task, split)
    render = _RENDERERS[task]
    exclude = exclude or set()
    max_draws = 50 * n + 1000
    keys: list[str] = []
    lines: list[str] = []
    draws = 0
    while len(lines) < n:
        if draws >= max_draws:
            raise ValueError(
                f"task '{task}' at image_size {image_size}: {draws} draws gave only {len(lines)} of {n} "
                f"samples outside `exclude` ({len(exclude)} keys); the task has too few distinct items"
            )
        draws += 1
        pixels, question, answer = render(rng, int(image_size))
        png = png_bytes(pixels)
        key = hashlib.sha256(png + question.encode("utf-8")).hexdigest()
        if key in exclude:
            continue
        record = {
            "id": f"{task}-{split}-{len(lines)}",
            "task": task,
            "question": question,
            "answer": answer,
            "image": base64.b64encode(png).decode("ascii"),
        }
        keys.append(key)
        lines.append(json.dumps(record, separators=(",", ":")) + "\n")
    write_text_atomic(Path(path), lines)
    return keys


def read_split(path: Path) -> list[dict]:
    """The records of a JSONL split, in file order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_suite(
    out_dir: Path, tasks: Sequence[str], n_train: int, n_test: int, image_size: int, seed: int
) -> dict:
    """Write out_dir/<task>/{test,train}.jsonl for every task, then out_dir/manifest.json; return the manifest.

    The test split of each task is written first and its content keys are excluded from the train split.
    The manifest is removed first and written last, so its presence means the suite is complete.
    """
    if isinstance(tasks, str):
        raise ValueError(f"tasks must be a sequence of task names, got the string {tasks!r}")
    tasks = list(tasks)
    if not tasks:
        raise ValueError("tasks is empty; known: " + ", ".join(sorted(TASKS)))
    for task in tasks:
        _check_task(task)
    duplicates = sorted({t for t in tasks if tasks.count(t) > 1})
    if duplicates:
        raise ValueError(f"tasks repeat {duplicates}")
    _check_count("n_train", n_train)
    _check_count("n_test", n_test)
    _check_image_size(image_size)

    out_dir = Path(out_dir)
    manifest_path = out_dir / "manifest.json"
    manifest_path.unlink(missing_ok=True)
    files: dict[str, dict] = {}
    for task in tasks:
        test_keys = write_split(out_dir / task / "test.jsonl", task, "test", n_test, seed, image_size)
        write_split(
            out_dir / task / "train.jsonl", task, "train", n_train, seed, image_size, exclude=set(test_keys)
        )
        for split, n in (("test", n_test), ("train", n_train)):
            rel = f"{task}/{split}.jsonl"
            files[rel] = {"n": int(n), "sha256": file_sha256(out_dir / rel)}
    manifest = {
        "format": FORMAT,
        "seed": int(seed),
        "image_size": int(image_size),
        "tasks": tasks,
        "n_train": int(n_train),
        "n_test": int(n_test),
        "zlib": zlib.ZLIB_RUNTIME_VERSION,  # the PNG bytes (so the digests) depend on it
        "files": files,
    }
    write_text_atomic(manifest_path, [json.dumps(manifest, indent=2, sort_keys=True) + "\n"])
    return manifest


def corpus_text() -> list[str]:
    """Every question each task can ask and every answer word, for training a tokenizer."""
    texts: list[str] = []
    for spec in TASKS.values():
        texts.extend(spec.questions)
    for spec in TASKS.values():
        texts.extend(spec.answers)
    return list(dict.fromkeys(texts))

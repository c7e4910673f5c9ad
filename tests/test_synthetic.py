"""The synthetic suite: determinism, balance, held-out splits, and images that say what the answers say."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from effivlm.data import synthetic as syn
from effivlm.data.font import DIGIT_GLYPHS, GLYPH_COLS, GLYPH_ROWS, glyph

SIZES = (32, 48, 64, 96)


def _samples(task: str, n: int, image_size: int = 64, seed: int = 0) -> list[syn.Sample]:
    rng = np.random.default_rng(seed)
    return [syn.make_sample(task, rng, image_size) for _ in range(n)]


def _cell_centres(size: int) -> list[tuple[int, int]]:
    """(y, x) of the pixel at the centre of each 2x2 cell, in cell order (top left, top right, ...)."""
    half = size // 2
    return [(r * half + half // 2, c * half + half // 2) for r in range(2) for c in range(2)]


def _cell_inked(pixels: np.ndarray, cell: int) -> bool:
    half = pixels.shape[0] // 2
    r, c = divmod(cell, 2)
    return bool(pixels[r * half : (r + 1) * half, c * half : (c + 1) * half].any())


def _color_name(rgb: np.ndarray) -> str | None:
    for name, value in syn.COLORS.items():
        if tuple(int(v) for v in rgb) == value:
            return name
    return None


def _packed(rgb: np.ndarray) -> np.ndarray:
    """One int per pixel: (..., 3) uint8 -> (...)."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]


# ---------------------------------------------------------------- the task table


def test_tasks_answers_are_disjoint_lowercase_single_words():
    assert sorted(syn.TASKS) == ["color", "count", "read", "spatial"]
    seen: dict[str, str] = {}
    for name, spec in syn.TASKS.items():
        assert spec.name == name
        assert spec.needs_image
        assert len(set(spec.answers)) == len(spec.answers)
        for answer in spec.answers:
            assert answer == answer.lower() and answer.split() == [answer], answer
            assert answer not in seen, f"{answer!r} is an answer of both {seen.get(answer)} and {name}"
            seen[answer] = name
        for question in spec.questions:
            assert question == question.lower() and question.endswith("?")


def test_corpus_text_covers_every_question_and_answer():
    corpus = set(syn.corpus_text())
    for spec in syn.TASKS.values():
        assert set(spec.questions) <= corpus
        assert set(spec.answers) <= corpus
    for task in syn.TASKS:
        for sample in _samples(task, 100):
            assert sample.question in corpus and sample.answer in corpus


# ---------------------------------------------------------------- the images say what the answers say


def _only_inked_cell(pixels: np.ndarray) -> int:
    inked = [cell for cell in range(4) if _cell_inked(pixels, cell)]
    assert len(inked) == 1, inked
    return inked[0]


@pytest.mark.parametrize("size", SIZES)
def test_color_answer_is_the_colour_of_the_one_shape(size):
    for sample in _samples("color", 200, size):
        pixels = np.asarray(sample.image)
        assert pixels.shape == (size, size, 3)
        y, x = _cell_centres(size)[_only_inked_cell(pixels)]
        assert _color_name(pixels[y, x]) == sample.answer
        # nothing but black and the named colours is drawn
        allowed = [_packed(np.array(c)) for c in [(0, 0, 0), *syn.COLORS.values()]]
        assert np.isin(_packed(pixels), allowed).all()


@pytest.mark.parametrize("size", SIZES)
def test_count_answer_is_the_number_of_non_black_cells(size):
    for sample in _samples("count", 200, size):
        pixels = np.asarray(sample.image)
        inked = sum(_cell_inked(pixels, cell) for cell in range(4))
        assert syn.COUNT_WORDS[inked - 1] == sample.answer


@pytest.mark.parametrize("size", SIZES)
def test_spatial_answer_is_the_cell_of_the_one_shape(size):
    for sample in _samples("spatial", 200, size):
        assert syn.POSITIONS[_only_inked_cell(np.asarray(sample.image))] == sample.answer


@pytest.mark.parametrize("size", SIZES)
def test_read_image_is_the_answers_glyph_scaled_and_shifted(size):
    scale = size // syn.READ_GRID
    for sample in _samples("read", 200, size):
        pixels = np.asarray(sample.image)
        ink = pixels.any(axis=2)
        assert len(np.unique(_packed(pixels[ink]))) == 1  # one colour
        cells = ink[::scale, ::scale]  # (8, 8) bitmap pixels
        assert np.array_equal(np.kron(cells, np.ones((scale, scale), dtype=bool)), ink)  # grid aligned
        rows, cols = np.nonzero(cells)
        matches = {
            digit
            for digit, variant in _glyph_ids()
            for dy in range(syn.READ_GRID - GLYPH_ROWS + 1)
            for dx in range(syn.READ_GRID - GLYPH_COLS + 1)
            if np.array_equal(cells[dy : dy + GLYPH_ROWS, dx : dx + GLYPH_COLS], glyph(digit, variant))
            and cells.sum() == glyph(digit, variant).sum()
        }
        assert matches == {int(sample.answer)}
        rows_inked = np.nonzero(ink.any(axis=1))[0]
        assert rows_inked[-1] - rows_inked[0] + 1 == GLYPH_ROWS * scale  # large: 7/8 of the image tall


def _glyph_ids() -> list[tuple[int, int]]:
    return [(d, v) for d, variants in DIGIT_GLYPHS.items() for v in range(len(variants))]


def test_glyphs_of_different_digits_differ_under_every_shift():
    def placed(d, v, dy, dx):
        grid = np.zeros((syn.READ_GRID, syn.READ_GRID), dtype=bool)
        grid[dy : dy + GLYPH_ROWS, dx : dx + GLYPH_COLS] = glyph(d, v)
        return grid

    shifts = list(
        itertools.product(range(syn.READ_GRID - GLYPH_ROWS + 1), range(syn.READ_GRID - GLYPH_COLS + 1))
    )
    for (d1, v1), (d2, v2) in itertools.combinations(_glyph_ids(), 2):
        for s1, s2 in itertools.product(shifts, shifts):
            if d1 != d2 or (v1, s1) != (v2, s2):
                assert not np.array_equal(placed(d1, v1, *s1), placed(d2, v2, *s2)), (d1, v1, s1, d2, v2, s2)


def test_read_images_of_different_digits_differ():
    by_digit: dict[str, set[bytes]] = {}
    for sample in _samples("read", 500):
        by_digit.setdefault(sample.answer, set()).add(np.asarray(sample.image).any(axis=2).tobytes())
    assert len(by_digit) == 10
    for a, b in itertools.combinations(by_digit, 2):
        assert not by_digit[a] & by_digit[b], (a, b)


# ---------------------------------------------------------------- balance


@pytest.mark.parametrize("task", sorted(syn.TASKS))
def test_answers_are_balanced(task):
    n = 800
    counts = Counter(s.answer for s in _samples(task, n, seed=7))
    answers = syn.TASKS[task].answers
    assert set(counts) == set(answers)
    expected = n / len(answers)
    for answer in answers:
        assert 0.6 * expected <= counts[answer] <= 1.4 * expected, (answer, counts)


def test_spatial_positions_are_balanced():
    counts = Counter(sample.answer for sample in _samples("spatial", 1000, seed=3))
    assert set(counts) == set(syn.POSITIONS)
    assert all(0.2 <= c / 1000 <= 0.3 for c in counts.values()), counts


# ---------------------------------------------------------------- files


def _suite(out: Path, seed: int = 11) -> dict:
    return syn.write_suite(out, sorted(syn.TASKS), n_train=60, n_test=20, image_size=64, seed=seed)


def test_write_suite_is_byte_identical_for_the_same_inputs(tmp_path):
    first = _suite(tmp_path / "a")
    second = _suite(tmp_path / "b")
    assert first == second
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b
    assert len(files_a) == 2 * len(syn.TASKS) + 1  # no .tmp left behind
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    other = _suite(tmp_path / "c", seed=12)
    assert other["files"]["read/test.jsonl"]["sha256"] != first["files"]["read/test.jsonl"]["sha256"]


def test_manifest_and_records(tmp_path):
    manifest = _suite(tmp_path)
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    assert manifest["seed"] == 11 and manifest["image_size"] == 64 and manifest["tasks"] == sorted(syn.TASKS)
    for task in syn.TASKS:
        for split, n in (("train", 60), ("test", 20)):
            rel = f"{task}/{split}.jsonl"
            path = tmp_path / rel
            assert manifest["files"][rel] == {"n": n, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
            records = syn.read_split(path)
            assert [r["id"] for r in records] == [f"{task}-{split}-{i}" for i in range(n)]
            for record in records:
                assert set(record) == {"id", "task", "question", "answer", "image"}
                assert record["task"] == task and record["answer"] in syn.TASKS[task].answers
                image = syn.decode_image(record["image"])
                assert image.mode == "RGB" and image.size == (64, 64)
                assert syn.encode_image(image) == record["image"]  # the encoding is canonical


def test_train_split_excludes_the_test_split(tmp_path):
    # spatial has the fewest distinct images (~3,600), so without exclusion the splits would overlap.
    def keys(path):
        return [syn.content_key(r["image"], r["question"]) for r in syn.read_split(path)]

    test_keys = syn.write_split(tmp_path / "test.jsonl", "spatial", "test", 300, 5, 64)
    assert keys(tmp_path / "test.jsonl") == test_keys
    unfiltered = syn.write_split(tmp_path / "plain.jsonl", "spatial", "train", 1000, 5, 64)
    assert set(unfiltered) & set(test_keys)
    train_keys = syn.write_split(
        tmp_path / "train.jsonl", "spatial", "train", 1000, 5, 64, exclude=set(test_keys)
    )
    assert len(train_keys) == 1000 and not set(train_keys) & set(test_keys)
    assert keys(tmp_path / "train.jsonl") == train_keys

    manifest = syn.write_suite(tmp_path / "suite", ["count", "read"], 400, 100, 32, seed=2)
    for task in manifest["tasks"]:
        test = set(keys(tmp_path / "suite" / task / "test.jsonl"))
        assert not test & set(keys(tmp_path / "suite" / task / "train.jsonl"))


def test_write_split_refuses_an_exhausted_task(tmp_path):
    # the first 1500 draws of the train stream are all the draws a 10-sample split may make
    drawn = set(syn.write_split(tmp_path / "drawn.jsonl", "read", "train", 1500, 0, 32))
    with pytest.raises(ValueError, match="too few distinct items"):
        syn.write_split(tmp_path / "train.jsonl", "read", "train", 10, 0, 32, exclude=drawn)
    assert not (tmp_path / "train.jsonl").exists()
    assert not (tmp_path / "train.jsonl.tmp").exists()


# ---------------------------------------------------------------- errors


def test_unknown_task_names_the_closest():
    message = "unknown task 'colr' (did you mean 'color'?); known: color, count, read, spatial"
    with pytest.raises(ValueError, match=re.escape(message)):
        syn.make_sample("colr", np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown task 'colr'"):
        syn.write_split(Path("unused.jsonl"), "colr", "test", 1, 0, 64)
    with pytest.raises(ValueError, match="unknown task 'colr'"):
        syn.write_suite(Path("unused"), ["color", "colr"], 1, 1, 64, 0)


@pytest.mark.parametrize("size", [16, 40, 0, -64, 24])
def test_bad_image_size_is_named(size, tmp_path):
    with pytest.raises(ValueError, match=f"image_size .* got {size}"):
        syn.make_sample("color", np.random.default_rng(0), size)
    with pytest.raises(ValueError, match=f"got {size}"):
        syn.write_split(tmp_path / "x.jsonl", "color", "test", 1, 0, size)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("n", [0, -3])
def test_non_positive_n_is_refused(n, tmp_path):
    with pytest.raises(ValueError, match=f"n must be a positive int, got {n}"):
        syn.write_split(tmp_path / "x.jsonl", "color", "test", n, 0, 64)
    with pytest.raises(ValueError, match=f"n_train must be a positive int, got {n}"):
        syn.write_suite(tmp_path, ["color"], n, 5, 64, 0)
    with pytest.raises(ValueError, match=f"n_test must be a positive int, got {n}"):
        syn.write_suite(tmp_path, ["color"], 5, n, 64, 0)
    assert not list(tmp_path.iterdir())


def test_bad_task_lists_are_refused(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        syn.write_suite(tmp_path, [], 5, 5, 64, 0)
    with pytest.raises(ValueError, match="repeat"):
        syn.write_suite(tmp_path, ["color", "color"], 5, 5, 64, 0)
    with pytest.raises(ValueError, match="string"):
        syn.write_suite(tmp_path, "color", 5, 5, 64, 0)

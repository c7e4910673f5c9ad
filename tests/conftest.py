"""Shared fixtures: small random-init backbones of every family, built once per session, and prompts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, TestRun, snakemake
from PIL import Image

from effivlm.backbones import available_families, get_adapter
from effivlm.backbones.loading import Backbone, load_backbone
from effivlm.backbones.sizes import TinySizes
from effivlm.backbones.tiny import build_tiny, save_backbone
from effivlm.pipeline import Prompt

TEST_SIZES = TinySizes(
    text_hidden=64,
    text_layers=3,  # FastV's default layer 2 needs a layer after it
    text_heads=4,
    text_kv_heads=2,
    text_intermediate=128,
    vision_hidden=32,
    vision_layers=1,
    vision_heads=2,
    vision_intermediate=64,
)
CORPUS = [
    "what color is the shape at the top left?",
    "how many shapes are there?",
    "red green blue yellow one two three four yes no",
]


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory) -> dict[str, Path]:
    """family -> folder of a saved random-init small backbone (64 px images, 16 visual tokens per view)."""
    root = tmp_path_factory.mktemp("tiny")
    paths = {}
    for family in available_families():
        model, processor, kwargs = build_tiny(get_adapter(family), CORPUS, 64, TEST_SIZES, seed=0)
        save_backbone(model, processor, kwargs, root / family)
        paths[family] = root / family
    return paths


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(4)]


@pytest.fixture(scope="module")
def backbones(tiny_paths) -> dict[str, Backbone]:
    """family -> the saved small backbone, loaded afresh for each test module (sdpa, float32, cpu)."""
    return {family: load_backbone(str(tiny_paths[family]), family) for family in available_families()}


@pytest.fixture(scope="module")
def prompts(images) -> list[Prompt]:
    """Three prompts of different lengths, the second with two images."""
    return [
        Prompt([images[0]], "what color is the shape at the top left?"),
        Prompt([images[1], images[2]], "how many shapes are there?"),
        Prompt([images[3]], "how many shapes?"),
    ]


@pytest.fixture(scope="session")
def test_run(tmp_path_factory) -> TestRun:
    """configs/test.yaml run end to end once per session on 2 cores (the integration tests read it; a test
    that changes it works on a copy)."""
    workdir = tmp_path_factory.mktemp("test-run")
    results = workdir / "results"
    args = ("--configfile", str(REPO / "configs/test.yaml"), "--config", f"results={results}")
    result = snakemake(workdir, "--cores", "2", *args, timeout=900)
    return TestRun(workdir, results, result)

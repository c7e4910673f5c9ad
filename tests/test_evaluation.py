"""The lmms-eval model, the synthetic task YAML and the job runner, with a fake ``effivlm.pipeline``."""

from __future__ import annotations

import base64
import io
import json
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image

import effivlm
from effivlm.evaluation.runner import METRICS, PREDICTIONS, run_evaluation
from effivlm.evaluation.tasks import write_synthetic_task

COLOURS = {"red": (255, 0, 0), "blue": (0, 0, 255)}
MODEL = {"name": "tiny", "family": "qwen2_vl", "path": "/nowhere/tiny"}


@dataclass
class Prompt:
    images: list
    text: str


@dataclass
class Generation:
    text: str
    stats: dict = field(default_factory=dict)


class FakePipeline:
    """Follows the ``effivlm.pipeline`` contract; always answers "Red." so it is right on the red images."""

    specs: list[dict] = []
    batches: list[int] = []
    fail = False

    def __init__(self, spec: dict) -> None:
        self.spec = spec

    @classmethod
    def from_spec(cls, **spec) -> FakePipeline:
        cls.specs.append(spec)
        return cls(spec)

    def generate(self, prompts: list[Prompt], max_new_tokens: int = 8) -> list[Generation]:
        if self.fail:
            raise RuntimeError("boom inside generate")
        type(self).batches.append(len(prompts))
        for prompt in prompts:
            assert isinstance(prompt, Prompt) and prompt.text.startswith("what colour")
            assert all(isinstance(image, Image.Image) and image.mode == "RGB" for image in prompt.images)
        # The newline and what follows are cut by the task's `until`, the case and dot by the normaliser.
        return [Generation(" Red.\nand more", {"visual_tokens": [16], "visual_kept": [4]}) for _ in prompts]

    def describe(self) -> dict:
        return {"fake": True, **self.spec}


@pytest.fixture
def fake_pipeline(monkeypatch):
    module = types.ModuleType("effivlm.pipeline")
    module.Pipeline, module.Prompt, module.Generation = FakePipeline, Prompt, Generation
    monkeypatch.setitem(sys.modules, "effivlm.pipeline", module)
    monkeypatch.setattr(FakePipeline, "specs", [])
    monkeypatch.setattr(FakePipeline, "batches", [])
    monkeypatch.setattr(FakePipeline, "fail", False)
    return FakePipeline


def _png(colour: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_jsonl(path: Path, n: int) -> Path:
    """``n`` records, red and blue alternating: the fake is right on exactly the even ones."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in range(n):
            answer = "red" if i % 2 == 0 else "blue"
            record = {
                "id": f"c{i}",
                "task": "colour",
                "question": "what colour is the square?",
                "answer": answer,
                "image": _png(COLOURS[answer]),
            }
            f.write(json.dumps(record) + "\n")
    return path


def _run(tmp_path: Path, n: int = 6, **kwargs) -> dict:
    # `data` may be the task's folder (holding test.jsonl), as the workflow passes it.
    write_jsonl(tmp_path / "colour" / "test.jsonl", n)
    task = {"name": "colour", "kind": "synthetic", "data": str(tmp_path / "colour")}
    return run_evaluation(
        tmp_path / "out", MODEL, "fastv_k2", "fastv", {"k": 2}, 0.25, task, batch_size=4, **kwargs
    )


def test_synthetic_task_scores_and_writes_outputs(tmp_path, fake_pipeline):
    metrics = _run(tmp_path)
    out = tmp_path / "out"
    assert json.loads((out / METRICS).read_text()) == metrics
    assert metrics["score"] == pytest.approx(0.5)
    assert metrics["metric"] == "exact_match" and metrics["n"] == 6
    assert metrics["task"] == "colour" and metrics["lmms_task"] == "effivlm_colour"
    assert metrics["method"] == "fastv_k2" and metrics["method_name"] == "fastv"
    assert metrics["visual_tokens"] == {"total": 96, "kept": 24}
    assert metrics["effivlm_version"] == effivlm.__version__
    assert metrics["code_version"] == effivlm.CODE_VERSION
    assert metrics["pipeline"]["fake"] is True
    rows = [json.loads(line) for line in (out / PREDICTIONS).read_text().splitlines()]
    assert [row["doc_id"] for row in rows] == list(range(6))
    assert [row["score"] for row in rows] == [1.0, 0.0] * 3
    assert {row["prediction"] for row in rows} == {" Red."}
    assert [row["target"] for row in rows] == ["red", "blue"] * 3
    assert all(row["visual_tokens"] == [16] and row["visual_kept"] == [4] for row in rows)
    # The model is built once from the job's spec and fed batches of at most batch_size.
    (spec,) = fake_pipeline.specs
    assert spec["method"] == "fastv" and spec["method_params"] == {"k": 2} and spec["budget"] == 0.25
    assert spec["family"] == "qwen2_vl" and spec["revision"] is None
    assert fake_pipeline.batches == [4, 2]
    assert not [p for p in out.iterdir() if p.name not in (METRICS, PREDICTIONS)]


def test_limit(tmp_path, fake_pipeline):
    metrics = _run(tmp_path, limit=3)
    assert metrics["n"] == 3 and metrics["score"] == pytest.approx(2 / 3)


def test_failure_inside_generate_raises_and_leaves_no_metrics(tmp_path, fake_pipeline):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / METRICS).write_text("{}")  # left by an earlier run
    fake_pipeline.fail = True
    with pytest.raises(RuntimeError, match="boom inside generate"):
        _run(tmp_path, log=tmp_path / "logs" / "job.log")
    assert not (tmp_path / "out" / METRICS).exists()
    # A log path receives the progress messages and the traceback.
    text = (tmp_path / "logs" / "job.log").read_text()
    assert "evaluating tiny / fastv_k2" in text and "RuntimeError: boom inside generate" in text


def test_empty_data_file_raises(tmp_path, fake_pipeline):
    (tmp_path / "empty.jsonl").write_text("")
    task = {"name": "colour", "kind": "synthetic", "data": str(tmp_path / "empty.jsonl")}
    with pytest.raises(ValueError, match="has no records"):
        run_evaluation(tmp_path / "out", MODEL, "dense", "dense", {}, 1.0, task)
    assert not (tmp_path / "out" / METRICS).exists()


def test_unknown_lmms_task_raises(tmp_path, fake_pipeline):
    task = {"name": "docvqa_vall", "kind": "lmms"}
    with pytest.raises(ValueError, match=r"unknown lmms-eval task 'docvqa_vall' \(did you mean 'docvqa_val'"):
        run_evaluation(tmp_path / "out", MODEL, "dense", "dense", {}, 1.0, task)
    assert not fake_pipeline.specs and not (tmp_path / "out" / METRICS).exists()


def test_lmms_task_lookup(tmp_path):
    from effivlm.evaluation.runner import _task_manager

    manager, name = _task_manager({"name": "mme", "kind": "lmms"}, tmp_path, 8)
    assert name == "mme" and manager.task_index["mme"]["yaml_path"].endswith("mme/mme.yaml")
    assert len(manager.all_tasks) < 50  # found by the text scan: only its own folder was indexed
    with pytest.raises(ValueError, match="'docvqa' is an lmms-eval group"):
        _task_manager({"name": "docvqa", "kind": "lmms"}, tmp_path, 8)


def test_unknown_task_kind_raises(tmp_path, fake_pipeline):
    with pytest.raises(ValueError, match="unknown task kind 'video'"):
        run_evaluation(tmp_path / "out", MODEL, "dense", "dense", {}, 1.0, {"name": "x", "kind": "video"})


def test_write_synthetic_task(tmp_path):
    data = write_jsonl(tmp_path / "test.jsonl", 2)
    assert write_synthetic_task("colour", data, tmp_path / "tasks") == "effivlm_colour"
    assert (tmp_path / "tasks" / "effivlm_colour.yaml").is_file()
    with pytest.raises(ValueError, match="synthetic task name"):
        write_synthetic_task("Colour!", data, tmp_path / "tasks")
    with pytest.raises(FileNotFoundError):
        write_synthetic_task("colour", tmp_path / "missing.jsonl", tmp_path / "tasks")


def test_task_utils():
    from effivlm.evaluation.task_templates import utils

    doc = {"question": "q?", "answer": "Light Blue", "image": _png((0, 0, 255))}
    assert utils.doc_to_visual(doc)[0].getpixel((0, 0)) == (0, 0, 255)
    assert utils.doc_to_text(doc) == "q?" and utils.doc_to_target(doc) == "Light Blue"
    assert utils.process_results(doc, ["  light   BLUE. "]) == {"exact_match": 1.0}
    assert utils.process_results(doc, ["blue"]) == {"exact_match": 0.0}


def test_lmms_eval_resolves_the_entry_point(fake_pipeline):
    from lmms_eval.models import get_model

    from effivlm.evaluation.lmms_model import EffiVLM

    assert get_model("effivlm") is EffiVLM
    # The CLI path: model_args as a string, method_params as JSON with commas inside.
    lm = EffiVLM.create_from_arg_string(
        'model_path=/m,family=llava,method=snapkv,budget=0.1,method_params={"window": 8, "pool": "max"}',
        {"batch_size": 2, "max_batch_size": None, "device": None},
    )
    assert lm.batch_size == 2
    (spec,) = fake_pipeline.specs
    assert spec["method_params"] == {"window": 8, "pool": "max"} and spec["budget"] == 0.1
    with pytest.raises(NotImplementedError, match="generate_until tasks only"):
        lm.loglikelihood([])
    with pytest.raises(ValueError, match="unknown effivlm model args"):
        EffiVLM(model_path="/m", family="llava", bogus=1)


def test_truncate_at_stop():
    from effivlm.evaluation.lmms_model import truncate_at_stop

    assert truncate_at_stop("a\nb</s>c", ["</s>", "\n"]) == "a"
    assert truncate_at_stop("abc", []) == "abc"


# ---------------------------------------------------------------------------- resuming an interrupted job


def _answer_by_colour(self, prompts: list[Prompt], max_new_tokens: int = 8) -> list[Generation]:
    """A fake model whose answers and statistics depend on the sample (its image's colour) and nothing else."""
    type(self).batches.append(len(prompts))
    if self.fail and len(type(self).batches) == self.fail:
        raise RuntimeError("killed at a batch")
    out = []
    for prompt in prompts:
        red = prompt.images[0].getpixel((0, 0))[0] > 128
        out.append(Generation("Red." if red else "Blue, no: red", {"visual_tokens": [16], "red": red}))
    return out


def _outputs(out: Path) -> tuple[str, dict]:
    metrics = json.loads((out / METRICS).read_text())
    metrics.pop("seconds")
    return (out / PREDICTIONS).read_text(), metrics


def _answers_files(out: Path) -> list[Path]:
    return sorted(out.glob(".answers-*.jsonl"))


def _interrupted(tmp_path: Path, fake_pipeline, n: int, fail: int) -> Path:
    """Run a job of ``n`` samples whose ``fail``-th batch raises; return the answers file it left, with the
    fake pipeline reset (no failure, no batches counted) for the rerun."""
    fake_pipeline.fail = fail
    with pytest.raises(RuntimeError, match="killed at a batch"):
        _run(tmp_path, n=n)
    (answers,) = _answers_files(tmp_path / "out")
    fake_pipeline.batches.clear()
    fake_pipeline.fail = False
    return answers


def test_a_failed_evaluation_resumes_from_its_last_finished_batch(tmp_path, fake_pipeline, monkeypatch):
    monkeypatch.setattr(FakePipeline, "generate", _answer_by_colour)
    uninterrupted = _run(tmp_path / "whole", n=10)
    assert fake_pipeline.batches == [4, 4, 2] and uninterrupted["score"] == pytest.approx(0.5)

    fake_pipeline.batches.clear()
    answers = _interrupted(tmp_path, fake_pipeline, n=10, fail=3)  # the first two batches are logged
    assert len(answers.read_text().splitlines()) == 8
    assert not (tmp_path / "out" / METRICS).exists()
    with answers.open("a") as fh:  # a kill during a write leaves a torn last line
        fh.write('{"key": "')

    _run(tmp_path, n=10, log=tmp_path / "job.log")
    assert fake_pipeline.batches == [2]  # only the last batch, with the boundaries of an uninterrupted run
    assert _outputs(tmp_path / "out") == _outputs(tmp_path / "whole" / "out")
    assert not _answers_files(tmp_path / "out")  # removed once metrics.json is written
    log = (tmp_path / "job.log").read_text()
    assert "resumed 8 of 10 samples from" in log
    assert "generation: 10/10 samples (100%)" in log
    assert "evaluation started" in log and "evaluation finished in" in log


def test_a_partly_logged_batch_is_generated_again(tmp_path, fake_pipeline, monkeypatch):
    """A batch is answered from the log only when all of it is there: its padding must stay the same."""
    monkeypatch.setattr(FakePipeline, "generate", _answer_by_colour)
    answers = _interrupted(tmp_path, fake_pipeline, n=6, fail=2)
    lines = answers.read_text().splitlines(keepends=True)
    answers.write_text("".join(lines[:3]))  # the first batch of 4, one sample short
    _run(tmp_path, n=6)
    assert fake_pipeline.batches == [4, 2]


def test_a_changed_configuration_never_resumes_from_stale_answers(tmp_path, fake_pipeline, monkeypatch):
    from effivlm.evaluation.runner import resume_key

    monkeypatch.setattr(FakePipeline, "generate", _answer_by_colour)
    stale = _interrupted(tmp_path, fake_pipeline, n=6, fail=2)
    _run(tmp_path, n=6, seed=1)  # another seed: every batch is generated, the stale answers are dropped
    assert fake_pipeline.batches == [4, 2]
    assert not stale.exists() and not _answers_files(tmp_path / "out")

    # the key covers the settings, the model's files and the task's data
    task = {"name": "colour", "kind": "synthetic", "data": str(tmp_path / "colour")}
    model = {**MODEL, "path": str(tmp_path / "model")}
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "weights").write_text("1")
    key = resume_key({"budget": 0.1}, model, task)
    assert resume_key({"budget": 0.1}, model, task) == key
    assert resume_key({"budget": 0.4}, model, task) != key
    (tmp_path / "model" / "weights").write_text("22")  # a retrained model
    assert resume_key({"budget": 0.1}, model, task) != key
    key = resume_key({"budget": 0.1}, model, task)
    write_jsonl(tmp_path / "colour" / "test.jsonl", 5)  # new data
    assert resume_key({"budget": 0.1}, model, task) != key


def test_answer_log_drops_a_torn_last_line(tmp_path):
    from effivlm.evaluation.lmms_model import AnswerLog

    path = tmp_path / "answers.jsonl"
    AnswerLog(path).append([{"key": "a", "answer": "x", "stats": {"n": [1]}}])
    path.write_text(path.read_text() + '{"key": "b", "answer": "y", "st')
    log = AnswerLog(path)
    assert log.answers == {"a": {"answer": "x", "stats": {"n": [1]}}}
    log.append([{"key": "b", "answer": "y", "stats": {}}])
    assert set(AnswerLog(path).answers) == {"a", "b"}
    assert path.read_text().count("\n") == 2


def test_progress_lines_are_readable_in_a_log():
    from effivlm.io import Progress

    lines: list[str] = []
    now = [0.0]
    progress = Progress("generation", 100, done=20, interval=10, say=lines.append, clock=lambda: now[0])
    for _ in range(8):
        now[0] += 4.0
        progress.update(10)  # 2.5 samples/s
    assert lines == [
        "generation: 20/100 samples (20%)",
        "generation: 50/100 samples (50%), 2.50 samples/s, eta 20s",
        "generation: 80/100 samples (80%), 2.50 samples/s, eta 8s",
        "generation: 100/100 samples (100%) in 32s, 2.50 samples/s",
    ]

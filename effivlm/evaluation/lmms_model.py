"""The lmms-eval model that runs an effivlm ``Pipeline`` (a backbone plus one compression method).

lmms-eval 0.7.3 only sees models registered through the ``lmms_eval.models`` entry point; pyproject.toml
points it at :func:`manifest`. The backbone is loaded when the model is constructed, never at import.

With ``answers_file``, every finished batch's answers are appended to that file (an :class:`AnswerLog`), and
a later run with the same file answers those samples from it instead of generating them again: a killed
evaluation resumes from its last finished batch. Batches keep the boundaries of an uninterrupted run (a
batch is taken from the file only when all of its samples are there), so padding, and with it every answer,
is the same as if the run had never stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image

from effivlm.io import Progress

logger = logging.getLogger(__name__)

MODEL_NAME = "effivlm"


def manifest():
    """The ``lmms_eval.models`` entry point: registers :class:`EffiVLM` under the name ``effivlm``.

    A callable, so that ``lmms_eval.models`` (which calls it while it is itself being imported) is never
    imported from here: this module may be imported first, and must stay importable in either order.
    """
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path=f"{__name__}.EffiVLM")


# Keys of lmms-eval generation_kwargs that ask for sampling; the pipeline decodes greedily only.
_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "num_beams", "do_sample")


def _parse_method_params(value: str | dict | None) -> dict:
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return dict(value)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise ValueError(f"method_params must be a JSON object, got {value!r}: {exc}") from exc
    if not isinstance(parsed, dict):
        raise ValueError(f"method_params must be a JSON object, got {value!r}")
    return parsed


def _asks_for_sampling(gen_kwargs: dict) -> bool:
    if gen_kwargs.get("do_sample"):
        return True
    temperature = gen_kwargs.get("temperature")
    if temperature not in (None, 0, 0.0):
        return True
    num_beams = gen_kwargs.get("num_beams")
    return num_beams not in (None, 1)


def truncate_at_stop(text: str, until: Sequence[str]) -> str:
    """Cut ``text`` at the first occurrence of any stop string (the stop string itself is dropped)."""
    cut = len(text)
    for stop in until:
        if stop:
            index = text.find(stop)
            if index != -1:
                cut = min(cut, index)
    return text[:cut]


def _as_images(visuals: Any, task: str, doc_id: int) -> list[Image.Image]:
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        visuals = [visuals]
    images = []
    for visual in visuals:
        if not isinstance(visual, Image.Image):
            raise ValueError(
                f"task {task!r} doc {doc_id}: effivlm evaluates image tasks only, "
                f"doc_to_visual returned a {type(visual).__name__}"
            )
        images.append(visual.convert("RGB") if visual.mode != "RGB" else visual)
    return images


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def request_key(request: Instance) -> str:
    """What identifies one generation request: its task, document, prompt text and decoding settings."""
    context, gen_kwargs, _, doc_id, task, split = request.args
    text = json.dumps([task, split, doc_id, context, gen_kwargs], sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


class AnswerLog:
    """The answers of finished samples, one JSON line each (``key``, ``answer``, ``stats``), appended a batch
    at a time and synced to disk, so that a killed job loses at most the batch it was generating.

    Opening the file drops a torn last line (a kill during a write): the next append starts a fresh line.
    Lines that cannot be read are skipped, so their samples are generated again.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.answers: dict[str, dict[str, Any]] = {}
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            with open(self.path, "r+b") as fh:
                fh.truncate(end)
        for line in data[:end].splitlines():
            try:
                record = json.loads(line)
                self.answers[record["key"]] = {"answer": record["answer"], "stats": record["stats"]}
            except (ValueError, KeyError, TypeError):
                logger.warning("%s: skipping an unreadable line", self.path)

    def append(self, records: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(r, default=str, ensure_ascii=False) + "\n" for r in records)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())


class EffiVLM(lmms):
    """An effivlm ``Pipeline`` behind lmms-eval's ``generate_until``.

    Model args (``--model effivlm --model_args model_path=...,family=...``): ``model_path``, ``family``,
    ``method`` (default ``dense``), ``budget``, ``method_params`` (a JSON object), ``dtype``, ``device``,
    ``attn_implementation``, ``batch_size``, ``seed``, ``revision``, ``max_new_tokens`` (used when a task's
    generation_kwargs do not set it) and ``answers_file`` (resume from and append to an :class:`AnswerLog`;
    the caller keys its name to everything that changes an answer).

    After ``generate_until``, :attr:`sample_stats` maps ``(task, doc_id)`` to the pipeline's per-sample
    statistics (for example ``{"visual_tokens": [16], "visual_kept": [2]}``).
    """

    is_simple = True

    def __init__(
        self,
        model_path: str,
        family: str,
        method: str = "dense",
        budget: float = 1.0,
        method_params: str | dict | None = None,
        dtype: str = "float32",
        device: str | None = "cpu",
        attn_implementation: str = "sdpa",
        batch_size: int | str | None = 1,
        seed: int = 0,
        max_new_tokens: int = 8,
        revision: str | None = None,
        answers_file: str | None = None,
        **unused: Any,
    ) -> None:
        super().__init__()
        # lmms-eval passes max_batch_size (and None-valued defaults) to every model; nothing else may be unknown.
        unknown = {k: v for k, v in unused.items() if k != "max_batch_size" and v is not None}
        if unknown:
            raise ValueError(f"unknown effivlm model args: {sorted(unknown)}")
        batch_size = 1 if batch_size in (None, "") else batch_size
        if str(batch_size).startswith("auto"):
            raise ValueError("effivlm needs a fixed batch_size, got 'auto'")
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        self.max_new_tokens = int(max_new_tokens)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        # lmms-eval's evaluator builds an accelerate.Accelerator unless the model has this attribute; one process needs none.
        self.accelerator = None
        self.sample_stats: dict[tuple[str, int], dict] = {}
        self.answers_file = str(answers_file) if answers_file else None
        self._warned_sampling = False

        from effivlm.pipeline import Pipeline

        self.pipeline = Pipeline.from_spec(
            model_path=str(model_path),
            family=str(family),
            method=str(method),
            method_params=_parse_method_params(method_params),
            budget=float(budget),
            dtype=str(dtype),
            device=str(device or "cpu"),
            attn_implementation=str(attn_implementation),
            seed=int(seed),
            revision=str(revision) if revision else None,
        )

    def describe(self) -> dict:
        return self.pipeline.describe()

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "effivlm supports generate_until tasks only; loglikelihood / multiple_choice tasks are not supported"
        )

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(
            "effivlm supports single-round generate_until tasks only; multi-round tasks are not supported"
        )

    def _generation_settings(self, gen_kwargs: dict) -> tuple[int, list[str]]:
        if _asks_for_sampling(gen_kwargs) and not self._warned_sampling:
            asked = {k: gen_kwargs[k] for k in _SAMPLING_KEYS if k in gen_kwargs}
            logger.warning("effivlm decodes greedily; ignoring sampling settings %s", asked)
            self._warned_sampling = True
        max_new_tokens = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
        until = gen_kwargs.get("until") or []
        if isinstance(until, str):
            until = [until]
        if not isinstance(until, (list, tuple)):
            raise ValueError(f"generation_kwargs 'until' must be a string or a list, got {until!r}")
        return max_new_tokens, list(until)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        from effivlm.pipeline import Prompt

        # Requests of one batch must share their decoding settings; keep the original order otherwise.
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            gen_kwargs = request.args[1]
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(index)
        batches = [batch for indices in groups.values() for batch in _batches(indices, self.batch_size)]

        log = AnswerLog(self.answers_file) if self.answers_file else None
        keys = [request_key(request) for request in requests]
        done = log.answers if log else {}
        finished = [all(keys[i] in done for i in batch) for batch in batches]
        resumed = sum(len(batch) for batch, ok in zip(batches, finished, strict=True) if ok)
        if log is not None:
            logger.info("resumed %d of %d samples from %s", resumed, len(requests), log.path)

        answers: list[str | None] = [None] * len(requests)
        progress = Progress("generation", len(requests), done=resumed)
        for batch, ok in zip(batches, finished, strict=True):
            if ok:
                for index in batch:
                    _, _, _, doc_id, task, _ = requests[index].args
                    answers[index] = done[keys[index]]["answer"]
                    self.sample_stats[(task, doc_id)] = done[keys[index]]["stats"]
                continue
            max_new_tokens, until = self._generation_settings(requests[batch[0]].args[1])
            prompts = []
            for index in batch:
                context, _, doc_to_visual, doc_id, task, split = requests[index].args
                doc = self.task_dict[task][split][doc_id]
                prompts.append(Prompt(images=_as_images(doc_to_visual(doc), task, doc_id), text=context))
            generations = self.pipeline.generate(prompts, max_new_tokens=max_new_tokens)
            if len(generations) != len(prompts):
                raise RuntimeError(
                    f"pipeline returned {len(generations)} generations for {len(prompts)} prompts"
                )
            records = []
            for index, generation in zip(batch, generations, strict=True):
                _, _, _, doc_id, task, _ = requests[index].args
                answers[index] = truncate_at_stop(generation.text, until)
                stats = self.sample_stats[(task, doc_id)] = dict(generation.stats)
                records.append({"key": keys[index], "answer": answers[index], "stats": stats})
            if log is not None:
                log.append(records)
            progress.update(len(batch))
        return answers

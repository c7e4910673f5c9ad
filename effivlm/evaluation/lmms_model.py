"""The lmms-eval model that runs an effivlm ``Pipeline`` (a backbone plus one compression method).

lmms-eval 0.7.3 only sees models registered through the ``lmms_eval.models`` entry point; pyproject.toml
points it at :func:`manifest`. The backbone is loaded when the model is constructed, never at import.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

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


class EffiVLM(lmms):
    """An effivlm ``Pipeline`` behind lmms-eval's ``generate_until``.

    Model args (``--model effivlm --model_args model_path=...,family=...``): ``model_path``, ``family``,
    ``method`` (default ``dense``), ``budget``, ``method_params`` (a JSON object), ``dtype``, ``device``,
    ``attn_implementation``, ``batch_size``, ``seed``, ``revision`` and ``max_new_tokens`` (used when a task's
    generation_kwargs do not set it).

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

        answers: list[str | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), desc="effivlm", disable=self.rank != 0)
        for indices in groups.values():
            max_new_tokens, until = self._generation_settings(requests[indices[0]].args[1])
            for batch in _batches(indices, self.batch_size):
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
                for index, generation in zip(batch, generations, strict=True):
                    _, _, _, doc_id, task, _ = requests[index].args
                    answers[index] = truncate_at_stop(generation.text, until)
                    self.sample_stats[(task, doc_id)] = dict(generation.stats)
                progress.update(len(batch))
        progress.close()
        return answers

"""The efficiency of one (model, method, budget), independent of tasks: what the ``efficiency`` rule measures.

Inputs are fixed and synthetic, of paper-like size: ``batch_size`` copies of one prompt with ``images`` random
images of ``image_size`` pixels and a question of ``question_tokens`` tokens. The same prompt serves every method
of a model, so their figures compare.

Measured, after ``warmup`` untimed calls, over ``repeats`` timed rounds (TTFT and decode alternate in a round):

* ``ttft_ms``: the wall time of ``Pipeline.generate(prompts, max_new_tokens=1)`` end to end (preprocessing, the
  vision tower, the prefill with the method's scoring, a KV method's compression, the first token); CUDA events
  on a GPU;
* ``decode_ms``: the time of one steady-state decode step (see :func:`decode_run`), and ``tokens_per_s``, the
  tokens a step decodes (the batch) per second;
* ``peak_memory_bytes``: CUDA's peak allocated memory during the timed runs on a GPU; on a CPU the process's
  peak resident set (VmHWM, reset through ``/proc/self/clear_refs`` before the runs), weights included;
* ``kv_bytes``: the prompt's KV cache after the method (``kv_bytes_dense``: the uncompressed prompt's);
* ``prefill_flops`` and ``decode_flops``: the language model's analytic FLOPs (``effivlm.efficiency.flops``) for the
  tokens every layer actually processed in the prefill and for one decoded token attending to the cache the
  method kept, at the model's actual MLP widths (channels a structured method removed are not counted; weights
  zeroed by unstructured sparsity or stored in 4 bits still run through dense matmuls and are counted). The vision
  tower is not counted: every method runs it in full.

Each timing is summarised by its median, quartiles, min and max over the timed runs.

The backbone is either the configured model itself (its trained, real or compressed weights) or, since timing
needs no trained weights, a random-init model of the same family at named sizes (``RANDOM_SIZES``: ``mid``, a
compute-bound size for CPUs, and ``7b``, Qwen2-VL-7B's decoder and tower, for GPUs). A weights entry is then
applied to the random model by its own method, calibrated on the synthetic prompt (EcoFLaP's gradient pass
included), so that the timed model has the structure the method produces: sliced MLPs, packed 4-bit codes.
GPTQ and AWQ are replaced by RTN at the same bits, group size and targets (``STAND_INS``): all three store the
same packed codes and scales and run the same kernels, and their searches (minutes on a CPU for a mid-size
model) change which codes are stored, not what a forward pass costs. The record says when a stand-in ran.
"""

from __future__ import annotations

import gc
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from effivlm.backbones import get_adapter
from effivlm.backbones.loading import DTYPES, Backbone, resolve_device
from effivlm.backbones.sizes import TinySizes
from effivlm.backbones.tiny import build_tiny
from effivlm.efficiency.flops import DecoderShape, decode_flops, prefill_flops
from effivlm.pipeline import Generation, Pipeline, Prompt

#: the tokenizer's training text of random backbones, and the words questions are made of
CORPUS = [
    "what color is the shape at the top left of the picture?",
    "how many shapes are there in the image and where are they?",
    "red green blue yellow one two three four yes no left right top bottom",
]
#: sizes of random-init backbones. mid: wide enough that matmuls, not Python, dominate on a CPU (a prefill of
#: ~1,000 tokens takes about a second on 2 cores); 7b: Qwen2-VL-7B's decoder and vision tower (LLaVA-OneVision-7B
#: has the same decoder)
RANDOM_SIZES = {
    "mid": TinySizes(1024, 4, 16, 4, 2816, 256, 2, 4, 1024, 32768),
    "7b": TinySizes(3584, 28, 28, 4, 18944, 1280, 32, 16, 5120, 32768),
}
#: image side giving about 1,000 visual tokens on a random backbone: Qwen/InternVL 8 px patches merged 2 x 2 ->
#: (512/16)^2 = 1024; LLaVA-OneVision 16 px patches, base view plus one AnyRes crop plus a newline per row -> 990
RANDOM_IMAGE_SIZES = {"qwen2_vl": 512, "qwen2_5_vl": 512, "internvl": 512, "llava_onevision": 352}
#: weight methods replaced on random backbones by a method producing the same structure at the same cost
STAND_INS = {"gptq": "rtn", "awq": "rtn"}
#: image side for a loaded model when the config leaves it open (the processors of real checkpoints resize)
MODEL_IMAGE_SIZE = 448


@dataclass(frozen=True)
class Settings:
    """The efficiency section of the config (see the schema): inputs and timing."""

    backbone: str = "model"  # "model" | "random"
    sizes: str = "mid"  # a RANDOM_SIZES name, for backbone "random"
    image_size: int | None = None
    images: int = 1
    question_tokens: int = 32
    new_tokens: int = 16
    batch_size: int = 1
    warmup: int = 1
    repeats: int = 5

    def __post_init__(self) -> None:
        if self.backbone not in ("model", "random"):
            raise ValueError(f"efficiency.backbone must be 'model' or 'random', got {self.backbone!r}")
        if self.sizes not in RANDOM_SIZES:
            raise ValueError(f"efficiency.sizes must be one of {sorted(RANDOM_SIZES)}, got {self.sizes!r}")
        for name in ("images", "question_tokens", "batch_size", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"efficiency.{name} must be >= 1, got {getattr(self, name)}")
        if self.new_tokens < 3:
            raise ValueError(f"efficiency.new_tokens must be >= 3 (one timed step), got {self.new_tokens}")
        if self.warmup < 0:
            raise ValueError(f"efficiency.warmup must be >= 0, got {self.warmup}")

    def resolved_image_size(self, family: str) -> int:
        if self.image_size is not None:
            return self.image_size
        return RANDOM_IMAGE_SIZES[family] if self.backbone == "random" else MODEL_IMAGE_SIZE


# ---------------------------------------------------------------------------------------------- backbones
def random_backbone(
    family: str, sizes: TinySizes, *, image_size: int, dtype: str, device: str, attn: str, seed: int
) -> Backbone:
    """A random-init backbone of ``family`` at ``sizes``, built in memory in ``dtype`` on ``device``."""
    adapter = get_adapter(family)
    saved = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[dtype])  # build in the target dtype: a 7B model in float32 would not fit
    try:
        model, processor, _ = build_tiny(adapter, CORPUS, image_size, sizes, seed=seed)
    finally:
        torch.set_default_dtype(saved)
    model.set_attn_implementation(attn)
    model.to(resolve_device(device)).eval()
    processor.tokenizer.padding_side = "left"
    return Backbone(model=model, processor=processor, adapter=adapter, path=f"random:{family}")


def question(tokenizer: Any, n_tokens: int) -> str:
    """A question of ``n_tokens`` tokens: corpus words, then a question mark (the byte-level pre-tokenizer splits
    at spaces, so the text's tokens are its words' own)."""
    words = " ".join(CORPUS).replace("?", "").split()

    def cost(i: int) -> int:
        word = words[i % len(words)]
        return len(tokenizer(word if i == 0 else " " + word, add_special_tokens=False)["input_ids"])

    out: list[str] = []
    total = 1  # the question mark
    while total + cost(len(out)) <= n_tokens:
        total += cost(len(out))
        out.append(words[len(out) % len(words)])
    return " ".join(out) + "?"


def synthetic_prompts(backbone: Backbone, settings: Settings, seed: int) -> list[Prompt]:
    """``batch_size`` copies of one prompt: ``images`` random images and a question of ``question_tokens``."""
    rng = np.random.default_rng(seed)
    side = settings.resolved_image_size(backbone.adapter.family)
    images = [
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(settings.images)
    ]
    text = question(backbone.processor.tokenizer, settings.question_tokens)
    return [Prompt(images=images, text=text)] * settings.batch_size


def apply_weights_to_random(
    backbone: Backbone, weights: dict[str, Any], prompts: list[Prompt], seed: int
) -> dict[str, Any]:
    """Compress a random backbone in place with a weights entry's own method, calibrated on the prompts."""
    from effivlm.calibration import Statistics, calibration_batches, collect_statistics
    from effivlm.data.synthetic import encode_image
    from effivlm.methods.weights import WEIGHT_METHODS, build_weight_method

    name = STAND_INS.get(weights["method"], weights["method"])
    params = dict(weights.get("params") or {})
    if name != weights["method"]:  # keep what the stand-in understands: bits, group size, targets
        params = {k: v for k, v in params.items() if k in WEIGHT_METHODS.get(name).params()}
    method = build_weight_method(name, params)
    records = [
        {"id": str(i), "image": encode_image(p.images[0]), "prompt": p.text, "caption": p.text}
        for i, p in enumerate(prompts[:1])
    ]
    stats = Statistics({}, {}, {}, 0)
    if method.needs:
        stats = collect_statistics(backbone, records, batch_size=1, hessians="hessian" in method.needs)
    batches = list(calibration_batches(backbone, records, 1)) if method.needs_batches else None
    torch.manual_seed(seed)
    with torch.no_grad():
        report = method.compress(backbone, stats, batches)
    return {
        "method": method.describe(),
        "stand_in_for": weights["method"] if name != weights["method"] else None,
        "summary": report.summary,
        "calibrated_on": "the synthetic prompt (random weights)",
    }


# ---------------------------------------------------------------------------------------------- timing
def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], Any], device: torch.device | str) -> tuple[float, Any]:
    """Wall time of one call in ms (CUDA events on a GPU), and its result."""
    if torch.device(device).type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        result = fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end), result
    t0 = time.perf_counter()
    result = fn()
    return (time.perf_counter() - t0) * 1e3, result


@contextmanager
def no_eos(backbone: Backbone) -> Iterator[None]:
    """Set the end-of-sequence logit to -inf, so that greedy decoding runs every step it is asked for (random
    weights could emit it at any step; the cost of a step is unchanged)."""
    eos = backbone.processor.tokenizer.eos_token_id

    def hook(module, inputs, output):
        output[..., eos] = float("-inf")
        return output

    handle = backbone.adapter.lm_head(backbone.model).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def ttft_run(pipe: Pipeline, prompts: list[Prompt]) -> tuple[float, list[Generation]]:
    """Time to first token in ms: ``generate(prompts, max_new_tokens=1)``, and its generations."""
    return time_call(lambda: pipe.generate(prompts, max_new_tokens=1), pipe.backbone.device)


def decode_run(pipe: Pipeline, prompts: list[Prompt], steps: int) -> tuple[float, list[Generation]]:
    """The median time in ms of ``steps`` steady-state decode steps, and the generations.

    A forward hook on the language model records when each of its calls ends (after a CUDA synchronisation).
    Call 0 is the prefill; step i is the time from the end of call i to the end of call i + 1: the LM head on the
    last hidden state, the argmax, the token's embedding and one decoder forward over the (compressed) cache.
    """
    ends: list[float] = []
    device = pipe.backbone.device

    def hook(module, inputs, output):
        synchronize(device)
        ends.append(time.perf_counter())

    backbone = pipe.backbone
    handle = backbone.adapter.language_model(backbone.model).register_forward_hook(hook)
    try:
        gens = pipe.generate(prompts, max_new_tokens=steps + 2)
    finally:
        handle.remove()
    if any(g.stats["new_tokens"] != steps + 2 for g in gens) or len(ends) != steps + 2:
        raise RuntimeError(
            f"decoding stopped early: {steps + 2} new tokens asked, got {[g.stats['new_tokens'] for g in gens]}"
        )
    step_ms = [(b - a) * 1e3 for a, b in zip(ends[1:], ends[2:], strict=False)]
    return statistics.median(step_ms), gens


def summary(times: list[float]) -> dict[str, float]:
    """Median, quartiles, min and max of timed runs."""
    q1, median, q3 = np.percentile(np.asarray(times, dtype=float), [25, 50, 75])
    return {"median": float(median), "q1": float(q1), "q3": float(q3), "min": min(times), "max": max(times)}


# ---------------------------------------------------------------------------------------------- memory
_VMHWM = re.compile(r"^VmHWM:\s+(\d+)\s+kB", re.M)


class PeakMemory:
    """Peak memory of a block: CUDA's peak allocated bytes, or the process's peak resident set on a CPU."""

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.kind = "cuda_peak_allocated" if self.cuda else "peak_rss"
        self.bytes: int | None = None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            try:  # Linux: "5" resets VmHWM to the current resident set
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                self.kind = "peak_rss_since_start"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            self.bytes = int(torch.cuda.max_memory_allocated())
            return
        try:
            match = _VMHWM.search(Path("/proc/self/status").read_text())
        except OSError:
            match = None
        if match:
            self.bytes = int(match.group(1)) * 1024
        else:  # not Linux: getrusage's peak since the process started (kB on Linux, bytes on macOS)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.bytes = int(peak if sys.platform == "darwin" else peak * 1024)
            self.kind = "peak_rss_since_start"


# ---------------------------------------------------------------------------------------------- FLOPs
def analytic_flops(backbone: Backbone, stats: dict[str, Any]) -> dict[str, float]:
    """Prefill FLOPs (every layer's actual token count) and FLOPs of the first decoded token (attending to the
    prompt cache every layer kept), per prompt, at the model's actual MLP widths."""
    adapter, model = backbone.adapter, backbone.model
    shape = DecoderShape.from_model(adapter.text_config(model), adapter.decoder_layers(model))
    return {
        "prefill_flops": prefill_flops(shape, stats["layer_tokens"]),
        "decode_flops": decode_flops(shape, stats["kv_tokens"]),
    }


# ---------------------------------------------------------------------------------------------- profile
def profile(pipe: Pipeline, prompts: list[Prompt], settings: Settings) -> dict[str, Any]:
    """Every figure of the module docstring for one pipeline (a backbone with its method) on ``prompts``."""
    device = pipe.backbone.device
    steps = settings.new_tokens - 2
    jobs = {
        "ttft": lambda: ttft_run(pipe, prompts),
        "decode": lambda: decode_run(pipe, prompts, steps),
    }
    times: dict[str, list[float]] = {name: [] for name in jobs}
    results: dict[str, list[Generation]] = {}
    with no_eos(pipe.backbone):
        for _ in range(settings.warmup):
            for name, fn in jobs.items():
                results[name] = fn()[1]
        with PeakMemory(device) as peak:
            for r in range(settings.repeats):
                for name in list(jobs)[r % 2 :] + list(jobs)[: r % 2]:  # alternate which runs first
                    elapsed, results[name] = jobs[name]()
                    times[name].append(elapsed)
    first = results["ttft"][0].stats
    if results["decode"][0].stats["kv_tokens"] != first["kv_tokens"]:
        raise RuntimeError("the TTFT and decode runs kept different caches")
    ttft, decode = summary(times["ttft"]), summary(times["decode"])
    return {
        "ttft_ms": ttft["median"],
        "ttft": ttft,
        "ttft_runs_ms": times["ttft"],
        "decode_ms": decode["median"],
        "decode": decode,
        "decode_runs_ms": times["decode"],
        "tokens_per_s": len(prompts) * 1e3 / decode["median"],
        "peak_memory_bytes": peak.bytes,
        "peak_memory_kind": peak.kind,
        "prompt_tokens": first["prompt_tokens"],
        "visual_tokens": sum(first["visual_tokens"]),
        "visual_kept": sum(first["visual_kept"]),
        "layer_tokens": list(first["layer_tokens"]),
        "kv_tokens": list(first["kv_tokens"]),
        "kv_bytes": first["kv_bytes"],
        "kv_bytes_dense": first["kv_bytes_dense"],
        "kv_share": first["kv_bytes"] / first["kv_bytes_dense"],
        **analytic_flops(pipe.backbone, first),
    }


def settings_record(settings: Settings, family: str) -> dict[str, Any]:
    """The settings as the job records them, with the image side actually used."""
    record = asdict(settings)
    record["image_size"] = settings.resolved_image_size(family)
    if settings.backbone == "random":
        record["random_sizes"] = asdict(RANDOM_SIZES[settings.sizes])
    else:
        record.pop("sizes")
    return record

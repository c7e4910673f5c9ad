"""Prefill latency of the visual-token methods against dense, beside the speedup their FLOPs promise.

What is measured: time to first token (TTFT), i.e. ``Pipeline.generate(prompts, max_new_tokens=1)`` end to end:
tokenising and image preprocessing, the vision tower, the method (scoring and selection/merging), the language
model's prefill and the first token. The backbone is a random-init model of a real family (Qwen2-VL by default)
with one image of about 1,000 visual tokens and a text question, sized so that the decoder is compute-bound.
Weights do not matter for latency; shapes do.

What it is compared with: the theoretical speedup ``dense prefill FLOPs / method prefill FLOPs``, computed with
``effivlm.efficiency.flops`` from the tokens every decoder layer actually saw in the run (``layer_tokens``).
It counts the vision tower and projector (the same for every method, ``encoder_flops``) and the language-model
decoder (projections, attention, MLP and the LM head of the last position), where the methods remove compute.
The methods' own scoring is extra work, not in the count, and reported separately; image preprocessing on the
CPU is not in it either. So measured/theoretical < 1 has known causes, all printed: preprocessing, the
scoring overhead, and the selection or merging arithmetic.

Scoring overhead, measured two ways at budget 1.0, where a method computes its scores but removes nothing:

1. Directly (the target's measure): in ``--repeats`` further runs per method under
   ``effivlm.attention.time_probes``, each probed attention call (VisionZip and PruMerge+: the vision-attention
   probe; FastV: the probe in decoder layer K - 1) times the method's callback and then the model's own
   attention function on the same inputs. The price of scoring is the callback's time, less the attention call
   it replaced when it computed the layer's output itself; summed over the run's probed calls, its ``--stat``
   over the runs is set against dense TTFT. Random and pool probe nothing: their price is 0.
2. End to end: ``(TTFT(method @ 1.0) - TTFT(dense)) / TTFT(dense)``, which also holds the selection
   bookkeeping, but is the difference of two noisy timings (a few % on a shared CPU: pool and random, which
   score nothing, show the noise).

Neither counts the top-k/merge arithmetic, which a method skips when it keeps everything.

Run ``python benchmarks/token_prefill.py --help``; ``--quick`` is a few-second smoke run for the tests.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from PIL import Image

from effivlm.attention import probe_attention, time_probes
from effivlm.backbones.loading import Backbone
from effivlm.backbones.sizes import TinySizes
from effivlm.efficiency import DecoderShape, encoder_flops, prefill_flops
from effivlm.efficiency.bench import (
    CORPUS,
    IMAGE_SIZES,
    STATS,
    add_backbone_arguments,
    add_run_arguments,
    add_size_arguments,
    apply_size_flags,
    cpu_threads,
    markdown,
    parse_budgets,
    parse_methods,
    parse_resolved,
    positive,
    random_backbone,
    resolve_device_flags,
    setup_record,
    time_interleaved,
    timing_line,
    write_report,
)
from effivlm.efficiency.profile import time_call as time_once
from effivlm.methods import build_method
from effivlm.pipeline import Generation, Pipeline, Prompt

DEFAULT_METHODS = "dense,random,pool,fastv,visionzip,prumerge_plus"
DEFAULT_BUDGETS = "0.01,0.1,0.4"
#: targets of the issue
TARGET_BUDGET, TARGET_RATIO, TARGET_METHODS, TARGET_OVERHEAD = 0.1, 0.8, ("fastv", "visionzip"), 0.05

# Text shapes of the presets (vision towers are kept modest: their cost is the same for every method).
# Vision towers in proportion to the decoder, as in the real models: Qwen2-VL-7B's tower (32 x 1280) costs about
# half its decoder's prefill FLOPs on a 1,000-token image; a toy tower would make any fixed cost look large.
MID_CPU = TinySizes(1024, 8, 16, 4, 5376, 256, 4, 4, 1024, 4096)  # ~0.15B decoder: minutes on 2 CPU cores
MID_CUDA = TinySizes(
    1536, 28, 12, 2, 8960, 640, 16, 10, 2560, 4096
)  # Qwen2-1.5B's decoder, half a Qwen2-VL tower
QWEN2_7B = TinySizes(
    3584, 28, 28, 4, 18944, 1280, 32, 16, 5120, 4096
)  # Qwen2-VL-7B: its decoder and its tower
QUICK = TinySizes(64, 3, 4, 2, 128, 32, 1, 2, 64, 1024)  # smoke test: FastV's layer 2 needs a third layer


# ---------------------------------------------------------------------------------------------- configuration
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    add_backbone_arguments(p)
    p.add_argument(
        "--shape",
        choices=["mid", "7b"],
        default="mid",
        help="mid: hidden 1024 x 8 layers on cpu, Qwen2-1.5B's decoder on cuda; 7b: Qwen2-7B's decoder",
    )
    add_size_arguments(
        p,
        hidden_help="decoder hidden size (mid on cpu: 1024)",
        layers_help="decoder layers (mid on cpu: 8; 7b: 28)",
    )
    p.add_argument("--text-tokens", type=positive, help="words in the text question (default 64)")
    add_run_arguments(
        p,
        repeats=5,
        warmup=2,
        methods=DEFAULT_METHODS,
        budgets=DEFAULT_BUDGETS,
        budgets_what="visual tokens kept",
    )
    return parse_resolved(p, argv, resolve)


def resolve(args: argparse.Namespace) -> None:
    """Fill the defaults that depend on --device, --shape and --quick, and validate."""
    resolve_device_flags(args)
    quick = args.quick
    args.image_size = args.image_size or (64 if quick else IMAGE_SIZES[args.family])
    args.text_tokens = args.text_tokens or (8 if quick else 64)
    args.repeats = args.repeats or (1 if quick else 5)
    if args.warmup is None:
        args.warmup = 1 if quick else 2
    args.methods = parse_methods(args.methods)
    args.budgets = parse_budgets(args.budgets)
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    args.sizes = model_sizes(args)


def model_sizes(args: argparse.Namespace) -> TinySizes:
    """The preset of --shape/--quick with the explicit size flags applied."""
    if args.quick:
        preset = QUICK
    elif args.shape == "7b":
        preset = QWEN2_7B
    else:
        preset = MID_CUDA if args.device == "cuda" else MID_CPU
    return apply_size_flags(preset, args)


# ---------------------------------------------------------------------------------------------- prompts
def make_prompts(args: argparse.Namespace) -> list[Prompt]:
    rng = np.random.default_rng(args.seed)
    pixels = rng.integers(0, 256, (args.image_size, args.image_size, 3), dtype=np.uint8)
    words = " ".join(CORPUS).replace("?", "").split()
    question = " ".join(words[i % len(words)] for i in range(args.text_tokens)) + "?"
    return [Prompt(images=[Image.fromarray(pixels)], text=question) for _ in range(args.batch)]


@dataclass(frozen=True)
class Point:
    """One (method, budget) measurement."""

    method: str
    budget: float
    visual_tokens: int  # per sample, before the method
    visual_kept: int  # per sample, as the decoder's last layer saw them
    layer_tokens: list[int]  # sample 0's sequence length in every decoder layer
    times_ms: list[float]
    time_ms: float  # the --stat of times_ms
    flops: float  # prefill FLOPs of the whole batch: vision tower and projector, then the decoder


def point_of(
    method: str,
    budget: float,
    times: list[float],
    gens: list[Generation],
    shape: DecoderShape,
    stat: str,
    vision: float,
) -> Point:
    first = gens[0]
    return Point(
        method=method,
        budget=budget,
        visual_tokens=sum(first.stats["visual_tokens"]),
        visual_kept=first.stats["layer_visual"][-1],
        layer_tokens=list(first.stats["layer_tokens"]),
        times_ms=times,
        time_ms=STATS[stat](times),
        flops=vision + sum(prefill_flops(shape, g.stats["layer_tokens"]) for g in gens),
    )


PRE_DECODER = "pre-decoder"


def measure(
    backbone: Backbone, prompts: list[Prompt], specs: list[tuple[str, float]], args: argparse.Namespace
) -> tuple[list[Point], list[float], float]:
    """TTFT of every (method, budget) in ``specs``, and the dense time up to the decoder (tokenising,
    preprocessing, the vision tower, scattering the visual tokens), all timed in interleaved rounds."""
    jobs: dict[str, Callable[[], Any]] = {}
    for method, budget in specs:
        pipe = Pipeline(backbone, build_method(method, budget), seed=args.seed)
        jobs[f"{method}@{budget:g}"] = partial(pipe.generate, prompts, max_new_tokens=1)
    dense = Pipeline(backbone, build_method("dense"), seed=args.seed)
    jobs[PRE_DECODER] = lambda: dense.prefill_inputs(dense.encode(prompts))
    timed = {name: partial(time_once, fn, args.device) for name, fn in jobs.items()}
    times, results = time_interleaved(timed, args.warmup, args.repeats)
    shape = DecoderShape.from_config(backbone.adapter.text_config(backbone.model))
    vision = vision_flops(backbone, dense, prompts)
    points = [
        point_of(m, b, times[f"{m}@{b:g}"], results[f"{m}@{b:g}"], shape, args.stat, vision) for m, b in specs
    ]
    return points, times[PRE_DECODER], vision


def vision_flops(backbone: Backbone, dense: Pipeline, prompts: list[Prompt]) -> float:
    """Analytic FLOPs of the vision tower and projector for ``prompts``, the same for every method.

    The attended sequences (an image, crop or tile each) are read off the feature layer's attention calls;
    the tower's depth is its number of attention modules of that kind, its width the queries' heads x size.
    """
    model, adapter = backbone.model, backbone.adapter
    scored = adapter.vision_attention(model)
    sequences: list[int] = []
    width: list[int] = []

    def record(module, query, key, value, attention_mask, kwargs) -> None:
        sequences.extend([key.shape[2]] * key.shape[0])
        width.append(query.shape[1] * query.shape[3])

    with torch.inference_mode(), probe_attention([scored], record):
        dense.prefill_inputs(dense.encode(prompts))
    modules = {
        id(m): m for part in (adapter.vision_tower(model), adapter.projector(model)) for m in part.modules()
    }
    linear = sum(m.weight.numel() for m in modules.values() if isinstance(m, torch.nn.Linear))
    layers = sum(isinstance(m, type(scored)) for m in modules.values())
    return encoder_flops(linear, layers, width[0], sequences)


# ---------------------------------------------------------------------------------------------- report
def speed_rows(points: list[Point], dense: Point) -> list[dict[str, Any]]:
    rows = []
    for pt in points:
        measured = dense.time_ms / pt.time_ms
        theoretical = dense.flops / pt.flops
        rows.append(
            {
                "method": pt.method,
                "budget": pt.budget,
                "visual_kept": pt.visual_kept,
                "visual_tokens": pt.visual_tokens,
                "ttft_ms": pt.time_ms,
                "ttft_min_ms": min(pt.times_ms),
                "ttft_max_ms": max(pt.times_ms),
                "measured_speedup": measured,
                "theoretical_speedup": theoretical,
                "ratio": measured / theoretical,
            }
        )
    return rows


SCORING = {
    "fastv": "attention probe in decoder layer K-1, top-k at K",
    "visionzip": "vision-attention probe (last ViT block)",
    "prumerge_plus": "vision-attention probe (last ViT block)",
}


@dataclass
class Price:
    """What one method's scoring cost in each timed run (ms), summed over its probed attention calls."""

    calls: int
    callback_ms: list[float]
    saved_ms: list[float]  # the model's attention calls the callbacks' outputs replaced
    price_ms: list[float]  # callback - saved


def scoring_prices(
    backbone: Backbone, prompts: list[Prompt], methods: list[str], args: argparse.Namespace
) -> dict[str, Price]:
    """Each method at budget 1.0, run ``--repeats`` times (interleaved, after ``--warmup`` untimed runs) under
    ``time_probes``: the price of its scoring per run."""
    pipes = {m: Pipeline(backbone, build_method(m, 1.0), seed=args.seed) for m in methods}
    prices = {m: Price(0, [], [], []) for m in methods}
    for r in range(args.warmup + args.repeats):
        for method in methods[r % len(methods) :] + methods[: r % len(methods)]:
            with time_probes() as calls:
                pipes[method].generate(prompts, max_new_tokens=1)
            if r < args.warmup:
                continue
            price = prices[method]
            price.calls = len(calls)
            price.callback_ms.append(1e3 * sum(c.callback_s for c in calls))
            price.saved_ms.append(1e3 * sum(c.base_s for c in calls if c.replaced))
            price.price_ms.append(1e3 * sum(c.price_s for c in calls))
    return prices


def overhead_rows(
    full: list[Point], dense: Point, prices: dict[str, Price], stat: str
) -> list[dict[str, Any]]:
    rows = []
    for pt in full:
        price = prices[pt.method]
        scoring = STATS[stat](price.price_ms)
        rows.append(
            {
                "method": pt.method,
                "ttft_ms": pt.time_ms,
                "ttft_min_ms": min(pt.times_ms),
                "ttft_max_ms": max(pt.times_ms),
                "dense_ms": dense.time_ms,
                "end_to_end": (pt.time_ms - dense.time_ms) / dense.time_ms,
                "probed_calls": price.calls,
                "callback_ms": STATS[stat](price.callback_ms),
                "saved_ms": STATS[stat](price.saved_ms),
                "scoring_ms": scoring,
                "scoring_min_ms": min(price.price_ms),
                "scoring_max_ms": max(price.price_ms),
                "overhead": scoring / dense.time_ms,
                "what": SCORING.get(pt.method, "nothing (selection bookkeeping only)"),
            }
        )
    return rows


def target_rows(speed: list[dict[str, Any]], overhead: list[dict[str, Any]]) -> list[dict[str, Any]]:
    targets = []
    for method in TARGET_METHODS:
        row = next((r for r in speed if r["method"] == method and r["budget"] == TARGET_BUDGET), None)
        value = None if row is None else row["ratio"]
        targets.append(
            {
                "target": f"{method} @ {TARGET_BUDGET:g} keep: measured/theoretical >= {TARGET_RATIO}",
                "value": value,
                "met": None if value is None else value >= TARGET_RATIO,
            }
        )
    worst = max(overhead, key=lambda r: r["overhead"], default=None)
    targets.append(
        {
            "target": f"scoring overhead (price of the probed calls) <= {TARGET_OVERHEAD:.0%} of dense TTFT (worst: "
            f"{worst['method'] if worst else '-'})",
            "value": None if worst is None else worst["overhead"],
            "met": None if worst is None else worst["overhead"] <= TARGET_OVERHEAD,
        }
    )
    return targets


def speed_table(rows: list[dict[str, Any]], stat: str) -> list[str]:
    header = [
        "method",
        "budget",
        "visual kept",
        f"TTFT ms ({stat})",
        "min-max",
        "measured x",
        "theory x",
        "ratio",
    ]
    cells = [
        [
            r["method"],
            f"{r['budget']:g}",
            f"{r['visual_kept']}/{r['visual_tokens']}",
            f"{r['ttft_ms']:.1f}",
            f"{r['ttft_min_ms']:.1f}-{r['ttft_max_ms']:.1f}",
            f"{r['measured_speedup']:.2f}",
            f"{r['theoretical_speedup']:.2f}",
            f"{r['ratio']:.2f}",
        ]
        for r in rows
    ]
    return markdown(header, cells)


def overhead_table(rows: list[dict[str, Any]], stat: str) -> list[str]:
    header = [
        "method",
        "probed calls",
        f"callback ms ({stat})",
        "attention replaced ms",
        "scoring price ms",
        "min-max",
        "price / dense TTFT",
        f"TTFT @ 1.0 ms ({stat})",
        "dense ms",
        "end to end",
        "what is scored",
    ]
    cells = [
        [
            r["method"],
            str(r["probed_calls"]),
            f"{r['callback_ms']:.1f}",
            f"{r['saved_ms']:.1f}",
            f"{r['scoring_ms']:+.1f}",
            f"{r['scoring_min_ms']:+.1f} to {r['scoring_max_ms']:+.1f}",
            f"{r['overhead']:+.1%}",
            f"{r['ttft_ms']:.1f}",
            f"{r['dense_ms']:.1f}",
            f"{r['end_to_end']:+.1%}",
            r["what"],
        ]
        for r in rows
    ]
    return markdown(header, cells)


def target_table(rows: list[dict[str, Any]]) -> list[str]:
    def verdict(met: bool | None) -> str:
        return "n/a (not measured)" if met is None else ("met" if met else "NOT met")

    def value(r: dict[str, Any]) -> str:
        if r["value"] is None:
            return "-"
        return f"{r['value']:+.1%}" if "overhead" in r["target"] else f"{r['value']:.2f}"

    return markdown(
        ["target", "value", "verdict"], [[r["target"], value(r), verdict(r["met"])] for r in rows]
    )


def describe(
    args: argparse.Namespace, backbone: Backbone, dense: Point, pre_ms: list[float], vision: float
) -> list[str]:
    s = args.sizes
    params = sum(p.numel() for p in backbone.model.parameters())
    pre = STATS[args.stat](pre_ms)
    return [
        f"# Prefill (TTFT) of visual-token methods vs dense: {args.family}, random init, {params / 1e6:.1f}M params",
        timing_line(args),
        f"decoder: hidden {s.text_hidden}, {s.text_layers} layers, {s.text_heads} heads / {s.text_kv_heads} kv, "
        f"MLP {s.text_intermediate}; vision tower: hidden {s.vision_hidden}, {s.vision_layers} layers, "
        f"{s.vision_heads} heads, MLP {s.vision_intermediate}",
        f"prompt: one {args.image_size}px image -> {dense.visual_tokens} visual tokens, "
        f"{dense.layer_tokens[0]} prompt tokens in all",
        "TTFT = generate(max_new_tokens=1): preprocessing + vision tower + method + decoder prefill + first token.",
        "theory x = dense / method prefill FLOPs: vision tower + projector (the same for every method) + LLM",
        "decoder (from the tokens each layer saw); the methods' scoring is not in it. The",
        f"dense pre-decoder part (preprocessing + vision tower) takes {pre:.1f} ms = {pre / dense.time_ms:.0%} of "
        f"dense TTFT; the vision tower is {vision / 1e9:.1f} GFLOPs = {vision / dense.flops:.0%} of dense prefill "
        "FLOPs.",
    ]


@dataclass
class Report:
    lines: list[str]
    speed: list[dict[str, Any]]
    overhead: list[dict[str, Any]]
    targets: list[dict[str, Any]]
    setup: dict[str, Any]


def run(args: argparse.Namespace) -> Report:
    with cpu_threads(args.threads):
        return _run(args)


def _run(args: argparse.Namespace) -> Report:
    torch.manual_seed(args.seed)
    prompts = make_prompts(args)
    with torch.inference_mode(), random_backbone(args) as backbone:
        others = [m for m in args.methods if m != "dense"]
        specs = [("dense", 1.0)] + [(m, b) for m in others for b in args.budgets]
        specs += [(m, 1.0) for m in others if 1.0 not in args.budgets]
        measured, pre_ms, vision = measure(backbone, prompts, specs, args)
        dense = measured[0]
        points = [p for p in measured[1:] if p.budget in args.budgets]
        full = [p for p in measured[1:] if p.budget == 1.0]
        lines = describe(args, backbone, dense, pre_ms, vision)
        prices = scoring_prices(backbone, prompts, [p.method for p in full], args)
    speed = speed_rows([dense, *points], dense)
    overhead = overhead_rows(full, dense, prices, args.stat)
    targets = target_rows(speed, overhead)
    lines += ["", "## Speedup per method and budget", *speed_table(speed, args.stat)]
    lines += [
        "",
        "## Scoring overhead at budget 1.0: price of the probed attention calls (callback - attention it "
        "replaced), and TTFT - dense TTFT",
        *overhead_table(overhead, args.stat),
    ]
    lines += ["", "## Targets of the issue", *target_table(targets)]
    setup = setup_record(args)
    setup["pre_decoder_ms"] = pre_ms
    return Report(lines, speed, overhead, targets, setup)


def main(argv: Sequence[str] | None = None) -> Report:
    args = parse_args(argv)
    report = run(args)
    print("\n".join(report.lines))
    if args.out is not None:
        tables = {k: getattr(report, k) for k in ("setup", "speed", "overhead", "targets")}
        write_report(args.out, tables, report.lines)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])

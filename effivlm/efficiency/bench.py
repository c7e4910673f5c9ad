"""Shared pieces of the latency benchmarks in ``benchmarks/`` (``token_prefill.py``, ``kv_cache.py``).

Each script says what it measures; this module holds what they do alike: the command-line flags they share,
a random-init backbone of a real family built to given sizes (weights do not matter for latency, shapes do),
timing in interleaved rounds, Markdown tables and the files a run writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from effivlm.backbones import available_families, get_adapter
from effivlm.backbones.loading import DTYPES, Backbone, load_backbone
from effivlm.backbones.sizes import TinySizes
from effivlm.backbones.tiny import build_tiny, save_backbone
from effivlm.efficiency.profile import CORPUS, RANDOM_IMAGE_SIZES
from effivlm.io import write_text_atomic
from effivlm.methods import available_methods

IMAGE_SIZES = RANDOM_IMAGE_SIZES
#: Qwen2's MLP width relative to its hidden size (18944 / 3584), for a --hidden given without --intermediate
MLP_RATIO = 18944 / 3584
#: how the timed runs of a point are summarised; min suits a machine shared with other jobs (noise only adds)
STATS: dict[str, Callable[[list[float]], float]] = {"median": statistics.median, "min": min}


# ---------------------------------------------------------------------------------------------- configuration
def positive(text: str) -> int:
    """argparse type: a whole number >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def add_backbone_arguments(p: argparse.ArgumentParser) -> None:
    """--dtype, --family and --image-size."""
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--family", choices=available_families(), default="qwen2_vl")
    p.add_argument("--image-size", type=positive, help="image side in pixels (default: ~1,000 visual tokens)")


def add_size_arguments(p: argparse.ArgumentParser, hidden_help: str, layers_help: str) -> None:
    """The decoder's size flags, read by :func:`apply_size_flags`: --hidden, --layers, --heads, --kv-heads,
    --intermediate (the first two with the script's own help, which names its presets' values)."""
    p.add_argument("--hidden", type=positive, help=hidden_help)
    p.add_argument("--layers", type=positive, help=layers_help)
    p.add_argument("--heads", type=positive, help="attention heads (default: keep the preset's head_dim)")
    p.add_argument("--kv-heads", type=positive, help="key/value heads (default: the preset's)")
    p.add_argument("--intermediate", type=positive, help="MLP width (default: Qwen2's ratio to --hidden)")


def add_run_arguments(
    p: argparse.ArgumentParser, *, repeats: int, warmup: int, methods: str, budgets: str, budgets_what: str
) -> None:
    """The flags from --repeats to --quick: timing (--repeats, --warmup, --stat), what is measured (--methods,
    --budgets) and the run (--batch, --threads, --seed, --out, --quick). ``repeats`` and ``warmup`` are the
    defaults the help names; ``budgets_what`` says what a budget is the share of."""
    p.add_argument("--repeats", type=positive, help=f"timed runs per point (default {repeats})")
    p.add_argument("--warmup", type=int, help=f"untimed runs per point (default {warmup})")
    p.add_argument(
        "--stat", choices=sorted(STATS), default="median", help="summary of the timed runs (default median)"
    )
    p.add_argument("--methods", default=methods, help=f"comma-separated (default {methods})")
    p.add_argument("--budgets", default=budgets, help=f"{budgets_what} (default {budgets})")
    p.add_argument("--batch", type=positive, default=1, help="prompts per generate call")
    p.add_argument("--threads", type=positive, help="CPU threads (default: every core this process may use)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the tables to OUT.json and OUT.md")
    p.add_argument("--quick", action="store_true", help="tiny sizes and one repeat: a smoke run of seconds")


def parse_resolved(
    p: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    resolve: Callable[[argparse.Namespace], None],
) -> argparse.Namespace:
    """``argv`` parsed by ``p``, then completed by ``resolve`` (defaults that depend on other flags, checks); a
    ValueError of ``resolve`` ends the program as a usage error, like a bad flag."""
    args = p.parse_args(argv)
    try:
        resolve(args)
    except ValueError as err:
        p.error(str(err))
    return args


def resolve_device_flags(args: argparse.Namespace) -> None:
    """--device auto becomes cuda where available; cuda without a GPU is refused; --dtype defaults to
    bfloat16 on cuda and float32 on cpu."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available on this machine")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")


def parse_methods(text: str, skip: Sequence[str] = ()) -> list[str]:
    """The comma-separated method names of ``text``, less those in ``skip``; ValueError naming any unknown."""
    methods = [m.strip() for m in text.split(",") if m.strip() and m.strip() not in skip]
    unknown = [m for m in methods if m not in available_methods()]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; available: {', '.join(available_methods())}")
    return methods


def parse_budgets(text: str, allow_empty: bool = True) -> list[float]:
    """The comma-separated budgets of ``text``, sorted and deduplicated; ValueError unless each is in (0, 1]
    (and, with ``allow_empty`` false, unless there is one at least)."""
    budgets = sorted({float(b) for b in text.split(",") if b.strip()})
    if (not budgets and not allow_empty) or any(not 0.0 < b <= 1.0 for b in budgets):
        raise ValueError(f"budgets must be in (0, 1], got {budgets}")
    return budgets


def apply_size_flags(preset: TinySizes, args: argparse.Namespace) -> TinySizes:
    """``preset`` with the decoder size flags of :func:`add_size_arguments` applied.

    Without --heads the preset's head_dim is kept; without --kv-heads the preset's count (at most --heads);
    without --intermediate the preset's MLP width, or Qwen2's ratio to an explicit --hidden (rounded to 128).
    """
    hidden = args.hidden or preset.text_hidden
    head_dim = preset.text_hidden // preset.text_heads
    heads = args.heads or max(1, hidden // head_dim)
    kv_heads = args.kv_heads or min(preset.text_kv_heads, heads)
    if args.intermediate:
        intermediate = args.intermediate
    elif args.hidden:
        intermediate = 128 * max(1, round(hidden * MLP_RATIO / 128))
    else:
        intermediate = preset.text_intermediate
    if hidden % heads or (hidden // heads) % 2:
        raise ValueError(f"--hidden {hidden} must split into {heads} heads of an even head_dim")
    if heads % kv_heads:
        raise ValueError(f"--heads {heads} must be a multiple of --kv-heads {kv_heads}")
    return dataclasses.replace(
        preset,
        text_hidden=hidden,
        text_layers=args.layers or preset.text_layers,
        text_heads=heads,
        text_kv_heads=kv_heads,
        text_intermediate=intermediate,
    )


# ---------------------------------------------------------------------------------------------- backbone
@contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` intra-op threads (None: every core this process may use), restoring the caller's count
    (a test calls a benchmark's ``main`` in-process)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n or len(os.sched_getaffinity(0)))
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Create parameters directly in ``dtype`` (a 7B model in float32 would need twice the memory)."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def build_backbone(
    folder: Path, family: str, sizes: TinySizes, *, image_size: int, dtype: str, device: str, seed: int
) -> Backbone:
    """Build a random-init backbone of ``family`` with ``sizes`` (its tokenizer trained on :data:`CORPUS`, its
    processor sized for ``image_size``), save it to ``folder`` and load it back under sdpa on ``device``."""
    adapter = get_adapter(family)
    with default_dtype(DTYPES[dtype]):
        model, processor, kwargs = build_tiny(adapter, CORPUS, image_size, sizes, seed=seed)
    save_backbone(model, processor, kwargs, folder)
    del model
    gc.collect()
    return load_backbone(str(folder), family, dtype=dtype, device=device, attn_implementation="sdpa")


@contextmanager
def random_backbone(args: argparse.Namespace) -> Iterator[Backbone]:
    """:func:`build_backbone` of a benchmark's resolved flags (``family``, ``sizes``, ``image_size``, ``dtype``,
    ``device``, ``seed``), saved in a temporary folder that is removed when the block ends."""
    with tempfile.TemporaryDirectory(prefix="effivlm-bench-") as tmp:
        yield build_backbone(
            Path(tmp) / "backbone",
            args.family,
            args.sizes,
            image_size=args.image_size,
            dtype=args.dtype,
            device=args.device,
            seed=args.seed,
        )


# ---------------------------------------------------------------------------------------------- timing
def time_interleaved(
    jobs: dict[str, Callable[[], tuple[float, Any]]], warmup: int, repeats: int, first: int = 0
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """The times (ms) every job reports over ``repeats`` rounds after ``warmup`` untimed calls each, and each
    job's last result; a job returns ``(ms, result)`` (wrap a plain callable with :func:`time_once`).

    The ``first`` jobs also run once before anything else, untimed (one-time costs: memory pools, kernel
    selection). A round calls every job once, starting one job later each round, so that drift and other load on
    the machine (thermal, a neighbour's process) spread over all jobs instead of biasing the ones timed in a bad
    moment. A line on stderr marks the end of each round.
    """
    results: dict[str, Any] = {}
    for name in list(jobs)[:first]:
        results[name] = jobs[name]()[1]
    for name, fn in jobs.items():
        for _ in range(warmup):
            results[name] = fn()[1]
    times: dict[str, list[float]] = {name: [] for name in jobs}
    names = list(jobs)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            elapsed, results[name] = jobs[name]()
            times[name].append(elapsed)
        print(f"  round {r + 1}/{repeats} done", file=sys.stderr, flush=True)
    return times, results


# ---------------------------------------------------------------------------------------------- report
def markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    """Lines of a Markdown table, each column padded to its widest cell."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return [line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)]


def timing_line(args: argparse.Namespace) -> str:
    """The report's line on where and how the points were timed."""
    return (
        f"device {args.device} ({torch.get_num_threads()} threads), {args.dtype}, sdpa, batch {args.batch}, "
        f"{args.warmup} warm-up + {args.repeats} timed runs per point ({args.stat}, min-max); "
        "jobs interleaved round by round"
    )


def setup_record(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings for the JSON file: the resolved flags (``sizes`` as a dict, without ``out``), the
    threads actually used, torch's version and the GPU's name on ``cuda``."""
    setup = {k: v for k, v in vars(args).items() if k not in ("out", "sizes")}
    setup["sizes"] = dataclasses.asdict(args.sizes)
    setup["threads"] = torch.get_num_threads()
    setup["torch"] = torch.__version__
    setup["device_name"] = torch.cuda.get_device_name() if args.device == "cuda" else None
    return setup


def write_report(out: Path, tables: dict[str, Any], lines: list[str]) -> None:
    """Write ``tables`` to OUT.json and the printed ``lines`` to OUT.md (a .json or .md suffix of ``out`` is
    dropped first), each atomically."""
    stem = out.with_suffix("") if out.suffix in (".json", ".md") else out
    write_text_atomic(stem.with_name(stem.name + ".json"), json.dumps(tables, indent=2))
    write_text_atomic(stem.with_name(stem.name + ".md"), "\n".join(lines) + "\n")


@dataclasses.dataclass
class Report:
    """What a benchmark's run returns: the printed lines, its rows and target rows, and the setup."""

    lines: list[str]
    rows: list[dict[str, Any]]
    targets: list[dict[str, Any]]
    setup: dict[str, Any]

    def publish(self, out: Path | None) -> None:
        """Print the report, and write its tables and lines to OUT.json and OUT.md when ``out`` is given."""
        print("\n".join(self.lines))
        if out is not None:
            tables = {"setup": self.setup, "rows": self.rows, "targets": self.targets}
            write_report(out, tables, self.lines)


def run_benchmark(
    parse_args: Callable[[Sequence[str] | None], argparse.Namespace],
    run: Callable[[argparse.Namespace], Report],
    argv: Sequence[str] | None = None,
) -> Report:
    """A benchmark's main: parse its arguments, run it, print the report and write it to ``--out``."""
    args = parse_args(argv)
    report = run(args)
    report.publish(args.out)
    return report


def progress(message: str) -> None:
    """A benchmark's progress line, on stderr so that the printed report stays clean."""
    print(f"  {message}", file=sys.stderr, flush=True)

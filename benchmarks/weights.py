"""Parameter compression against dense: checkpoint size, parameter count, prefill and decode time, FFN time.

The backbone is a random-init model of a real family (Qwen2-VL by default) built with
``effivlm.backbones.tiny.build_tiny`` and saved as a bfloat16 transformers checkpoint, the dense reference;
its embedding matrix is resized to ``--vocab`` rows, so that embeddings and LM head, which no method
compresses, weigh in the checkpoint about what they weigh in the real model (``mid``: 4,096 rows at hidden
1,024 make them 15% of the parameters; Qwen2-VL-7B: 13%). Weights do not matter for size or latency;
shapes do.

Statistics are calibrated, not synthetic: ``collect_statistics`` runs ``--calibration-samples`` records (a
random-pixel image, "Describe the image." and a caption of corpus words: about 4,000 tokens at ``mid``, more
than the widest linear input, so that the Hessians X^T X / n are of full rank) through the dense model, once,
and every method reads them. On a random-init model they are statistics of random activations: they drive
the methods through the same code and the same costs as real ones, but this script measures no accuracy.

Every method (``--methods``, default all) compresses a fresh copy of the dense model, loaded in the compute
dtype (float32 on CPU, bfloat16 on CUDA); the result is cast to bfloat16, saved with ``save_compressed`` and
loaded back with ``load_backbone``, and the loaded model is what is timed (the saved checkpoint is what a user
runs). Settings: magnitude, Wanda, SparseGPT and EcoFLaP at 50% unstructured sparsity and Wanda 2:4, CFSP at
50% FFN channels, RTN, GPTQ and AWQ at 4 bits in groups of 128 (W4A16). EcoFLaP's zeroth-order block scores
use one calibration record (each record costs two forward passes per weight tensor; EffiVLM-Bench averages
over its whole calibration set, which at ``mid`` on 2 CPU cores would take longer than everything else).

What is reported, per method and for dense:

1. Size: the bytes of the checkpoint's safetensors files, and ``ckpt / dense16`` = those bytes over
   2 x the dense parameter count (the 16-bit dense size; the dense checkpoint's own ratio is 1 plus its
   header).
   ``linears / 16-bit``: the stored bytes of just the linear layers the method compresses (read from the
   safetensors header: a pruned weight as kept values plus a bitmask, a quantized one as packed codes, scales
   and zero points, a CFSP matrix as its smaller self) over 2 bytes per weight of the same layers in the
   dense model. The W4A16 target concerns this ratio; the whole checkpoint stays larger because embeddings,
   LM head, norms and the vision tower stay 16-bit.
2. Parameters: every weight the model holds (a quantized layer's codes count one each, as the dense weights
   they replace) and how many of them are non-zero.
3. Prefill and decode time of the language model (the vision tower is not compressed): prefill is one
   forward of ``--prompt-tokens`` random token ids plus the LM head on the last position; decode is
   ``--decode-steps`` greedy steps after it (one token, the LM head, the argmax), in ms per token, the cache
   cropped back to the prompt between runs. ``--warmup`` untimed runs, then ``--repeats`` timed ones; the
   tables show the minimum (noise on a shared machine only adds). All models stay loaded and are timed in
   interleaved rounds (every job once per round, as in the other benchmarks), so that a burst of other load
   falls on all of them alike; at ``7b`` (15 GB a model) each is timed alone as soon as it is loaded.
   ``x`` = dense / method, from one run of the script: above 1 is faster.
4. FFN alone for CFSP: every decoder layer's ``mlp`` run on one fixed hidden-state tensor of the prompt's
   length, dense against CFSP, beside the theoretical speedup (total dense width / total kept width: the
   FFN's FLOPs are proportional to its width).

What to expect, and why: unstructured and 2:4 sparsity store fewer bytes but run dense kernels here (the
zeros are multiplied), so their speedup is ~1.0 by construction (on a CPU, models loaded after the dense one
decode a few percent slower whatever they hold: a second dense copy loaded late measured 0.97x, so 0.93-1.0
is no cost of the zeros). On CUDA, each 2:4 model is also timed with its pruned weights converted by
``torch.sparse.to_sparse_semi_structured`` (16-bit weights, sm80+), the kernel that skips the zeros; on CPU
that kernel does not exist and the table says so. ``QuantLinear`` dequantizes its weight on every call and
then runs a dense matmul (a reference kernel, not a fused W4A16 one), so W4 models are slower than dense, by
most in decode, where the dequantization is not amortised over many tokens.

Targets, checked at the end: (a) W4A16: the quantized linear layers store <= 0.3x of their 16-bit bytes;
(b) CFSP 50%: the measured FFN speedup is >= 0.8 of the theoretical one.

Presets: ``mid`` (default): hidden 1,024, 4 layers, 16 heads / 4 kv heads, MLP 2,816, vocab 4,096, a small
vision tower: compute-bound on a CPU, about 4 minutes on 2 idle cores (AWQ's search, SparseGPT and GPTQ take
half of it; a neighbour's load on the same cores can stretch that to 10).
``7b``: Qwen2-VL-7B's decoder (hidden 3,584, 28 layers, 28 / 4 heads, MLP 18,944, vocab 152,064) and its
vision tower; meant for a CUDA machine. ``--quick``: tiny shapes and one repeat, a smoke run for the tests.

Run ``python benchmarks/weights.py --help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache

from effivlm.backbones import available_families, get_adapter
from effivlm.backbones.loading import DTYPES, Backbone, load_backbone
from effivlm.backbones.sizes import TinySizes
from effivlm.backbones.tiny import build_tiny, save_backbone
from effivlm.calibration import Statistics, calibration_batches, collect_statistics
from effivlm.checkpoints import save_compressed
from effivlm.data.synthetic import encode_image
from effivlm.efficiency.bench import (
    CORPUS,
    Report,
    add_size_arguments,
    apply_size_flags,
    cpu_threads,
    default_dtype,
    markdown,
    parse_resolved,
    positive,
    progress,
    resolve_device_flags,
    run_benchmark,
    setup_record,
    time_interleaved,
)
from effivlm.efficiency.profile import synchronize
from effivlm.efficiency.profile import time_call as time_once
from effivlm.methods.weights import build_weight_method
from effivlm.methods.weights.qlinear import QuantLinear
from effivlm.registry import closest_hint

#: targets of the issue
TARGET_W4_RATIO, TARGET_FFN_RATIO = 0.3, 0.8
#: the dtype every checkpoint is written in, the dense one included: "16-bit" in every ratio
STORAGE_DTYPE = torch.bfloat16
MIB = 2**20
DENSE = "dense"

# Decoder shapes (then the vision tower's hidden, layers, heads, MLP). mid: hidden 1,024 with grouped-query
# attention (16 / 4 heads of 64) and an MLP of 2,816 (2.75 x hidden, Llama-like; Qwen2-7B's is 5.3 x); four
# layers keep SparseGPT, GPTQ and AWQ (up to seconds per linear layer on 2 CPU cores) to minutes in all.
# The vision tower is tiny: no method compresses it, and the LM is timed without it.
MID = TinySizes(1024, 4, 16, 4, 2816, 128, 1, 2, 256, 4096)
QWEN2_7B = TinySizes(3584, 28, 28, 4, 18944, 1280, 32, 16, 5120, 32768)  # Qwen2-VL-7B: its decoder and tower
QUICK = TinySizes(128, 2, 4, 2, 256, 32, 1, 2, 64, 1024)  # smoke test: group 128 must divide every input


@dataclasses.dataclass(frozen=True)
class Preset:
    """The run settings that go with a shape: what a realistic prompt and calibration set are for it."""

    sizes: TinySizes
    vocab: int
    image_size: int  # calibration images: (image_size / 16)^2 visual tokens on Qwen2-VL's small builds
    calibration_samples: int
    caption_words: int
    prompt_tokens: int
    decode_steps: int
    repeats: int
    warmup: int


PRESETS = {
    "mid": Preset(MID, 4096, 128, 24, 60, 512, 8, 5, 1),
    "7b": Preset(QWEN2_7B, 152064, 224, 128, 60, 1024, 32, 5, 2),
    "quick": Preset(QUICK, 1024, 32, 4, 8, 16, 2, 1, 0),
}


@dataclasses.dataclass(frozen=True)
class Spec:
    """One compressed model of the benchmark: a weight method, its parameters and how its forward runs."""

    label: str
    method: str
    params: Mapping[str, Any]
    setting: str
    kernel: str


SPARSE_KERNEL = "dense matmul, zeros multiplied"
W4_KERNEL = "dequantize + dense matmul"
SPECS = (
    Spec("magnitude", "magnitude", {"sparsity": 0.5}, "50% unstructured", SPARSE_KERNEL),
    Spec("wanda", "wanda", {"sparsity": 0.5}, "50% unstructured", SPARSE_KERNEL),
    Spec("wanda_2:4", "wanda", {"pattern": "2:4"}, "2:4", SPARSE_KERNEL),
    Spec("sparsegpt", "sparsegpt", {"sparsity": 0.5}, "50% unstructured", SPARSE_KERNEL),
    Spec("ecoflap", "ecoflap", {"sparsity": 0.5, "batches": 1}, "50% unstructured", SPARSE_KERNEL),
    Spec("cfsp", "cfsp", {"sparsity": 0.5}, "50% FFN channels", "dense matmul, smaller FFN matrices"),
    Spec("rtn", "rtn", {"bits": 4, "group_size": 128}, "W4A16 g128", W4_KERNEL),
    Spec("gptq", "gptq", {"bits": 4, "group_size": 128}, "W4A16 g128", W4_KERNEL),
    Spec("awq", "awq", {"bits": 4, "group_size": 128}, "W4A16 g128", W4_KERNEL),
)
DEFAULT_METHODS = ",".join(s.label for s in SPECS)


# ---------------------------------------------------------------------------------------------- configuration
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda if available"
    )
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), help="compute dtype (default: float32 on cpu, bfloat16 on cuda)"
    )
    p.add_argument("--family", choices=available_families(), default="qwen2_vl")
    p.add_argument(
        "--preset",
        choices=["mid", "7b"],
        default="mid",
        help="mid: hidden 1024, 4 layers, MLP 2816 (CPU); 7b: Qwen2-VL-7B's decoder and tower (CUDA)",
    )
    add_size_arguments(
        p, hidden_help="decoder hidden size (mid: 1024)", layers_help="decoder layers (mid: 4; 7b: 28)"
    )
    p.add_argument("--vocab", type=positive, help="embedding rows (mid: 4096; 7b: 152064)")
    p.add_argument("--prompt-tokens", type=positive, help="prefill length (mid: 512; 7b: 1024)")
    p.add_argument("--decode-steps", type=positive, help="timed decode steps per run (mid: 8; 7b: 32)")
    p.add_argument("--calibration-samples", type=positive, help="calibration records (mid: 24; 7b: 128)")
    p.add_argument("--repeats", type=positive, help="timed runs per measurement (mid: 5; 7b: 5)")
    p.add_argument("--warmup", type=int, help="untimed runs first (mid: 1; 7b: 2)")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated (default {DEFAULT_METHODS})")
    p.add_argument("--threads", type=positive, help="CPU threads (default: every core this process may use)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="write the tables to OUT.json and OUT.md")
    p.add_argument("--quick", action="store_true", help="tiny sizes and one repeat: a smoke run of seconds")
    return parse_resolved(p, argv, resolve)


def resolve(args: argparse.Namespace) -> None:
    """Fill the defaults that depend on --device, --preset and --quick, and validate."""
    resolve_device_flags(args)
    preset = PRESETS["quick" if args.quick else args.preset]
    for key in ("vocab", "prompt_tokens", "decode_steps", "calibration_samples", "repeats", "warmup"):
        if getattr(args, key) is None:
            setattr(args, key, getattr(preset, key))
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    args.interleave = args.quick or args.preset != "7b"  # ten 7B models do not fit in one GPU together
    args.image_size = preset.image_size
    args.caption_words = preset.caption_words
    args.methods = parse_labels(args.methods)
    args.sizes = apply_size_flags(preset.sizes, args)


def parse_labels(text: str) -> list[str]:
    """The benchmark's method labels named in ``text`` (comma-separated), in the order of :data:`SPECS`."""
    known = [s.label for s in SPECS]
    asked = [m.strip() for m in text.split(",") if m.strip() and m.strip() != DENSE]
    for label in asked:
        if label not in known:
            raise ValueError(
                f"unknown method '{label}'{closest_hint(label, known)}; known: {', '.join(known)}"
            )
    return [label for label in known if label in asked]


# ---------------------------------------------------------------------------------------------- models
def build_dense(args: argparse.Namespace, folder: Path) -> None:
    """Save a random-init backbone of ``args.sizes`` with ``args.vocab`` embedding rows, in 16 bits, to
    ``folder``: the dense checkpoint every method starts from and is measured against."""
    adapter = get_adapter(args.family)
    with default_dtype(STORAGE_DTYPE):
        model, processor, kwargs = build_tiny(adapter, CORPUS, args.image_size, args.sizes, seed=args.seed)
        # the trained tokenizer only knows a few hundred tokens; the rows above them exist for their bytes
        model.resize_token_embeddings(args.vocab, mean_resizing=False)
    save_backbone(model, processor, kwargs, folder)
    del model
    gc.collect()


def load(folder: Path, args: argparse.Namespace) -> Backbone:
    return load_backbone(str(folder), args.family, dtype=args.dtype, device=args.device)


def free(device: str) -> None:
    """Give the memory of dropped models back before the next one is loaded (a 7B model is 15 GB)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def to_storage_dtype(model: nn.Module) -> None:
    """Cast the floating parameters to :data:`STORAGE_DTYPE` before saving. Parameters only: a QuantLinear's
    scales are buffers and keep the 16-bit dtype the method chose for them."""
    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point() and param.dtype != STORAGE_DTYPE:
                param.data = param.data.to(STORAGE_DTYPE)


def calibration_records(args: argparse.Namespace) -> list[dict[str, str]]:
    """Calibration records in effivlm's format: a random-pixel image, a fixed prompt and a caption of
    ``args.caption_words`` corpus words (a different run of words each)."""
    rng = np.random.default_rng(args.seed)
    words = " ".join(CORPUS).replace("?", "").split()
    size = args.image_size
    return [
        {
            "id": f"bench-{i}",
            "image": encode_image(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)),
            "prompt": "Describe the image.",
            "caption": " ".join(words[(i + j) % len(words)] for j in range(args.caption_words)),
        }
        for i in range(args.calibration_samples)
    ]


# ---------------------------------------------------------------------------------------------- sizes
def safetensors_bytes(folder: Path) -> dict[str, int]:
    """Stored bytes of every tensor in ``folder``'s safetensors files, from their headers (an 8-byte
    little-endian length, then JSON giving each tensor's byte range), without reading the tensors."""
    sizes: dict[str, int] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for key, entry in header.items():
            if key != "__metadata__":
                start, end = entry["data_offsets"]
                sizes[key] = end - start
    return sizes


def checkpoint_bytes(folder: Path) -> int:
    """The size on disk of a checkpoint's weights: all its safetensors files (transformers shards a 7B)."""
    return sum(file.stat().st_size for file in folder.glob("*.safetensors"))


def weight_counts(model: nn.Module) -> tuple[int, int]:
    """(weights held, non-zero weights held). A QuantLinear's codes and bias count one each, like the dense
    weights they stand for (its codes are all counted as non-zero: they are stored)."""
    total = nonzero = 0
    for param in model.parameters():
        total += param.numel()
        nonzero += int(torch.count_nonzero(param))
    for module in model.modules():
        if isinstance(module, QuantLinear):
            n = module.in_features * module.out_features + (0 if module.bias is None else module.out_features)
            total += n
            nonzero += n
    return total, nonzero


def linear_bytes_16bit(linears: Mapping[str, nn.Linear]) -> int:
    """2 bytes per weight and bias entry of ``linears``: what the dense checkpoint stores for them."""
    return 2 * sum(p.numel() for m in linears.values() for p in m.parameters())


def stored_linear_bytes(tensors: Mapping[str, int], names: Sequence[str]) -> int:
    """Bytes the checkpoint stores under the modules ``names`` (every tensor named ``<name>.*``)."""
    prefixes = tuple(n + "." for n in names)
    return sum(size for key, size in tensors.items() if key.startswith(prefixes))


# ---------------------------------------------------------------------------------------------- timing
class Timer:
    """The timed jobs of one backbone's language model (prefill, decode, its FFN alone) on fixed inputs."""

    def __init__(self, backbone: Backbone, args: argparse.Namespace) -> None:
        self.model = backbone.model
        self.adapter = backbone.adapter
        self.lm = backbone.adapter.language_model(backbone.model)
        self.head = backbone.adapter.lm_head(backbone.model)
        self.args = args
        generator = torch.Generator().manual_seed(args.seed)
        text = self.adapter.text_config(self.model)
        self.ids = torch.randint(0, text.vocab_size, (1, args.prompt_tokens), generator=generator).to(
            args.device
        )  # (1, L)
        self.hidden = torch.randn(1, args.prompt_tokens, text.hidden_size, generator=generator).to(
            device=args.device, dtype=DTYPES[args.dtype]
        )  # (1, L, D): the FFN input

    def prefill(self) -> tuple[DynamicCache, torch.Tensor]:
        """One forward of the prompt and the LM head on its last position: the cache and (1, 1, V) logits."""
        cache = DynamicCache(config=self.adapter.text_config(self.model))
        hidden = self.lm(input_ids=self.ids, past_key_values=cache, use_cache=True).last_hidden_state
        return cache, self.head(hidden[:, -1:])

    def decode(self, cache: DynamicCache, logits: torch.Tensor) -> None:
        """``--decode-steps`` greedy steps from ``logits``; the cache is cropped back to the prompt after, so
        that every run decodes the same tokens from the same cache."""
        for _ in range(self.args.decode_steps):
            token = logits.argmax(-1)  # (1, 1)
            hidden = self.lm(input_ids=token, past_key_values=cache, use_cache=True).last_hidden_state
            logits = self.head(hidden[:, -1:])
        cache.crop(-self.args.decode_steps)
        if cache.get_seq_length() != self.args.prompt_tokens:
            raise RuntimeError(f"decode left {cache.get_seq_length()} cached tokens, not the prompt's")

    def ffn(self) -> None:
        """Every decoder layer's MLP on the same hidden states (no residual chain: each costs its own)."""
        for layer in self.adapter.decoder_layers(self.model):
            layer.mlp(self.hidden)

    def widths(self) -> list[int]:
        return [layer.mlp.down_proj.in_features for layer in self.adapter.decoder_layers(self.model)]

    def jobs(self, label: str, ffn: bool) -> dict[str, Callable[[], tuple[float, Any]]]:
        """``time_interleaved`` jobs: ``prefill <label>``, ``decode <label>`` (and ``ffn <label>``)."""
        cache, logits = self.prefill()  # the decode runs' prompt, computed once
        device = self.args.device
        jobs = {
            f"prefill {label}": partial(time_once, self.prefill, device),
            f"decode {label}": partial(time_once, partial(self.decode, cache, logits), device),
        }
        if ffn:
            jobs[f"ffn {label}"] = partial(time_once, self.ffn, device)
        return jobs


def time_models(models: Mapping[str, Backbone], ffn: set[str], args: argparse.Namespace) -> dict[str, dict]:
    """Prefill and decode figures of every model (and FFN figures of those in ``ffn``), timed in interleaved
    rounds: a round runs every job once, so that a burst of other load on the machine falls on all alike."""
    jobs: dict[str, Callable[[], tuple[float, Any]]] = {}
    widths: dict[str, list[int]] = {}
    with torch.inference_mode():
        for label, backbone in models.items():
            timer = Timer(backbone, args)
            jobs.update(timer.jobs(label, label in ffn))
            widths[label] = timer.widths()
        times, _ = time_interleaved(jobs, args.warmup, args.repeats)
    figures: dict[str, dict] = {}
    for label in models:
        prefill = times[f"prefill {label}"]
        decode = [ms / args.decode_steps for ms in times[f"decode {label}"]]  # per token
        figures[label] = {
            "prefill_times_ms": prefill,
            "prefill_ms": min(prefill),
            "decode_times_ms": decode,
            "decode_ms": min(decode),
        }
        if label in ffn:
            runs = times[f"ffn {label}"]
            figures[label]["ffn"] = {"ffn_times_ms": runs, "ffn_ms": min(runs), "widths": widths[label]}
    return figures


def time_semi_structured(backbone: Backbone, names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Prefill and decode of a 2:4 model with its pruned weights (``names``) replaced by semi-structured
    sparse tensors (CUDA, 16-bit), so that ``F.linear`` runs the kernel that skips the zeros; or why that
    failed."""
    from torch.sparse import to_sparse_semi_structured

    try:
        with torch.inference_mode():
            for name in names:
                linear = backbone.model.get_submodule(name)
                sparse = to_sparse_semi_structured(linear.weight.detach())
                linear.weight = nn.Parameter(sparse, requires_grad=False)
        return time_models({"2:4 kernel": backbone}, set(), args)["2:4 kernel"]
    except (RuntimeError, ValueError, NotImplementedError, TypeError) as err:
        return {"error": f"{type(err).__name__}: {(str(err).splitlines() or [''])[0]}"}


# ---------------------------------------------------------------------------------------------- compression
@dataclasses.dataclass
class Compressed:
    """A compressed model loaded back from its checkpoint, its figures so far, and what a 2:4 kernel needs."""

    row: dict[str, Any]
    backbone: Backbone
    linears: list[str]  # the compressed linear layers' names


def compress_method(
    spec: Spec, dense_dir: Path, work: Path, stats: Statistics, batches: list, args: argparse.Namespace
) -> Compressed:
    """Compress a fresh dense model with ``spec``, save it in 16 bits, measure the checkpoint, and load it
    back (the checkpoint is deleted once loaded: a 7B run would otherwise hold nine on disk)."""
    method = build_weight_method(spec.method, dict(spec.params))
    backbone = load(dense_dir, args)
    linears = method.select(backbone)
    dense_linear_bytes = linear_bytes_16bit(linears)
    started = time.perf_counter()
    with torch.no_grad():
        report = method.compress(backbone, stats, batches if method.needs_batches else None)
    synchronize(args.device)
    compress_s = time.perf_counter() - started
    to_storage_dtype(backbone.model)
    folder = work / spec.label.replace(":", "-")
    save_compressed(backbone, method, report, folder, dense_parameters=args.dense_parameters)
    del backbone
    free(args.device)
    row: dict[str, Any] = {
        "method": spec.label,
        "setting": spec.setting,
        "kernel": spec.kernel,
        "compress_s": compress_s,
        "checkpoint_bytes": checkpoint_bytes(folder),
        "linear_bytes": stored_linear_bytes(safetensors_bytes(folder), list(linears)),
        "linear_bytes_16bit": dense_linear_bytes,
        "summary": report.summary,
    }
    backbone = load(folder, args)
    shutil.rmtree(folder)
    row["weights"], row["nonzero"] = weight_counts(backbone.model)
    return Compressed(row, backbone, list(linears))


def calibrate(backbone: Backbone, args: argparse.Namespace) -> tuple[Statistics, list]:
    """Calibration statistics of the dense model (Hessians only when a chosen method reads them) and
    EcoFLaP's one-record batch."""
    records = calibration_records(args)
    hessians = any(
        "hessian" in build_weight_method(s.method, dict(s.params)).needs
        for s in SPECS
        if s.label in args.methods
    )
    started = time.perf_counter()
    stats = collect_statistics(backbone, records, batch_size=8, hessians=hessians)
    args.calibration = {
        "records": len(records),
        "tokens": stats.tokens,
        "hessians": hessians,
        "seconds": time.perf_counter() - started,
    }
    return stats, list(calibration_batches(backbone, records[:1], 1))


def dense_row(backbone: Backbone, dense_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The dense model's size figures; records its parameter count and linear share in ``args``."""
    args.dense_parameters = sum(p.numel() for p in backbone.model.parameters())
    linears = build_weight_method("magnitude").select(backbone)  # every decoder linear
    args.linear_share = sum(m.weight.numel() for m in linears.values()) / args.dense_parameters
    weights, nonzero = weight_counts(backbone.model)
    return {
        "method": DENSE,
        "setting": "bfloat16",
        "kernel": "dense matmul",
        "compress_s": 0.0,
        "checkpoint_bytes": checkpoint_bytes(dense_dir),
        "linear_bytes": linear_bytes_16bit(linears),  # stored in 16 bits: what the ratios divide by
        "linear_bytes_16bit": linear_bytes_16bit(linears),
        "summary": {},
        "weights": weights,
        "nonzero": nonzero,
    }


def measure_all(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """Every model's row of figures (dense first), without the ratios to dense.

    With ``args.interleave`` every model stays loaded and all are timed together in interleaved rounds (on a
    CPU shared with other processes, a burst of their load then falls on every model alike); without it (a
    7B model takes 15 GB) each is timed alone as soon as it is loaded, then dropped."""
    dense_dir = work / "dense"
    build_dense(args, dense_dir)
    progress("dense model built; calibrating it")
    backbone = load(dense_dir, args)
    stats, batches = calibrate(backbone, args)
    rows = {DENSE: dense_row(backbone, dense_dir, args)}
    resident: dict[str, Backbone] = {DENSE: backbone}
    ffn = {DENSE} | {s.label for s in SPECS if s.method == "cfsp"}
    nm: dict[str, list[str]] = {}  # 2:4 models: their pruned linears

    def time_resident() -> None:
        progress(f"timing {', '.join(resident)}")
        for label, figures in time_models(resident, ffn, args).items():
            rows[label].update(figures)
            if label in nm and args.device == "cuda":
                rows[label]["sparse_kernel"] = time_semi_structured(resident[label], nm[label], args)
        resident.clear()
        free(args.device)

    del backbone  # held by resident until timed
    if not args.interleave:
        time_resident()
    for spec in (s for s in SPECS if s.label in args.methods):
        progress(f"{spec.label}: compressing, saving, loading back")
        done = compress_method(spec, dense_dir, work, stats, batches, args)
        progress(f"{spec.label}: compressed in {done.row['compress_s']:.1f} s")
        rows[spec.label] = done.row
        resident[spec.label] = done.backbone
        if done.row["summary"].get("pattern") == "2:4":
            nm[spec.label] = done.linears
        del done
        if not args.interleave:
            time_resident()
    if args.interleave:
        time_resident()
    return list(rows.values())


# ---------------------------------------------------------------------------------------------- report
def with_ratios(rows: list[dict[str, Any]], dense: dict[str, Any]) -> list[dict[str, Any]]:
    dense16 = 2 * dense["weights"]
    out = []
    for r in rows:
        r = {
            **r,
            "checkpoint_ratio": r["checkpoint_bytes"] / dense16,
            "linear_ratio": r["linear_bytes"] / r["linear_bytes_16bit"],
            "prefill_speedup": dense["prefill_ms"] / r["prefill_ms"],
            "decode_speedup": dense["decode_ms"] / r["decode_ms"],
        }
        if "ffn" in r and r["method"] != DENSE:
            ffn, dense_ffn = r["ffn"], dense["ffn"]
            theory = sum(dense_ffn["widths"]) / sum(ffn["widths"])
            measured = dense_ffn["ffn_ms"] / ffn["ffn_ms"]
            r["ffn"] = {**ffn, "speedup": measured, "theoretical": theory, "ratio": measured / theory}
        kernel = r.get("sparse_kernel")
        if kernel is not None and "error" not in kernel:
            kernel["prefill_speedup"] = dense["prefill_ms"] / kernel["prefill_ms"]
            kernel["decode_speedup"] = dense["decode_ms"] / kernel["decode_ms"]
        out.append(r)
    return out


def main_table(rows: list[dict[str, Any]]) -> list[str]:
    header = [
        "method",
        "setting",
        "weights (M)",
        "non-zero (M)",
        "checkpoint MiB",
        "ckpt / dense16",
        "linears / 16-bit",
        "prefill ms",
        "prefill x",
        "decode ms/token",
        "decode x",
        "compress s",
        "kernel",
    ]
    cells = [
        [
            r["method"],
            r["setting"],
            f"{r['weights'] / 1e6:.3f}",
            f"{r['nonzero'] / 1e6:.3f}",
            f"{r['checkpoint_bytes'] / MIB:.2f}",
            f"{r['checkpoint_ratio']:.3f}",
            f"{r['linear_ratio']:.3f}",
            f"{r['prefill_ms']:.1f}",
            f"{r['prefill_speedup']:.2f}",
            f"{r['decode_ms']:.2f}",
            f"{r['decode_speedup']:.2f}",
            f"{r['compress_s']:.1f}",
            r["kernel"],
        ]
        for r in rows
    ]
    return markdown(header, cells)


def ffn_table(rows: list[dict[str, Any]]) -> list[str]:
    header = ["model", "FFN width (total)", "FFN ms", "FFN x", "theory x", "measured / theory"]
    cells = []
    for r in rows:
        ffn = r.get("ffn")
        if ffn is None:
            continue
        dense = r["method"] == DENSE
        cells.append(
            [
                r["method"],
                f"{sum(ffn['widths'])} ({'/'.join(map(str, ffn['widths']))})",
                f"{ffn['ffn_ms']:.2f}",
                "1.00" if dense else f"{ffn['speedup']:.2f}",
                "1.00" if dense else f"{ffn['theoretical']:.2f}",
                "1.00" if dense else f"{ffn['ratio']:.2f}",
            ]
        )
    return markdown(header, cells)


def sparse_kernel_lines(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[str]:
    nm = [r for r in rows if r["summary"].get("pattern") == "2:4"]
    if not nm:
        return ["no 2:4 model in this run"]
    if args.device != "cuda":
        return [
            "not available here: torch.sparse.to_sparse_semi_structured needs a CUDA GPU (sm80+) and 16-bit "
            f"weights; on {args.device} the 2:4 model runs dense kernels, as in the table above "
            "(speedup ~1.0)."
        ]
    header = ["method", "prefill ms", "prefill x", "decode ms/token", "decode x", "note"]
    cells = []
    for r in nm:
        k = r["sparse_kernel"]
        if "error" in k:
            cells.append([r["method"], "-", "-", "-", "-", f"kernel failed: {k['error']}"])
        else:
            cells.append(
                [
                    r["method"],
                    f"{k['prefill_ms']:.1f}",
                    f"{k['prefill_speedup']:.2f}",
                    f"{k['decode_ms']:.2f}",
                    f"{k['decode_speedup']:.2f}",
                    "to_sparse_semi_structured on the pruned linears",
                ]
            )
    return markdown(header, cells)


def target_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    w4 = [r for r in rows if r["summary"].get("bits") == 4]
    worst = max(w4, key=lambda r: r["linear_ratio"], default=None)
    cfsp = next((r for r in rows if r["method"] == "cfsp"), None)
    return [
        {
            "target": f"(a) W4A16: quantized linears store <= {TARGET_W4_RATIO}x their 16-bit bytes "
            f"(worst: {worst['method'] if worst else '-'})",
            "value": None if worst is None else worst["linear_ratio"],
            "met": None if worst is None else all(r["linear_ratio"] <= TARGET_W4_RATIO for r in w4),
        },
        {
            "target": f"(b) CFSP 50%: FFN speedup >= {TARGET_FFN_RATIO} of theoretical",
            "value": None if cfsp is None else cfsp["ffn"]["ratio"],
            "met": None if cfsp is None else cfsp["ffn"]["ratio"] >= TARGET_FFN_RATIO,
        },
    ]


def target_table(targets: list[dict[str, Any]]) -> list[str]:
    def met(value: bool | None) -> str:
        return "n/a (not measured)" if value is None else ("yes" if value else "no")

    cells = [
        [t["target"], "-" if t["value"] is None else f"{t['value']:.3f}", met(t["met"])] for t in targets
    ]
    return markdown(["target", "figure", "met"], cells)


def describe(args: argparse.Namespace, dense: dict[str, Any]) -> list[str]:
    s, cal = args.sizes, args.calibration
    timing = "models timed in interleaved rounds" if args.interleave else "each model timed alone"
    hessians = "yes" if cal["hessians"] else "no"
    return [
        f"# Parameter compression vs dense: {args.family}, random init, "
        f"{dense['weights'] / 1e6:.1f}M weights",
        f"device {args.device} ({torch.get_num_threads()} threads), compute {args.dtype}, checkpoints in "
        f"bfloat16; {args.warmup} warm-up + {args.repeats} timed runs per measurement, min shown; {timing}",
        f"decoder: hidden {s.text_hidden}, {s.text_layers} layers, {s.text_heads} heads / "
        f"{s.text_kv_heads} kv, MLP {s.text_intermediate}, vocab {args.vocab}; vision tower: hidden "
        f"{s.vision_hidden}, {s.vision_layers} layers",
        f"the decoder's linear layers (what the methods compress) are {args.linear_share:.1%} of the "
        "weights; embeddings, LM head, norms and the vision tower stay 16-bit in every checkpoint.",
        f"statistics: calibrated on {cal['records']} synthetic records ({cal['tokens']} tokens, Hessians "
        f"{hessians}) in {cal['seconds']:.1f} s; EcoFLaP's block scores on one record.",
        f"prefill: the language model on {args.prompt_tokens} token ids + LM head on the last position; "
        f"decode: {args.decode_steps} greedy steps after it, ms per token (LM head included). "
        "x = dense / method.",
        "unstructured and 2:4 sparsity run dense kernels here (the zeros are stored as a bitmask, but "
        "multiplied): no speedup is expected; W4A16's QuantLinear dequantizes its weight on every call "
        "before a dense matmul (a reference kernel), so it is slower than dense, most in decode.",
    ]


def run(args: argparse.Namespace) -> Report:
    with cpu_threads(args.threads):
        return _run(args)


def _run(args: argparse.Namespace) -> Report:
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="effivlm-bench-weights-") as tmp:
        raw = measure_all(args, Path(tmp))
    rows = with_ratios(raw, raw[0])
    targets = target_rows(rows)
    lines = describe(args, rows[0])
    lines += ["", "## Per method", *main_table(rows)]
    lines += ["", "## FFN alone: CFSP vs dense", *ffn_table(rows)]
    lines += ["", "## 2:4 with a sparse kernel", *sparse_kernel_lines(rows, args)]
    lines += ["", "## Targets of the issue", *target_table(targets)]
    return Report(lines, rows, targets, setup_record(args))


def main(argv: Sequence[str] | None = None) -> Report:
    return run_benchmark(parse_args, run, argv)


if __name__ == "__main__":
    main(sys.argv[1:])

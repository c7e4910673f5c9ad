"""Training the small backbones of the embedded default on the synthetic suite.

The result is a normal transformers checkpoint of the family's real class. Training is deterministic from the
seed; the exact training setup is hashed into a fingerprint, and a prebuilt checkpoint with the same fingerprint
(committed under ``assets/backbones`` to keep the demo fast) is copied instead of retraining. Change anything that
enters the fingerprint (sizes, steps, data, seed, ``TRAINING_VERSION``) and the rule trains for real.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from effivlm.backbones import get_adapter
from effivlm.backbones.base import FamilyAdapter, TinySizes
from effivlm.backbones.tiny import build_tiny, save_backbone
from effivlm.data import synthetic
from effivlm.io import log_to_file
from effivlm.registry import closest_hint

#: bump when the training procedure changes in a way that changes the weights
TRAINING_VERSION = "1"
META_FILE = "effivlm_backbone.json"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSpec:
    steps: int = 3000
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 100
    min_accuracy: float = 0.0
    eval_batch_size: int = 64
    prebuilt: bool = True
    sizes: TinySizes = field(default_factory=TinySizes)

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> TrainSpec:
        spec = dict(spec)
        allowed = [f.name for f in fields(cls)]
        for key in spec:
            if key not in allowed:
                raise ValueError(
                    f"train: unknown setting '{key}'{closest_hint(key, allowed)}; allowed: {', '.join(allowed)}"
                )
        sizes = TinySizes(**spec.pop("sizes", {}))
        built = cls(sizes=sizes, **spec)
        if built.steps < 1 or built.batch_size < 1:
            raise ValueError(
                f"train: steps and batch_size must be >= 1, got {built.steps} and {built.batch_size}"
            )
        if not 0.0 <= built.min_accuracy <= 1.0:
            raise ValueError(f"train: min_accuracy {built.min_accuracy} is outside [0, 1]")
        return built


def fingerprint(family: str, spec: TrainSpec, seed: int, manifest: dict[str, Any]) -> str:
    """Hash of everything that determines the trained weights (not ``prebuilt`` nor ``min_accuracy``)."""
    relevant = {
        k: v for k, v in asdict(spec).items() if k not in ("prebuilt", "min_accuracy", "eval_batch_size")
    }
    payload = {
        "family": family,
        "spec": relevant,
        "seed": seed,
        "data": {k: v for k, v in manifest.items() if k != "created"},
        "training_version": TRAINING_VERSION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------- data
def _conversation(processor, question: str, answer: str | None) -> str:
    content = [{"type": "image"}, {"type": "text", "text": question}]
    text = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    return text if answer is None else text + answer + processor.tokenizer.eos_token


def encode_batch(processor, records: list[dict]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Processor inputs of question + answer, and a (B, L) mask of the target tokens (answer and end token)."""
    texts = [_conversation(processor, r["question"], r["answer"]) for r in records]
    images = [[synthetic.decode_image(r["image"])] for r in records]
    inputs = dict(processor(text=texts, images=images, padding=True, return_tensors="pt"))
    tokenizer = processor.tokenizer
    target = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    for b, r in enumerate(records):
        answer_ids = tokenizer(r["answer"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        tail = inputs["input_ids"][b, -len(answer_ids) :].tolist()
        if tail != answer_ids:  # left padding puts the answer last; anything else is a tokenizer surprise
            raise RuntimeError(
                f"answer tokens not at the end of the sequence for {r['id']}: {tail} != {answer_ids}"
            )
        target[b, -len(answer_ids) :] = True
    inputs["batch_num_images"] = torch.ones(len(records), dtype=torch.long)
    return inputs, target


# ---------------------------------------------------------------------------- training
def _lr_at(step: int, spec: TrainSpec) -> float:
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    progress = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_model(
    model, processor, adapter: FamilyAdapter, records: list[dict], spec: TrainSpec, seed: int
) -> None:
    """Teacher-forced next-token loss on the answer tokens only, AdamW with warm-up and cosine decay."""
    generator = torch.Generator().manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    order = torch.randperm(len(records), generator=generator).tolist()
    cursor = 0
    progress = tqdm(range(spec.steps), desc=f"train {adapter.family}", mininterval=10)
    running = None
    for step in progress:
        if cursor + spec.batch_size > len(order):
            order, cursor = torch.randperm(len(records), generator=generator).tolist(), 0
        batch = [records[i] for i in order[cursor : cursor + spec.batch_size]]
        cursor += spec.batch_size
        inputs, target = encode_batch(processor, batch)
        logits = model(**adapter.forward_inputs(inputs)).logits  # (B, L, V)
        # position t predicts token t + 1
        loss = F.cross_entropy(logits[:, :-1][target[:, 1:]], inputs["input_ids"][:, 1:][target[:, 1:]])
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, spec)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        value = float(loss.detach())
        running = value if running is None else 0.98 * running + 0.02 * value
        progress.set_postfix(loss=f"{running:.4f}", refresh=False)
        if step % 100 == 0 or step == spec.steps - 1:
            log.info("step %d/%d loss %.4f lr %.2e", step, spec.steps, running, _lr_at(step, spec))
    model.eval()


def held_out_accuracy(
    out_dir: Path, family: str, data_dir: Path, tasks: list[str], batch_size: int
) -> dict[str, float]:
    """Exact-match accuracy of greedy answers on each task's test split, through the evaluation engine."""
    from effivlm.metrics.loyalty import normalise_prediction
    from effivlm.pipeline import Pipeline, Prompt

    pipe = Pipeline.from_spec(str(out_dir), family, "dense")
    accuracy = {}
    for task in tasks:
        records = synthetic.read_split(data_dir / task / "test.jsonl")
        correct = 0
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            prompts = [Prompt([synthetic.decode_image(r["image"])], r["question"]) for r in chunk]
            for r, g in zip(chunk, pipe.generate(prompts, max_new_tokens=6), strict=True):
                correct += normalise_prediction(g.text) == normalise_prediction(r["answer"])
        accuracy[task] = correct / len(records)
    return accuracy


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def train_backbone(
    family: str,
    data_dir: Path,
    out_dir: Path,
    spec: dict[str, Any],
    seed: int,
    prebuilt_dir: Path | None = None,
    log_path: Path | None = None,
) -> dict[str, Any]:
    """Build and train (or reuse a matching prebuilt) small backbone of ``family``; write it to ``out_dir``."""
    with log_to_file(log_path, f"training {family}"):
        return _train_backbone(family, Path(data_dir), Path(out_dir), spec, seed, prebuilt_dir)


def _train_backbone(
    family: str, data_dir: Path, out_dir: Path, spec: dict[str, Any], seed: int, prebuilt_dir: Path | None
) -> dict[str, Any]:
    adapter = get_adapter(family)
    manifest = json.loads((data_dir / "manifest.json").read_text())
    image_size = int(manifest["image_size"])
    tasks = list(manifest["tasks"])
    train_spec = TrainSpec.from_dict(spec)
    key = fingerprint(family, train_spec, seed, manifest)

    if train_spec.prebuilt and prebuilt_dir is not None and (Path(prebuilt_dir) / META_FILE).is_file():
        meta = json.loads((Path(prebuilt_dir) / META_FILE).read_text())
        if meta.get("fingerprint") == key:
            log.info("reusing prebuilt %s (fingerprint %s)", prebuilt_dir, key[:12])
            _copy_atomic(Path(prebuilt_dir), out_dir)
            _check_accuracy(meta, train_spec)
            return meta
        log.info(
            "prebuilt %s does not match (fingerprint %s != %s): training",
            prebuilt_dir,
            meta.get("fingerprint", "")[:12],
            key[:12],
        )

    started = time.perf_counter()
    corpus = synthetic.corpus_text()
    model, processor, processor_kwargs = build_tiny(adapter, corpus, image_size, train_spec.sizes, seed)
    records = [r for task in tasks for r in synthetic.read_split(data_dir / task / "train.jsonl")]
    torch.manual_seed(seed)
    train_model(model, processor, adapter, records, train_spec, seed)
    train_seconds = time.perf_counter() - started

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_backbone(model, processor, processor_kwargs, tmp)
    accuracy = held_out_accuracy(tmp, family, data_dir, tasks, train_spec.eval_batch_size)
    meta = {
        "family": family,
        "model_class": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "fingerprint": key,
        "seed": seed,
        "spec": asdict(train_spec),
        "training_version": TRAINING_VERSION,
        "train_seconds": round(train_seconds, 1),
        "held_out_accuracy": accuracy,
    }
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    log.info("trained %s in %.0f s; held-out accuracy %s", family, train_seconds, accuracy)
    _check_accuracy(meta, train_spec)
    return meta


def _check_accuracy(meta: dict[str, Any], spec: TrainSpec) -> None:
    low = {t: a for t, a in meta["held_out_accuracy"].items() if a < spec.min_accuracy}
    if low:
        raise RuntimeError(
            f"backbone {meta['family']}: held-out accuracy below min_accuracy {spec.min_accuracy} on "
            + ", ".join(f"{t} ({a:.3f})" for t, a in sorted(low.items()))
        )

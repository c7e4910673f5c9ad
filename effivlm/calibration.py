"""Calibration: one pass of a calibration set through the dense model, recording what the parameter methods
read, so that every method of one (model, calibration set) shares it.

For every ``nn.Linear`` of the language model's decoder layers, the vision tower and the projector:

- ``sq_norm`` (C,): sum over tokens of x_c^2 (Wanda's ||X_c||^2, CFSP's activation norm of down_proj's input);
- ``abs_mean`` (C,): mean over tokens of |x_c| (AWQ's activation scale);
- ``hessian`` (C, C): X^T X / n (SparseGPT, GPTQ, AWQ's output loss), only when asked for (it is large);

and for every decoder block ``angular``: the sum over tokens of arccos(cos(h_in, h_out)) / pi (CFSP).

Linears fed the same tensor (q/k/v, gate/up) share one record, stored under the first of them; ``aliases``
maps every linear to its record. Padding tokens never count. Statistics come from the dense model in one
pass (not layer by layer through already-compressed layers, as the SparseGPT and GPTQ reference scripts
do): that is what lets methods share them. Records live in one safetensors file, read lazily per tensor.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from effivlm.backbones.loading import Backbone
from effivlm.backbones.train import encode_batch
from effivlm.io import Progress, atomic_path
from effivlm.methods.weights.cfsp_ops import angular_distance_sum

log = logging.getLogger(__name__)

STATISTICS = ("sq_norm", "abs_mean", "hessian", "angular")
_Batch = tuple[dict[str, torch.Tensor], torch.Tensor]  # model inputs and the (B, L) caption mask


def linear_modules(backbone: Backbone) -> dict[str, nn.Linear]:
    """Every linear layer of the decoder layers, vision tower and projector, by its name in the model."""
    model, adapter = backbone.model, backbone.adapter
    roots = [adapter.decoder_layers(model), adapter.vision_tower(model), adapter.projector(model)]
    wanted = {id(m) for root in roots for m in root.modules() if isinstance(m, nn.Linear)}
    return {name: m for name, m in model.named_modules() if id(m) in wanted}


def decoder_layer_names(backbone: Backbone) -> list[str]:
    layers = backbone.adapter.decoder_layers(backbone.model)
    names = {id(m): n for n, m in backbone.model.named_modules()}
    return [names[id(layer)] for layer in layers]


def calibration_batches(
    backbone: Backbone, records: list[dict[str, str]], batch_size: int
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Model inputs of prompt + caption conversations, and the (B, L) mask of the caption tokens."""
    for start in range(0, len(records), batch_size):
        chunk = [
            {"id": r["id"], "image": r["image"], "question": r["prompt"], "answer": r["caption"]}
            for r in records[start : start + batch_size]
        ]
        inputs, target = encode_batch(backbone.processor, chunk)
        inputs = {k: v.to(backbone.device) for k, v in inputs.items()}
        yield backbone.adapter.forward_inputs(inputs), target.to(backbone.device)


@dataclass
class _Record:
    sq_norm: torch.Tensor
    abs_sum: torch.Tensor
    hessian: torch.Tensor | None
    tokens: int = 0


@dataclass
class Statistics:
    """What calibration recorded; see the module docstring."""

    records: dict[str, dict[str, torch.Tensor]]  # leader name -> {"sq_norm", "abs_mean", ("hessian")}
    aliases: dict[str, str]  # linear name -> leader name
    angular: dict[str, float]  # decoder layer name -> summed angular distance
    tokens: int  # valid language-model tokens seen
    meta: dict = field(default_factory=dict)

    def of(self, linear: str, statistic: str) -> torch.Tensor:
        """One statistic of one linear layer (fails with the names recorded when it is missing)."""
        leader = self.aliases.get(linear)
        if leader is None:
            raise KeyError(
                f"no calibration statistics for linear layer '{linear}' (calibration never ran it: it is not on "
                "the model's forward path, or the statistics are of another model)"
            )
        record = self.records.get(leader, {})
        if statistic not in record:
            raise KeyError(
                f"calibration statistic '{statistic}' was not recorded for '{linear}' "
                f"(recorded: {', '.join(sorted(record))})"
            )
        return record[statistic]

    def save(self, path: Path) -> Path:
        tensors = {
            f"{stat}/{leader}": t.contiguous()
            for leader, rec in self.records.items()
            for stat, t in rec.items()
        }
        meta = {
            "format": "effivlm-calibration-statistics-v1",
            "aliases": json.dumps(self.aliases, sort_keys=True),
            "angular": json.dumps(self.angular),
            "tokens": str(self.tokens),
            "meta": json.dumps(self.meta, sort_keys=True),
        }
        with atomic_path(Path(path)) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return Path(path)

    @classmethod
    def load(cls, path: Path, statistics: Iterable[str] | None = None) -> Statistics:
        """The statistics saved in ``path``; with ``statistics``, only those named are read (the Gram matrices
        of a 7B model take tens of GB, which a method reading norms never needs)."""
        path = Path(path)
        wanted = None if statistics is None else set(statistics)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != "effivlm-calibration-statistics-v1":
                    raise ValueError("not an effivlm calibration statistics file")
                records: dict[str, dict[str, torch.Tensor]] = {}
                for key in f.keys():  # noqa: SIM118  (a safetensors handle, not a dict)
                    stat, leader = key.split("/", 1)
                    if wanted is None or stat in wanted:
                        records.setdefault(leader, {})[stat] = f.get_tensor(key)
            return cls(
                records=records,
                aliases=json.loads(meta["aliases"]),
                angular=json.loads(meta["angular"]),
                tokens=int(meta["tokens"]),
                meta=json.loads(meta["meta"]),
            )
        except (OSError, ValueError, KeyError, SafetensorError) as err:
            raise ValueError(f"calibration statistics {path} cannot be read: {err}") from None


class _Collector:
    """Hooks that accumulate the statistics of one forward pass at a time."""

    def __init__(self, backbone: Backbone, hessians: bool) -> None:
        self.backbone = backbone
        self.hessians = hessians
        self.linears = linear_modules(backbone)
        self.layers = decoder_layer_names(backbone)
        self.records: dict[str, _Record] = {}
        self.aliases: dict[str, str] = {}
        self.angular = dict.fromkeys(self.layers, 0.0)
        self.valid: torch.Tensor | None = None  # (B, L) of the current batch
        # the last linear input seen and whose record it went to: q/k/v (and gate/up) run one after the other on
        # one tensor, so comparing with the last input finds them while holding one tensor alive
        self._last: tuple[torch.Tensor, str] | None = None

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """The token rows of a layer input, (T, C), padding removed where the input is a prompt sequence."""
        if self.valid is not None and x.dim() == 3 and x.shape[:2] == self.valid.shape:
            return x[self.valid]
        return x.reshape(-1, x.shape[-1])

    def linear_hook(self, name: str):
        def hook(module: nn.Linear, args: tuple) -> None:
            x = args[0]
            if self._last is not None and self._last[0] is x:
                self.aliases.setdefault(name, self._last[1])
                return
            self._last = (x, name)
            if self.aliases.setdefault(name, name) != name:
                raise RuntimeError(f"linear layer '{name}' shared its input in one batch but not in another")
            rows = self.rows(x.detach()).float()  # (T, C)
            rec = self.records.get(name)
            if rec is None:
                c = rows.shape[-1]
                hess = torch.zeros(c, c, dtype=torch.float32, device=rows.device) if self.hessians else None
                rec = self.records[name] = _Record(
                    torch.zeros(c, device=rows.device), torch.zeros(c, device=rows.device), hess
                )
            rec.sq_norm += (rows * rows).sum(0)
            rec.abs_sum += rows.abs().sum(0)
            if rec.hessian is not None:
                # running X^T X, divided by the token count at the end
                rec.hessian.addmm_(rows.T, rows)
            rec.tokens += rows.shape[0]

        return hook

    def layer_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            valid = self.valid if self.valid is not None and h_in.shape[:2] == self.valid.shape else None
            d = h_in.shape[-1]
            self.angular[name] += angular_distance_sum(
                h_in.detach().reshape(-1, d),
                h_out.detach().reshape(-1, d),
                None if valid is None else valid.reshape(-1),
            )

        return hook

    def run(self, batches: Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]) -> int:
        model = self.backbone.model
        modules = dict(model.named_modules())
        handles = [m.register_forward_pre_hook(self.linear_hook(n)) for n, m in self.linears.items()]
        handles += [
            modules[n].register_forward_hook(self.layer_hook(n), with_kwargs=True) for n in self.layers
        ]
        tokens = 0
        try:
            with torch.no_grad():
                for inputs, _ in batches:
                    self.valid = inputs["attention_mask"].bool()
                    self._last = None
                    model(**inputs, use_cache=False)
                    tokens += int(self.valid.sum())
        finally:
            for h in handles:
                h.remove()
            self.valid, self._last = None, None
        return tokens


def _counted(batches: Iterator[_Batch], total: int) -> Iterator[_Batch]:
    """``batches``, with a progress line over samples as each batch's forward pass ends (the next is asked for)."""
    progress = Progress("calibration", total)
    for inputs, target in batches:
        yield inputs, target
        progress.update(int(target.shape[0]))


def collect_statistics(
    backbone: Backbone,
    records: list[dict[str, str]],
    *,
    batch_size: int = 8,
    hessians: bool = True,
    meta: dict | None = None,
) -> Statistics:
    """Run the calibration set through the model and return its statistics (see the module docstring)."""
    if not records:
        raise ValueError("calibration set is empty")
    collector = _Collector(backbone, hessians)
    tokens = collector.run(_counted(calibration_batches(backbone, records, batch_size), len(records)))
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, rec in collector.records.items():
        n = max(rec.tokens, 1)
        entry = {"sq_norm": rec.sq_norm.cpu(), "abs_mean": (rec.abs_sum / n).cpu()}
        if rec.hessian is not None:
            entry["hessian"] = (rec.hessian / n).cpu()
        out[name] = entry
    unused = sorted(set(collector.linears) - set(collector.aliases))
    if unused:  # e.g. SigLIP's pooling head, which LLaVA-OneVision never runs
        log.info("calibration: %d linear layers are off the forward path: %s", len(unused), unused[:3])
    log.info("calibration: %d samples, %d tokens, %d linear records", len(records), tokens, len(out))
    return Statistics(out, dict(collector.aliases), collector.angular, tokens, dict(meta or {}))


def lm_loss(backbone: Backbone, batches: list[tuple[dict[str, torch.Tensor], torch.Tensor]]) -> float:
    """Mean next-token cross-entropy over the caption tokens of the given batches (EcoFLaP's loss)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs, target in batches:
            logits = backbone.model(**inputs, use_cache=False).logits.float()  # (B, L, V)
            # a token at position t is predicted by the logits at t - 1
            pred, labels, mask = logits[:, :-1], inputs["input_ids"][:, 1:], target[:, 1:]
            loss = torch.nn.functional.cross_entropy(pred[mask], labels[mask], reduction="sum")
            total += float(loss)
            count += int(mask.sum())
    if count == 0 or not math.isfinite(total):
        raise RuntimeError("calibration loss has no caption tokens or is not finite")
    return total / count

"""The workflow configuration: loading, validation and the job grid.

``load_config`` checks a config against ``effivlm/schema/config.schema.json`` (JSON Schema draft 2020-12),
fills its defaults, then checks what a schema cannot: known families and methods, method parameters and
their types, and the cross-references between sections. Every failure is a ``ConfigError`` whose message
is one line naming the key path and what would be allowed, so the workflow fails before any job runs.

``eval_jobs`` and the path helpers are the contract between the Snakemake rules and the library: the
rules build their paths only from these functions.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import re
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError

from effivlm.registry import closest_hint

DENSE = "dense"
BUDGET_PATTERN = r"[0-9]+\.[0-9]+"
_BUDGET_DECIMALS = 10


class ConfigError(ValueError):
    """A config that cannot run; the message is one line: ``config: <key path>: <what is wrong>``."""

    def __init__(self, where: str, message: str) -> None:
        self.where = where
        super().__init__(f"config: {where}: {message}" if where else f"config: {message}")


# ------------------------------------------------------------------------------------------- schema


def load_schema() -> dict[str, Any]:
    text = resources.files("effivlm").joinpath("schema/config.schema.json").read_text(encoding="utf-8")
    return json.loads(text)


def _with_defaults(validator_class: type) -> type:
    """A validator that fills ``default`` values while validating (as Snakemake's ``validate`` does).

    Defaults are deep-copied, so two models never share one mutable default (Snakemake's version does).
    """
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, subschema in properties.items():
                if isinstance(subschema, dict) and "default" in subschema and key not in instance:
                    instance[key] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return validators.extend(validator_class, {"properties": set_defaults})


def _key_path(path: Iterator[Any] | Any) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _range_text(schema: Mapping[str, Any]) -> str:
    lo = schema.get("exclusiveMinimum", schema.get("minimum"))
    hi = schema.get("exclusiveMaximum", schema.get("maximum"))
    left = "(" if "exclusiveMinimum" in schema else "["
    right = ")" if "exclusiveMaximum" in schema else "]"
    return f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"


def _translate(error: ValidationError) -> ConfigError:
    """One jsonschema error -> one ConfigError line naming the key path and what is allowed."""
    where = _key_path(error.absolute_path)
    v, schema, value = error.validator, error.schema, error.instance
    if v == "additionalProperties" and isinstance(value, dict):
        allowed = sorted(schema.get("properties", {}))
        extra = sorted(k for k in value if k not in allowed)
        key = extra[0] if extra else "?"
        at = "" if where else " at top level"
        return ConfigError(
            where, f"unknown key '{key}'{at}{closest_hint(str(key), allowed)} (allowed: {', '.join(allowed)})"
        )
    if v == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        return ConfigError(where, f"missing required key '{missing}'")
    if v == "enum":
        allowed = ", ".join(str(x) for x in schema["enum"])
        return ConfigError(
            where, f"{value!r} is not allowed{closest_hint(str(value), schema['enum'])}; allowed: {allowed}"
        )
    if v == "type":
        expected = schema["type"]
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        return ConfigError(where, f"expected {expected}, got {_json_type(value)} {value!r}")
    if v in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        if set(schema) & {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"} == {"minimum"}:
            return ConfigError(where, f"must be >= {schema['minimum']}, got {value!r}")
        return ConfigError(where, f"{value!r} is outside {_range_text(schema)}")
    if v == "pattern":
        return ConfigError(where, f"{value!r} is not a valid name: use letters, digits, '.', '_' and '-'")
    if v in ("minItems", "minProperties"):
        return ConfigError(where, "must not be empty")
    if v == "uniqueItems":
        return ConfigError(where, f"holds duplicates: {value!r}")
    if v == "minLength":
        return ConfigError(where, "must not be empty")
    return ConfigError(where, error.message)


# The order in which errors are reported when there are several: a typo'd key explains a missing one.
_PRIORITY = {"additionalProperties": 0, "propertyNames": 0, "pattern": 0, "required": 2}


def _schema_check(config: dict[str, Any]) -> None:
    validator = _with_defaults(Draft202012Validator)(load_schema())
    errors = list(validator.iter_errors(config))
    if errors:
        errors.sort(key=lambda e: (_PRIORITY.get(str(e.validator), 1), list(map(str, e.absolute_path))))
        raise _translate(errors[0])


# ------------------------------------------------------------------------------------- semantic checks


def format_budget(budget: float) -> str:
    """The canonical folder name of a budget: ``0.01``, ``0.1``, ``0.4``, ``1.0``."""
    text = f"{float(budget):.{_BUDGET_DECIMALS}f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _known_methods() -> list[str]:
    from effivlm.methods import available_methods

    return list(available_methods())


def _method_params(name: str) -> dict[str, type]:
    from effivlm.methods import method_params

    return dict(method_params(name))


def _known_families() -> list[str]:
    from effivlm.backbones import available_families

    return list(available_families())


def _type_ok(value: Any, expected: Any) -> bool:
    if typing.get_origin(expected) is tuple:  # a list of names, e.g. a weight method's targets
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if expected is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _check_models(cfg: dict[str, Any]) -> None:
    families = _known_families()
    for name, model in cfg["models"].items():
        where = f"models.{name}"
        if model["family"] not in families:
            raise ConfigError(
                f"{where}.family",
                f"unknown family '{model['family']}'{closest_hint(model['family'], families)}; "
                f"known: {', '.join(families)}",
            )
        source = model["source"]
        if source == "embedded":
            for key in ("path", "revision"):
                if key in model:
                    raise ConfigError(
                        f"{where}.{key}", "only for source: path or hub (embedded backbones are trained here)"
                    )
        else:
            if "path" not in model:
                hint = "a local folder" if source == "path" else "a hub id such as Qwen/Qwen2-VL-7B-Instruct"
                raise ConfigError(where, f"missing required key 'path' for source: {source} ({hint})")
            if source == "path" and "revision" in model:
                raise ConfigError(f"{where}.revision", "only for source: hub")
            model.setdefault("revision", "main" if source == "hub" else None)
        model.setdefault("path", None)
        model.setdefault("revision", None)


def _check_known(where: str, kind: str, name: str, known: list[str]) -> None:
    if name not in known:
        raise ConfigError(
            where, f"unknown {kind} '{name}'{closest_hint(name, known)}; known: {', '.join(known)}"
        )


def _check_params(where: str, what: str, params: Mapping[str, Any], allowed: Mapping[str, Any]) -> None:
    """Every parameter is one the method has, of its type."""
    for key, value in params.items():
        if key not in allowed:
            names = sorted(allowed)
            raise ConfigError(
                f"{where}.params.{key}",
                f"unknown parameter '{key}' for {what}{closest_hint(key, names)}; "
                f"allowed: {', '.join(names) if names else '(none)'}",
            )
        expected = allowed[key]
        if not _type_ok(value, expected):
            kind = "list of names" if typing.get_origin(expected) is tuple else expected.__name__
            raise ConfigError(f"{where}.params.{key}", f"expected {kind}, got {_json_type(value)} {value!r}")


def _check_methods(cfg: dict[str, Any]) -> None:
    known = _known_methods()
    dense_variants = []
    for variant, spec in cfg["methods"].items():
        where = f"methods.{variant}"
        name = spec.setdefault("method", variant)
        _check_known(f"{where}.method", "method", name, known)
        _check_params(where, f"method '{name}'", spec["params"], _method_params(name))
        models = list(cfg["models"])
        for i, model in enumerate(spec.get("models", [])):
            if model not in models:
                raise ConfigError(
                    f"{where}.models[{i}]",
                    f"unknown model '{model}'{closest_hint(model, models)}; known: {', '.join(models)}",
                )
        weights = spec.get("weights")
        if weights is not None and weights not in cfg["weights"]:
            known_w = list(cfg["weights"])
            raise ConfigError(
                f"{where}.weights",
                f"unknown weights entry '{weights}'{closest_hint(weights, known_w)}; "
                f"known: {', '.join(known_w) if known_w else '(the weights section is empty)'}",
            )
        if name == DENSE and weights is None and "models" in spec:
            raise ConfigError(
                f"{where}.models", "dense runs on every model: it is the reference of ratios and loyalty"
            )
        if weights is not None:
            compressed = cfg["weights"][weights]["models"]
            outside = [m for m in spec.get("models", []) if m not in compressed]
            if outside:
                raise ConfigError(
                    f"{where}.models", f"model '{outside[0]}' is not compressed by weights entry '{weights}'"
                )
            spec.setdefault("models", list(compressed))
        spec.setdefault("models", models)
        if name == DENSE and weights is None:
            dense_variants.append(variant)
        if name == DENSE:
            spec.setdefault("budgets", [1.0])
            if [float(b) for b in spec["budgets"]] != [1.0]:
                raise ConfigError(f"{where}.budgets", f"dense runs at budget 1.0 only, got {spec['budgets']}")
        elif "budgets" not in spec:
            raise ConfigError(where, f"missing required key 'budgets' for method '{name}' (values in (0, 1])")
        seen: dict[str, int] = {}
        for i, budget in enumerate(spec["budgets"]):
            text = format_budget(budget)
            if float(text) != float(budget):
                raise ConfigError(
                    f"{where}.budgets[{i}]", f"{budget!r} has more than {_BUDGET_DECIMALS} decimal places"
                )
            if text in seen:
                raise ConfigError(f"{where}.budgets[{i}]", f"{budget!r} repeats budgets[{seen[text]}]")
            seen[text] = i
        spec["budgets"] = [float(b) for b in spec["budgets"]]
    if len(dense_variants) != 1:
        found = ", ".join(dense_variants) if dense_variants else "none"
        raise ConfigError(
            "methods",
            "exactly one variant must use method 'dense' without weights (the reference of ratios and loyalty); "
            f"found: {found}",
        )


def _check_weights(cfg: dict[str, Any]) -> None:
    """Every weights entry names a known weight method with valid parameters and known models, and there is
    a calibration set to draw."""
    from effivlm.methods.weights import available_weight_methods, build_weight_method, method_params

    known = available_weight_methods()
    models = list(cfg["models"])
    for entry, spec in cfg["weights"].items():
        where = f"weights.{entry}"
        name = spec.setdefault("method", entry)
        _check_known(f"{where}.method", "weight method", name, known)
        _check_params(where, f"weight method '{name}'", spec["params"], method_params(name))
        try:
            build_weight_method(name, spec["params"])
        except ValueError as err:
            raise ConfigError(f"{where}.params", str(err)) from None
        for i, model in enumerate(spec.get("models", [])):
            if model not in models:
                raise ConfigError(
                    f"{where}.models[{i}]",
                    f"unknown model '{model}'{closest_hint(model, models)}; known: {', '.join(models)}",
                )
        spec.setdefault("models", models)
    calibration = cfg["calibration"]
    if cfg["weights"]:
        path = calibration.get("path")
        if path is None and "synthetic" not in cfg:
            raise ConfigError(
                "calibration.path",
                "required: the weights section needs a calibration set and there is no synthetic suite to draw one from",
            )
        # like model weights, the file is read by its job (calibration_set), so the paper's grid plans on a
        # machine without the data; a missing or unreadable file fails that job with one line naming it


def _text_layers(model: Mapping[str, Any]) -> int | None:
    """Decoder depth of a model when it is known without loading weights: an embedded backbone's configured
    size, or a local checkpoint's config.json; None for a hub id or a folder not there yet."""
    if model["source"] == "embedded":
        from effivlm.backbones.sizes import TinySizes

        sizes = (model.get("train") or {}).get("sizes") or {}
        return int(sizes.get("text_layers", TinySizes().text_layers))
    config_file = Path(model["path"]) / "config.json" if model["source"] == "path" else None
    if config_file is None or not config_file.is_file():
        return None
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # the job's loader reports a corrupt checkpoint with its own message
    text = raw.get("text_config") or raw.get("llm_config") or raw
    layers = text.get("num_hidden_layers")
    return int(layers) if isinstance(layers, int) else None


def _check_method_models(cfg: dict[str, Any]) -> None:
    """Every variant builds at each budget (the method's own checks of its parameters), serves every model's
    family, and fits every model's depth where that is known."""
    from effivlm.methods import build_method
    from effivlm.methods.base import LayerTokenMethod

    for variant, spec in cfg["methods"].items():
        where = f"methods.{variant}"
        for budget in spec["budgets"]:
            try:
                method = build_method(spec["method"], budget, spec["params"])
            except ValueError as err:
                raise ConfigError(f"{where}.params", str(err)) from None
            for model in spec["models"]:
                mspec = cfg["models"][model]
                try:
                    method.check_family(mspec["family"])
                    depth = _text_layers(mspec)
                    if isinstance(method, LayerTokenMethod) and depth is not None:
                        method.check_depth(depth)
                except ValueError as err:
                    raise ConfigError(where, f"{err} (model '{model}')") from None


def _check_tasks(cfg: dict[str, Any]) -> None:
    embedded = [m for m, spec in cfg["models"].items() if spec["source"] == "embedded"]
    synthetic = [t for t, spec in cfg["tasks"].items() if spec["kind"] == "synthetic"]
    if (embedded or synthetic) and "synthetic" not in cfg:
        why = f"model '{embedded[0]}' is embedded" if embedded else f"task '{synthetic[0]}' is synthetic"
        raise ConfigError(
            "synthetic", f"section required because {why} (keys: tasks, image_size, n_train, n_test)"
        )
    if "synthetic" in cfg:
        suite = cfg["synthetic"]["tasks"]
        known = _known_synthetic_tasks()
        for i, task in enumerate(suite):
            if task not in known:
                raise ConfigError(
                    f"synthetic.tasks[{i}]",
                    f"unknown synthetic task '{task}'{closest_hint(task, known)}; known: {', '.join(known)}",
                )
        for task in synthetic:
            if task not in suite:
                raise ConfigError(
                    f"tasks.{task}",
                    f"synthetic task '{task}' is not in synthetic.tasks{closest_hint(task, suite)} "
                    f"(allowed: {', '.join(suite)})",
                )
    for task, spec in cfg["tasks"].items():
        if spec["kind"] != "lmms":
            for key in ("lmms_task", "include_path"):
                if key in spec:
                    raise ConfigError(f"tasks.{task}.{key}", "only for kind: lmms")
        elif "include_path" not in spec:
            name = spec.get("lmms_task", task)
            known = _known_lmms_tasks()
            if known is not None and name not in known:
                key = f"tasks.{task}.lmms_task" if "lmms_task" in spec else f"tasks.{task}"
                raise ConfigError(
                    key,
                    f"unknown lmms-eval task '{name}'{closest_hint(name, sorted(known))}; "
                    f"known: the {len(known)} task and group names under lmms_eval/tasks (lmms-eval --tasks list)",
                )
    lmms = [t for t, spec in cfg["tasks"].items() if spec["kind"] == "lmms"]
    if embedded and lmms:
        raise ConfigError(
            f"tasks.{lmms[0]}",
            f"embedded model '{embedded[0]}' knows only the synthetic suite and cannot run lmms task "
            f"'{lmms[0]}'; use weights (source: path or hub) or kind: synthetic",
        )


_LMMS_TASK_LINE = re.compile(r"""^(?:task|group):\s*["']?([A-Za-z0-9_.-]+)["']?\s*$""", re.M)


@functools.cache
def _known_lmms_tasks() -> frozenset[str] | None:
    """Task and group names of the installed lmms-eval, read from its task YAMLs without importing it."""
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or spec.origin is None:
        return None
    names: set[str] = set()
    for path in (Path(spec.origin).parent / "tasks").rglob("*"):
        if path.is_file() and (path.suffix == ".yaml" or path.name.startswith("_default_template")):
            names.update(_LMMS_TASK_LINE.findall(path.read_text(encoding="utf-8", errors="replace")))
    return frozenset(names) or None


def _known_synthetic_tasks() -> list[str]:
    from effivlm.data.synthetic import TASKS

    return list(TASKS)


# --------------------------------------------------------------------------------------------- loading


def load_config(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """Validate a config (a YAML path or a mapping) and return a new dict with every default filled.

    Raises ConfigError (a ValueError) with one line naming the key path and the allowed values.
    """
    if isinstance(source, Mapping):
        raw: Any = copy.deepcopy(dict(source))
    elif not isinstance(source, str | Path):
        raw = source
    else:
        path = Path(source)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as err:
            raise ConfigError("", f"cannot read {path}: {err.strerror}") from None
        except yaml.YAMLError as err:
            raise ConfigError("", f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError("", f"expected a mapping at top level, got {_json_type(raw)}")
    _schema_check(raw)
    _check_models(raw)
    _check_weights(raw)
    _check_methods(raw)
    _check_method_models(raw)
    _check_tasks(raw)
    _check_efficiency(raw)
    return raw


def _check_efficiency(cfg: dict[str, Any]) -> None:
    """Every model the efficiency rule profiles is a configured model (default: all of them)."""
    section = cfg["efficiency"]
    models = section.setdefault("models", list(cfg["models"]))
    for i, model in enumerate(models):
        _check_known(f"efficiency.models[{i}]", "model", model, list(cfg["models"]))


# ------------------------------------------------------------------------------------- jobs and paths


@dataclass(frozen=True, order=True)
class Job:
    """One evaluation: a model, a method variant at one budget, on one task."""

    model: str
    variant: str
    budget: float
    task: str

    @property
    def budget_str(self) -> str:
        return format_budget(self.budget)


def eval_jobs(cfg: Mapping[str, Any]) -> list[Job]:
    """Every (model, variant, budget, task) of a loaded config, in config order."""
    return [
        Job(model, variant, float(budget), task)
        for model in cfg["models"]
        for variant, spec in cfg["methods"].items()
        if model in spec["models"]
        for budget in spec["budgets"]
        for task in cfg["tasks"]
    ]


def job_dir(cfg: Mapping[str, Any], job: Job) -> str:
    return f"{cfg['results']}/eval/{job.model}/{job.variant}/{job.budget_str}/{job.task}"


def efficiency_jobs(cfg: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """Every (model, variant, budget) the efficiency rule profiles, the budget as its folder name."""
    return [
        (model, variant, format_budget(budget))
        for model in cfg["efficiency"]["models"]
        for variant, spec in cfg["methods"].items()
        if model in spec["models"]
        for budget in spec["budgets"]
    ]


def efficiency_file(cfg: Mapping[str, Any], model: str, variant: str, budget: str) -> str:
    return f"{cfg['results']}/efficiency/{model}/{variant}/{budget}.json"


def efficiency_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The efficiency section without its model list: what changes a profile's figures."""
    return canonical({k: v for k, v in cfg["efficiency"].items() if k != "models"})


def synthetic_dir(cfg: Mapping[str, Any]) -> str:
    return f"{cfg['results']}/data/synthetic"


def backbone_dir(cfg: Mapping[str, Any], model: str) -> str:
    return f"{cfg['results']}/backbones/{model}"


def embedded_models(cfg: Mapping[str, Any]) -> list[str]:
    return [m for m, spec in cfg["models"].items() if spec["source"] == "embedded"]


def synthetic_suite(cfg: Mapping[str, Any]) -> list[str]:
    """The synthetic tasks to generate (the whole suite: embedded backbones train on all of it)."""
    if "synthetic" not in cfg:
        return []
    return list(cfg["synthetic"]["tasks"])


def model_spec(cfg: Mapping[str, Any], model: str, variant: str | None = None) -> dict[str, Any]:
    """What a job needs to load a model: name, family, path (the trained folder for embedded ones, the
    compressed checkpoint when ``variant`` runs on one)."""
    spec = cfg["models"][model]
    path = backbone_dir(cfg, model) if spec["source"] == "embedded" else spec["path"]
    weights = None if variant is None else cfg["methods"][variant].get("weights")
    if weights is not None:
        return {
            "name": model,
            "family": spec["family"],
            "path": compressed_dir(cfg, model, weights),
            "revision": None,
            "weights": weights,
        }
    return {"name": model, "family": spec["family"], "path": path, "revision": spec["revision"]}


def weight_jobs(cfg: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Every (model, weights entry) checkpoint that some method variant evaluates."""
    used = {
        (m, spec["weights"])
        for spec in cfg["methods"].values()
        if spec.get("weights")
        for m in spec["models"]
    }
    return [(m, w) for m in cfg["models"] for w in cfg["weights"] if (m, w) in used]


def compressed_dir(cfg: Mapping[str, Any], model: str, weights: str) -> str:
    return f"{cfg['results']}/compressed/{model}/{weights}"


def calibration_file(cfg: Mapping[str, Any]) -> str:
    return f"{cfg['results']}/data/calibration/calibration.jsonl"


def statistics_file(cfg: Mapping[str, Any], model: str) -> str:
    return f"{cfg['results']}/calibration/{model}/statistics.safetensors"


def weights_spec(cfg: Mapping[str, Any], weights: str) -> dict[str, Any]:
    spec = cfg["weights"][weights]
    return {"name": weights, "method": spec["method"], "params": canonical(spec["params"])}


def weight_entry_needs(cfg: Mapping[str, Any], weights: str) -> set[str]:
    """Calibration statistics one weights entry's method reads, and ``batches`` when it runs the calibration
    set itself."""
    from effivlm.methods.weights import WEIGHT_METHODS

    cls = WEIGHT_METHODS.get(cfg["weights"][weights]["method"])
    return set(cls.needs) | ({"batches"} if cls.needs_batches else set())


def weight_needs(cfg: Mapping[str, Any], model: str) -> set[str]:
    """Calibration statistics and batches the model's configured weight methods read."""
    return {need for m, w in weight_jobs(cfg) if m == model for need in weight_entry_needs(cfg, w)}


def task_spec(cfg: Mapping[str, Any], task: str) -> dict[str, Any]:
    """What the runner needs to run a task: name, kind, and the data folder of a synthetic task."""
    spec = cfg["tasks"][task]
    data = f"{synthetic_dir(cfg)}/{task}" if spec["kind"] == "synthetic" else None
    extra = {key: spec[key] for key in ("lmms_task", "include_path") if key in spec}
    return {"name": task, "kind": spec["kind"], "data": data, **extra}


def train_spec(cfg: Mapping[str, Any], model: str) -> dict[str, Any]:
    """The training recipe of an embedded backbone (the image size comes with the data's manifest)."""
    return canonical(cfg["models"][model]["train"])


def method_params_of(cfg: Mapping[str, Any], variant: str) -> dict[str, Any]:
    """A variant's method parameters, in canonical key order."""
    return canonical(cfg["methods"][variant]["params"])


def canonical(value: Any) -> Any:
    """Dicts with sorted keys, recursively: Snakemake compares params by their text, so reordering keys in a
    config file must not look like a change."""
    if isinstance(value, Mapping):
        return {key: canonical(value[key]) for key in sorted(value)}
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    return value


def choice_pattern(names: list[str]) -> str:
    """A wildcard constraint that matches exactly these names (and nothing when the list is empty)."""
    return "|".join(re.escape(n) for n in names) if names else "(?!)"

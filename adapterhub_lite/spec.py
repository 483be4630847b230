"""Task spec: one YAML file per task, overridable from the command line as `dotted.key=value`.

The spec is plain dataclasses. `load_spec` reads YAML, applies overrides, and validates the
whole thing in one pass so that the user sees every problem at once (torchtune style).
"""

from __future__ import annotations

import copy
import dataclasses
import string
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import SpecError

TASK_TYPES = ("classification", "generation")
METHODS = ("lora", "prefix", "prompt", "ia3")
QUANTIZATIONS = ("8bit", "4bit", "none")
DTYPES = ("auto", "bf16", "fp16", "fp32")  # compute dtype; auto: bf16 on CUDA that has it (else fp16), fp32 on the CPU
SCHEDULES = ("linear", "cosine", "constant")
METRICS = {
    "classification": ("accuracy", "macro_f1"),
    "generation": ("exact_match", "json_valid"),
}


@dataclass
class DataSpec:
    train: str = ""
    dev: str = ""


@dataclass
class TrainConfig:
    max_steps: int = 200
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 20
    schedule: str = "linear"
    max_grad_norm: float = 1.0
    eval_every: int = 50
    eval_samples: int = 200  # dev rows used by the periodic evals; the final eval uses all
    eval_batch_size: int = 32
    patience: int = 0  # evals without improvement before stopping; 0 disables early stopping
    checkpoint_every: int = 50
    log_every: int = 10  # steps per metrics.jsonl loss row; the loss is read off the device only then
    max_minutes: float = 0.0  # wall-clock budget for the loop; 0 means no limit
    max_length: int = 256  # prompt + answer tokens
    max_new_tokens: int = 48  # greedy decoding budget for generation tasks
    seed: int = 0


@dataclass
class TaskSpec:
    name: str = ""
    type: str = ""
    data: DataSpec = field(default_factory=DataSpec)
    prompt: str = ""
    label: str | None = None
    labels: list[str] | dict[str, str] | None = None
    target: str | None = None
    metric: list[str] = field(default_factory=list)
    method: str = "lora"
    method_args: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    base: str = "smollm2-135m"
    quantization: str = "8bit"
    dtype: str = "auto"  # compute dtype (DTYPES); not part of the backbone fingerprint
    init_from: str = ""  # start from this adapter's weights: a folder, or name[@version] in the adapters/ registry

    @property
    def prompt_fields(self) -> list[str]:
        """Column names the prompt template reads, in order of appearance."""
        return [f for _, f, _, _ in string.Formatter().parse(self.prompt) if f]

    @property
    def primary_metric(self) -> str:
        return self.metric[0]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ["train.lr=1e-3", "method=prefix"] into a nested dict; values are parsed as YAML."""
    out: dict[str, Any] = {}
    bad = [item for item in items if "=" not in item or not item.split("=", 1)[0]]
    if bad:
        raise SpecError([f"override {b!r} is not of the form dotted.key=value" for b in bad], "overrides")
    for item in items:
        key, raw = item.split("=", 1)
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        value = yaml.safe_load(raw) if raw else ""
        # "Text: {body}" parses as a YAML mapping; only an explicit {…} / […] is meant as one.
        node[leaf] = raw if isinstance(value, (dict, list)) and raw.strip()[:1] not in "{[" else value
    return out


_SECTIONS = ("data", "train", "method_args")  # merged key by key; any other key is replaced whole


def _merge(base: dict, extra: dict) -> dict:
    merged = copy.deepcopy(base)
    for k, v in extra.items():
        section = k in _SECTIONS and isinstance(v, dict) and isinstance(merged.get(k), dict)
        merged[k] = {**merged[k], **v} if section else v
    return merged


def _build(cls, raw: Any, where: str, problems: list[str]):
    """Instantiate dataclass `cls` from `raw`, appending a message per problem instead of raising."""
    if not isinstance(raw, dict):
        problems.append(f"{where or 'spec'} must be a mapping, got {type(raw).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            problems.append(f"unknown key {where + str(key)!r} (valid: {', '.join(names)})")
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        value, hint = raw[name], hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, f"{where}{name}.", problems)
            continue
        kwargs[name] = _coerce(value, hint, where + name, problems)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str, problems: list[str]) -> Any:
    if hint is float and not isinstance(value, bool):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string; accept it as the number it means
            return float(value)
        except (TypeError, ValueError):
            pass
    if hint in (int, str, float):
        if not isinstance(value, hint) or isinstance(value, bool):
            problems.append(f"{key!r} must be {hint.__name__}, got {value!r}")
        return value
    if key == "metric":
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            problems.append(f"'metric' must be a name or a list of names, got {value!r}")
            return []
    return value  # unions and containers are checked by _check


def _check(spec: TaskSpec, problems: list[str]) -> None:
    def choice(key: str, value: Any, valid: tuple) -> None:
        if value not in valid:
            problems.append(f"{key}={value!r} is not one of {', '.join(valid)}")

    if not spec.name or not isinstance(spec.name, str):
        problems.append("'name' is required (a short task name, e.g. sst2)")
    elif not spec.name.replace("_", "").replace("-", "").isalnum():
        problems.append(f"name={spec.name!r} may hold only letters, digits, '-' and '_'")
    choice("type", spec.type, TASK_TYPES)
    choice("method", spec.method, METHODS)
    choice("quantization", spec.quantization, QUANTIZATIONS)
    choice("dtype", spec.dtype, DTYPES)
    choice("train.schedule", spec.train.schedule, SCHEDULES)
    if not isinstance(spec.method_args, dict):
        problems.append(f"'method_args' must be a mapping, got {spec.method_args!r}")
    for key in ("train", "dev"):
        if not getattr(spec.data, key):
            problems.append(f"'data.{key}' is required (a csv/tsv/jsonl/parquet path or hf:<dataset>[:<config>]:<split>)")
    if not spec.prompt or not isinstance(spec.prompt, str):
        problems.append("'prompt' is required, e.g. \"Review: {sentence}\\nSentiment:\"")
    else:
        try:
            fields = spec.prompt_fields
            if not fields:
                problems.append(f"prompt {spec.prompt!r} names no column; use {{column}} placeholders")
        except ValueError as exc:
            problems.append(f"prompt {spec.prompt!r} is not a valid template ({exc})")
    if spec.type == "classification":
        if not spec.label:
            problems.append("'label' (the label column) is required for classification")
        if not spec.labels or not isinstance(spec.labels, (list, dict)) or len(spec.labels) < 2:
            problems.append(f"'labels' needs at least two verbalizer words (a list, or a mapping value→word), got {spec.labels!r}")
    if spec.type == "generation" and not spec.target:
        problems.append("'target' (the answer column) is required for generation")
    valid_metrics = METRICS.get(spec.type, ())
    if spec.type in METRICS:
        if not spec.metric:
            spec.metric = [valid_metrics[0]]
        for m in spec.metric:
            if m not in valid_metrics:
                problems.append(f"metric {m!r} is not valid for {spec.type} (valid: {', '.join(valid_metrics)})")
    t = spec.train
    for key in ("max_steps", "batch_size", "grad_accum", "eval_every", "eval_batch_size", "max_length", "max_new_tokens", "checkpoint_every", "log_every"):
        if isinstance(getattr(t, key), int) and getattr(t, key) < 1:
            problems.append(f"train.{key} must be ≥ 1, got {getattr(t, key)}")
    if isinstance(t.lr, float) and t.lr <= 0:
        problems.append(f"train.lr must be > 0, got {t.lr}")


def spec_from_dict(raw: dict, overrides: list[str] | None = None, source: str = "task spec") -> TaskSpec:
    """Build and validate a TaskSpec from a mapping plus `dotted.key=value` overrides."""
    if overrides:
        extra = parse_overrides(overrides)
        if "method" in extra and extra["method"] != (raw or {}).get("method") and "method_args" not in extra:
            extra["method_args"] = None  # the file's method_args belong to the method being replaced
        raw = _merge(raw or {}, extra)
        if raw.get("method_args") is None:
            raw["method_args"] = {}
    problems: list[str] = []
    spec = _build(TaskSpec, raw, "", problems)
    _check(spec, problems)
    if problems:
        raise SpecError(problems, source)
    return spec


def load_spec(path: str | Path, overrides: list[str] | None = None) -> TaskSpec:
    """Read a task spec YAML file, apply overrides, and validate it."""
    path = Path(path)
    if not path.is_file():
        raise SpecError([f"file {str(path)!r} does not exist; pass a task YAML such as scripts/tasks/sst2.yaml"], "task spec")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SpecError([f"YAML does not parse: {' '.join(str(exc).split())}"], f"task spec {path}") from None
    return spec_from_dict(raw, overrides, f"task spec {path}")

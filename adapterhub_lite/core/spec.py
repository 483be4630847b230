"""Task spec: one YAML file per task, overridable from the command line as `dotted.key=value`.

The spec is plain dataclasses. `load_spec` reads YAML, applies overrides, and validates the
whole thing in one pass so that the user sees every problem at once (torchtune style). The prompt, the label
words and the method_args are checked by spec_checks.py; the file is read by spec_yaml.py.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import string
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from adapterhub_lite.core.errors import SpecError
from adapterhub_lite.core.names import DTYPES, QUANTIZATIONS  # noqa: F401 - re-exported: spec.DTYPES is public
from adapterhub_lite.core.spec_checks import label_problems, method_args_problems, prompt_problems
from adapterhub_lite.core.spec_yaml import check_numbers, read_yaml

TASK_TYPES = ("classification", "generation")
METHODS = ("lora", "prefix", "prompt", "ia3")

SCHEDULES = ("linear", "cosine", "constant")
COMPILE = ("auto", "always", "never")  # train.compile: auto compiles on CUDA for a backbone that is not quantized
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
    # A key the spec leaves out is chosen at the start of `train` from the data, the task type, the
    # method and the model (defaults.py), printed and recorded; the numbers below are the fallback
    # for code that reads a spec without training it.
    max_steps: int = 200
    epochs: float = 0.0  # the budget in passes over the train split (max_steps = epochs × steps per epoch); 0: use max_steps
    batch_size: int = 16
    batch_tokens: int = 0  # the batch in tokens: batch_size = this ÷ the train rows' mean tokens (0: batch_size rows; on a GPU chosen when left out)
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
    min_delta: float = 0.0  # an eval must beat the best by more than this to count as an improvement (patience)
    min_steps: int = 0  # early stopping may not end the run before this step
    checkpoint_every: int = 50
    log_every: int = 10  # steps per metrics.jsonl loss row; the loss is read off the device only then
    max_minutes: float = 0.0  # wall-clock budget for the loop; 0 means no limit
    max_length: int = 256  # prompt + answer tokens
    max_new_tokens: int = 48  # greedy decoding budget for generation tasks
    seed: int = 0
    compile: str = "auto"  # the training forward through torch.compile: auto (on CUDA, unquantized, LoRA/IA3), always, never


@dataclass
class TaskSpec:
    """One task's spec: its data, prompt, answers, metrics, method and backbone, and its `train` settings."""

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
    # The dotted keys the spec (file + overrides) set itself; defaults.resolve fills the others. Not a spec key.
    given: frozenset = field(default_factory=frozenset, repr=False, compare=False, metadata={"internal": True})

    @property
    def prompt_fields(self) -> list[str]:
        """Column names the prompt template reads, in order of appearance."""
        return [f for _, f, _, _ in string.Formatter().parse(self.prompt) if f]

    @property
    def primary_metric(self) -> str:
        return self.metric[0]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("given")
        return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ["train.lr=1e-3", "method=prefix"] into a nested dict; values are parsed as YAML.

    A value YAML cannot parse (e.g. `prompt=Review: {text}\\nSentiment:`) is taken as the string written.
    """
    out: dict[str, Any] = {}
    bad = [item for item in items if "=" not in item or not item.split("=", 1)[0]]
    if bad:
        raise SpecError([f"override {b!r} is not of the form dotted.key=value" for b in bad], "overrides")
    # A key beside its own parent (train=… with train.lr=…) has no one meaning: the parent's mapping would replace the
    # dotted key, or a value given for the parent would be indexed as a mapping. The same key twice is last-wins, as an
    # argparse option given twice (scripts put their own settings after the user's, bench_train.py, gpu_check.sh).
    keys = list(dict.fromkeys(item.split("=", 1)[0] for item in items))
    clash = [(a, b) for i, a in enumerate(keys) for b in keys[i + 1:] if b.startswith(a + ".") or a.startswith(b + ".")]
    if clash:
        raise SpecError([f"overrides {a!r} and {b!r} both set {min(a, b, key=len)!r}; give its keys one way (dotted keys, or one mapping)"
                         for a, b in clash], "overrides")
    for item in items:
        key, raw = item.split("=", 1)
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:  # free text such as a prompt is not meant as YAML
            value = raw
        # "Text: {body}" parses as a YAML mapping; only an explicit {…} / […] is meant as one.
        if isinstance(value, (dict, list)) and raw.strip()[:1] not in "{[":
            value = raw
        elif raw:
            check_numbers(raw, item)
        node[leaf] = value
    return out


_SECTIONS = ("data", "train", "method_args")  # merged key by key; any other key is replaced whole


def _merge(base: dict, extra: dict) -> dict:
    merged = copy.deepcopy(base)
    for k, v in extra.items():
        section = k in _SECTIONS and isinstance(v, dict) and isinstance(merged.get(k), dict)
        merged[k] = {**merged[k], **v} if section else v
    return merged


@functools.cache
def _hints(cls) -> dict[str, Any]:
    """A spec dataclass's field types. Cached: get_type_hints evaluates every string annotation (this module's
    `from __future__ import annotations`) again at each call, ~1 ms a spec, and the server builds an adapter's spec
    for every request it prepares (serving/reading.py)."""
    return typing.get_type_hints(cls)


def _build(cls, raw: Any, where: str, problems: list[str]):
    """Instantiate dataclass `cls` from `raw`, appending a message per problem instead of raising."""
    if not isinstance(raw, dict):
        fix = f"set its keys (e.g. {where}KEY=VALUE)" if where else "write the spec as a YAML mapping (name: ..., type: ...)"
        problems.append(f"{where.rstrip('.') or 'the spec'} must be a mapping of keys, got {type(raw).__name__} {raw!r}; {fix}")
        return cls()
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
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
            number = float(value)
        except (TypeError, ValueError):
            pass
        else:
            if not math.isfinite(number):  # .inf / nan would train an all-NaN adapter and exit 0
                problems.append(f"{key}={value!r} is not a finite number; give a finite value")
            return number
    if hint in (int, str, float):
        if not isinstance(value, hint) or isinstance(value, bool):
            problems.append(f"{key!r} must be {hint.__name__}, got {value!r}")
        return value
    if key in ("label", "target") and value is not None and not isinstance(value, str):  # the union `str | None`
        # a list raised a bare TypeError deep in data.py; a number named no column (csv headers are text)
        quoted = f"; quote it ('{value}') if the column is named so" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
        problems.append(f"{key!r} must be a column name (text), got {type(value).__name__} {value!r}{quoted}")
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
    choice("train.compile", spec.train.compile, COMPILE)
    if not isinstance(spec.method_args, dict):
        problems.append(f"'method_args' must be a mapping, got {spec.method_args!r}")
    elif spec.method in METHODS:
        problems += method_args_problems(spec.method, spec.method_args)
    for key in ("train", "dev"):
        if not getattr(spec.data, key):
            problems.append(f"'data.{key}' is required (a csv/tsv/jsonl/parquet path or hf:<dataset>[:<config>]:<split>)")
    if not spec.prompt or not isinstance(spec.prompt, str):
        problems.append("'prompt' is required, e.g. \"Review: {sentence}\\nSentiment:\"")
    else:
        problems += prompt_problems(spec.prompt)
    if spec.type == "classification":
        if not spec.label:
            problems.append("'label' (the label column) is required for classification")
        if not spec.labels or not isinstance(spec.labels, (list, dict)) or len(spec.labels) < 2:
            problems.append(f"'labels' needs at least two verbalizer words (a list, or a mapping value→word), got {spec.labels!r}")
        else:
            problems += label_problems(spec.labels)
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
    for key in ("max_steps", "batch_size", "grad_accum", "eval_every", "eval_batch_size", "eval_samples", "max_length", "max_new_tokens",
                "checkpoint_every", "log_every"):
        if isinstance(getattr(t, key), int) and getattr(t, key) < 1:
            problems.append(f"train.{key} must be ≥ 1, got {getattr(t, key)}")
    for key in ("epochs", "min_delta", "max_minutes", "weight_decay", "max_grad_norm"):  # max_grad_norm 0: no clipping
        value = getattr(t, key)
        if isinstance(value, float) and value < 0:
            problems.append(f"train.{key} must be ≥ 0, got {value}")
    if isinstance(t.seed, int) and not 0 <= t.seed <= 2**63 - 1:
        problems.append(f"train.seed must be between 0 and 2^63 - 1 (torch's seeds), got {t.seed}")
    for key in ("patience", "min_steps", "batch_tokens", "warmup_steps"):
        value = getattr(t, key)
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            problems.append(f"train.{key} must be ≥ 0, got {value}")
    if isinstance(t.lr, float) and t.lr <= 0:
        problems.append(f"train.lr must be > 0, got {t.lr}")
    if isinstance(t.max_length, int) and isinstance(t.max_new_tokens, int) and t.max_length >= 1:
        # max_length holds the prompt (≥ 1 token, the answer is conditioned on it) and the answer. The exact
        # minimum needs the tokenizer (data_checks.check_lengths); what the spec alone rules out is refused here.
        need = 2 if spec.type == "classification" else t.max_new_tokens + 1
        if t.max_length < need:
            what = "one prompt token and a one-token label" if spec.type == "classification" else f"one prompt token and train.max_new_tokens={t.max_new_tokens}"
            problems.append(f"train.max_length={t.max_length} leaves no room for {what}; use train.max_length ≥ {need}")


def spec_from_dict(raw: dict, overrides: list[str] | None = None, source: str = "task spec") -> TaskSpec:
    """Build and validate a TaskSpec from a mapping plus `dotted.key=value` overrides."""
    if overrides:
        extra = parse_overrides(overrides)
        raw = dict(raw or {}) if isinstance(raw, dict) or raw is None else raw
        if isinstance(raw, dict) and "method" in extra and extra["method"] != raw.get("method", "lora"):
            raw["method_args"] = {}  # the file's method_args belong to the method being replaced; only the overrides' stay
        _replace_other_form(raw, extra)
        raw = _merge(raw, extra) if isinstance(raw, dict) else raw
        if isinstance(raw, dict) and raw.get("method_args") is None:
            raw["method_args"] = {}
    problems: list[str] = []
    spec = _build(TaskSpec, raw, "", problems)
    spec.given = frozenset(given_keys(raw)) if isinstance(raw, dict) else frozenset()
    _check(spec, problems)
    if problems:
        raise SpecError(problems, source)
    return spec


# Two keys that give one setting two ways (the budget: steps or epochs; the batch: rows or tokens). A spec gives one.
_ONE_SETTING = (("max_steps", "epochs"), ("batch_size", "batch_tokens"))


def _replace_other_form(raw: dict, extra: dict) -> None:
    """An override that gives one form of a setting (train.epochs=3) replaces the file's other form (its max_steps), as
    `method` replaces method_args: else no command line could train a spec that fixes max_steps (every shipped one) by
    epochs, since max_steps cannot be unset there. An override of 0 (epochs 0, batch_tokens 0: "use the other form")
    and both forms on the command line replace nothing (load_spec refuses the latter)."""
    given, written = extra.get("train"), raw.get("train") if isinstance(raw, dict) else None
    if not isinstance(given, dict) or not isinstance(written, dict):
        return
    for pair in _ONE_SETTING:
        for key, other in (pair, pair[::-1]):
            if given.get(key) and other not in given and other in written:
                raw["train"] = written = {k: v for k, v in written.items() if k != other}


def given_keys(raw: dict, prefix: str = "") -> set[str]:
    """The dotted keys a raw spec sets: `train.lr`, `method_args`, `data.train` … (a section's keys and the section).

    `method_args` counts as one key: its entries are peft's, merged over the method's defaults.
    """
    keys = set()
    for key, value in raw.items():
        name = prefix + str(key)
        keys.add(name)
        if isinstance(value, dict) and name in ("train", "data"):
            keys |= given_keys(value, name + ".")
    return keys


def load_spec(path: str | Path, overrides: list[str] | None = None) -> TaskSpec:
    """Read a task spec YAML file, apply overrides, and validate it."""
    path = Path(path)
    if path.is_dir():  # "does not exist" would send the user looking for a path that is there
        raise SpecError([f"{str(path)!r} is a directory, not a file; pass a task YAML such as scripts/tasks/sst2.yaml"], "task spec")
    if not path.is_file():
        raise SpecError([f"file {str(path)!r} does not exist; pass a task YAML such as scripts/tasks/sst2.yaml"], "task spec")
    raw = read_yaml(path) or {}
    spec = spec_from_dict(raw, overrides, f"task spec {path}")
    t = spec.train
    if {"train.max_steps", "train.epochs"} <= spec.given and t.epochs:  # a written spec; a recorded one holds both, consistent
        raise SpecError([f"train.max_steps={t.max_steps} and train.epochs={t.epochs} both set the budget; give one "
                         "(on the command line, train.epochs=N replaces the file's max_steps and train.max_steps=N its epochs)"], f"task spec {path}")
    if {"train.batch_size", "train.batch_tokens"} <= spec.given and t.batch_tokens:
        raise SpecError([f"train.batch_size={t.batch_size} and train.batch_tokens={t.batch_tokens} both set the batch; give one "
                         "(on the command line, train.batch_tokens=N replaces the file's batch_size and train.batch_size=N its batch_tokens)"], f"task spec {path}")
    return spec

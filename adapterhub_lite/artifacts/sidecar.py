"""The sidecar (`adapterhub.json`): what an adapter folder is, beside the PEFT files peft reads.

One versioned dataclass with save/load (as peft's PeftConfig), built by one function, `build`,
that every writer uses: training (train.py), joint training (a folder per task and the shared
component), merging (ops/merge.py) and composition (training/recipes/compose.py). Older versions are
upgraded on load by an explicit step per version (`_UPGRADES`), so readers see one shape.

    format 1  written before typed sidecars: base.dtype and base.weights may be missing
    format 2  this class; every field below is present (None where it does not apply)
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from adapterhub_lite.artifacts.files import share_files, write_json
from adapterhub_lite.core import __version__
from adapterhub_lite.core.errors import AdapterHubError, AdapterLoadError
from adapterhub_lite.core.spec import METHODS, spec_from_dict

SIDECAR = "adapterhub.json"
FORMAT = "adapterhub_lite.adapter/2"


@dataclass
class Sidecar:
    """Everything about an adapter that its PEFT files do not say."""

    name: str
    task: dict | None  # the task spec it serves (None: a component, e.g. a joint run's shared adapter, serving raw text)
    method: str  # lora, prefix, prompt, ia3
    base: dict  # the backbone: name, hub_id, fingerprint (checked at load), dtype, weights (the exact file), quantization_config (absent: older sidecars)
    label_words: list[str] | None = None  # classification: the verbalizer words, in label order
    metrics: dict = field(default_factory=dict)  # dev scores of this adapter itself
    routing: dict | None = None  # content-routing samples: file, embedding, samples (None: left out of auto routing)
    data: dict = field(default_factory=dict)  # split → source, sha256, rows
    trainable_parameters: dict | None = None
    efficiency: dict | None = None  # adapter bytes, peak memory, train tokens/s, latency, device
    train_state: dict | None = None  # steps, best step, why it stopped, seconds, tokens, processes, global batch
    init_from: dict | None = None  # the adapter this one started from
    defaults: dict | None = None  # the settings its spec left out: dotted key → value and why (defaults.resolve)
    joint: dict | None = None  # joint training: the run, tasks, role
    merge: dict | None = None  # merging: method, weights, sources …
    merge_report: dict | None = None
    metrics_rows: int | None = None
    composition: dict | None = None  # learned composition: search, weights, sources
    command: str | None = None
    versions: dict | None = None
    created: str | None = None
    extra: dict = field(default_factory=dict)  # keys this version does not know (a newer writer's), kept as they are
    format: str = FORMAT

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "extra"}
        return {"format": out.pop("format"), **out, **self.extra}

    @classmethod
    def from_dict(cls, raw: dict, where: str = "sidecar") -> Sidecar:
        """A sidecar from its JSON form, upgraded from an older format first."""
        raw = dict(raw)
        while raw.get("format") != FORMAT:
            fmt = raw.get("format")
            step = _UPGRADES.get(fmt) if isinstance(fmt, str) else None
            if step is None:
                raise AdapterLoadError(f"{where} has format {fmt!r}; this version reads {', '.join([*_UPGRADES, FORMAT])}: "
                                       "upgrade adapterhub_lite, or re-train the adapter")
            raw = step(raw)
        names = {f.name for f in fields(cls)} - {"extra"}
        missing = [k for k in ("name", "task", "method", "base") if k not in raw]
        if missing:
            raise AdapterLoadError(f"{where} lacks {', '.join(missing)}; it was not written by adapterhub_lite: re-train or re-export the adapter")
        problems = sidecar_problems(raw)  # after upgrading: the shape every reader relies on
        if problems:
            raise AdapterLoadError(f"{where} is damaged: {'; '.join(problems)}; re-train or re-export the adapter (or restore its sidecar)")
        return cls(**{k: v for k, v in raw.items() if k in names}, extra={k: v for k, v in raw.items() if k not in names})

    @classmethod
    def load(cls, folder: str | Path) -> Sidecar:
        path = Path(folder) / SIDECAR
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise AdapterLoadError(f"cannot read {path} ({type(exc).__name__}); the adapter folder is damaged: re-publish or re-train it") from None
        if not isinstance(raw, dict):
            raise AdapterLoadError(f"{path} holds a JSON {type(raw).__name__}, not an object; the adapter folder is damaged")
        return cls.from_dict(raw, str(path))

    def save(self, folder: str | Path) -> None:
        """Write `folder/adapterhub.json` atomically, once the PEFT files are there, and make the folder's files
        readable by others as a published adapter must be (safetensors writes its file 0600)."""
        write_json(Path(folder) / SIDECAR, self.to_dict())
        share_files(Path(folder))


FINGERPRINT_KEYS = ("config_sha256", "tokenizer_sha256", "weights_sha256", "quantization")


def sidecar_problems(raw: dict) -> list[str]:
    """What is wrong with a (current-format) sidecar's fields that readers use, each naming the field and the value."""
    out = []

    def shown(value) -> str:
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."

    if not isinstance(raw.get("name"), str) or not raw["name"]:
        out.append(f"name is {shown(raw.get('name'))}, expected a non-empty string")
    if raw.get("method") not in METHODS:
        out.append(f"method is {shown(raw.get('method'))}, expected one of {', '.join(METHODS)}")
    base = raw.get("base")
    if not isinstance(base, dict):
        out.append(f"base is {shown(base)}, expected an object with name, hub_id and fingerprint")
    else:
        if not isinstance(base.get("name"), str) or not base["name"]:
            out.append(f"base.name is {shown(base.get('name'))}, expected the backbone's name")
        if base.get("hub_id") is not None and not isinstance(base["hub_id"], str):
            out.append(f"base.hub_id is {shown(base['hub_id'])}, expected a string or null")
        fp = base.get("fingerprint")
        if not isinstance(fp, dict):
            out.append(f"base.fingerprint is {shown(fp)}, expected an object with {', '.join(FINGERPRINT_KEYS)}")
        else:
            lacking = [k for k in FINGERPRINT_KEYS if not isinstance(fp.get(k), str)]
            if lacking:
                out.append(f"base.fingerprint has no string {', '.join(lacking)}")
    task, words = raw.get("task"), raw.get("label_words")
    if words is not None and not (isinstance(words, list) and all(isinstance(w, str) for w in words)):
        out.append(f"label_words is {shown(words)}, expected a list of strings or null")
    if task is None:
        if words:  # a classifier that lost its task would be served as raw text
            out.append("task is null but label_words are set: a classifier's sidecar without its task")
    elif not isinstance(task, dict):
        out.append(f"task is {shown(task)}, expected the task spec (an object) or null")
    else:
        try:
            spec_from_dict(task, source="task")
        except AdapterHubError as exc:
            out.append(str(exc))
    if not isinstance(raw.get("metrics", {}), dict):
        out.append(f"metrics is {shown(raw['metrics'])}, expected an object")
    return out


def _from_v1(raw: dict) -> dict:
    """format 1 → 2: sidecars before base.dtype / base.weights were recorded computed in fp32 on unrecorded weights."""
    base = raw.get("base")
    if isinstance(base, dict):  # anything else is left for sidecar_problems to name (a default here would hide it)
        base = {"dtype": "fp32", "weights": None, **base}
    raw = {**raw, "base": base, "format": FORMAT}
    if "compose" in raw and "composition" not in raw:
        raw["composition"] = raw.pop("compose")
    return raw


_UPGRADES = {"adapterhub_lite.adapter/1": _from_v1}


def quantization_record(model) -> dict | None:
    """The bitsandbytes config `model` was loaded with, as transformers writes it into a quantized model's config.json
    (`BitsAndBytesConfig.from_dict` reads it back); None for an unquantized model.

    "8bit" alone does not say how to rebuild the backbone: we load with llm_int8_threshold=0.0, bitsandbytes' default
    is 6.0, and the two give other logits (README, "8-bit backbone, kept causal"). A peft user reads the threshold here.
    """
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return None
    raw = json.loads(config.to_json_string(use_diff=False))
    return {k: v for k, v in raw.items() if not k.startswith("_")}  # _load_in_8bit / _load_in_4bit mirror the public keys


def base_record(name: str, backbone) -> dict:
    """The sidecar's `base` for backbone `backbone` (a model.backbone.Backbone) loaded as `name`."""
    return {"name": name, "hub_id": backbone.hub_id, "fingerprint": backbone.fingerprint, "dtype": backbone.dtype_name, "weights": backbone.source,
            "quantization_config": quantization_record(backbone.model)}


def versions() -> dict:
    """The versions of everything that computed the adapter."""
    import platform

    import bitsandbytes
    import peft
    import torch
    import transformers


    return {"adapterhub_lite": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__}


def build(name: str, *, task: dict | None, method: str, base: dict, command: str | None = None, **fields_) -> Sidecar:
    """The one way a sidecar is made: the given fields, plus the command, versions and time of now."""
    return Sidecar(name=name, task=task, method=method, base=base, command=command or " ".join(sys.argv), versions=versions(),
                   created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields_)

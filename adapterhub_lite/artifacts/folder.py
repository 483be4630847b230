"""The adapter folder: what a training run leaves behind, and how it is read back.

    adapter_config.json, adapter_model.safetensors   PEFT files (plain PeftModel.from_pretrained)
    adapterhub.json                                  sidecar: spec, backbone fingerprint, metrics …
    README.md                                        HF model card (library_name: peft)
    metrics.jsonl, curves.png                        the run's history and its plot
Every file is written to a temp name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from adapterhub_lite.artifacts.files import atomic_write, share_files, write_json, write_jsonl  # noqa: F401 - re-exported: folder writers
from adapterhub_lite.artifacts.sidecar import FORMAT, SIDECAR, Sidecar  # noqa: F401 - re-exported: the folder's metadata file
from adapterhub_lite.core.errors import AdapterLoadError


def read_sidecar(folder: Path) -> dict:
    """An adapter folder's sidecar (sidecar.Sidecar, upgraded from older formats) as a dict."""
    folder = Path(folder)
    missing = [f for f in ("adapter_config.json", SIDECAR) if not (folder / f).is_file()]
    if missing:
        raise AdapterLoadError(f"{str(folder)!r} is not an adapter folder: missing {', '.join(missing)}; pass a folder written by `adapterhub-lite train`")
    return Sidecar.load(folder).to_dict()


def nonfinite_tensors(tensors: dict) -> list[str]:
    """Names of the tensors holding NaN or ±inf (the flags are gathered on each tensor's device: one host sync per device)."""
    import torch  # here: `import adapterhub_lite.artifacts.folder` (registry, list, info) stays free of torch

    floats = {k: v for k, v in tensors.items() if v.is_floating_point()}
    if not floats:
        return []
    by_device: dict = {}
    for k, v in floats.items():
        by_device.setdefault(v.device, []).append(k)
    bad = []
    for names in by_device.values():
        finite = torch.stack([torch.isfinite(floats[k]).all() for k in names]).tolist()
        bad += [k for k, ok in zip(names, finite) if not ok]
    return bad


def read_tensors(path: Path, error=AdapterLoadError, data: bytes | None = None) -> dict:
    """The tensors of an adapter_model.safetensors at `path` (or of its bytes `data`, already read), or one `error` naming
    the file when it is no whole safetensors file: a copy cut short (a full disk, an interrupted download) or another
    file under that name was safetensors' own traceback ("invalid header length")."""
    from safetensors import SafetensorError
    from safetensors.torch import load, load_file

    try:
        return load(data) if data is not None else load_file(path)
    except SafetensorError as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise error(f"{path} cannot be read as safetensors ({reason}); the file is damaged (truncated?): copy, pull or re-publish "
                    "the adapter again, or re-train it") from None


def check_finite(folder: Path, error=AdapterLoadError) -> dict:
    """Refuse an adapter folder whose weights hold NaN or ±inf: such an adapter scores garbage. Returns the tensors read.

    Raised before anything is published or served, so a diverged run or a NaN merge weight
    never reaches a registry or a user.
    """
    path = Path(folder) / "adapter_model.safetensors"
    tensors = read_tensors(path, error)
    bad = nonfinite_tensors(tensors)
    if bad:
        shown = ", ".join(bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")
        raise error(f"{path} holds non-finite values (NaN or inf) in {len(bad)} tensor(s): {shown}; "
                    "retrain with a lower learning rate, or merge with finite weights")
    return tensors


def check_lora_ranks(folder: Path, config: dict, tensors: dict, error=AdapterLoadError) -> None:
    """Refuse a LoRA folder whose lora_A tensors do not have the rank adapter_config.json gives their module (`r`, or its
    rank_pattern entry, matched as peft matches it): peft refuses to load it (size mismatch), and vLLM scales by the
    config's rank, so no server can answer as the adapter was trained."""
    from peft.utils.other import get_pattern_key

    pattern, r = config.get("rank_pattern") or {}, config.get("r")
    if not isinstance(r, int):  # no rank at all: the index's own check names it
        return
    for key, t in tensors.items():
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        want = pattern.get(get_pattern_key(pattern.keys(), module), r)  # as peft's LoraModel picks a module's rank
        if t.shape[0] != want:
            raise error(f"{Path(folder) / 'adapter_config.json'} gives rank {want} to {module} but adapter_model.safetensors holds it at rank "
                        f"{t.shape[0]}: the config does not describe these weights (peft refuses to load them); re-train or re-export the adapter")


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
PEFT_TYPES = {"LORA": "lora", "PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt", "IA3": "ia3"}  # adapter_config.json → sidecar method


def check_adapter_folder(folder: Path, error=AdapterLoadError) -> dict:
    """The checks every way in applies to an adapter folder (publish, loading at run time, predict/eval by
    path, a server's start); returns its sidecar. One line (`error`) names the first problem:

    - no symlinks (a publish would copy what they point to) and no pickle weights, only safetensors;
    - a sidecar of the known shape (sidecar.sidecar_problems) whose method is the PEFT config's;
    - finite weights (a diverged run or a NaN merge weight is never served or published);
    - a LoRA's weights at the ranks its adapter_config.json gives (check_lora_ranks).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise error(f"adapter folder {str(folder)!r} does not exist; pass a folder written by `adapterhub-lite train`")
    links = sorted(p.name for p in folder.iterdir() if p.is_symlink())
    if links:
        raise error(f"{folder} holds symlinks {links}: an adapter folder holds its own files; copy the files in place of the links")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise error(f"{folder} holds pickle weights {pickles}: only safetensors are accepted; run `adapterhub-lite convert {folder} --trust-pickle` "
                    "if you trust the file (and remove any other pickle)")
    if not (folder / "adapter_model.safetensors").is_file():
        raise error(f"{folder} has no adapter_model.safetensors; pass a folder written by `adapterhub-lite train`")
    meta = read_sidecar(folder)
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        peft_type = config.get("peft_type")
    except (OSError, ValueError, AttributeError, RecursionError) as exc:
        raise error(f"{folder / 'adapter_config.json'} cannot be read as a PEFT config ({type(exc).__name__}); the folder is damaged") from None
    if PEFT_TYPES.get(peft_type) != meta["method"]:
        raise error(f"{folder / SIDECAR} says method {meta['method']!r} but adapter_config.json holds a {peft_type!r} adapter; "
                    "the sidecar does not describe these weights: re-train or re-export the adapter")
    tensors = check_finite(folder, error)
    if peft_type == "LORA":
        check_lora_ranks(folder, config, tensors, error)
    return meta


def convert_pickle(folder: str | Path) -> Path:
    """Turn a trusted pickle adapter (adapter_model.bin) into adapter_model.safetensors, in place (`adapterhub-lite convert`)."""
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    src = folder / "adapter_model.bin"
    if not src.is_file():
        raise AdapterLoadError(f"{folder} has no adapter_model.bin to convert; pass the adapter folder that holds it")
    state = torch.load(src, map_location="cpu", weights_only=True)  # tensors only: no code runs
    tmp = folder / ".adapter_model.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / "adapter_model.safetensors")
    src.unlink()
    return folder / "adapter_model.safetensors"


def folder_hashes(folder: Path) -> dict[str, str]:
    """{file name: sha256} of a folder's regular files (the few MB of an adapter: read at every load)."""
    import hashlib

    out = {}
    for p in sorted(Path(folder).iterdir()):
        if p.is_file() and not p.name.startswith("."):
            h = hashlib.sha256()
            with open(p, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            out[p.name] = h.hexdigest()
    return out


def is_adapter_folder(folder: Path) -> bool:
    """A folder adapterhub_lite wrote: the PEFT config beside our sidecar."""
    return (Path(folder) / "adapter_config.json").is_file() and (Path(folder) / SIDECAR).is_file()


def replaceable(path: Path) -> str | None:
    """Why `--overwrite` may not replace `path` (None when it may).

    Only what this package writes is ever replaced: an adapter folder, a joint run (run.json beside
    adapter folders) or an empty folder. A user's file, or a folder of other things, is refused
    rather than deleted.
    """
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return "it is a file, not a folder"
    entries = list(path.iterdir())
    if not entries or is_adapter_folder(path):
        return None
    subdirs = [e for e in entries if e.is_dir()]
    if (path / "run.json").is_file() and subdirs and all(is_adapter_folder(d) for d in subdirs):
        return None  # a joint run (train-multi): one adapter folder per task
    return "it is a folder but not an adapter folder (no adapter_config.json + adapterhub.json)"


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (servers have no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, dpi: int = 90) -> None:
    """Write a figure as PNG atomically (temp file, then rename) and free it."""
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a figure is to share
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
        pyplot().close(fig)


def plot_curves(history: list[dict], metric: str, path: Path) -> None:
    """Train loss and dev metric against step, as one PNG."""
    plt = pyplot()
    train = [r for r in history if "loss" in r]
    evals = [r for r in history if metric in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8)
    ax1.set(xlabel="step", ylabel="train loss", title="loss")
    ax2.plot([r["step"] for r in evals], [r[metric] for r in evals], marker="o")
    ax2.set(xlabel="step", ylabel=f"dev {metric}", title=metric)
    save_figure(fig, path)


def hub_model_id(name: str | None) -> str | None:
    """`name` when it is a Hugging Face Hub model id (org/model), else None: a local folder's absolute path, or none recorded.

    A card's `base_model` (and its base_model:adapter tag) must be a Hub model id: the Hub checks a README's metadata
    on upload and refuses a local path there (as transformers leaves a local `finetuned_from` out of its cards).
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or Path(name).is_absolute():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def model_card(meta: dict) -> str:
    """An HF model card: huggingface_hub's metadata header (library, base model, tags, eval results), then usage and results.

    Built offline (no Hub calls); `ModelCard(text).data` reads the header back.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    spec, metrics = meta["task"], meta["metrics"]
    base_id = meta["base"]["hub_id"] or meta["base"]["name"]
    hub = hub_model_id(meta["base"]["hub_id"])  # None: a local backbone, named in the text only
    task_type = "text-classification" if spec["type"] == "classification" else "text-generation"
    # pipeline_tag and the base_model:adapter tag as peft's own card has: the Hub's inference widget and its base-model
    # adapter listing read them (every adapter here runs on a causal LM, classifiers included: they score label words)
    card_data = ModelCardData(
        library_name="peft", base_model=hub, pipeline_tag="text-generation",
        tags=["adapterhub_lite", spec["method"], spec["type"], spec["name"]] + ([f"base_model:adapter:{hub}"] if hub else []),
        metrics=list(spec["metric"]), model_name=f"{spec['name']}-{spec['method']}",
        eval_results=[EvalResult(task_type=task_type, dataset_type=spec["name"], dataset_name=spec["name"], dataset_split="dev",
                                 metric_type=m, metric_value=metrics[m]) for m in spec["metric"]],
    )
    quant, dtype = meta["base"]["fingerprint"]["quantization"], meta["base"].get("dtype")
    frozen = quant if quant != "none" else "unquantized" + (f" ({dtype})" if dtype else "")
    eff = meta["efficiency"]
    rows = "\n".join(f"| {m} | {metrics[m]} |" for m in spec["metric"])
    local = "" if hub else "The backbone is a local folder, not a Hub model, so the metadata names no base_model: load that folder as the base.\n"
    body = f"""
# {spec['name']} — {spec['method']} adapter for {base_id}

Trained with adapterhub_lite on a frozen {frozen} backbone
(fingerprint `{meta['base']['fingerprint']['id']}`). Task type: {spec['type']}.
{_weights_line(meta['base'])}{local}
Prompt template: `{spec['prompt']!r}`{f"; label words: {', '.join(map(str, meta['label_words']))}" if meta.get('label_words') else ''}.

## Results (dev, {meta.get('metrics_rows') or meta['data']['dev']['rows']} rows)

| metric | value |
|---|---|
{rows}

Trainable parameters: {meta['trainable_parameters']['trainable']:,} ({meta['trainable_parameters']['percent']}%),
adapter file {eff['adapter_file_bytes'] / 1e6:.2f} MB, train {eff['train_tokens_per_s']:.0f} tokens/s,
{eff['latency_ms_per_example']:.1f} ms per dev example, peak memory {eff['peak_memory_mb']:.0f} MB,
{meta['train_state']['steps']} steps in {meta['train_state']['train_seconds']:.0f} s.

## Use with peft

{_peft_snippet(meta['base'])}

## Use with adapterhub_lite

```
adapterhub-lite predict path/to/this/folder --text "..."
adapterhub-lite eval path/to/this/folder --split dev --json
```

`adapterhub.json` holds the full task spec, data hashes, backbone fingerprint, command and versions.
"""
    return str(ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}"))


_TORCH_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # sidecar base.dtype → torch's name


def _peft_snippet(base: dict) -> str:
    """The card's plain transformers + peft code that loads the backbone as the adapter was trained on it, in the
    recorded compute dtype (sidecar base.dtype; a format-1 sidecar has none).

    A quantized run names its BitsAndBytesConfig: `load_in_8bit=True` alone means bitsandbytes' default
    llm_int8_threshold 6.0, and the adapters here were trained (and are served) at 0.0. The arguments are the
    recorded config's (sidecar base.quantization_config) where they differ from BitsAndBytesConfig's defaults.
    """
    quant = base["fingerprint"]["quantization"]
    config = base.get("quantization_config")
    if quant == "8bit" and config is None:  # sidecars before quantization_config was recorded: load_backbone's one 8-bit config
        config = {"load_in_8bit": True, "llm_int8_threshold": 0.0}
    load, imports, note = f'"{base["hub_id"]}"', "AutoModelForCausalLM", ""
    if base.get("dtype") in _TORCH_NAMES:  # named even for fp32: transformers 5 loads a checkpoint in its config's dtype
        load += f", dtype=torch.{_TORCH_NAMES[base['dtype']]}"  # when none is passed (the hub's SmolLM2 says bfloat16)
    if quant != "none" and config is not None:
        from transformers import BitsAndBytesConfig

        default = json.loads(BitsAndBytesConfig().to_json_string(use_diff=False))
        args = {k: v for k, v in sorted(config.items(), key=lambda kv: not kv[0].startswith("load_in"))  # load_in_8bit/4bit first
                if k != "quant_method" and not k.startswith("_") and default.get(k) != v}
        if quant == "8bit":
            args.setdefault("llm_int8_threshold", config.get("llm_int8_threshold", 6.0))
            note = "# llm_int8_threshold as trained: bitsandbytes' default 6.0 gives other answers (adapterhub_lite's README)\n"
        shown = ", ".join(f"{k}=torch.{v}" if k == "bnb_4bit_compute_dtype" else f"{k}={v!r}" for k, v in args.items())
        imports += ", BitsAndBytesConfig"
        load += f", quantization_config=BitsAndBytesConfig({shown})"
    return (f"```python\nimport torch\nfrom transformers import {imports}\nfrom peft import PeftModel\n{note}"
            f"base = AutoModelForCausalLM.from_pretrained({load})\nmodel = PeftModel.from_pretrained(base, \"path/to/this/folder\")\n```")


def _weights_line(base: dict) -> str:
    """The card's statement of exactly which backbone weights the adapter was trained on."""
    w = base.get("weights")
    if not w:
        return ""
    return f"Backbone weights: {w['file']}, sha256 `{w['sha256']}` ({w['note']}).\n"

"""A merge's sources, read once and loaded from those bytes (ops/merge.py merges them).

Each source's adapter_config.json, adapter_model.safetensors and sidecar are read once (read_source); a caller that
checks their sha256 (the server's build_merge) merges exactly what it checked, whatever the folders hold by then.
load_sources puts them on a model as PeftModel.from_pretrained / load_adapter would, without reading a file, refuses
what peft's add_weighted_adapter would drop, and names modules apart where the sources place their factors apart.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from peft import MODEL_TYPE_TO_PEFT_MODEL_MAPPING, PeftConfig, PeftModel, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer

from adapterhub_lite.artifacts.folder import read_tensors
from adapterhub_lite.artifacts.sidecar import SIDECAR
from adapterhub_lite.core.errors import AdapterHubError


class MergeError(AdapterHubError):
    """Adapters that cannot be merged as asked (method, ranks, types or backbones differ)."""


SOURCE_FILES = ("adapter_config.json", "adapter_model.safetensors", SIDECAR)  # what a merge reads of each source


def read_source(folder: Path) -> dict[str, bytes]:
    """The files a merge reads of one source folder, each read once: the merge is built from these bytes alone (so a
    caller that checked their sha256 merges what it checked, whatever the folder holds by then)."""
    missing = [f for f in SOURCE_FILES if not (Path(folder) / f).is_file()]
    if missing:
        raise MergeError(f"{str(folder)!r} is not an adapter folder: missing {', '.join(missing)}; pass a folder written by `adapterhub-lite train`")
    return {f: (Path(folder) / f).read_bytes() for f in SOURCE_FILES}


def read_json(files: dict[str, bytes], name: str, folder: Path) -> dict:
    try:
        raw = json.loads(files[name])
    except ValueError as exc:
        raise MergeError(f"cannot read {Path(folder) / name} ({exc}); the adapter folder is damaged: re-publish or re-train it") from None
    if not isinstance(raw, dict):
        raise MergeError(f"{Path(folder) / name} holds a JSON {type(raw).__name__}, not an object; the adapter folder is damaged")
    return raw


def read_weights(files: dict[str, bytes], folder: Path) -> dict:
    """A source's tensors from its adapter_model.safetensors bytes (read_source's), or one MergeError naming the file
    when they are not a whole safetensors file (read_tensors)."""
    return read_tensors(Path(folder) / "adapter_model.safetensors", MergeError, data=files["adapter_model.safetensors"])


_FACTOR = re.compile(r"\.lora_(A|B)\.weight$|\.lora_embedding_(A|B)$")  # the tensors add_weighted_adapter merges


def load_sources(base, sources: dict[str, tuple[dict, dict, Path]]) -> PeftModel:
    """`base` with each source adapter loaded under its name from files already read: name → (adapter_config.json as
    read, its tensors (read_weights), the folder, for messages). peft's own steps of PeftModel.from_pretrained /
    load_adapter (config class by peft_type, inference mode, set_peft_model_state_dict), without reading a file."""
    model = None
    for n, (raw, state, folder) in sources.items():
        raw = {k: v for k, v in raw.items() if k != "runtime_config"}  # as peft drops it when reading the file
        config = PeftConfig.from_peft_type(**PeftConfig.check_kwargs(**raw))
        config.inference_mode = True
        if model is None:  # the PeftModel class from_pretrained picks (by task type)
            model = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(config.task_type, PeftModel)(base, config, adapter_name=n)
        else:
            model.add_adapter(n, config)
        others = [k for k in state if not _FACTOR.search(k)]
        copies = [k for k in others if k.endswith(".base_layer.weight")]
        if copies:  # the base's own weight, not trained: refused by name, as the "trained tensor" line below sends users to DoRA or lora_bias
            tied = "tied " if getattr(getattr(base, "config", None), "tie_word_embeddings", False) else ""
            raise MergeError(f"{folder / 'adapter_model.safetensors'} holds a LoRA on the {tied}lm_head/embedding: peft saved the base's "
                             f"{tied}weight beside it ({copies[0]}), which add_weighted_adapter does not merge; merge adapters "
                             "trained without that target (lm_head, embed_tokens) in target_modules, or untie the embeddings and re-train")
        if others:  # a DoRA magnitude, lora_bias' B bias, a trained module copy or token rows: peft merges none of them
            raise MergeError(f"{folder / 'adapter_model.safetensors'} holds {len(others)} trained tensor(s) besides the LoRA factors (e.g. "
                             f"{others[0]}), which peft's add_weighted_adapter does not merge (they would be dropped); merge adapters of "
                             "LoRA factors alone (no DoRA, lora_bias, modules_to_save or trainable tokens)")
        loaded = set_peft_model_state_dict(model, state, adapter_name=n)
        missing = [k for k in loaded.missing_keys if "lora_" in k and f".{n}." in k]
        if missing or loaded.unexpected_keys:
            raise MergeError(f"{folder / 'adapter_model.safetensors'} does not fit its adapter_config.json (missing {missing[:3]}, "
                             f"unexpected {loaded.unexpected_keys[:3]}); the adapter folder is damaged: re-publish or re-train it")
    if len({_placement(model.peft_config[n]) for n in sources}) > 1:
        # peft places the merged adapter by the first source's config with the sources' target_modules joined: lists are
        # unioned, regexes joined, a mix refused (a bare ValueError), and the first source's layers_to_transform,
        # layers_pattern and exclude_modules kept, so the other sources' updates outside its layers were dropped, unsaid.
        # Where the sources place their factors differently, each names its modules by their full paths instead (a
        # suffix such as q_proj could name modules a source left out, where no source has factors to merge).
        for n in sources:
            config = model.peft_config[n]
            config.target_modules = {key for key, module in model.base_model.model.named_modules() if isinstance(module, LoraLayer) and n in module.lora_A}
            config.layers_to_transform = config.layers_pattern = config.exclude_modules = None
    return model


def _placement(config) -> tuple:
    """What decides the modules an adapter of this config goes to, besides target_modules' names."""
    return (isinstance(config.target_modules, str), *(repr(getattr(config, f, None)) for f in ("layers_to_transform", "layers_pattern", "exclude_modules")))

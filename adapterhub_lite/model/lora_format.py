"""The one reader of the PEFT LoRA / IA3 format, importing neither torch nor peft (the registry's light commands, the
folder checks, export and the per-row layer all ask it): tensor names, the scale, what a config means beyond its
shapes (initialisations that rewrite the base), and a config's keys as peft fills them (with_peft_defaults)."""

from __future__ import annotations

import math
import re
from pathlib import Path

# LoRA initialisations that rewrite the base weights (the adapter is the residual of a changed base:
# PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA). Such an adapter fits only that rewritten base, so on the
# unchanged backbone it computes something else; every reader of LoRA folders refuses it by name.
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def base_rewriting_init(config) -> str | None:
    """The name of the base-rewriting initialisation a LoRA config (a LoraConfig or its JSON dict)
    was made with, else None. peft saves a converted adapter (path_initial_model_for_weight_conversion)
    as plain LoRA, so a config that still names one of these needs the rewritten base."""
    get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
    init = get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        return init
    return "loftq" if get("loftq_config") else None


def base_rewriting_problem(config, what: str, use: str = "serve") -> str | None:
    """One line saying why `what` (a LoRA adapter) cannot be used (`use`: served, merged …) on an unchanged base, or None."""
    init = base_rewriting_init(config)
    if init is None:
        return None
    return (f"{what} was initialised with init_lora_weights={init!r}, which rewrites the base weights; it fits only that rewritten base, "
            f"not this backbone: save it converted to plain LoRA (peft's path_initial_model_for_weight_conversion) and {use} that")


def with_peft_defaults(raw: dict, what: str, error: type[Exception]) -> dict:
    """adapter_config.json (`raw`, as read) with every key it leaves out set to peft's default (r=8, lora_alpha=8 …), as
    PeftConfig.from_pretrained reads it: a hand-written config that plain peft loads means the same here. The keys it
    gives keep their values as written. A peft_type peft does not know is one `error` naming `what` (the file)."""
    from peft import PeftConfig  # at call time: importing this module stays free of peft (and torch)
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    if raw.get("peft_type") not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise error(f"{what} has peft_type {raw.get('peft_type')!r}, which peft does not know (e.g. 'LORA', 'IA3', 'PREFIX_TUNING'); "
                    "the folder is damaged or not a PEFT adapter: re-train or re-save it with peft")
    kwargs = {k: v for k, v in raw.items() if k != "runtime_config"}  # as PeftConfig.from_pretrained drops it
    return {**PeftConfig.from_peft_type(**PeftConfig.check_kwargs(**kwargs)).to_dict(), **raw}


# Tensor names in a PEFT folder: "[base_model.model.]<module>.lora_A[.<adapter>].weight" and
# "[base_model.model.]<module>.ia3_l[.<adapter>]". peft saves without the adapter segment; a state dict
# taken from a live PeftModel has it. Every reader (the per-row layer, check_fits, export) parses them here.
_FACTOR_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight")
_VECTOR_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.ia3_l(?:\.(?P<adapter>[^.]+))?")


# peft's save_pretrained also writes the full weight of the backbone's input embedding or LM head when target_modules
# names one of them (save_embedding_layers="auto", its default; or True): "<module>.base_layer.weight" for a targeted
# layer, "<module>.weight" for an untargeted one. PeftModel.from_pretrained loads it into the base, so it is part of the
# adapter only where it differs from the backbone's own weight.
_BASE_COPY_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+?)(?:\.base_layer)?\.weight")


def base_copy_key(key: str) -> str | None:
    """The module a tensor name would hold a base-weight copy of (peft's save_embedding_layers), else None; only the
    input embedding and the LM head are saved so, which the caller checks against the model."""
    m = _BASE_COPY_KEY.fullmatch(key)
    return m["module"] if m and not factor_key(key) else None


def base_copy_modules(model) -> set[str]:
    """Names of the modules peft's save_embedding_layers may save whole: the model's input embedding and LM head."""
    kept = (model.get_input_embeddings(), model.get_output_embeddings())
    return {n for n, m in model.named_modules() if any(m is k for k in kept)}


def factor_key(key: str) -> tuple[str, str, str | None] | None:
    """(module, "A" or "B", adapter name or None) for a LoRA factor's tensor name, else None."""
    m = _FACTOR_KEY.fullmatch(key)
    return (m["module"], m["ab"], m["adapter"]) if m else None


# The trained biases peft saves beside the factors (peft/tuners/tuners_utils.py, _get_learnable_bias_state_dict):
# bias="lora_only" (or "all") saves a targeted layer's own bias as "<module>.base_layer.bias", bias="all" also every
# other bias of the model as "<module>.bias", and lora_bias=True gives lora_B a bias, "<module>.lora_B[.<adapter>].bias".
_BIAS_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+?)(?P<kind>\.base_layer|\.lora_B(?:\.[^.]+)?)?\.bias")


def bias_key(key: str) -> tuple[str, str] | None:
    """(module, kind) for a trained bias's tensor name, else None: kind "base" (a targeted layer's own bias,
    `<module>.base_layer.bias`), "lora" (lora_B's bias, lora_bias=True) or "own" (`<module>.bias`: a layer peft did not
    wrap, saved by bias="all")."""
    m = _BIAS_KEY.fullmatch(key)
    if not m:
        return None
    kind = m["kind"] or ""
    return m["module"], "base" if kind == ".base_layer" else "lora" if kind else "own"


def vector_key(key: str) -> tuple[str, str | None] | None:
    """(module, adapter name or None) for an IA3 vector's tensor name, else None."""
    m = _VECTOR_KEY.fullmatch(key)
    return (m["module"], m["adapter"]) if m else None


def scale(alpha: float, r: float, rslora: bool = False) -> float:
    """The factor peft multiplies B·A by: alpha/r, or alpha/sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def tensor_shapes(folder: str | Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape in a folder's adapter_model.safetensors, read from the header alone."""
    from safetensors import safe_open  # numpy framework: no torch needed to read a header

    with safe_open(str(Path(folder) / "adapter_model.safetensors"), framework="numpy") as fh:
        return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}

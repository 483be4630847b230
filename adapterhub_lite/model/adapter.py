"""Adapter: turn a spec's `method` + `method_args` into a peft config and attach it to a backbone.

peft does the real work; this module only chooses sensible defaults for small causal LMs and
turns peft's failures into one-line errors that name the method, the architecture and the fix.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from peft import IA3Config, LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file, save_file

from adapterhub_lite.core.errors import AdapterLoadError, AdapterMethodError
from adapterhub_lite.core.spec_checks import method_args_problems
from adapterhub_lite.model.rowconfig import LoraFactors

_CONFIGS = {"lora": LoraConfig, "prefix": PrefixTuningConfig, "prompt": PromptTuningConfig, "ia3": IA3Config}
_DEFAULTS = {
    # LoRA's targets are every linear layer but the output head (default_method_args): on small
    # models adapting the MLP as well as attention learns a task in fewer steps (QLoRA's finding).
    "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0},
    "prefix": {"num_virtual_tokens": 16},
    "prompt": {"num_virtual_tokens": 16},
    "ia3": {},
}


_PEFT_PARTS = {"base_layer", "lora_A", "lora_B", "modules_to_save", "original_module"}  # inside a layer peft wrapped


def _linear_names(model: torch.nn.Module) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and not _PEFT_PARTS & set(n.split("."))})


def default_method_args(method: str, model: torch.nn.Module) -> dict:
    """The method_args a spec gets for what it leaves out: peft's config with our choices for small causal LMs."""
    args = dict(_DEFAULTS[method])
    if method == "lora":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        heads = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is head}
        args["target_modules"] = [n for n in _linear_names(model) if n not in heads]
    return args


def _tied_embedding_names(model: torch.nn.Module) -> set[str]:
    """Full names of the input and output embeddings when the backbone ties them (one weight), else none."""
    if not (hasattr(model, "get_input_embeddings") and hasattr(model, "get_output_embeddings")):
        return set()
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embed is None or head is None:
        return set()
    same = getattr(head, "weight", None) is getattr(embed, "weight", 0)
    if not (same or getattr(model.config, "tie_word_embeddings", False)):
        return set()
    return {n for n, m in model.named_modules() if m is embed or m is head}


def _targeted(targets, model: torch.nn.Module, tied: set[str]) -> list[str]:
    """The tied embeddings `targets` would adapt, matched as peft matches: a list by name suffix, a string as a regex."""
    if not tied:
        return []
    if isinstance(targets, list):
        return sorted({t for t in targets for n in tied if n == t or n.endswith("." + t)})
    if isinstance(targets, str) and targets != "all-linear":  # peft's all-linear leaves the output layer out
        try:
            return sorted(n.rsplit(".", 1)[-1] for n in tied if re.fullmatch(targets, n))
        except re.error:
            return []  # peft reports the bad pattern
    return []


def make_config(method: str, method_args: dict, model: torch.nn.Module):
    """Build the peft config for `method`, checking target modules against the model first."""
    problems = method_args_problems(method, method_args or {})
    if problems:  # checked here too: peft would fail deep inside (TypeError for r="eight") or take r=0
        raise AdapterMethodError("; ".join(problems))
    args = {**default_method_args(method, model), **(method_args or {})}
    tied = _tied_embedding_names(model)
    linear = [n for n in _linear_names(model) if n not in tied]  # a tied lm_head is not offered
    targets = args.get("target_modules")
    hit = _targeted(targets, model, tied)
    if hit:
        fix = (f"drop {', '.join(hit)} from method_args.target_modules" if isinstance(targets, list)
               else f"narrow method_args.target_modules={targets!r} so it does not match {', '.join(hit)}")
        raise AdapterMethodError(
            f"method {method!r} cannot target {hit} on {model.config.model_type!r}: the backbone ties its input and output "
            f"embeddings (tie_word_embeddings: true), so merging the adapter (peft's merge_and_unload) changes both and gives "
            f"wrong logits; {fix}"
        )
    if isinstance(targets, list):
        missing = [t for t in targets if t not in linear]
        if missing:
            raise AdapterMethodError(
                f"method {method!r} cannot target {missing} on {model.config.model_type!r}: no such linear layer "
                f"(available: {', '.join(linear)}); set method_args.target_modules"
            )
    if method == "prompt" and str(args.get("prompt_tuning_init", "")).upper() == "TEXT" and not args.get("tokenizer_name_or_path"):
        # peft tokenizes the init text to pick rows of the backbone's embeddings, so only the backbone's own tokenizer
        # (in its folder) is right; peft wants it named and refused the spec with a traceback when it was left out
        args["tokenizer_name_or_path"] = model.name_or_path
    try:
        return _CONFIGS[method](task_type="CAUSAL_LM", **args)
    except (TypeError, ValueError) as exc:
        raise AdapterMethodError(f"method_args for {method!r} are invalid ({exc}); see peft's {_CONFIGS[method].__name__}") from None


def attach(model: torch.nn.Module, method: str, method_args: dict) -> PeftModel:
    """Wrap a frozen backbone with a fresh trainable adapter of the given method."""
    config = make_config(method, method_args, model)
    try:
        peft_model = get_peft_model(model, config)
    except (ValueError, KeyError, AttributeError, NotImplementedError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise AdapterMethodError(f"method {method!r} cannot be applied to {model.config.model_type!r} ({msg}); pick another method or set method_args.target_modules") from None
    if not any(p.requires_grad for p in peft_model.parameters()):
        raise AdapterMethodError(f"method {method!r} matched no layer of {peft_model.base_model.model.config.model_type!r}; set method_args.target_modules")
    return peft_model


def trainable_parameters(model: torch.nn.Module) -> dict:
    """Count trainable vs all parameters (8-bit weights count once each, like peft does)."""
    trainable, total = model.get_nb_trainable_parameters() if hasattr(model, "get_nb_trainable_parameters") else (0, 0)
    return {"trainable": int(trainable), "total": int(total), "percent": round(100.0 * trainable / max(total, 1), 4)}


def save_lora(folder: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], base_model: str,
              dropout: float = 0.0) -> None:
    """Write LoRA factors as a plain PEFT adapter (adapter_config.json + adapter_model.safetensors).

    factors: module name (as in the backbone, e.g. model.layers.0.self_attn.q_proj) → (A [r, in],
    B [out, r]) with the scale already in B. Every module gets lora_alpha = its rank (scale 1), so
    the update is exactly B·A; modules whose rank differs from the most common one go in
    rank_pattern/alpha_pattern.
    """
    ranks = {m: a.shape[0] for m, (a, _) in factors.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    odd = {m: k for m, k in ranks.items() if k != r}
    config = LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=r, lora_dropout=dropout, base_model_name_or_path=base_model,
                        target_modules=sorted({m.rsplit(".", 1)[-1] for m in factors}), rank_pattern=odd, alpha_pattern=odd)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    tensors = {}
    for m, (a, b) in factors.items():
        tensors[f"base_model.model.{m}.lora_A.weight"] = a.detach().float().contiguous().cpu()
        tensors[f"base_model.model.{m}.lora_B.weight"] = b.detach().float().contiguous().cpu()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def require_safetensors(folder: Path) -> None:
    """Refuse an adapter folder that holds only a pickle (adapter_model.bin), pointing to `convert`."""
    folder = Path(folder)
    if (folder / "adapter_model.bin").is_file() and not (folder / "adapter_model.safetensors").is_file():
        raise AdapterLoadError(f"adapter {str(folder)!r} holds only adapter_model.bin (a pickle, not loaded for safety); "
                               f"if you trust it, run `adapterhub-lite convert {folder} --trust-pickle` to turn it into safetensors")


def read_lora(folder: Path) -> LoraFactors:
    """The factors of a PEFT LoRA folder, as the per-row layer takes them; refuses configs it cannot apply."""
    require_safetensors(folder)
    cfg = LoraConfig.from_pretrained(str(folder))
    weights = load_file(str(Path(folder) / "adapter_model.safetensors"))
    return LoraFactors.from_state_dict(cfg, weights, f"LoRA adapter {str(folder)!r}")


def init_from(model: PeftModel, folder: Path) -> None:
    """Transfer initialisation: start `model`'s adapter from the weights of the adapter in `folder`.

    Both must be the same method with the same shapes (LoRA: rank and target modules); every
    difference is listed in one error.
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    require_safetensors(folder)
    try:
        theirs = load_file(str(Path(folder) / "adapter_model.safetensors"))
    except OSError:
        raise AdapterMethodError(f"init_from {str(folder)!r} has no adapter_model.safetensors; point it at an adapter folder") from None
    ours = get_peft_model_state_dict(model)
    problems = [f"{k}: ours {tuple(v.shape)}, theirs {tuple(theirs[k].shape) if k in theirs else 'missing'}"
                for k, v in ours.items() if k not in theirs or theirs[k].shape != v.shape]
    problems += [f"{k}: theirs only" for k in theirs if k not in ours]
    if problems:
        raise AdapterMethodError(f"init_from {str(folder)!r} does not match this adapter's method/rank/targets "
                                 f"({len(problems)} tensors differ, e.g. {'; '.join(problems[:3])}); use the source adapter's method_args")
    set_peft_model_state_dict(model, theirs)

"""What the per-row layer (rowlora.py) accepts: the adapter configs it implements, refused by field
otherwise, and an adapter's tensors as the layer takes them (LoRA factors, IA3 vectors)."""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import torch
from peft import IA3Config, LoraConfig
from peft.tuners.ia3.model import IA3Model
from peft.utils import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING

from adapterhub_lite.core.errors import AdapterLoadError
from adapterhub_lite.model.lora_format import base_copy_key, base_copy_modules, base_rewriting_problem, bias_key, factor_key, scale, vector_key

# LoraConfig fields this layer implements. Any other field that differs from peft's default
# changes what the adapter computes (DoRA, aLoRA's invocation tokens, …), so an adapter that sets
# one is refused by name instead of being served as something it is not. `bias` and `lora_bias`
# are refused in a config to train with; a saved adapter's biases are judged by its tensors.
IMPLEMENTED = {
    "r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "lora_dropout", "target_modules",
    "layers_to_transform", "layers_pattern", "exclude_modules", "init_lora_weights", "fan_in_fan_out", "eva_config",
}
# `eva_config` only says how EVA initialised the factors (from activations, on the unchanged base); the ranks and
# alphas it chose per module are saved in rank_pattern / alpha_pattern, which are read as for any adapter.
# `fan_in_fan_out` says how peft transposes B·A when it merges it into a Conv1D-style ([in, out]) weight; peft's
# forward is B(A(x)) either way. On the layers served here (nn.Linear and the bitsandbytes ones, [out, in]) peft resets
# it to False, but keeps True in the config of an adapter trained on an 8-bit or 4-bit base, so such folders say True.
# Bookkeeping fields: they say where the adapter came from, not what it computes.
_BOOKKEEPING = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version",
    "runtime_config", "target_parameters_allowed",
}
# IA3Config fields the layer implements. `init_ia3_weights` only says how training started;
# `fan_in_fan_out` only transposes weights when peft merges, and peft itself resets it to False on
# the nn.Linear modules served here, so neither changes what the adapter computes. Anything else
# (`modules_to_save`: whole trained copies of modules; a field a later peft adds) is refused.
IMPLEMENTED_IA3 = {"target_modules", "exclude_modules", "feedforward_modules", "init_ia3_weights", "fan_in_fan_out"}


def _unsupported(cfg, default, implemented) -> list[str]:
    """`name=value` of each field of `cfg` outside `implemented` that differs from peft's default."""
    out = []
    for name in sorted(vars(cfg)):
        if name.startswith("_") or name in implemented or name in _BOOKKEEPING:
            continue
        value, usual = getattr(cfg, name), getattr(default, name, None)
        if value != usual and not (value in (None, [], {}, "") and usual in (None, [], {}, "")):
            out.append(f"{name}={value!r}")
    return out


def unsupported_lora_fields(cfg: LoraConfig) -> list[str]:
    """Fields of `cfg` that set something the per-row layer does not implement (e.g. `use_dora=True`)."""
    return _unsupported(cfg, LoraConfig(), IMPLEMENTED)


def check_lora_config(cfg: LoraConfig, what: str, saved: bool = False) -> None:
    """Refuse, in one line naming the fields, a LoRA config the per-row layer would serve wrongly.

    `saved`: `cfg` is a saved adapter's, whose trained biases (`bias`, `lora_bias`) are judged by the tensors it holds
    (LoraFactors.from_state_dict, bias_deltas) rather than by the fields; a config to train with refuses them."""
    problem = base_rewriting_problem(cfg, what)
    if problem:
        raise AdapterLoadError(problem)
    bad = unsupported_lora_fields(cfg)
    if saved:
        # peft saves what these fields train as tensors (base_layer.bias, lora_B.bias, another layer's .bias), and
        # saves none where the layers have no bias (bias="all" / "lora_only" on Llama): such an adapter is a
        # bias="none" one, exactly. So the tensors decide, not the fields.
        bad = [f for f in bad if not f.startswith(("bias=", "lora_bias="))]
    elif cfg.bias != "none" and f"bias={cfg.bias!r}" not in bad:
        bad.append(f"bias={cfg.bias!r}")
    if bad:
        raise AdapterLoadError(f"{what} sets {', '.join(bad)}, which per-row LoRA does not implement "
                               f"(it implements {', '.join(sorted(IMPLEMENTED))}); serve it alone with peft, or retrain without it")


def lora_scale(cfg: LoraConfig, module: str, r: int) -> float:
    """The factor peft multiplies B·A by at `module` (alpha_pattern and rsLoRA honoured)."""
    alpha = next((v for k, v in (cfg.alpha_pattern or {}).items() if re.match(rf"(.*\.)?({k})$", module)), cfg.lora_alpha)
    return scale(alpha, r, cfg.use_rslora)


def without_base_copies(weights: dict[str, torch.Tensor], model: torch.nn.Module, what: str) -> dict[str, torch.Tensor]:
    """`weights` less the copies of the backbone's input embedding and LM head weights that peft's save_pretrained
    writes when target_modules names one of them (save_embedding_layers, lora_format.base_copy_key). peft loads such a
    copy into the base for every row; one equal to the backbone's own changes nothing, one that differs changes the
    backbone itself, which no per-row adapter can, so that adapter is refused by name."""
    embeddings = base_copy_modules(model)
    out = {}
    for key, t in weights.items():
        module = base_copy_key(key)
        if module not in embeddings:
            out[key] = t
            continue
        own = model.get_submodule(module).weight
        if t.shape != own.shape or not torch.equal(t.to(own.device, own.dtype), own):
            raise AdapterLoadError(f"{what} holds its own {module}.weight ({key!r}, written by peft's save_embedding_layers), which differs "
                                   "from this backbone's; peft puts it into the base for every row, which per-row serving cannot: "
                                   "serve it alone with peft, on the base it was saved from")
    return out


@dataclass
class LoraFactors:
    """A LoRA adapter as the per-row layer takes it: module name → (A [r, in], B [out, r], scale), and the trained
    biases it saved: module name → {kind: bias} (kinds as lora_format.bias_key; bias_deltas makes them per-row offsets)."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    config: LoraConfig
    biases: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def from_state_dict(cls, cfg: LoraConfig, weights: dict[str, torch.Tensor], what: str, biases: bool = False) -> LoraFactors:
        """Pair up a PEFT LoRA state dict's A and B tensors; refuse anything else it holds. `biases`: keep its trained
        biases (bias="lora_only" / "all", lora_bias=True) for bias_deltas; else (composition, which takes factors
        alone) a saved bias is refused by name."""
        check_lora_config(cfg, what, saved=True)
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        kept: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in weights.items():
            parsed, bias = factor_key(key), bias_key(key)
            if bias and biases:
                kept.setdefault(bias[0], {})[bias[1]] = t
                continue
            if bias:
                raise AdapterLoadError(f"{what} holds the trained bias {key!r} (bias={cfg.bias!r}, lora_bias={cfg.lora_bias!r}), which only the "
                                       "serving bank applies (per row); here plain LoRA factors are taken: retrain it with bias='none' and lora_bias=False")
            if not parsed and ".lora_embedding_" in key:  # the option that made it, not only the tensor: what the user set
                module = key.removeprefix("base_model.model.").rpartition(".lora_embedding_")[0]
                raise AdapterLoadError(f"{what} adapts the embedding {module!r} (target_modules names it; peft saves lora_embedding_A/B), "
                                       "which per-row LoRA does not implement (it adapts linear layers); serve it alone with peft, "
                                       "or retrain without the embedding in target_modules")
            if not parsed:
                raise AdapterLoadError(f"{what} holds tensor {key!r}; per-row LoRA serves plain LoRA factors (lora_A / lora_B) only")
            pairs.setdefault(parsed[0], {})[parsed[1]] = t
        broken = [mod for mod, ab in pairs.items() if set(ab) != {"A", "B"} or ab["B"].shape[1] != ab["A"].shape[0]]
        if broken:
            raise AdapterLoadError(f"{what} has unpaired or mismatched lora_A/lora_B at {broken[0]!r}; the folder is damaged")
        if not pairs:  # peft would load it as B = 0 everywhere: the plain backbone under the adapter's name
            raise _no_weights(what, "LoRA factors (lora_A / lora_B tensors)")
        return cls({mod: (ab["A"], ab["B"], lora_scale(cfg, mod, ab["A"].shape[0])) for mod, ab in pairs.items()}, cfg, kept)

    def update(self, module: str) -> torch.Tensor:
        """ΔW = s·B·A at `module` (for tests and exact merges)."""
        a, b, s = self.modules[module]
        return s * (b.float() @ a.float())


def bias_deltas(factors: LoraFactors, model: torch.nn.Module, what: str) -> dict[str, torch.Tensor]:
    """What the adapter's trained biases add to each of its rows' outputs, per targeted module (fp32, [out]), or a
    one-line refusal of a bias no per-row offset can stand for. Modules where it adds nothing are left out.

    peft applies them to the whole model: bias="lora_only" (and "all", at a targeted layer) loads the saved bias into
    the base layer, so a row computes W·x + b_saved = base(x) + (b_saved − b_base); lora_bias=True gives lora_B a bias
    inside the scaled branch, (B·A·x + c)·s, so it adds s·c (peft's LoraLayer forward, and its merge adds c·s to the
    base bias). Both are offsets of the output alone, so adding them to the rows of this adapter only is exact per row.
    A bias="all" bias of a layer the adapter does not adapt changes the base for every row, which is refused unless it
    is the backbone's own (peft then loads what is there: nothing changes)."""
    modules = dict(model.named_modules())
    out, elsewhere = {}, []
    for mod, saved in factors.biases.items():
        layer = modules.get(mod)
        own = getattr(getattr(layer, "base_layer", layer), "bias", None)  # the backbone's bias (under a per-row layer too)
        if mod not in factors.modules:
            if set(saved) != {"own"} or own is None or saved["own"].shape != own.shape or not torch.equal(saved["own"].to(own.device, own.dtype), own):
                elsewhere.append(mod)
            continue
        if "own" in saved:  # "<module>.bias" at a wrapped layer: older peft's name for base_layer.bias, which peft now loads nowhere
            raise AdapterLoadError(f"{what} holds {mod}.bias at a layer it adapts, a name peft does not load there (it loads {mod}.base_layer.bias); "
                                   "save it again with this peft, or retrain with bias='none'")
        a, b, s = factors.modules[mod]
        delta = torch.zeros(b.shape[0], device=b.device)
        if "base" in saved:
            if own is None or saved["base"].shape != own.shape:
                got = None if own is None else tuple(own.shape)
                raise AdapterLoadError(f"{what} saves a bias of shape {tuple(saved['base'].shape)} for {mod!r}, whose bias here is {got}; "
                                       "was it trained on another model?")
            delta += saved["base"].to(delta.device, torch.float32) - own.to(delta.device, torch.float32)
        if "lora" in saved:
            if saved["lora"].shape != delta.shape:
                raise AdapterLoadError(f"{what} has a lora_B bias of shape {tuple(saved['lora'].shape)} at {mod!r} for a lora_B of {b.shape[0]} outputs; the folder is damaged")
            delta += s * saved["lora"].to(delta.device, torch.float32)
        if delta.any():
            out[mod] = delta
    if elsewhere:
        shown = ", ".join(elsewhere[:3]) + (f" (+{len(elsewhere) - 3} more)" if len(elsewhere) > 3 else "")
        raise AdapterLoadError(f"{what} saves trained biases of modules it holds no LoRA factors for ({shown}; bias={factors.config.bias!r}), which "
                               "peft puts into the base for every row and per-row serving cannot: serve it alone with peft, or retrain with bias='none' or 'lora_only'")
    return out


def check_ia3_config(cfg: IA3Config, what: str) -> None:
    """Refuse, in one line naming the fields, an IA3 config the per-row layer would serve wrongly."""
    bad = _unsupported(cfg, IA3Config(), IMPLEMENTED_IA3)
    if bad:
        raise AdapterLoadError(f"{what} sets {', '.join(bad)}, which per-row IA3 does not implement "
                               f"(it implements {', '.join(sorted(IMPLEMENTED_IA3))}); serve it alone with peft, or retrain without it")


# Prefix / prompt tuning config fields the bank implements: the virtual tokens and the shape peft gave them (the
# saved prompt_embeddings are checked against the backbone), and how training started (a prefix_projection's MLP is
# already applied to the saved embeddings). Anything else (`modules_to_save`: trained copies of whole modules, whose
# tensors sit beside the prompt_embeddings) is refused.
IMPLEMENTED_PROMPT = {
    "num_virtual_tokens", "token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers", "init_weights",
    "prefix_projection", "encoder_hidden_size", "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs",
}


def check_prompt_config(cfg, weights: dict[str, torch.Tensor], what: str) -> None:
    """Refuse, in one line naming the field or tensor, a prefix- or prompt-tuning adapter that holds more than its
    virtual tokens (the bank serves those alone, and would silently run the rest as the backbone's)."""
    bad = _unsupported(cfg, type(cfg)(), IMPLEMENTED_PROMPT)
    extra = sorted(set(weights) - {"prompt_embeddings"})
    if bad or extra:
        what_set = f"sets {', '.join(bad)}" if bad else f"holds tensor {extra[0]!r} beside its prompt_embeddings"
        raise AdapterLoadError(f"{what} {what_set}, which per-row prefix / prompt tuning does not implement (it serves the "
                               "virtual tokens alone); serve it alone with peft, or retrain without it")


def ia3_vectors(cfg: IA3Config, weights: dict[str, torch.Tensor], what: str, model_type: str | None = None) -> dict[str, tuple[torch.Tensor, bool]]:
    """A PEFT IA3 state dict as the per-row layer takes it: module name → (vector l, on_input).

    on_input is peft's own test (IA3Model._check_target_module_feedforward): the module matches
    `feedforward_modules` (filled from peft's per-architecture default for `model_type` when the
    config leaves it unset, as peft does on load). The vector's saved shape must agree with it:
    (1, in) scales the input, (out, 1) the output.
    """
    check_ia3_config(cfg, what)
    if cfg.feedforward_modules is None:
        if model_type not in TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING:
            raise AdapterLoadError(f"{what} leaves feedforward_modules unset and peft has no default for model type {model_type!r}; set it in adapter_config.json")
        cfg = copy.copy(cfg)  # the caller's config is left as it was
        cfg.feedforward_modules = set(TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[model_type])
    out = {}
    for key, t in weights.items():
        parsed = vector_key(key)
        if not parsed:
            raise AdapterLoadError(f"{what} holds tensor {key!r}; per-row IA3 serves plain IA3 vectors (ia3_l) only")
        module = parsed[0]
        on_input = IA3Model._check_target_module_feedforward(cfg, module)
        if t.dim() != 2 or t.shape[0 if on_input else 1] != 1:
            want = "(1, in_features): it scales the input" if on_input else "(out_features, 1): it scales the output"
            raise AdapterLoadError(f"{what} has ia3_l of shape {tuple(t.shape)} at {module!r}, expected {want} per feedforward_modules; the folder is damaged")
        out[module] = (t.reshape(-1), on_input)
    if not out:  # it would take a slot and serve the plain backbone under the adapter's name
        raise _no_weights(what, "IA3 vectors (ia3_l tensors)")
    return out


def _no_weights(what: str, kind: str) -> AdapterLoadError:
    """The refusal of an adapter folder whose weights file holds none of its method's tensors (`kind`): peft loads it
    as the plain backbone, so it is refused as damaged rather than served under the adapter's name."""
    return AdapterLoadError(f"{what} holds no {kind} in its adapter_model.safetensors; the folder is damaged: "
                            "save it again with peft, or retrain it")

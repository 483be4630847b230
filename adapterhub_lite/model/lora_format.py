"""What a LoRA folder's adapter_config.json means beyond its shapes, read without torch or peft
(so the registry's light commands and the folder checks can ask it too)."""

from __future__ import annotations

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


def base_rewriting_problem(config, what: str) -> str | None:
    """One line saying why `what` (a LoRA adapter) cannot be served on an unchanged base, or None."""
    init = base_rewriting_init(config)
    if init is None:
        return None
    return (f"{what} was initialised with init_lora_weights={init!r}, which rewrites the base weights; it fits only that rewritten base, "
            "not this backbone: save it converted to plain LoRA (peft's path_initial_model_for_weight_conversion) and serve that")

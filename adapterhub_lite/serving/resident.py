"""Adapters resident on one frozen backbone: each PEFT folder (LoRA, IA3, prefix or prompt tuning) loaded into
the form the per-row batch (serving/bank.py) runs.

- LoRA and IA3 adapters hold a slot (1..max_loras; 0 is the plain backbone): their factors or vectors are put
  into the slot pool of every module they target (rowlora.RowLoraLinear wraps the module on first use, and
  unwraps it when no resident adapter targets it any more).
- Prefix tuning keeps its keys and values per layer, [layers, 2, kv_heads, V, head_dim] (peft's get_prompt
  layout); prompt tuning its virtual token embeddings [V, hidden].

Every check runs before the model is touched, so a folder that does not fit leaves the bank as it was.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftConfig
from safetensors.torch import load

from adapterhub_lite.core.errors import AdapterLoadError
from adapterhub_lite.model.rowconfig import LoraFactors, bias_deltas, check_ia3_config, check_lora_config, check_prompt_config, ia3_vectors, without_base_copies
from adapterhub_lite.model.rowcontext import RowContext
from adapterhub_lite.model.rowlora import RowLoraLinear, check_own, unwrap, wrap

BASE_SLOT = 0  # the plain backbone: a slot with no entries


BASE_SLOT = 0  # the plain backbone: a slot with no entries


@dataclass
class _Adapter:
    kind: str  # "LORA", "IA3", "PREFIX_TUNING" or "PROMPT_TUNING"
    nbytes: int
    slot: int = 0  # LoRA / IA3 slot (0 = none)
    modules: tuple = ()  # LoRA / IA3: names of the modules it targets
    tensor: torch.Tensor | None = None  # prefix: [layers, 2, kv_heads, V, head_dim]; prompt: [V, hidden]

    @property
    def virtual(self) -> int:
        return 0 if self.tensor is None else self.tensor.shape[-2 if self.kind == "PREFIX_TUNING" else 0]


class ResidentAdapters:
    """The adapters loaded on one frozen backbone, by name, with their slots (the part of AdapterBank that loads)."""

    def __init__(self, model, max_lora_rank: int | None = None, max_loras: int | None = None):
        self.model = model
        self.max_lora_rank = max_lora_rank  # a fixed rank for every layer's slot pool; wider LoRA adapters are refused
        # With both set, every targeted layer's pool is allocated once at max_loras slots × max_lora_rank (vLLM's
        # preallocated slots): loading an adapter is a copy into its slot, and the pool's memory is fixed from the
        # first load on. LoRA and IA3 adapters hold slots 1..max_loras; the AdapterManager evicts to keep within them.
        self.max_loras = max_loras
        self.config = model.config.get_text_config(decoder=True)
        self.decoder = model.get_decoder()
        self.embed = model.get_input_embeddings()
        self.device, self.dtype = self.embed.weight.device, self.embed.weight.dtype
        # LoRA factors are kept in the compute dtype, so the update runs with no casts. peft instead
        # upcasts them to fp32 for bf16/fp16 models; the difference is the rounding of x·A to the
        # compute dtype, far below the base output's own rounding.
        self.lora_dtype = self.dtype
        self._adapters: dict[str, _Adapter] = {}
        self._slots: list[str | None] = [None]  # slot 0 is the plain backbone and never assigned
        self.context = RowContext()
        self.context.define(BASE_SLOT, [])
        self._lora: dict[str, RowLoraLinear] = {}  # wrapped module name → its per-row layer

    @property
    def lm_head(self) -> torch.nn.Module:
        """The output projection as the model has it now (a per-row layer while a LoRA targets it)."""
        return self.model.get_output_embeddings()

    # ---- adapters -----------------------------------------------------------------------------

    def add(self, name: str, folder, loaded: tuple | None = None) -> None:
        """Load a PEFT adapter folder (LoRA, IA3, prefix tuning or prompt tuning) under `name`; `loaded`:
        its (config, weights) already read into host memory (read_adapter), so nothing is read from disk."""
        if name in self._adapters:
            raise AdapterLoadError(f"adapter {name!r} is already loaded; remove it first to replace it")
        cfg, weights = loaded if loaded is not None else read_adapter(name, folder)
        weights = {k: v.to(self.device, non_blocking=True) for k, v in weights.items()}  # host → device: one copy per tensor
        kind = str(getattr(cfg.peft_type, "value", cfg.peft_type))
        loaders = {"LORA": self._load_lora, "IA3": self._load_ia3, "PREFIX_TUNING": self._load_prefix, "PROMPT_TUNING": self._load_prompt}
        if kind not in loaders:
            raise AdapterLoadError(f"adapter {name!r} is {kind}; the bank serves {', '.join(loaders)}")
        self._adapters[name] = loaders[kind](name, cfg, weights)

    def remove(self, name: str) -> None:
        """Free an adapter; its LoRA / IA3 slot is reused by the next LoRA or IA3 adapter added."""
        entry = self._get(name)
        for mod in entry.modules:
            layer = self._lora[mod]
            layer.drop(name)
            if not (layer.entries or layer.scales):  # no resident LoRA / IA3 targets it any more: the original module again
                unwrap(self.model, {mod})
                del self._lora[mod]
        if entry.slot:
            self._slots[entry.slot] = None
            self.context.forget(entry.slot)
        del self._adapters[name]

    @contextmanager
    def plain(self):
        """Context in which the model's modules are the backbone's own (no per-row layers), e.g. for
        peft to fold an update into the base weights; the layers (and their adapters) come back after."""
        layers = dict(self._lora)
        unwrap(self.model, set(layers))
        try:
            yield self.model
        finally:
            modules = dict(self.model.named_modules())
            for name, layer in layers.items():
                parent, _, child = name.rpartition(".")
                layer.base_layer = modules[name]  # the same object unless the caller replaced it
                setattr(modules[parent] if parent else self.model, child, layer)

    def slot(self, name: str) -> int:
        """The LoRA / IA3 slot an adapter holds (0: none, prefix and prompt tuning)."""
        return self._get(name).slot

    def free_slot(self) -> int | None:
        """The lowest LoRA / IA3 slot free for the next adapter, None when every slot below the highest is taken."""
        return self._slots.index(None, 1) if None in self._slots[1:] else None

    def names(self) -> list[str]:
        return list(self._adapters)

    def nbytes(self, name: str) -> int:
        """Bytes of the adapter's own tensors (LoRA: unpadded A and B of every targeted module, and its bias offsets; IA3: its vectors)."""
        return self._get(name).nbytes

    def stack_bytes(self) -> int:
        """Bytes of the per-layer slot pools that serve the resident LoRA / IA3 adapters: each targeted layer keeps
        every slot's factors padded to the widest rank there (rowlora.RowLoraLinear.stack_nbytes), so this grows with
        slots × widest rank, beyond the adapters' own bytes."""
        return sum(layer.stack_nbytes() for layer in self._lora.values())

    def row_bytes(self) -> int:
        """Bytes of the running batch's per-row factors, gathered from the pools (rowlora.RowLoraLinear.row_nbytes):
        rows × the pools' width at every targeted layer while rows of different adapters share a batch."""
        return sum(layer.row_nbytes() for layer in self._lora.values())

    def drop_rows(self) -> None:
        """Free what every layer gathered for the last batch's rows (call once no row runs): an idle server then holds
        none of it, and row_bytes() is 0, instead of the last mixed batch's factors (3.7 MB a row on SmolLM2-135M)."""
        for layer in self._lora.values():
            layer.drop_rows()

    def virtual_tokens(self, name: str) -> int:
        """Positions a prompt- or prefix-tuning adapter puts before every prompt (0 for LoRA and IA3)."""
        return self._get(name).virtual

    def _get(self, name: str) -> _Adapter:
        if name not in self._adapters:
            known = ", ".join(map(repr, self._adapters)) or "none"
            raise AdapterLoadError(f"unknown adapter {name!r}; loaded adapters: {known}")
        return self._adapters[name]

    def _check_own(self, name: str, modules: dict, targets) -> None:
        problem = check_own(modules, targets, self.context)
        if problem:
            raise AdapterLoadError(f"cannot load adapter {name!r}: {problem}")

    def _load_lora(self, name, cfg: LoraConfig, weights) -> _Adapter:
        what = f"LoRA adapter {name!r}"
        check_lora_config(cfg, what, saved=True)  # first: a modules_to_save copy of lm_head is refused by that field, not as a base copy
        factors = LoraFactors.from_state_dict(cfg, without_base_copies(weights, self.model, what), what, biases=True)
        modules = dict(self.model.named_modules())
        # Check everything before touching the model, so a bad folder leaves the bank as it was.
        self._check_own(name, modules, factors.modules)
        rank = max(a.shape[0] for a, _, _ in factors.modules.values())
        if self.max_lora_rank is not None and rank > self.max_lora_rank:
            raise AdapterLoadError(f"LoRA adapter {name!r} has rank {rank} but this server's adapter slots hold rank {self.max_lora_rank} at most "
                                   "(--max-lora-rank); raise it, or serve a lower-rank adapter")
        for mod, (a, b, _) in factors.modules.items():
            lin = modules.get(mod)
            base = lin.base_layer if isinstance(lin, RowLoraLinear) else lin
            if not isinstance(base, torch.nn.Linear) or a.shape[1] != base.in_features or b.shape[0] != base.out_features:
                raise AdapterLoadError(f"LoRA adapter {name!r} does not fit the backbone at {mod!r}; was it trained on another model?")
        offsets = bias_deltas(factors, self.model, what)  # its trained biases as per-row offsets (or a refusal), after the shapes
        slot = self._take_slot(name)
        layers = self._wrap(factors.modules)
        nbytes = 0
        for mod, (a, b, scale) in factors.modules.items():
            a, b = a.to(self.lora_dtype).contiguous(), b.to(self.lora_dtype).contiguous()
            c = offsets[mod].to(self.lora_dtype) if mod in offsets else None
            layers[mod].put(name, a, b, scale, bias=c)
            nbytes += (a.numel() + b.numel() + (0 if c is None else c.numel())) * a.element_size()
        self.context.define(slot, [(name, 1.0)])
        return _Adapter("LORA", nbytes, slot=slot, modules=tuple(factors.modules))

    def _load_ia3(self, name, cfg, weights) -> _Adapter:
        what = f"IA3 adapter {name!r}"
        check_ia3_config(cfg, what)  # first, as for LoRA
        vectors = ia3_vectors(cfg, without_base_copies(weights, self.model, what), what, self.model.config.model_type)
        modules = dict(self.model.named_modules())
        # Check everything before touching the model, so a bad folder leaves the bank as it was.
        self._check_own(name, modules, vectors)
        for mod, (vec, on_input) in vectors.items():
            lin = modules.get(mod)
            base = lin.base_layer if isinstance(lin, RowLoraLinear) else lin
            if not isinstance(base, torch.nn.Linear) or vec.numel() != (base.in_features if on_input else base.out_features):
                raise AdapterLoadError(f"IA3 adapter {name!r} does not fit the backbone at {mod!r}; was it trained on another model?")
        slot = self._take_slot(name)
        layers = self._wrap(vectors)
        nbytes = 0
        for mod, (vec, on_input) in vectors.items():
            # fp32, as peft keeps IA3 vectors on any backbone: each product is rounded once, as peft's is.
            vec = vec.float().contiguous()
            layers[mod].put_scale(name, vec, on_input)
            nbytes += vec.numel() * vec.element_size()
        self.context.define(slot, [(name, 1.0)])
        return _Adapter("IA3", nbytes, slot=slot, modules=tuple(vectors))

    def _take_slot(self, name: str) -> int:
        """The lowest free LoRA / IA3 slot, now `name`'s (called once every check passed)."""
        slot = self._slots.index(None, 1) if None in self._slots[1:] else len(self._slots)
        if self.max_loras is not None and slot > self.max_loras:
            held = [n for n in self._slots[1:] if n]
            raise AdapterLoadError(f"adapter {name!r} needs a slot but all {self.max_loras} (--max-loras) hold adapters {held}; "
                                   "unload one first (the router evicts the least recently used)")
        self._slots[slot:slot + 1] = [name]
        return slot

    def _wrap(self, modules) -> dict[str, RowLoraLinear]:
        """The per-row layers of these modules (wrapped now if they are not yet), with the bank's pool shape."""
        layers = wrap(self.model, modules, self.context, cache=True)
        for layer in layers.values():
            layer.pool_rank = self.max_lora_rank
            layer.pool_slots = None if self.max_loras is None else self.max_loras + 1  # + slot 0, the plain backbone
        self._lora.update(layers)
        return layers

    def slots_held(self) -> int:
        """LoRA / IA3 slots holding an adapter."""
        return sum(1 for n in self._slots[1:] if n)

    def _prompt_weights(self, name, cfg, weights, width) -> torch.Tensor:
        check_prompt_config(cfg, weights, f"{'prefix' if cfg.peft_type == 'PREFIX_TUNING' else 'prompt'}-tuning adapter {name!r}")
        emb = weights.get("prompt_embeddings")
        if emb is None or emb.shape != (cfg.num_virtual_tokens, width):
            got = None if emb is None else tuple(emb.shape)
            raise AdapterLoadError(f"{cfg.peft_type} adapter {name!r} has prompt_embeddings {got}, expected {(cfg.num_virtual_tokens, width)} for this backbone; was it trained on another model?")
        return emb.to(self.dtype)

    def _load_prefix(self, name, cfg, weights) -> _Adapter:
        c = self.config
        kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        if cfg.num_transformer_submodules != 1:
            raise AdapterLoadError(f"prefix adapter {name!r} is for an encoder-decoder model; the bank serves causal LMs")
        emb = self._prompt_weights(name, cfg, weights, c.num_hidden_layers * 2 * kv_heads * head_dim)
        # As peft's get_prompt: [V, layers*2, heads, head_dim] → [layers, 2 (key, value), heads, V, head_dim].
        kv = emb.view(cfg.num_virtual_tokens, c.num_hidden_layers, 2, kv_heads, head_dim).permute(1, 2, 3, 0, 4).contiguous()
        return _Adapter("PREFIX_TUNING", kv.numel() * kv.element_size(), tensor=kv)

    def _load_prompt(self, name, cfg, weights) -> _Adapter:
        emb = self._prompt_weights(name, cfg, weights, self.config.hidden_size).contiguous()
        return _Adapter("PROMPT_TUNING", emb.numel() * emb.element_size(), tensor=emb)


def read_adapter(name: str, folder) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """An adapter folder's config and weights, in host memory (what the router's host cache keeps)."""
    folder = Path(folder)
    try:
        # from the bytes, not load_file: its CPU tensors are views of the file mapped in memory, so a file rewritten in
        # place after its hashes were checked changed the weights kept in the host cache (served at the next load)
        return PeftConfig.from_pretrained(str(folder)), load((folder / "adapter_model.safetensors").read_bytes())
    except (OSError, ValueError) as exc:
        raise AdapterLoadError(f"cannot load adapter {name!r} from {str(folder)!r} ({type(exc).__name__}); it needs adapter_config.json and adapter_model.safetensors") from None

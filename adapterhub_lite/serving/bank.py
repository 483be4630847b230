"""Heterogeneous batches: one forward pass in which every row runs through its own adapter.

A row may use a LoRA, an IA3, a prefix-tuning or a prompt-tuning adapter, or none (the plain
backbone). peft serves one prompt-learning adapter per forward and cannot mix them with LoRA, so
the four kinds are applied here with plain torch ops on the frozen backbone:

- LoRA: each targeted linear module (the LM head included) is wrapped in the per-row layer
  (rowlora.RowLoraLinear): each row's factors, zero-padded to the widest rank, applied with two bmm's.
- IA3: the same layer scales each row's input (feed-forward modules) or output by its own vector.
- Prefix tuning: each row's prefix keys/values pre-fill a DynamicCache, padded to the longest prefix
  and masked out beyond the row's own.
- Prompt tuning: the virtual token embeddings are put in front of the row's token embeddings.

Rows are right-padded; every row gets explicit position ids equal to those it has when run alone
through peft, and a 2D attention mask over [prefix slots + token columns]. Decoding state
(`Decoding`) lets rows start, join a running batch, advance and leave one step at a time: the
server's continuous batching (serve/engine.py) and `generate` share it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftConfig
from safetensors.torch import load_file
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from adapterhub_lite.core.errors import AdapterHubError, AdapterLoadError
from adapterhub_lite.model.heads import head_logits
from adapterhub_lite.model.rowconfig import LoraFactors, ia3_vectors
from adapterhub_lite.model.rowlora import RowContext, RowLoraLinear, check_own, unwrap, wrap
from adapterhub_lite.serving.static import ATTENTIONS, StaticBatch, attention

_BASE_SLOT = 0  # the plain backbone: a slot with no entries


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


@dataclass
class _Batch:
    embeds: torch.Tensor  # [B, L, hidden], right-padded; prompt rows start with their virtual tokens
    mask: torch.Tensor  # [B, P_max + L]: 1 over the row's own prefix slots and token columns
    positions: torch.Tensor  # [B, L]
    cache: DynamicCache  # pre-filled with the padded prefixes (empty when no row has one)
    slots: list[int]  # LoRA slot per row
    starts: list[int]  # column of each row's first real token (after its virtual tokens)
    lengths: list[int]  # columns used by each row (virtual + real tokens)


class AdapterBank:
    """Adapters resident on one frozen backbone, served per row."""

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
        self.context.define(_BASE_SLOT, [])
        self._lora: dict[str, RowLoraLinear] = {}  # wrapped module name → its per-row layer
        self.decode_batch_sizes: list[int] = []  # rows in the batch at each decode step of the last generate()
        self._spare: StaticBatch | None = None  # generate()'s static batch, empty between calls: its buffers (and graphs) are reused
        self._cache_arg = "cache" if "cache" in inspect.signature(self.decoder.forward).parameters else "past_key_values"

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

    def kv_bytes_per_token(self) -> int:
        """Bytes one cache position takes over every layer (keys and values), in the compute dtype."""
        c = self.config
        kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return c.num_hidden_layers * 2 * kv_heads * head_dim * torch.finfo(self.dtype).bits // 8

    def names(self) -> list[str]:
        return list(self._adapters)

    def nbytes(self, name: str) -> int:
        """Bytes of the adapter's own tensors (LoRA: unpadded A and B of every targeted module; IA3: its vectors)."""
        return self._get(name).nbytes

    def stack_bytes(self) -> int:
        """Bytes of the per-layer slot pools that serve the resident LoRA / IA3 adapters: each targeted layer keeps
        every slot's factors padded to the widest rank there (rowlora.RowLoraLinear.stack_nbytes), so this grows with
        slots × widest rank, beyond the adapters' own bytes."""
        return sum(layer.stack_nbytes() for layer in self._lora.values())

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
        factors = LoraFactors.from_state_dict(cfg, weights, f"LoRA adapter {name!r}")
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
        slot = self._take_slot(name)
        layers = self._wrap(factors.modules)
        nbytes = 0
        for mod, (a, b, scale) in factors.modules.items():
            a, b = a.to(self.lora_dtype).contiguous(), b.to(self.lora_dtype).contiguous()
            layers[mod].put(name, a, b, scale)
            nbytes += (a.numel() + b.numel()) * a.element_size()
        self.context.define(slot, [(name, 1.0)])
        return _Adapter("LORA", nbytes, slot=slot, modules=tuple(factors.modules))

    def _load_ia3(self, name, cfg, weights) -> _Adapter:
        vectors = ia3_vectors(cfg, weights, f"IA3 adapter {name!r}", self.model.config.model_type)
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

    # ---- running ------------------------------------------------------------------------------

    def _prepare(self, input_ids, adapters) -> _Batch:
        """Lay the rows out side by side: embeddings, mask, positions, prefix cache and LoRA slots."""
        if len(input_ids) != len(adapters) or not input_ids or any(len(r) == 0 for r in input_ids):
            raise AdapterHubError(f"need one adapter (or None) per row and at least one token per row; got {len(input_ids)} rows and {len(adapters)} adapters")
        entries = [None if a is None else self._get(a) for a in adapters]
        prompt = [e.virtual if e and e.kind == "PROMPT_TUNING" else 0 for e in entries]
        prefix = [e.virtual if e and e.kind == "PREFIX_TUNING" else 0 for e in entries]
        lengths = [v + len(r) for v, r in zip(prompt, input_ids)]
        B, L, P = len(input_ids), max(lengths), max(prefix)
        pad = getattr(self.config, "pad_token_id", None) or 0
        # Three host → device copies per batch (ids, lengths, prefix lengths); masks and positions are
        # built on the device from them rather than row by row on the host.
        ids = torch.tensor([[pad] * v + r + [pad] * (L - v - len(r)) for v, r in zip(prompt, input_ids)], dtype=torch.long).to(self.device, non_blocking=True)
        length, pre = torch.tensor([lengths, prefix], device=self.device)
        cols = torch.arange(L, device=self.device)
        mask = torch.cat([torch.arange(P, device=self.device)[None, :] < pre[:, None], cols[None, :] < length[:, None]], dim=1).long()
        # Alone through peft a prefix row's tokens start at position P_i (the cache already holds
        # P_i entries); a prompt row's virtual tokens take positions 0..V-1. Pad columns are masked
        # as keys and their outputs dropped, so their positions do not matter.
        positions = pre[:, None] + cols[None, :]
        embeds = self.embed(ids)
        for i, e in enumerate(entries):
            if prompt[i]:
                embeds[i, :prompt[i]] = e.tensor
        cache = DynamicCache(config=self.model.config)
        if P:
            n_layers, _, heads, _, head_dim = next(e.tensor.shape for e in entries if e and e.kind == "PREFIX_TUNING")
            kv = torch.zeros(n_layers, 2, B, heads, P, head_dim, dtype=self.dtype, device=self.device)
            for i, e in enumerate(entries):
                if prefix[i]:
                    kv[:, :, i, :, :prefix[i]] = e.tensor
            for layer in range(n_layers):
                cache.update(kv[layer, 0], kv[layer, 1], layer)
        slots = [e.slot if e else _BASE_SLOT for e in entries]
        return _Batch(embeds, mask, positions, cache, slots, prompt, lengths)

    def _assigned(self, slots: list[int] | None):
        # The per-row layers act only while a batch is assigned slots, so the backbone called by anyone else
        # is the plain backbone. The routing (one index tensor) is computed here once per batch.
        return self.context.assign(slots, self.device)

    def _plan(self, slots: list[int]):
        return self.context.plan(slots, self.device)

    def base_only(self):
        """Context in which calling `model` directly gives the plain backbone (as anywhere outside
        forward/generate; this makes it explicit and holds even inside an assigned call)."""
        return self._assigned(None)

    def _run(self, embeds, mask, positions, cache) -> torch.Tensor:
        # transformers renamed the decoder's `past_key_values` argument to `cache` (5.x deprecates the
        # old name, 5.40 drops it): pass whichever this version's decoder takes.
        out = self.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True, **{self._cache_arg: cache})
        return out.last_hidden_state

    @torch.inference_mode()
    def forward(self, input_ids: list[list[int]], adapters: list[str | None], logits_positions=None) -> list[torch.Tensor]:
        """One forward pass, row i through adapters[i] (None = base model).

        Returns per row the logits [T_i, vocab] over the row's own tokens (prompt-tuning virtual
        tokens removed), or [len(p_i), vocab] at the positions p_i = logits_positions[i] (negative
        counts from the end); the LM head then runs only there.
        """
        if logits_positions is None:
            logits_positions = [range(len(r)) for r in input_ids]
        if len(logits_positions) != len(input_ids):
            raise AdapterHubError(f"logits_positions has {len(logits_positions)} rows, input_ids {len(input_ids)}")
        batch = self._prepare(input_ids, adapters)
        rows, cols, counts = [], [], []
        for i, (row, pos) in enumerate(zip(input_ids, logits_positions)):
            pos = list(pos)
            if any(not -len(row) <= p < len(row) for p in pos):
                raise AdapterHubError(f"logits_positions[{i}] = {pos} is out of range for a row of {len(row)} tokens")
            rows += [i] * len(pos)
            cols += [batch.starts[i] + p % len(row) for p in pos]
            counts.append(len(pos))
        with self._assigned(batch.slots):
            hidden = self._run(batch.embeds, batch.mask, batch.positions, batch.cache)
        picked = hidden[torch.tensor(rows, dtype=torch.long, device=self.device), torch.tensor(cols, dtype=torch.long, device=self.device)]
        with self._assigned([batch.slots[i] for i in rows]):  # a LoRA on the LM head applies per picked position
            logits = head_logits(self.model, picked)  # the model's own post-processing (soft-capping, scaling) included
        return list(logits.split(counts))

    @torch.inference_mode()
    def generate(self, input_ids: list[list[int]], adapters: list[str | None], max_new_tokens: int | list[int],
                 eos_token_id: int, *, output_scores: bool = False, static: bool = True, graphs: bool = False):
        """Greedy decoding with a KV cache; returns each row's new tokens (its EOS included).

        Each row stops at its own EOS or its own max_new_tokens and then leaves the batch: the cache,
        mask, positions and LoRA slots keep only the running rows, so finished rows cost nothing.
        With output_scores, also returns per row the logits [n_i, vocab] each new token was chosen from.
        Each step is `step`, the one the server's engine runs too (serving/engine.py), here without rows
        joining mid-way and with greedy choices; `static` decodes over preallocated buffers (serving/static.py)
        where the model's cache allows, as the engine does, else over the prefill's growing cache; `graphs`
        replays its steps as CUDA graphs on a GPU (the buffers and graphs are kept for the next call).
        """
        budget = [max_new_tokens] * len(input_ids) if isinstance(max_new_tokens, int) else list(max_new_tokens)
        if len(budget) != len(input_ids):
            raise AdapterHubError(f"max_new_tokens has {len(budget)} entries for {len(input_ids)} rows")
        out: list[list[int]] = [[] for _ in input_ids]
        scores: list[list[torch.Tensor]] = [[] for _ in input_ids]
        self.decode_batch_sizes = []
        running = [i for i, n in enumerate(budget) if n > 0]
        if running:
            dec = self.start([input_ids[i] for i in running], [adapters[i] for i in running], keys=running)
            if static and self.static_ok(dec):
                spare = self._spare if self._spare is not None and self._spare.graphs == (graphs and self.device.type == "cuda") else None
                dec = self._spare = self.batch(dec, max_rows=len(running), graphs=graphs, into=spare)

            def record(j: int, i: int, tok: int) -> bool:
                out[i].append(tok)
                if output_scores:
                    scores[i].append(dec.logits[j])
                return tok != eos_token_id and len(out[i]) < budget[i]

            while self.step(dec, dec.logits.argmax(-1), record):
                self.decode_batch_sizes.append(len(dec.keys))
        if not output_scores:
            return out
        vocab = self.lm_head.out_features
        return out, [torch.stack(r) if r else torch.zeros(0, vocab, device=self.device) for r in scores]

    # ---- incremental decoding: rows start, join, advance and leave --------------------------------

    @torch.inference_mode()
    def start(self, input_ids: list[list[int]], adapters: list[str | None], keys: list | None = None,
              score_prompt: dict | None = None) -> Decoding:
        """Prefill rows (each through its adapter) and return their decoding state, whose `logits`
        [B, vocab] are each row's next-token logits. `keys` (default 0..B-1) name the rows for the caller.

        `score_prompt` {key: k} also scores those rows' prompts in the same pass (see PromptScores):
        `dec.prompt_scores[key]`.
        """
        keys = list(range(len(input_ids))) if keys is None else list(keys)
        if len(keys) != len(input_ids):
            raise AdapterHubError(f"{len(keys)} keys for {len(input_ids)} rows")
        batch = self._prepare(input_ids, adapters)
        last = torch.tensor(batch.lengths, device=self.device) - 1
        dec = Decoding(keys, batch.cache, batch.mask, batch.positions.gather(1, last[:, None]) + 1, list(batch.slots), self._plan(batch.slots))
        with self.context.using(dec.route):
            hidden = self._run(batch.embeds, batch.mask, batch.positions, batch.cache)
            dec.logits = head_logits(self.model, hidden[torch.arange(len(keys), device=self.device), last])
        for i, key in enumerate(keys):
            if score_prompt and key in score_prompt:
                own = hidden[i, batch.starts[i] : batch.starts[i] + len(input_ids[i])]  # the row's own tokens (no virtual ones)
                dec.prompt_scores[key] = self._score(own, batch.slots[i], input_ids[i], score_prompt[key])
        return dec

    def _score(self, hidden: torch.Tensor, slot: int, ids: list[int], top: int, chunk: int = 256) -> PromptScores:
        """PromptScores of one row from its hidden states [T, hidden]; the LM head runs `chunk` positions at
        a time, so a long prompt never holds a [T, vocab] tensor."""
        out = PromptScores([None], [None], [None], [None])
        target = torch.tensor(ids[1:], dtype=torch.long, device=self.device)
        for s in range(0, len(ids) - 1, chunk):
            h = hidden[s : min(s + chunk, len(ids) - 1)]  # position t predicts token t + 1
            with self._assigned([slot] * len(h)):  # a LoRA on the LM head applies per position
                logp = head_logits(self.model, h).float().log_softmax(-1)
            want = target[s : s + len(h)]
            chosen = logp.gather(1, want[:, None]).squeeze(1)
            rank = (logp > chosen[:, None]).sum(1) + 1
            values, indices = logp.topk(top) if top else (logp[:, :0], want[:, None][:, :0])
            out.logprobs += chosen.tolist()
            out.ranks += rank.tolist()
            out.top += [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
            out.tokens += want.tolist()
        return out

    @torch.inference_mode()
    def step(self, dec: Decoding, tokens: torch.Tensor, decide: Callable[[int, object, int], bool]) -> bool:
        """One decode step, the one both decoders run (generate here, the engine's continuous batch).

        `tokens` [B] are the running rows' chosen tokens; reading them is the step's one host sync.
        decide(j, key, token) records row j's token and says whether the row keeps running. Finished
        rows leave the batch (cache, mask, positions, adapter slots), so they cost nothing after; the
        rest are fed their token. Returns whether any row is still running.
        """
        keep = []
        for j, (key, tok) in enumerate(zip(dec.keys, tokens.tolist())):
            if decide(j, key, tok):
                keep.append(j)
        if len(keep) < len(dec.keys):
            order = self.keep(dec, keep)  # a static batch moves rows: its order, not `keep`'s
            if not keep:
                return False
            tokens = tokens[torch.tensor(order, device=tokens.device)]
        self.advance(dec, tokens)
        return True

    @torch.inference_mode()
    def advance(self, dec: Decoding, tokens: torch.Tensor) -> None:
        """Feed each running row its chosen token [B] and compute the next logits (one decode step)."""
        if isinstance(dec, StaticBatch):
            return dec.advance(tokens)
        dec.mask = torch.cat([dec.mask, dec.mask.new_ones(len(dec.keys), 1)], dim=1)
        with self.context.using(dec.route):  # the same routing (and the layers' gathered factors) until a row joins or leaves
            hidden = self._run(self.embed(tokens[:, None]), dec.mask, dec.next_pos, dec.cache)[:, -1]
            dec.logits = head_logits(self.model, hidden)
        dec.next_pos = dec.next_pos + 1

    @torch.inference_mode()
    def extend(self, dec: Decoding, input_ids: list[list[int]]) -> None:
        """Run more prompt tokens of each row (the next piece of a chunked prefill): they continue the row's
        cache at its next positions; `dec.logits` become each row's logits after its last token.

        Rows are right-padded to the longest piece; the pad columns are written to the cache but masked
        as keys (their mask stays 0), so each row reads exactly what it would have read prefilled whole."""
        if len(input_ids) != len(dec.keys) or any(len(r) == 0 for r in input_ids):
            raise AdapterHubError(f"need one non-empty piece per row: {len(dec.keys)} rows, pieces of {[len(r) for r in input_ids]} tokens")
        if not self.joinable(dec):
            raise AdapterHubError("this model's cache (sliding-window or static layers) cannot take a prompt in pieces; prefill it whole")
        pad = getattr(self.config, "pad_token_id", None) or 0
        width = max(map(len, input_ids))
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in input_ids], dtype=torch.long).to(self.device, non_blocking=True)
        length = torch.tensor([len(r) for r in input_ids], device=self.device)
        cols = torch.arange(width, device=self.device)
        dec.mask = torch.cat([dec.mask, (cols[None, :] < length[:, None]).long()], dim=1)
        with self.context.using(dec.route):
            hidden = self._run(self.embed(ids), dec.mask, dec.next_pos + cols[None, :], dec.cache)
            dec.logits = head_logits(self.model, hidden[torch.arange(len(input_ids), device=self.device), length - 1])
        dec.next_pos = dec.next_pos + length[:, None]

    def keep(self, dec: Decoding | StaticBatch, rows: list[int]) -> list[int]:
        """Keep only the rows at these positions of `dec` (the others finished or were cancelled); returns, per new
        position, the old position of its row (a static batch fills holes with its last rows)."""
        if isinstance(dec, StaticBatch):
            return dec.keep(rows)
        if not rows:
            dec.keys, dec.slots = [], []
            return rows
        idx = torch.tensor(rows, device=self.device)
        dec.cache.batch_select_indices(idx)
        dec.mask, dec.next_pos, dec.logits = dec.mask[idx], dec.next_pos[idx], dec.logits[idx]
        dec.keys, dec.slots = [dec.keys[j] for j in rows], [dec.slots[j] for j in rows]
        dec.route = self._plan(dec.slots)
        # Columns no remaining row attends to (left by rows that finished) are dropped, so a long-running
        # server's cache does not keep the widest row it ever served. Keys carry their rotary positions,
        # so a column's index in the cache means nothing once it is written.
        used = dec.mask.any(0)
        if self.joinable(dec) and not bool(used.all()):
            cols = used.nonzero().squeeze(1)
            dec.mask = dec.mask[:, cols]
            for layer in dec.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, cols], layer.values[:, :, cols]
        return rows

    @staticmethod
    def joinable(dec: Decoding | StaticBatch) -> bool:
        """Whether rows can join `dec` mid-way: its cache layers must be plain (no sliding window)."""
        if isinstance(dec, StaticBatch):
            return True
        return all(type(layer) is DynamicLayer and layer.is_initialized for layer in dec.cache.layers)

    def static_ok(self, dec: Decoding) -> bool:
        """Whether rows prefilled into `dec` can decode over static buffers: a plain cache (no sliding window) and an
        attention the static mask serves (sdpa or eager)."""
        return self.joinable(dec) and attention(self.config) in ATTENTIONS

    def batch(self, new: Decoding, max_rows: int, max_width: int | None = None, graphs: bool = False, into: StaticBatch | None = None) -> StaticBatch:
        """A StaticBatch holding the rows of `new` (`into`, an empty one to reuse, keeps its buffers and graphs)."""
        out = into if into is not None else StaticBatch(self, max_rows, max_width, graphs)
        out.join(new)
        return out

    def join(self, dec: Decoding | StaticBatch, new: Decoding) -> None:
        """Append the rows of `new` (just prefilled) to the running `dec` (continuous batching).

        The two caches are right-padded with masked columns to the same length and stacked; each row
        keeps its own positions, so it decodes exactly as it would alone. A static batch copies them into its
        preallocated rows instead (StaticBatch.join).
        """
        if isinstance(dec, StaticBatch):
            return dec.join(new)
        if not (self.joinable(dec) and self.joinable(new)):
            raise AdapterHubError("this model's cache (sliding-window or static layers) cannot take rows mid-way; start a new batch")
        width = max(dec.mask.shape[1], new.mask.shape[1])
        for a, b in zip(dec.cache.layers, new.cache.layers):
            a.keys = torch.cat([_pad_cols(a.keys, width), _pad_cols(b.keys, width)])
            a.values = torch.cat([_pad_cols(a.values, width), _pad_cols(b.values, width)])
        dec.mask = torch.cat([F.pad(dec.mask, (0, width - dec.mask.shape[1])), F.pad(new.mask, (0, width - new.mask.shape[1]))])
        dec.next_pos = torch.cat([dec.next_pos, new.next_pos])
        dec.logits = torch.cat([dec.logits, new.logits])
        dec.keys, dec.slots = dec.keys + new.keys, dec.slots + new.slots
        dec.route = self._plan(dec.slots)


def read_adapter(name: str, folder) -> tuple[PeftConfig, dict[str, torch.Tensor]]:
    """An adapter folder's config and weights, in host memory (what the router's host cache keeps)."""
    folder = Path(folder)
    try:
        return PeftConfig.from_pretrained(str(folder)), load_file(folder / "adapter_model.safetensors", device="cpu")
    except (OSError, ValueError) as exc:
        raise AdapterLoadError(f"cannot load adapter {name!r} from {str(folder)!r} ({type(exc).__name__}); it needs adapter_config.json and adapter_model.safetensors") from None


@dataclass
class Decoding:
    """The state of rows being decoded together: what `AdapterBank.advance` needs for the next step."""

    keys: list  # the caller's name for each row
    cache: DynamicCache  # [B, heads, S, head_dim] per layer
    mask: torch.Tensor  # [B, S]: which cache columns each row attends to
    next_pos: torch.Tensor  # [B, 1]: position id of each row's next token
    slots: list[int]  # LoRA slot per row
    route: object  # the RowContext plan for these rows
    logits: torch.Tensor | None = None  # [B, vocab]: each row's next-token logits
    prompt_scores: dict = field(default_factory=dict)  # key → PromptScores (rows start() was asked to score)


@dataclass
class PromptScores:
    """Each prompt token's log-prob given the tokens before it, through the row's adapter: per position,
    the token, its log-prob, its rank in the vocabulary (1: the most likely) and the top k
    [(token id, log-prob)]. The first token has nothing before it: None everywhere."""

    tokens: list
    logprobs: list
    ranks: list
    top: list


def _pad_cols(t: torch.Tensor, width: int) -> torch.Tensor:
    return F.pad(t, (0, 0, 0, width - t.shape[-2]))

"""Heterogeneous batches: one forward pass in which every row runs through its own adapter (the model runner).

A row may use a LoRA, an IA3, a prefix-tuning or a prompt-tuning adapter, or none (the plain
backbone). peft serves one prompt-learning adapter per forward and cannot mix them with LoRA, so
the four kinds, loaded by ResidentAdapters (serving/resident.py), are applied here with plain torch ops on
the frozen backbone:

- LoRA: each targeted linear module (the LM head included) is wrapped in the per-row layer
  (rowlora.RowLoraLinear): each row's factors, zero-padded to the widest rank, applied with two bmm's.
- IA3: the same layer scales each row's input (feed-forward modules) or output by its own vector.
- Prefix tuning: each row's prefix keys/values pre-fill a DynamicCache, padded to the longest prefix
  and masked out beyond the row's own.
- Prompt tuning: the virtual token embeddings are put in front of the row's token embeddings.

Rows are right-padded; every row gets explicit position ids equal to those it has when run alone
through peft, and a 2D attention mask over [prefix slots + token columns]. `start` prefills rows into
a decoding batch (serving/decoding.py: `Decoding`, or a `StaticBatch` over preallocated buffers that
takes its rows over, serving/static.py) in which rows join, advance and leave one step at a time;
`step` is the decode step the server's continuous batching (serving/engine.py) and `generate` share.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from adapterhub_lite.core.errors import AdapterHubError
from adapterhub_lite.model.heads import head_logits
from adapterhub_lite.serving.decoding import Decoding, PromptScores
from adapterhub_lite.serving.resident import BASE_SLOT, ResidentAdapters
from adapterhub_lite.serving.static import ATTENTIONS, StaticBatch, attention


@dataclass
class _Batch:
    embeds: torch.Tensor  # [B, L, hidden], right-padded; prompt rows start with their virtual tokens
    mask: torch.Tensor  # [B, P_max + L]: 1 over the row's own prefix slots and token columns
    positions: torch.Tensor  # [B, L]
    cache: DynamicCache  # pre-filled with the padded prefixes (empty when no row has one)
    slots: list[int]  # LoRA slot per row
    starts: list[int]  # column of each row's first real token (after its virtual tokens)
    lengths: list[int]  # columns used by each row (virtual + real tokens)


class PassAbandoned(Exception):  # noqa: N818 - not an error: the pass stopped because nobody wants it
    """A forward pass stopped between two decoder layers because every request in it had ended (see abandon_when)."""


class AdapterBank(ResidentAdapters):
    """Adapters resident on one frozen backbone (ResidentAdapters), served per row: `forward`, `generate`, and the
    incremental decoding the engine runs (`start`, `step`, `batch`)."""

    def __init__(self, model, max_lora_rank: int | None = None, max_loras: int | None = None):
        super().__init__(model, max_lora_rank, max_loras)
        self.decode_batch_sizes: list[int] = []  # rows in the batch at each decode step of the last generate()
        self._spare: StaticBatch | None = None  # generate()'s static batch, empty between calls: its buffers (and graphs) are reused
        self._cache_arg = "cache" if "cache" in inspect.signature(self.decoder.forward).parameters else "past_key_values"
        # Whether a prefilled row's cache can take more positions: rows joining a batch, a prompt's next piece
        # (Decoding.joinable says it of a batch once one exists). A sliding-window layer drops old columns, so such a
        # model runs each prompt whole, even when no batch runs yet to say so.
        self.joinable = all(type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers)

    def kv_bytes_per_token(self) -> int:
        """Bytes one cache position takes over every layer (keys and values), in the compute dtype."""
        c = self.config
        kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return c.num_hidden_layers * 2 * kv_heads * head_dim * torch.finfo(self.dtype).bits // 8

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
        slots = [e.slot if e else BASE_SLOT for e in entries]
        return _Batch(embeds, mask, positions, cache, slots, prompt, lengths)

    def _assigned(self, slots: list[int] | None):
        # The per-row layers act only while a batch is assigned slots, so the backbone called by anyone else
        # is the plain backbone. The routing (one index tensor) is computed here once per batch.
        return self.context.assign(slots, self.device)

    def base_only(self):
        """Context in which calling `model` directly gives the plain backbone (as anywhere outside
        forward/generate; this makes it explicit and holds even inside an assigned call)."""
        return self._assigned(None)

    @contextmanager
    def abandon_when(self, gone: Callable[[], bool]):
        """While this holds, every decoder layer first asks gone() and, once it says True, the pass raises PassAbandoned.

        A prefill of a few thousand tokens takes seconds on a CPU; when the clients of every row in it leave (a load
        tester's burst cancelled), the pass would run to its end for nobody while a newcomer waits behind it. Its rows
        are new (their cache is their own), so stopping leaves nothing half-done that a running row reads. The hooks
        exist only during the pass: decode steps (and their CUDA graphs) run without them."""
        def check(_module, _args):
            if gone():
                raise PassAbandoned
        handles = [layer.register_forward_pre_hook(check) for layer in getattr(self.decoder, "layers", ())]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

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
        dec = Decoding(self, keys, batch.cache, batch.mask, batch.positions.gather(1, last[:, None]) + 1, batch.slots)
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
    def step(self, dec: Decoding | StaticBatch, tokens: torch.Tensor, decide: Callable[[int, object, int], bool]) -> bool:
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
            order = dec.keep(keep)  # a static batch moves rows: its order, not `keep`'s
            if not keep:
                return False
            tokens = tokens[torch.tensor(order, device=tokens.device)]
        dec.advance(tokens)
        return True

    def static_ok(self, dec: Decoding) -> bool:
        """Whether rows prefilled into `dec` can decode over static buffers: a plain cache (no sliding window) and an
        attention the static mask serves (sdpa or eager)."""
        return dec.joinable and attention(self.config) in ATTENTIONS

    def batch(self, new: Decoding, max_rows: int, max_width: int | None = None, graphs: bool = False, into: StaticBatch | None = None,
              max_positions: int | None = None) -> StaticBatch:
        """A StaticBatch holding the rows of `new` (`into`, an empty one to reuse, keeps its buffers and graphs); its buffers
        hold at most `max_positions` rows × columns (the engine's KV cache budget)."""
        out = into if into is not None else StaticBatch(self, max_rows, max_width, graphs, max_positions)
        out.join(new)
        return out

"""Rows decoding over the prefill's own cache: the dynamic path, and what every decoding batch offers.

`AdapterBank.start` prefills rows into a `Decoding`. A running batch is either that `Decoding` (the dynamic
path: the cache grows by one column per step, rows that join are compacted to their own columns) or a `StaticBatch` (serving/static.py:
preallocated buffers, one shape per bucket, CUDA graphs on a GPU) that took its rows over. Both offer one
interface, which `AdapterBank.step`, `generate` and the engine use without asking which they hold:

- `keys` (the caller's name for each row), `slots` (its LoRA / IA3 slot), `logits` ([rows, vocab], each row's
  next-token logits), `len()`;
- `advance(tokens)`: feed each row its chosen token and compute the next logits (one decode step);
- `keep(rows)`: keep the rows at these positions; returns each new position's old position;
- `join(new)`: take the rows of a just-prefilled `Decoding` (continuous batching);
- `joinable`: whether rows can join mid-way.

The dynamic path stays for caches the static buffers cannot stand for (sliding-window layers), for attentions
whose mask the static step does not build, for prefill pieces (`extend`), and as the reference the static path
is tested against (`--decode-cache dynamic`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from adapterhub_lite.core.errors import AdapterHubError
from adapterhub_lite.model.heads import head_logits


class Decoding:
    """Rows prefilled together (and rows that joined them), decoding over a DynamicCache.

    The cache is [rows, kv_heads, columns, head_dim] per layer with a 2D mask [rows, columns]: rows that joined
    are compacted to their own columns and right-padded with masked ones, and each row keeps its own position ids, so
    it decodes exactly as it would alone."""

    def __init__(self, bank, keys: list, cache: DynamicCache, mask: torch.Tensor, next_pos: torch.Tensor, slots: list[int]):
        self.bank = bank
        self.keys = list(keys)  # the caller's name for each row
        self.cache = cache  # [B, heads, S, head_dim] per layer
        self.mask = mask  # [B, S]: which cache columns each row attends to
        self.next_pos = next_pos  # [B, 1]: position id of each row's next token
        self.slots = list(slots)  # LoRA / IA3 slot per row
        self.route = bank.context.plan(self.slots, bank.device)  # the per-row layers' routing for these rows
        self.logits: torch.Tensor | None = None  # [B, vocab]: each row's next-token logits
        self.prompt_scores: dict = {}  # key → PromptScores (rows start() was asked to score)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def joinable(self) -> bool:
        """Whether rows can join mid-way (or a prompt continue in pieces): every cache layer must be plain (no
        sliding window, which drops old columns)."""
        return all(type(layer) is DynamicLayer and layer.is_initialized for layer in self.cache.layers)

    @torch.inference_mode()
    def advance(self, tokens: torch.Tensor) -> None:
        """Feed each row its chosen token [B] and compute the next logits (one decode step)."""
        bank = self.bank
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.keys), 1)], dim=1)
        with bank.context.using(self.route):  # the same routing (and the layers' gathered factors) until a row joins or leaves
            hidden = bank._run(bank.embed(tokens[:, None]), self.mask, self.next_pos, self.cache)[:, -1]
            self.logits = head_logits(bank.model, hidden)
        self.next_pos = self.next_pos + 1

    @torch.inference_mode()
    def extend(self, input_ids: list[list[int]]) -> None:
        """Run more prompt tokens of each row (the next piece of a chunked prefill): they continue the row's
        cache at its next positions; `logits` become each row's logits after its last token.

        Rows are right-padded to the longest piece; the pad columns are written to the cache but masked
        as keys (their mask stays 0), so each row reads exactly what it would have read prefilled whole."""
        bank = self.bank
        if len(input_ids) != len(self.keys) or any(len(r) == 0 for r in input_ids):
            raise AdapterHubError(f"need one non-empty piece per row: {len(self.keys)} rows, pieces of {[len(r) for r in input_ids]} tokens")
        if not self.joinable:
            raise AdapterHubError("this model's cache (sliding-window or static layers) cannot take a prompt in pieces; prefill it whole")
        pad = getattr(bank.config, "pad_token_id", None) or 0
        width = max(map(len, input_ids))
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in input_ids], dtype=torch.long).to(bank.device, non_blocking=True)
        length = torch.tensor([len(r) for r in input_ids], device=bank.device)
        cols = torch.arange(width, device=bank.device)
        self.mask = torch.cat([self.mask, (cols[None, :] < length[:, None]).long()], dim=1)
        with bank.context.using(self.route):
            hidden = bank._run(bank.embed(ids), self.mask, self.next_pos + cols[None, :], self.cache)
            self.logits = head_logits(bank.model, hidden[torch.arange(len(input_ids), device=bank.device), length - 1])
        self.next_pos = self.next_pos + length[:, None]

    def keep(self, rows: list[int]) -> list[int]:
        """Keep only the rows at these positions (the others finished or were cancelled); returns `rows` (the rows
        keep their order)."""
        if not rows:
            self.keys, self.slots, self.logits = [], [], None
            return rows
        idx = torch.tensor(rows, device=self.bank.device)
        self.cache.batch_select_indices(idx)
        self.mask, self.next_pos = self.mask[idx], self.next_pos[idx]
        self.logits = None if self.logits is None else self.logits[idx]
        self.keys, self.slots = [self.keys[j] for j in rows], [self.slots[j] for j in rows]
        self.route = self.bank.context.plan(self.slots, self.bank.device)
        # Columns no remaining row attends to (left by rows that finished) are dropped, so a long-running
        # server's cache does not keep the widest row it ever served. Keys carry their rotary positions,
        # so a column's index in the cache means nothing once it is written.
        used = self.mask.any(0)
        if self.joinable and not bool(used.all()):
            cols = used.nonzero().squeeze(1)
            self.mask = self.mask[:, cols]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, cols], layer.values[:, :, cols]
        return rows

    def join(self, new: Decoding) -> None:
        """Append the rows of `new` (just prefilled): every row's used cache columns are moved, in order, to its first
        columns (as StaticBatch.join does) and the two caches stacked at the widest row's width; each row keeps its
        own positions.

        Stacked as they were (each right-padded to the other's width), the batch held rows × (one side's prefix and
        prompt columns + the other's), over what the scheduler counts (rows × (longest prefix + longest rest)), and
        the decode columns every later step adds came after both. Compacted, a row's columns are its own and the steps'
        (keep drops the columns left by rows that finished), within its reservation. Keys carry their rotary positions,
        so moving a column changes nothing a row reads."""
        if not (self.joinable and new.joinable):
            raise AdapterHubError("this model's cache (sliding-window or static layers) cannot take rows mid-way; start a new batch")
        full = max(self.mask.shape[1], new.mask.shape[1])
        masks = [F.pad(m, (0, full - m.shape[1])) != 0 for m in (self.mask, new.mask)]
        width = int(max(m.sum(1).max() for m in masks))  # the widest row's used columns (one host read per join)
        # each row's used columns first, in their order (a stable sort of "unused"), then the first `width` of them
        orders = [torch.argsort((~m).to(torch.int8), dim=1, stable=True)[:, :width] for m in masks]

        def packed(t, order):
            t = _pad_cols(t, full)
            return t.gather(2, order[:, None, :, None].expand(t.shape[0], t.shape[1], width, t.shape[3]))
        for a, b in zip(self.cache.layers, new.cache.layers):
            a.keys = torch.cat([packed(a.keys, orders[0]), packed(b.keys, orders[1])])
            a.values = torch.cat([packed(a.values, orders[0]), packed(b.values, orders[1])])
        self.mask = torch.cat([m.gather(1, o) for m, o in zip(masks, orders)]).to(self.mask.dtype)
        self.next_pos = torch.cat([self.next_pos, new.next_pos])
        self.logits = torch.cat([self.logits, new.logits])
        self.keys, self.slots = self.keys + new.keys, self.slots + new.slots
        self.route = self.bank.context.plan(self.slots, self.bank.device)


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

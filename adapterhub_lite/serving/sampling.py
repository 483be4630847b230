"""Choosing each row's next token from its logits, with that row's own settings (SamplingParams).

A batch mixes rows with different settings, so every setting is applied per row (transformers'
logits processors take one setting for the whole batch). The order is vLLM's:

1. shape the logits: `allowed_token_ids` masks the rest, `logit_bias` is added, EOS and
   `stop_token_ids` are masked while fewer than `min_tokens` were generated, then the penalties:
   `repetition_penalty` over the prompt's and the completion's tokens (positive logits ÷ p,
   negative × p), `frequency_penalty` (× the token's count in the completion) and
   `presence_penalty` (once per token present in the completion) are subtracted;
2. greedy rows (temperature below params.GREEDY_BELOW) take the argmax of the shaped logits;
3. sampled rows divide by their temperature, keep tokens of at least `min_p` × the top token's
   probability, the `top_k` most likely (ties with the k-th kept), then the smallest set reaching
   `top_p`, and draw with their own generator (a seeded request repeats exactly). These are
   transformers' own warpers, in vLLM's order: transformers' `generate` applies min_p last, after
   top_k/top_p, so with min_p and top_p both set its nucleus is taken over more tokens.

Log-probs reported to clients are the model's own (before any of this), as vLLM's default.
Rows that set none of (1) cost nothing extra: the common greedy batch is one argmax.
"""

from __future__ import annotations

from typing import Protocol

import torch
from transformers.generation.logits_process import MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from adapterhub_lite.serving.params import SamplingParams


class Row(Protocol):
    """What choosing a row's token reads (the engine's Job has these)."""

    params: SamplingParams
    tokens: list[int]  # generated so far
    generator: torch.Generator | None

    @property
    def prompt_ids(self) -> list[int]: ...


def shape_logits(logits: torch.Tensor, rows: list[Row], eos_id: int | None) -> torch.Tensor:
    """[B, V] logits after each row's masks, biases and penalties (rows that set none are unchanged)."""
    shaped = [j for j, r in enumerate(rows) if r.params.shapes_logits]
    if not shaped:
        return logits
    device, width = logits.device, logits.shape[-1]
    sub = logits[shaped].float()  # a copy: the model's own logits stay as they are for the log-probs
    for k, j in enumerate(shaped):
        p, out, row = rows[j].params, rows[j].tokens, sub[k]
        if p.allowed_token_ids is not None:
            keep = torch.tensor(p.allowed_token_ids, device=device)
            masked = torch.full_like(row, float("-inf"))
            masked[keep] = row[keep]
            row.copy_(masked)  # row is a view of sub[k]: every step below edits sub in place
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), device=device)
            row[ids] += torch.tensor(list(p.logit_bias.values()), device=device, dtype=row.dtype)
        if len(out) < p.min_tokens and (banned := p.stop_ids(eos_id)):  # the ids check_a_token_is_left weighs
            row[torch.tensor(banned, device=device)] = float("-inf")
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(rows[j].prompt_ids) | set(out)), device=device, dtype=torch.long)
            v = row[seen]
            row[seen] = torch.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and out:
            counts = torch.bincount(torch.tensor(out, device=device), minlength=width).to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    full = logits.float().clone() if logits.dtype == torch.float32 else logits.float()
    full[torch.tensor(shaped, device=device)] = sub
    return full


def filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The distribution a sampled row draws from: softmax(logits / T) after min_p, top_k and top_p (vLLM's order).

    The filters are transformers' warpers, applied to this one row: their top_p (ascending cumulative sum ≤ 1 − p
    dropped) is vLLM's, so a prefix of exactly top_p is the whole nucleus (no one token more)."""
    x = TemperatureLogitsWarper(float(p.temperature))(None, logits.float()[None])
    if p.min_p > 0:
        x = MinPLogitsWarper(p.min_p)(None, x)
    if 0 < p.top_k < x.shape[-1]:
        x = TopKLogitsWarper(p.top_k)(None, x)
    if p.top_p < 1.0:
        x = TopPLogitsWarper(p.top_p)(None, x)
    return x.softmax(-1)[0]


def choose(logits: torch.Tensor, rows: list[Row], eos_id: int | None) -> torch.Tensor:
    """Each row's next token [B] (on the logits' device; nothing is read back here)."""
    shaped = shape_logits(logits, rows, eos_id)
    tokens = shaped.argmax(-1)
    for j, row in enumerate(rows):  # sampling rows are few and each draws with its own generator
        if not row.params.greedy:
            tokens[j] = torch.multinomial(filtered_probs(shaped[j], row.params), 1, generator=row.generator)[0]
    return tokens


def model_logprobs(logits: torch.Tensor, tokens: torch.Tensor, rows: list[Row]) -> dict[int, tuple]:
    """{row: (log-prob of its token, [(id, log-prob)] of the top k)} for the rows that asked (`params.logprobs` set):
    the model's own distribution, before any sampling setting (one read for the whole step)."""
    asked = [j for j, row in enumerate(rows) if row.params.logprobs is not None]
    if not asked:
        return {}
    at = torch.tensor(asked, device=logits.device)
    logp = logits[at].float().log_softmax(-1)
    chosen = logp.gather(1, tokens[at][:, None]).squeeze(1).tolist()
    k = max(rows[j].params.logprobs for j in asked)
    values, indices = logp.topk(k) if k else (logp[:, :0], at[:, None][:, :0])
    values, indices = values.tolist(), indices.tolist()
    return {j: (chosen[i], list(zip(indices[i], values[i]))[: rows[j].params.logprobs]) for i, j in enumerate(asked)}

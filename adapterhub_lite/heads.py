"""Task heads on a causal LM: score labels by likelihood, put the loss on target tokens only.

Both heads need log-probabilities at a handful of positions, never the full [B, T, vocab] logits.
So we run the model once with `logits_to_keep=1` (to skip the big projection), take the final
hidden states, gather the positions the loss needs, and project only those through the LM head.
Sequences are right-padded: a causal model's real positions are then unaffected by padding.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def encode_prompt(tokenizer, prompt: str, max_tokens: int) -> list[int]:
    """Tokenize a prompt, keeping its end (where the answer cue sits) when it is too long."""
    ids = tokenizer(prompt, add_special_tokens=True).input_ids
    return ids[-max_tokens:] if len(ids) > max_tokens else ids


def answer_ids(tokenizer, text: str) -> list[int]:
    """Tokens of an answer: a continuation of the prompt after one space."""
    return tokenizer(" " + text, add_special_tokens=False).input_ids


def _device(model) -> torch.device:
    return next(p for p in model.parameters()).device


def final_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last-layer hidden states [B, T, H] aligned with input_ids (prompt-tuning tokens dropped)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=1, use_cache=False)
    hidden = out.hidden_states[-1]
    return hidden[:, hidden.shape[1] - input_ids.shape[1]:]


def logprobs_at(model, pad_id: int, seqs: list[list[int]], rows: list[int], cols: list[int]) -> torch.Tensor:
    """Log-softmax over the vocabulary for the next token after seqs[r][c], for each (r, c)."""
    device = _device(model)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    hidden = final_hidden(model, ids.to(device), mask.to(device))
    picked = hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
    logits = model.get_output_embeddings()(picked.to(model.get_output_embeddings().weight.dtype))
    return logits.float().log_softmax(-1)


@dataclass
class Plan:
    """What one batch of a task needs from a forward pass, so several tasks can share one pass.

    seqs are the token sequences to run; (rows[j], cols[j]) the positions whose next-token
    log-probs are read; `finish` turns those log-probs [len(rows), vocab] into the result
    (label scores, or a loss).
    """

    seqs: list[list[int]]
    rows: list[int]
    cols: list[int]
    finish: Callable[[torch.Tensor], torch.Tensor]

    def run(self, model, pad_id: int) -> torch.Tensor:
        return self.finish(logprobs_at(model, pad_id, self.seqs, self.rows, self.cols))


def continuation_plan(prompts: list[list[int]], conts: list[list[int]]) -> Plan:
    """Sum of log p(cont | prompt) for each (prompt ids, continuation ids) pair: a [N] tensor."""
    rows = [i for i, c in enumerate(conts) for _ in c]
    targets = [t for c in conts for t in c]

    def finish(logp):
        token_lp = logp.gather(-1, torch.tensor(targets, device=logp.device)[:, None]).squeeze(-1)
        return torch.zeros(len(conts), device=logp.device).index_add(0, torch.tensor(rows, device=logp.device), token_lp)

    cols = [len(p) - 1 + j for p, c in zip(prompts, conts) for j in range(len(c))]
    return Plan([p + c for p, c in zip(prompts, conts)], rows, cols, finish)


def label_plan(tokenizer, prompts: list[str], label_tokens: list[list[int]], max_length: int) -> Plan:
    """Every label of every prompt scored by its log-likelihood: a [B, K] tensor.

    When every label is one token, one sequence per prompt scores all K labels from the
    next-token distribution; otherwise each (prompt, label) pair is its own sequence.
    """
    longest = max(len(t) for t in label_tokens)
    ids = [encode_prompt(tokenizer, p, max_length - longest) for p in prompts]
    if longest == 1:
        first = [t[0] for t in label_tokens]
        return Plan(ids, list(range(len(ids))), [len(s) - 1 for s in ids], lambda logp: logp[:, first])
    k = len(label_tokens)
    flat = continuation_plan([p for p in ids for _ in range(k)], [t for _ in ids for t in label_tokens])
    return Plan(flat.seqs, flat.rows, flat.cols, lambda logp: flat.finish(logp).view(len(ids), k))


def loss_plan(tokenizer, prompts: list[str], answers: list, max_length: int, label_tokens=None) -> Plan:
    """The training loss of a batch: cross-entropy over label scores (classification, answers are
    label indices) or the mean NLL of the target tokens + EOS (generation; prompts carry no loss)."""
    if label_tokens is not None:
        scores = label_plan(tokenizer, prompts, label_tokens, max_length)
        return Plan(scores.seqs, scores.rows, scores.cols,
                    lambda logp: F.cross_entropy(s := scores.finish(logp), torch.tensor(answers, device=s.device)))
    conts = [(answer_ids(tokenizer, t) + [tokenizer.eos_token_id])[: max_length - 1] for t in answers]
    ids = [encode_prompt(tokenizer, p, max_length - len(c)) for p, c in zip(prompts, conts)]
    lp = continuation_plan(ids, conts)
    n_tokens = sum(len(c) for c in conts)
    return Plan(lp.seqs, lp.rows, lp.cols, lambda logp: -lp.finish(logp).sum() / n_tokens)


def label_scores(model, tokenizer, prompts: list[str], label_tokens: list[list[int]], max_length: int) -> torch.Tensor:
    """Log-likelihood of every label of every prompt: [B, K]."""
    return label_plan(tokenizer, prompts, label_tokens, max_length).run(model, tokenizer.pad_token_id)


def task_loss(model, tokenizer, prompts: list[str], answers: list, max_length: int, label_tokens=None) -> torch.Tensor:
    """One task's training loss on a batch (see loss_plan)."""
    return loss_plan(tokenizer, prompts, answers, max_length, label_tokens).run(model, tokenizer.pad_token_id)


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, max_length: int) -> list[str]:
    """Greedy-decode an answer per prompt; rows stop at EOS, the answer ends at its first newline."""
    ids = [encode_prompt(tokenizer, p, max_length - max_new_tokens) for p in prompts]
    width = max(len(s) for s in ids)
    device = _device(model)
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(s)) + s for s in ids], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in ids], device=device)
    out = model.generate(
        input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
        temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    texts = tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return [t.strip().split("\n")[0].strip() for t in texts]

"""Task heads on a causal LM: score labels by likelihood, put the loss on target tokens only.

Both heads need log-probabilities at a handful of positions, never the full [B, T, vocab] logits.
So we run the model with `logits_to_keep` an empty index (its own LM head projects no position), take the
final hidden states, gather the positions the loss needs, and project only those through the LM head.
Sequences are right-padded: a causal model's real positions are then unaffected by padding.

Hot-path shape (this runs every training step): token ids come in pre-tokenized (`*_ids`
functions; `data.Split` caches them), a batch is padded in one tensor op on the host and moved
once with `non_blocking`, index tensors are built on the host and moved the same way, and nothing
here reads a value back to the host, so the GPU queue never drains inside a step.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from adapterhub_lite.core.data import label_words
from adapterhub_lite.core.text import first_line
from adapterhub_lite.model.backbone import autocast, end_ids


def encode_prompt(tokenizer, prompt: str, max_tokens: int) -> list[int]:
    """Tokenize a prompt, keeping its end (where the answer cue sits) when it is too long."""
    return keep_end(tokenizer(prompt, add_special_tokens=True).input_ids, max_tokens)


def keep_end(ids: list[int], max_tokens: int) -> list[int]:
    """The last `max_tokens` ids of an already tokenized prompt (encode_prompt on ids)."""
    return ids[-max_tokens:] if len(ids) > max_tokens else ids


def answer_ids(tokenizer, text: str) -> list[int]:
    """Tokens of an answer: a continuation of the prompt after one space."""
    return tokenizer(" " + text, add_special_tokens=False).input_ids


def label_token_ids(tokenizer, spec) -> list[list[int]]:
    """Token ids of each verbalizer word as it follows the prompt (training, evaluation and serving score these)."""
    return [answer_ids(tokenizer, w) for w in label_words(spec)]


def _device(model) -> torch.device:
    return next(p for p in model.parameters()).device


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to `device` without blocking the host (pinned first when the target is a GPU)."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()  # a copy from pageable memory would be synchronous
    return tensor.to(device, non_blocking=True)


def pad_batch(seqs: list[list[int]], pad_id: int, device: torch.device, left: bool = False,
              width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, T] for token lists, padded (right by default) on the host in
    one op and moved to `device` once; T is the longest row, or `width` (at least that)."""
    width = max(max(len(s) for s in seqs), width or 0)
    rows = [[pad_id] * (width - len(s)) + s for s in seqs] if left else [s + [pad_id] * (width - len(s)) for s in seqs]
    ids = torch.tensor(rows, dtype=torch.long)
    lengths = torch.tensor([len(s) for s in seqs])
    pos = torch.arange(width)
    mask = (pos >= width - lengths[:, None]) if left else (pos < lengths[:, None])
    return to_device(ids, device), to_device(mask.long(), device)


def _final_norm(model) -> torch.nn.Module | None:
    """The decoder's last module, whose output is what the LM head reads (None if not found)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", None)
    for name in ("norm", "final_layernorm", "ln_f"):
        module = getattr(decoder, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


class CompiledCall:
    """The model's forward through torch.compile, fed a few shapes only, so each is compiled once (and on CUDA,
    mode="reduce-overhead", captured as a CUDA graph and replayed: the step stops being bound by launching small
    kernels from the host). Rows are padded to the next power of two ≥ MIN_WIDTH tokens (≤ 6 shapes up to 1,024;
    the batch's row count is fixed by the recipe), and the last hidden states are read from the outputs rather than
    through a hook added per call, which would make every call a new graph."""

    MIN_WIDTH = 32

    def __init__(self, call, mode: str | None = None, backend: str = "inductor", limit: int | None = None):
        self.fn = torch.compile(call, dynamic=False, mode=mode, backend=backend)
        self.limit = limit  # the model's positions: no bucket past them

    def width(self, longest: int) -> int:
        """The padded width of a batch whose longest row has `longest` tokens."""
        bucket = max(self.MIN_WIDTH, 1 << (longest - 1).bit_length())
        return max(longest, min(bucket, self.limit or bucket))

    def __call__(self, **kwargs):
        return self.fn(**kwargs)


def no_logits(input_ids: torch.Tensor) -> torch.Tensor:
    """`logits_to_keep` for a forward whose logits nobody reads: an empty index, so the LM head projects nothing.

    logits_to_keep=1 (the smallest count transformers takes) still projects each row's last position onto the
    whole vocabulary and throws it away: a [B,1,H]×[H,49152] bmm, 60 ms of a 730 ms CPU training step of the
    135M (torch.profiler).
    """
    return torch.empty(0, dtype=torch.long, device=input_ids.device)


def final_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, call=None) -> torch.Tensor:
    """Last-layer hidden states [B, T, H] aligned with input_ids (prompt-tuning tokens dropped).

    A forward hook on the final norm keeps exactly the tensor the LM head would read, and only
    it: `output_hidden_states=True` would keep every layer's states. The model is still called
    through its top-level forward, so peft's prompt tuning (virtual tokens prepended) and prefix
    tuning (virtual keys/values) apply as usual. `call` (default: the model) is what is called, e.g.
    the model's DistributedDataParallel wrapper in a data-parallel run.
    """
    call = call or model
    norm = _final_norm(model)
    # The model's own LM head projects no position: we project the few we read (head_logits).
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "logits_to_keep": no_logits(input_ids), "use_cache": False}
    if norm is None or isinstance(call, CompiledCall):  # no named final norm, or a compiled graph: all hidden states
        hidden = call(**kwargs, output_hidden_states=True).hidden_states[-1]
    else:
        seen: list[torch.Tensor] = []
        handle = norm.register_forward_hook(lambda _module, _args, out: seen.append(out))
        try:
            call(**kwargs)
        finally:
            handle.remove()
        hidden = seen[-1]
    return hidden[:, hidden.shape[1] - input_ids.shape[1]:]


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on `hidden`, with the post-processing the model's own forward applies after it.

    We project a handful of positions ourselves (see the module docstring), so whatever the
    model's forward does to its logits must be done here too, as transformers does it:
    Gemma 2/3 soft-cap (tanh(x/c)·c), Cohere scales (x·s), Granite divides (x/s).
    """
    head = model.get_output_embeddings()
    logits = head(hidden.to(head.weight.dtype))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    scale = getattr(base, "logit_scale", None)  # Cohere keeps config.logit_scale on the model
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    divisor = getattr(config, "logits_scaling", None)
    if divisor and divisor != 1:
        logits = logits / divisor
    return logits


def logprobs_at(model, pad_id: int, seqs: list[list[int]], rows: list[int], cols: list[int], call=None) -> torch.Tensor:
    """Log-softmax over the vocabulary for the next token after seqs[r][c], for each (r, c).

    Runs under autocast in the model's compute dtype; the log-softmax is taken in fp32.
    """
    device = _device(model)
    width = call.width(max(map(len, seqs))) if isinstance(call, CompiledCall) else None
    ids, mask = pad_batch(seqs, pad_id, device, width=width)
    where = to_device(torch.tensor([rows, cols], dtype=torch.long).view(2, -1), device)
    with autocast(model):
        hidden = final_hidden(model, ids, mask, call)
        logits = head_logits(model, hidden[where[0], where[1]])
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
    reduce: Callable[[torch.Tensor], torch.Tensor]

    def run(self, model, pad_id: int, call=None) -> torch.Tensor:
        return self.reduce(logprobs_at(model, pad_id, self.seqs, self.rows, self.cols, call))


def continuation_plan(prompts: list[list[int]], conts: list[list[int]]) -> Plan:
    """Sum of log p(cont | prompt) for each (prompt ids, continuation ids) pair: a [N] tensor."""
    rows = [i for i, c in enumerate(conts) for _ in c]
    targets = torch.tensor([t for c in conts for t in c], dtype=torch.long)
    owners = torch.tensor(rows, dtype=torch.long)

    def finish(logp):
        token_lp = logp.gather(-1, to_device(targets, logp.device)[:, None]).squeeze(-1)
        return torch.zeros(len(conts), device=logp.device, dtype=token_lp.dtype).index_add(0, to_device(owners, logp.device), token_lp)

    cols = [len(p) - 1 + j for p, c in zip(prompts, conts) for j in range(len(c))]
    # The continuation's last token is read (as a target) but never fed: no position after it is scored, and in a
    # causal model no earlier position sees it. Feeding it cost one position a row for nothing (3.5% of date_iso's
    # training tokens).
    return Plan([p + c[:-1] for p, c in zip(prompts, conts)], rows, cols, finish)


def label_plan_ids(prompt_ids: list[list[int]], label_tokens: list[list[int]], max_length: int) -> Plan:
    """label_plan on already tokenized (untruncated) prompts."""
    longest = max(len(t) for t in label_tokens)
    ids = [keep_end(p, max_length - longest) for p in prompt_ids]
    if longest == 1:
        first = torch.tensor([t[0] for t in label_tokens], dtype=torch.long)
        return Plan(ids, list(range(len(ids))), [len(s) - 1 for s in ids], lambda logp: logp.index_select(-1, to_device(first, logp.device)))
    k = len(label_tokens)
    flat = continuation_plan([p for p in ids for _ in range(k)], [t for _ in ids for t in label_tokens])
    return Plan(flat.seqs, flat.rows, flat.cols, lambda logp: flat.reduce(logp).view(len(ids), k))


def label_plan(tokenizer, prompts: list[str], label_tokens: list[list[int]], max_length: int) -> Plan:
    """Every label of every prompt scored by its log-likelihood: a [B, K] tensor.

    When every label is one token, one sequence per prompt scores all K labels from the
    next-token distribution; otherwise each (prompt, label) pair is its own sequence.
    """
    return label_plan_ids(tokenizer(prompts, add_special_tokens=True).input_ids, label_tokens, max_length)


def loss_plan_ids(prompt_ids: list[list[int]], answers: list, max_length: int, label_tokens=None, eos_id: int | None = None,
                  reduction: str = "mean") -> Plan:
    """loss_plan on already tokenized prompts. Classification: `answers` are label indices.
    Generation: `answers` are the target token ids (answer_ids, no EOS); `eos_id` is appended.

    reduction="sum" gives the summed loss and leaves the averaging to the caller, over `loss_items`
    of the batch: a data-parallel step divides by the *global* batch's count, so that the mean is the one
    a single process would take over the whole batch.
    """
    if label_tokens is not None:
        scores = label_plan_ids(prompt_ids, label_tokens, max_length)
        gold = torch.tensor(answers, dtype=torch.long)
        return Plan(scores.seqs, scores.rows, scores.cols,
                    lambda logp: F.cross_entropy(s := scores.reduce(logp), to_device(gold, s.device), reduction=reduction))
    conts = [_target(a, eos_id, max_length) for a in answers]
    ids = [keep_end(p, max_length - len(c)) for p, c in zip(prompt_ids, conts)]
    lp = continuation_plan(ids, conts)
    n_tokens = sum(len(c) for c in conts)
    scale = 1 if reduction == "sum" else n_tokens
    return Plan(lp.seqs, lp.rows, lp.cols, lambda logp: -lp.reduce(logp).sum() / scale)


def loss_items(answers: list, max_length: int, label_tokens=None) -> int:
    """What a loss plan of these answers averages over, without building it: rows for
    classification, target tokens + EOS for generation. A data-parallel step computes it for the
    global batch, which every process knows."""
    if label_tokens is not None:
        return len(answers)
    return sum(len(_target(a, 0, max_length)) for a in answers)


def read_tokens(prompt_len: int, answer, max_length: int, label_tokens=None) -> int:
    """Tokens the loss plan of one row runs, after truncation to max_length (what a tokens/s figure counts):
    the prompt's kept end (one sequence when every label is one token), else the kept end and each label but its last
    token (one sequence per label), or the kept end and the target + EOS but its last token (continuation_plan feeds
    no token whose next is not read). Equals the length of the plan's sequences, without building it."""
    if label_tokens is not None:
        longest = max(len(t) for t in label_tokens)
        kept = min(prompt_len, max_length - longest)
        return kept if longest == 1 else sum(kept + len(t) - 1 for t in label_tokens)
    target = len(_target(answer, 0, max_length))
    return min(prompt_len, max_length - target) + target - 1


def _target(answer: list[int], eos_id: int, max_length: int) -> list[int]:
    """The tokens a generation row's loss is taken on: the answer + EOS, cut to leave one prompt token."""
    return (list(answer) + [eos_id])[: max_length - 1]


def loss_plan(tokenizer, prompts: list[str], answers: list, max_length: int, label_tokens=None) -> Plan:
    """The training loss of a batch: cross-entropy over label scores (classification, answers are
    label indices) or the mean NLL of the target tokens + EOS (generation; prompts carry no loss)."""
    ids = tokenizer(prompts, add_special_tokens=True).input_ids
    if label_tokens is None:
        answers = tokenizer([" " + t for t in answers], add_special_tokens=False).input_ids
    return loss_plan_ids(ids, answers, max_length, label_tokens, tokenizer.eos_token_id)


def label_scores(model, tokenizer, prompts: list[str], label_tokens: list[list[int]], max_length: int) -> torch.Tensor:
    """Log-likelihood of every label of every prompt: [B, K]."""
    return label_plan(tokenizer, prompts, label_tokens, max_length).run(model, tokenizer.pad_token_id)


def task_loss(model, tokenizer, prompts: list[str], answers: list, max_length: int, label_tokens=None) -> torch.Tensor:
    """One task's training loss on a batch (see loss_plan)."""
    return loss_plan(tokenizer, prompts, answers, max_length, label_tokens).run(model, tokenizer.pad_token_id)


@torch.no_grad()
def generate_ids(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int, max_length: int) -> list[str]:
    """Greedy-decode an answer per tokenized prompt (its last max_length − max_new_tokens tokens, the window training
    used); rows stop at an end id (the tokenizer's EOS or the generation config's others, as the server stops), and the
    answer is the first line of what was generated."""
    ends = end_ids(model, tokenizer)
    ids = [keep_end(p, max_length - max_new_tokens) for p in prompt_ids]
    input_ids, mask = pad_batch(ids, tokenizer.pad_token_id, _device(model), left=True)  # generation appends on the right
    with autocast(model):
        if virtual_tokens(model):  # (inside peft's disable_adapter() there are none: the plain backbone decodes, through generate())
            new = _prompt_learning_greedy(model, input_ids, mask, max_new_tokens, ends, tokenizer.pad_token_id)
        else:
            new = model.generate(
                input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id, eos_token_id=ends,
            )[:, input_ids.shape[1]:]
    return [first_line(t) for t in tokenizer.batch_decode(new, skip_special_tokens=True)]


def virtual_tokens(model) -> int:
    """The positions the active prefix- or prompt-tuning adapter puts before every prompt; 0 for LoRA, IA3, the plain
    backbone, and inside peft's disable_adapter()."""
    config = getattr(model, "active_peft_config", None)
    if getattr(config, "peft_type", None) in ("PREFIX_TUNING", "PROMPT_TUNING") and not getattr(model, "_adapters_disabled", False):
        return config.num_virtual_tokens
    return 0


def _prompt_learning_greedy(model, input_ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, ends: list[int], pad_id: int) -> torch.Tensor:
    """Greedy new tokens [B, n] of a prefix- or prompt-tuning PeftModel, decoded by its base model from peft's own
    virtual tokens (get_prompt: a prefix pre-fills the cache, a prompt's embeddings go before the tokens'), each row at
    the positions it has alone through peft's forward: its tokens right after the virtual ones, whatever its padding.

    peft 0.21.2's generate() does not run these kinds as its forward does on transformers 5.25: it hands a prefix to
    the model as `past_key_values` beside transformers' own empty `cache`, so the plain backbone decoded (and, left
    padded, a mix of neither); a prompt's first token was right but every later step off (0.1 on logits the prompt
    moved by 0.35, tiny backbone). Eval then scored something other than the adapter `serve` runs."""
    base, rows = model.get_base_model(), input_ids.shape[0]
    prefix = model.active_peft_config.peft_type == "PREFIX_TUNING"  # a PeftType is a str enum
    cache = model.get_prompt(batch_size=rows) if prefix else DynamicCache(config=base.config)
    arg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"  # renamed in transformers 5
    virtual = model.active_peft_config.num_virtual_tokens
    own = virtual + (mask.cumsum(1) - 1).clamp(min=0)  # left padding: each row's tokens right after the virtual ones
    mask = torch.cat([mask.new_ones(rows, virtual), mask], dim=1)
    if prefix:
        first = {"input_ids": input_ids, "position_ids": own}
    else:
        embeds = base.get_input_embeddings()(input_ids)
        prompts = model.get_prompt(batch_size=rows).to(embeds.dtype)
        positions = torch.cat([torch.arange(virtual, device=own.device).expand(rows, -1), own], dim=1)
        first = {"inputs_embeds": torch.cat([prompts, embeds], dim=1), "position_ids": positions}
    out, last = [], first["position_ids"][:, -1:]
    running = torch.ones(rows, dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        logits = base(**first, attention_mask=mask, use_cache=True, **{arg: cache}).logits[:, -1]
        token = torch.where(running, logits.argmax(-1), pad_id)  # finished rows are padded, as generate() pads them
        out.append(token)
        running &= ~torch.isin(token, torch.tensor(ends, device=token.device))
        if not running.any():
            break
        last = last + 1
        first = {"input_ids": token[:, None], "position_ids": last}
        mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
    return torch.stack(out, dim=1) if out else input_ids[:, :0]

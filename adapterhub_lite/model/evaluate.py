"""Inference for one task: classification by label likelihood, generation by greedy decoding."""

from __future__ import annotations

import sys
import time

import torch

from adapterhub_lite.core.data import Split, label_words
from adapterhub_lite.core.errors import LABEL_NEED, ContextLengthError, over_context
from adapterhub_lite.core.metrics import classification_metrics, generation_metrics
from adapterhub_lite.core.spec import TaskSpec
from adapterhub_lite.model.heads import generate_ids, label_plan_ids, label_token_ids, virtual_tokens

# Below this many rows a command answers in a few seconds: a bar would only be noise.
PROGRESS_MIN_ROWS = 300


def progress_bar(total: int, desc: str, enabled: bool = True):
    """A tqdm bar on stderr over `total` rows; off when not `enabled` (--no-progress) or under PROGRESS_MIN_ROWS rows.

    stderr keeps stdout (the answers, the JSON) clean for pipes.
    """
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="row", disable=not enabled or total < PROGRESS_MIN_ROWS, dynamic_ncols=True, file=sys.stderr)


@torch.no_grad()
def predict(model, tokenizer, spec: TaskSpec, prompts: list[str], batch_size: int | None = None,
            prompt_ids: list[list[int]] | None = None, progress: bool = False, desc: str = "predict",
            context: int | None = None) -> list:
    """Label indices (classification) or answer strings (generation), one per prompt.

    `prompt_ids` are the prompts already tokenized (data.Split.prompt_ids); else they are tokenized
    here, in one call. Runs under autocast in the model's compute dtype (heads does it).
    `progress` shows a bar on stderr (see progress_bar; the commands turn it on, training's evals do not).
    Prompts keep their end within train.max_length, as the adapter was trained (eval); with `context` (the
    backbone's, as `serve` reads it) every prompt is read whole instead, and one that does not fit is refused.
    """
    was_training = model.training
    model.eval()
    batch_size = batch_size or spec.train.eval_batch_size
    ids = prompt_ids if prompt_ids is not None else tokenizer(prompts, add_special_tokens=True).input_ids
    label_tokens = label_token_ids(tokenizer, spec) if spec.type == "classification" else None
    max_length = spec.train.max_length if context is None else _fit_context(ids, label_tokens, spec, context, virtual_tokens(model))
    # Batch prompts of similar length together (less padding), then restore the caller's order.
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list = [None] * len(ids)
    picked: list[torch.Tensor] = []  # classification: argmax per batch stays on the device; one read at the end
    bar = progress_bar(len(order), desc, progress)
    for start in range(0, len(order), batch_size):
        chunk = [ids[i] for i in order[start : start + batch_size]]
        if label_tokens is not None:
            picked.append(label_plan_ids(chunk, label_tokens, max_length).run(model, tokenizer.pad_token_id).argmax(-1))
        else:
            for i, p in zip(order[start : start + batch_size], generate_ids(model, tokenizer, chunk, spec.train.max_new_tokens, max_length)):
                out[i] = p
        bar.update(len(chunk))
    bar.close()
    if picked:
        for i, p in zip(order, torch.cat(picked).tolist()):
            out[i] = p
    model.train(was_training)
    return out


def _fit_context(ids: list[list[int]], label_tokens, spec: TaskSpec, context: int, virtual: int = 0) -> int:
    """The context itself, once every prompt fits it with the adapter's virtual tokens and its answer (the longest label,
    or max_new_tokens), so no prompt is cut: keeping the end within train.max_length answered a long input other than the
    server did. The virtual tokens count as the server counts them: without them a prompt-tuning adapter ran positions
    past the context on a prompt that `serve`, `infer` and Router.run refuse."""
    # a label's last token is read, never fed (heads.continuation_plan): scoring runs the prompt and the longest label but one
    need = max(len(t) for t in label_tokens) - 1 if label_tokens else spec.train.max_new_tokens
    over = [i for i, p in enumerate(ids) if len(p) + virtual + need > context]
    if over:
        # the words serve, infer and Router.run refuse it with (serving/reading.py): one problem, said one way
        what = LABEL_NEED if label_tokens else "for the completion"
        err = ContextLengthError(f"input row {over[0] + 1}: {over_context(len(ids[over[0]]), virtual, need, what, context, spec.name)}; "
                                 "shorten it (no prompt is cut, as in `serve`)")
        err.row = over[0]  # the caller that read the rows from a file names its line (cli `predict --input`)
        raise err
    return context + 1 if label_tokens else context  # a label plan's max_length counts the label's last token, which runs nowhere


def score(spec: TaskSpec, preds: list, answers: list) -> dict:
    """The task's metrics for predictions against gold answers."""
    if spec.type == "classification":
        return classification_metrics(preds, answers, label_words(spec))
    return generation_metrics(preds, answers)


def evaluate_split(model, tokenizer, spec: TaskSpec, split: Split, limit: int | None = None,
                   progress: bool = False, shard: tuple[int, int] = (0, 1), gather=None) -> tuple[dict, list, float]:
    """Predict and score (the first `limit` rows of) a split; returns metrics, predictions, and the seconds this process
    took for its rows (`progress`: a bar on stderr).

    Data-parallel (`shard` = (rank, processes), `gather` = Parallel.gather): each process predicts every
    processes-th row from its rank, the predictions are gathered, and every process scores them all, so no
    process waits alone in a collective while one evaluates (a long eval would pass the group's timeout)."""
    rank, world = shard
    prompts, answers = split.prompts[:limit], split.answers[:limit]
    start = time.perf_counter()
    mine = predict(model, tokenizer, spec, prompts[rank::world], prompt_ids=split.prompt_ids(tokenizer)[:limit][rank::world],
                   progress=progress, desc="eval")
    seconds = time.perf_counter() - start
    preds = mine
    if world > 1:
        preds = [None] * len(prompts)
        for r, part in enumerate(gather(mine)):
            preds[r::world] = part
    return score(spec, preds, answers), preds, seconds

"""Inference for one task: classification by label likelihood, generation by greedy decoding."""

from __future__ import annotations

import time

import torch

from .data import Split, label_words
from .heads import answer_ids, greedy_generate, label_scores
from .metrics import classification_metrics, generation_metrics
from .spec import TaskSpec


def label_token_ids(tokenizer, spec: TaskSpec) -> list[list[int]]:
    """Token ids of each verbalizer word as it follows the prompt."""
    return [answer_ids(tokenizer, w) for w in label_words(spec)]


@torch.no_grad()
def predict(model, tokenizer, spec: TaskSpec, prompts: list[str], batch_size: int | None = None) -> list:
    """Label indices (classification) or answer strings (generation), one per prompt."""
    was_training = model.training
    model.eval()
    batch_size = batch_size or spec.train.eval_batch_size
    label_tokens = label_token_ids(tokenizer, spec) if spec.type == "classification" else None
    # Batch prompts of similar length together (less padding), then restore the caller's order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        chunk = [prompts[i] for i in idx]
        if label_tokens is not None:
            preds = label_scores(model, tokenizer, chunk, label_tokens, spec.train.max_length).argmax(-1).tolist()
        else:
            preds = greedy_generate(model, tokenizer, chunk, spec.train.max_new_tokens, spec.train.max_length)
        for i, p in zip(idx, preds):
            out[i] = p
    model.train(was_training)
    return out


def score(spec: TaskSpec, preds: list, answers: list) -> dict:
    """The task's metrics for predictions against gold answers."""
    if spec.type == "classification":
        return classification_metrics(preds, answers, label_words(spec))
    return generation_metrics(preds, answers)


def evaluate_split(model, tokenizer, spec: TaskSpec, split: Split, limit: int | None = None) -> tuple[dict, list, float]:
    """Predict and score (the first `limit` rows of) a split; returns metrics, predictions, seconds."""
    prompts, answers = split.prompts[:limit], split.answers[:limit]
    start = time.perf_counter()
    preds = predict(model, tokenizer, spec, prompts)
    seconds = time.perf_counter() - start
    return score(spec, preds, answers), preds, seconds


def readable(spec: TaskSpec, pred) -> str:
    """A prediction as the user reads it: the label word, or the generated text."""
    return label_words(spec)[pred] if spec.type == "classification" else pred

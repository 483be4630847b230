"""Metrics: accuracy, macro-F1 and per-class P/R/F1 for classification; exact match and
valid-JSON rate for generation.

Classification comes from scikit-learn (`accuracy_score`, `precision_recall_fscore_support`): the figures are the ones
sklearn gives for the same predictions, macro-F1 its `f1_score(average="macro")` over the classes present (see
classification_metrics).
The generation metrics stay hand-written: "the output equals the answer after trimming
whitespace" and "the output parses as JSON" are one line each, and no metrics library defines
them in this form (evaluate's `exact_match` normalises case/punctuation differently, and nothing
scores JSON validity).
"""

from __future__ import annotations

import json

import numpy as np
from sklearn.metrics import accuracy_score, precision_recall_fscore_support


def classification_metrics(preds: list[int], gold: list[int], names: list[str]) -> dict:
    """Accuracy, macro-F1 and per-class precision/recall/F1/support, rounded to 4 places.

    macro_f1 is scikit-learn's `f1_score(gold, preds, average="macro")` (as `classification_report` and lm-eval's
    macro F1 take it): the mean F1 over the classes that occur in the gold answers or the predictions, rounded once.
    A class of `names` in neither (no row of it scored, never predicted) has no F1 to average: counted as 0, a perfect
    classifier on a dev set without one of 4 classes would score 0.75.

    `per_class` lists every class of `names`. A class in neither holds support 0 and null precision, recall and F1
    (nothing was measured); otherwise the figures are `classification_report(zero_division=0)`'s: a class never
    predicted has precision 0, one with no gold row recall 0 (its F1 is 0 in both cases, and counts in macro_f1).
    No rows at all (sklearn refuses them): nothing is measured, every figure is null; the commands refuse an
    empty split before they score it.
    """
    if not gold:
        return {"accuracy": None, "macro_f1": None, "per_class": {n: _unmeasured() for n in names}}
    precision, recall, f1, support = precision_recall_fscore_support(gold, preds, labels=list(range(len(names))), average=None, zero_division=0)
    seen = set(gold) | set(preds)
    per_class = {name: {"precision": round(float(p), 4), "recall": round(float(r), 4), "f1": round(float(f), 4), "support": int(s)}
                 if k in seen else _unmeasured() for k, (name, p, r, f, s) in enumerate(zip(names, precision, recall, f1, support))}
    # f1_score(average="macro")'s own mean (over sklearn's unique_labels, sorted), rounded once: a mean of per_class's
    # rounded figures can differ from it in the 4th place
    macro_f1 = np.mean(f1[sorted(seen)])
    return {"accuracy": round(float(accuracy_score(gold, preds)), 4), "macro_f1": round(float(macro_f1), 4), "per_class": per_class}


def _unmeasured() -> dict:
    """A class no scored row holds and no prediction names: its support is 0, and no precision, recall or F1 was measured."""
    return {"precision": None, "recall": None, "f1": None, "support": 0}


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def generation_metrics(preds: list[str], gold: list[str]) -> dict:
    """Exact match (after trimming whitespace) and the share of outputs that parse as JSON."""
    n = max(len(gold), 1)
    return {
        "exact_match": round(sum(p.strip() == g.strip() for p, g in zip(preds, gold)) / n, 4),
        "json_valid": round(sum(_is_json(p) for p in preds) / n, 4),
    }

"""Metrics: accuracy, macro-F1 and per-class P/R/F1 for classification; exact match and
valid-JSON rate for generation.

Classification comes from scikit-learn (`accuracy_score`, `precision_recall_fscore_support`).
The generation metrics stay hand-written: "the output equals the answer after trimming
whitespace" and "the output parses as JSON" are one line each, and no metrics library defines
them in this form (evaluate's `exact_match` normalises case/punctuation differently, and nothing
scores JSON validity).
"""

from __future__ import annotations

import json

from sklearn.metrics import accuracy_score, precision_recall_fscore_support


def classification_metrics(preds: list[int], gold: list[int], names: list[str]) -> dict:
    """Accuracy, macro-F1 and per-class precision/recall/F1/support, rounded to 4 places.

    Every class in `names` is reported, present or not: `labels` fixes the classes, and
    `zero_division=0` scores a class with no predictions (or no gold rows) 0 rather than warning.
    """
    if not gold:  # sklearn refuses empty inputs; an empty split scores 0 as it always has
        return {"accuracy": 0.0, "macro_f1": 0.0, "per_class": {n: {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0} for n in names}}
    precision, recall, f1, support = precision_recall_fscore_support(gold, preds, labels=list(range(len(names))), average=None, zero_division=0)
    per_class = {name: {"precision": round(float(p), 4), "recall": round(float(r), 4), "f1": round(float(f), 4), "support": int(s)}
                 for name, p, r, f, s in zip(names, precision, recall, f1, support)}
    # macro-F1 is the mean of the per-class F1 as reported, so a sidecar's macro_f1 is the mean of its own
    # per_class values (and equal to what earlier versions wrote)
    macro_f1 = sum(c["f1"] for c in per_class.values()) / max(len(per_class), 1)
    return {"accuracy": round(float(accuracy_score(gold, preds)), 4), "macro_f1": round(macro_f1, 4), "per_class": per_class}


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

"""Metrics: accuracy, macro-F1 and per-class P/R/F1 for classification; exact match and
valid-JSON rate for generation. Plain Python: the sets are small and the formulas are the spec."""

from __future__ import annotations

import json


def classification_metrics(preds: list[int], gold: list[int], names: list[str]) -> dict:
    """Accuracy, macro-F1 and per-class precision/recall/F1/support."""
    per_class = {}
    for k, name in enumerate(names):
        tp = sum(p == k and g == k for p, g in zip(preds, gold))
        fp = sum(p == k and g != k for p, g in zip(preds, gold))
        fn = sum(p != k and g == k for p, g in zip(preds, gold))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4), "support": tp + fn}
    accuracy = sum(p == g for p, g in zip(preds, gold)) / max(len(gold), 1)
    macro_f1 = sum(c["f1"] for c in per_class.values()) / max(len(per_class), 1)
    return {"accuracy": round(accuracy, 4), "macro_f1": round(macro_f1, 4), "per_class": per_class}


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

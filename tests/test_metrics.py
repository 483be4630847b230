import random
from fractions import Fraction

from adapterhub_lite.core.metrics import classification_metrics, generation_metrics


def test_classification_metrics_by_hand():
    # gold: a a b b c ; pred: a b b b a
    m = classification_metrics([0, 1, 1, 1, 0], [0, 0, 1, 1, 2], ["a", "b", "c"])
    assert m["accuracy"] == 0.6
    assert m["per_class"]["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["per_class"]["b"]["precision"] == round(2 / 3, 4) and m["per_class"]["b"]["recall"] == 1.0
    assert m["per_class"]["c"]["f1"] == 0.0
    assert m["macro_f1"] == round((0.5 + 0.8 + 0.0) / 3, 4)


def test_a_class_never_predicted_nor_seen_is_reported_as_zeros():
    m = classification_metrics([0, 0, 1], [0, 1, 1], ["a", "b", "c"])  # "c" appears nowhere
    assert list(m["per_class"]) == ["a", "b", "c"]
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["macro_f1"] == round((round(2 / 3, 4) + round(2 / 3, 4) + 0.0) / 3, 4)  # "c" counts in the macro mean
    assert classification_metrics([], [], ["a", "b"])["accuracy"] == 0.0  # an empty split scores 0, no exception


def _reference(preds, gold, names):
    """The metric definitions in exact arithmetic (Fractions): what the numbers must be, to 4 places."""
    per_class = {}
    for k, name in enumerate(names):
        tp = sum(p == k and g == k for p, g in zip(preds, gold))
        fp = sum(p == k and g != k for p, g in zip(preds, gold))
        fn = sum(p != k and g == k for p, g in zip(preds, gold))
        precision = Fraction(tp, tp + fp) if tp + fp else Fraction(0)
        recall = Fraction(tp, tp + fn) if tp + fn else Fraction(0)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else Fraction(0)
        per_class[name] = {"precision": round(float(precision), 4), "recall": round(float(recall), 4), "f1": round(float(f1), 4), "support": tp + fn}
    accuracy = Fraction(sum(p == g for p, g in zip(preds, gold)), len(gold))
    return {"accuracy": round(float(accuracy), 4), "macro_f1": round(sum(c["f1"] for c in per_class.values()) / len(names), 4), "per_class": per_class}


def test_classification_metrics_match_the_definitions_on_random_predictions():
    rng = random.Random(0)
    for _ in range(300):
        k, n = rng.randint(1, 6), rng.randint(1, 80)
        gold = [rng.randrange(k) for _ in range(n)]
        preds = [rng.randrange(k) if rng.random() < 0.7 else 0 for _ in range(n)]  # skewed: some classes never predicted
        names = [f"c{j}" for j in range(k)]
        assert classification_metrics(preds, gold, names) == _reference(preds, gold, names), (preds, gold)


def test_f1_on_a_rounding_tie_is_rounded_from_the_exact_value():
    # P = 15/49, R = 1: F1 = 30/64 = 0.46875 exactly. The old 2PR/(P+R) in floats gave 0.468749… and so 0.4687.
    gold = [0] * 15 + [1] * 18 + [2] * 16
    m = classification_metrics([0] * 49, gold, ["a", "b", "c"])
    assert m["per_class"]["a"]["f1"] == 0.4688 and m["macro_f1"] == round(0.4688 / 3, 4)


def test_generation_metrics_exact_match_and_json_rate():
    m = generation_metrics(['{"a": 1}', "2021-01-01", '{"a": '], ['{"a": 1}', "2021-01-02", '{"a": 2}'])
    assert m == {"exact_match": round(1 / 3, 4), "json_valid": round(1 / 3, 4)}

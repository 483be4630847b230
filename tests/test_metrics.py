import random
from fractions import Fraction

from sklearn.metrics import classification_report, f1_score

from adapterhub_lite.core.metrics import classification_metrics, generation_metrics


def test_classification_metrics_by_hand():
    # gold: a a b b c ; pred: a b b b a
    m = classification_metrics([0, 1, 1, 1, 0], [0, 0, 1, 1, 2], ["a", "b", "c"])
    assert m["accuracy"] == 0.6
    assert m["per_class"]["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["per_class"]["b"]["precision"] == round(2 / 3, 4) and m["per_class"]["b"]["recall"] == 1.0
    assert m["per_class"]["c"]["f1"] == 0.0  # a gold row, never predicted: measured, and 0
    assert m["macro_f1"] == round((0.5 + 0.8 + 0.0) / 3, 4)


def test_a_class_never_predicted_nor_seen_is_reported_unmeasured_and_left_out_of_macro_f1():
    """A class no scored row holds and no prediction names has no F1: it counted as 0 in macro_f1 (a perfect classifier on a
    dev set without one of 4 classes scored 0.75), where sklearn's f1_score(average="macro"), classification_report and
    lm-eval's macro F1 average the classes present. Its per_class figures are null (nothing measured), its support 0."""
    m = classification_metrics([0, 0, 1], [0, 1, 1], ["a", "b", "c"])  # "c" appears nowhere
    assert list(m["per_class"]) == ["a", "b", "c"]
    assert m["per_class"]["c"] == {"precision": None, "recall": None, "f1": None, "support": 0}
    assert m["macro_f1"] == round(2 / 3, 4) == round(f1_score([0, 1, 1], [0, 0, 1], average="macro"), 4)
    perfect = classification_metrics([0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2], ["a", "b", "c", "d"])
    assert perfect["macro_f1"] == 1.0 and perfect["accuracy"] == 1.0 and perfect["per_class"]["d"]["f1"] is None  # was 0.75


def test_a_class_predicted_but_absent_from_gold_counts_as_f1_zero_as_in_sklearn():
    # gold has a and b; "c" is predicted once (a false positive): precision 0, recall 0/0 → 0 (zero_division=0), F1 0
    gold, preds = [0, 0, 1, 1], [0, 2, 1, 1]
    m = classification_metrics(preds, gold, ["a", "b", "c", "d"])
    assert m["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["per_class"]["d"]["f1"] is None
    assert m["macro_f1"] == round(f1_score(gold, preds, average="macro"), 4) == round((2 / 3 + 1.0 + 0.0) / 3, 4)


def test_an_empty_split_measures_nothing():
    # sklearn refuses empty inputs; a 0 would read as a measured score (the commands refuse an empty split before scoring)
    m = classification_metrics([], [], ["a", "b"])
    assert m["accuracy"] is None and m["macro_f1"] is None
    assert m["per_class"]["a"] == {"precision": None, "recall": None, "f1": None, "support": 0}


def _reference(preds, gold, names):
    """The metric definitions in exact arithmetic (Fractions): what the numbers must be, to 4 places."""
    per_class, f1s = {}, []
    for k, name in enumerate(names):
        tp = sum(p == k and g == k for p, g in zip(preds, gold))
        fp = sum(p == k and g != k for p, g in zip(preds, gold))
        fn = sum(p != k and g == k for p, g in zip(preds, gold))
        if not tp + fp + fn:  # in neither the gold answers nor the predictions: nothing to measure
            per_class[name] = {"precision": None, "recall": None, "f1": None, "support": 0}
            continue
        precision = Fraction(tp, tp + fp) if tp + fp else Fraction(0)
        recall = Fraction(tp, tp + fn) if tp + fn else Fraction(0)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else Fraction(0)
        per_class[name] = {"precision": round(float(precision), 4), "recall": round(float(recall), 4), "f1": round(float(f1), 4), "support": tp + fn}
        f1s.append(f1)
    accuracy = Fraction(sum(p == g for p, g in zip(preds, gold)), len(gold))
    return {"accuracy": round(float(accuracy), 4), "macro_f1": round(float(sum(f1s) / len(f1s)), 4), "per_class": per_class}


def test_classification_metrics_match_the_definitions_and_sklearn_on_random_predictions():
    rng = random.Random(0)
    for _ in range(300):
        k, n = rng.randint(1, 6), rng.randint(1, 80)
        gold = [rng.randrange(k) for _ in range(n)]
        preds = [rng.randrange(k) if rng.random() < 0.7 else 0 for _ in range(n)]  # skewed: some classes never predicted
        names = [f"c{j}" for j in range(k)]
        m = classification_metrics(preds, gold, names)
        assert m == _reference(preds, gold, names), (preds, gold)
        if _ % 5:
            continue
        # the figures scikit-learn gives for the same ids, computed independently (every 5th case: classification_report is slow)
        assert m["macro_f1"] == round(f1_score(gold, preds, average="macro"), 4), (preds, gold)
        report = classification_report(gold, preds, output_dict=True, zero_division=0)
        for j, name in enumerate(names):
            if str(j) not in report:  # sklearn reports the classes in gold or predictions
                assert m["per_class"][name]["f1"] is None
                continue
            theirs = report[str(j)]
            assert m["per_class"][name] == {"precision": round(theirs["precision"], 4), "recall": round(theirs["recall"], 4),
                                            "f1": round(theirs["f1-score"], 4), "support": theirs["support"]}, (preds, gold)


def test_f1_on_a_rounding_tie_is_rounded_from_the_exact_value():
    # P = 15/49, R = 1: F1 = 30/64 = 0.46875 exactly. The old 2PR/(P+R) in floats gave 0.468749… and so 0.4687.
    gold = [0] * 15 + [1] * 18 + [2] * 16
    m = classification_metrics([0] * 49, gold, ["a", "b", "c"])
    # macro-F1 is rounded once, from the unrounded mean (0.46875 / 3 = 0.15625), as round(f1_score(...), 4) is; it was the
    # mean of the rounded figures (0.4688 / 3: 0.1563)
    assert m["per_class"]["a"]["f1"] == 0.4688
    assert m["macro_f1"] == round(0.46875 / 3, 4) == round(f1_score(gold, [0] * 49, average="macro"), 4) == 0.1562


def test_generation_metrics_exact_match_and_json_rate():
    m = generation_metrics(['{"a": 1}', "2021-01-01", '{"a": '], ['{"a": 1}', "2021-01-02", '{"a": 2}'])
    assert m == {"exact_match": round(1 / 3, 4), "json_valid": round(1 / 3, 4)}

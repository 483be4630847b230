from adapterhub_lite.metrics import classification_metrics, generation_metrics


def test_classification_metrics_by_hand():
    # gold: a a b b c ; pred: a b b b a
    m = classification_metrics([0, 1, 1, 1, 0], [0, 0, 1, 1, 2], ["a", "b", "c"])
    assert m["accuracy"] == 0.6
    assert m["per_class"]["a"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["per_class"]["b"]["precision"] == round(2 / 3, 4) and m["per_class"]["b"]["recall"] == 1.0
    assert m["per_class"]["c"]["f1"] == 0.0
    assert m["macro_f1"] == round((0.5 + 0.8 + 0.0) / 3, 4)


def test_generation_metrics_exact_match_and_json_rate():
    m = generation_metrics(['{"a": 1}', "2021-01-01", '{"a": '], ['{"a": 1}', "2021-01-02", '{"a": 2}'])
    assert m == {"exact_match": round(1 / 3, 4), "json_valid": round(1 / 3, 4)}

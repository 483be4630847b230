"""Label values end to end: a column's value is matched as written (a JSON boolean is 'true', not Python's 'True'), a near
miss is told what it misses by, two classes can never be one word or one token sequence, and a dev split without a class
is said and scored as scikit-learn scores it."""

import json

import pandas as pd
import pytest
import yaml
from sklearn.metrics import accuracy_score, classification_report, f1_score

from adapterhub_lite.cli import main
from adapterhub_lite.core.data import load_task_data
from adapterhub_lite.core.data_checks import absent_classes, check_label_tokens
from adapterhub_lite.core.errors import DataError, SpecError
from adapterhub_lite.core.spec import spec_from_dict


def _spec(labels, data="t.jsonl", **extra):
    return spec_from_dict({"name": "t", "type": "classification", "data": {"train": data, "dev": data},
                           "prompt": "{a} ->", "label": "label", "labels": labels, **extra})


def _rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_json_or_parquet_boolean_label_is_read_as_written(tmp_path, monkeypatch):
    """A JSON true was read as str(True), 'True': a spec keyed 'true' (as the file says) refused every row, and one keyed
    'True' (as Python says) was the one that trained. Parquet (and hf:) boolean columns read as JSON's words too."""
    monkeypatch.chdir(tmp_path)
    rows = [{"a": "x", "label": True}, {"a": "y", "label": False}]
    _rows(tmp_path / "t.jsonl", rows)
    (tmp_path / "t.json").write_text(json.dumps(rows))
    pd.DataFrame(rows).to_parquet(tmp_path / "t.parquet")
    for data in ("t.jsonl", "t.json", "t.parquet"):
        assert load_task_data(_spec({"true": "yes", "false": "no"}, data))["train"].answers == [0, 1], data
        assert load_task_data(_spec(["false", "true"], data))["train"].answers == [1, 0], data  # the list's words
    (tmp_path / "mixed.jsonl").write_text('{"a": "x", "label": true}\n{"a": "y", "label": "maybe"}\n')  # beside text
    assert load_task_data(_spec({"true": "yes", "maybe": "no"}, "mixed.jsonl"))["train"].answers == [0, 1]
    (tmp_path / "p.jsonl").write_text('{"a": true, "label": "x"}\n{"a": 2.50, "label": "y"}\n')  # a prompt value too
    assert load_task_data(_spec(["x", "y"], "p.jsonl"))["train"].prompts == ["true ->", "2.50 ->"]


@pytest.mark.parametrize("data", ["t.jsonl", "t.parquet"])
def test_a_spec_keyed_by_pythons_spelling_is_refused_naming_the_line_value_and_fix(tmp_path, monkeypatch, data):
    monkeypatch.chdir(tmp_path)
    rows = [{"a": "x", "label": True}, {"a": "y", "label": False}]
    _rows(tmp_path / "t.jsonl", rows)
    pd.DataFrame(rows).to_parquet(tmp_path / "t.parquet")
    with pytest.raises(DataError) as err:
        load_task_data(_spec({"True": "yes", "False": "no"}, data))
    said = str(err.value)
    where = "line 2, 1" if data == "t.jsonl" else "row 2, 1"
    assert f"has label value(s) 'false', 'true' not in labels (first at {where})" in said and "\n" not in said, said
    assert "'false' is a JSON (or parquet) boolean, read as written, not as Python's 'False': write the key 'false' in 'labels'" in said


def test_the_spec_refusal_of_a_yaml_boolean_key_names_the_key_a_json_boolean_needs():
    with pytest.raises(SpecError, match=r"quote it as written \('yes'\) or 'true' for a JSON true in the column"):
        _spec({True: "positive", "n": "negative"})


@pytest.mark.parametrize("value, key, hint", [
    ("Pos", "pos", "'Pos' differs from 'pos' only by case (values match as written)"),
    ("pos ", "pos", "'pos ' differs from 'pos' only by spaces around it (values match as written)"),
    (" POS", "pos", "' POS' differs from 'pos' only by case, spaces or Unicode form"),
    # shown alike, so the refusal shows the code points: the value was refused with the key printed as its own fix
    ("caf\u00e9", "cafe\u0301", "'caf\\xe9' in the data, 'cafe\\u0301' in 'labels'): save both in one form (NFC)"),
    (1.0, "1", "'1.0' is the number 1 written otherwise"),
])
def test_a_value_that_misses_a_key_by_case_spaces_unicode_form_or_number_form_is_told_so(tmp_path, monkeypatch, value, key, hint):
    """Values match keys exactly, as written (a case or space difference may be a class of its own); the refusal says
    what the near miss is, since 'café' not in labels 'café' reads as a contradiction."""
    monkeypatch.chdir(tmp_path)
    _rows(tmp_path / "t.jsonl", [{"a": "x", "label": value}, {"a": "y", "label": "neg"}])
    with pytest.raises(DataError) as err:
        load_task_data(_spec({key: "yes", "neg": "no"}))
    assert "not in labels (first at line 1)" in str(err.value) and hint in str(err.value), str(err.value)


def test_an_empty_csv_label_is_a_missing_label(tmp_path, monkeypatch):
    """As an empty csv target is: it was "label value(s) '' not in labels", as if '' were a value someone wrote."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.csv").write_text("a,label\nx,\ny,0\n")
    with pytest.raises(DataError, match=r"has no 'label' value in 1 row\(s\) \(line 2\); an empty csv/tsv field reads as missing"):
        load_task_data(_spec({"1": "yes", "0": "no"}, "t.csv"))


@pytest.mark.parametrize("labels, needle", [
    (["a", "a"], "labels[0] and labels[1] are one word 'a', so no prediction can tell those classes apart"),
    ({"p": "xy", "n": "xy", "m": "z"}, "labels['p'] and labels['n'] are one word 'xy'"),
    ({"p": "caf\u00e9", "n": "cafe\u0301"}, "are one word 'café' in two Unicode forms ('caf\\xe9', 'cafe\\u0301'), so a prediction of either prints alike"),
])
def test_two_classes_of_one_word_are_refused_at_the_spec(labels, needle):
    """The first class always wins their tie, so the other is never predicted, and per_class (keyed by word) kept one of
    them. `train` refused such labels only once tokenized; train-multi trained them."""
    with pytest.raises(SpecError) as err:
        _spec(labels)
    assert needle in str(err.value), str(err.value)


def test_train_multi_refuses_two_classes_of_one_word(capsys, cls_task):
    spec = yaml.safe_load((cls_task / "toy.yaml").read_text())
    (cls_task / "dup.yaml").write_text(yaml.safe_dump({**spec, "name": "dup", "labels": {"pos": "x", "neg": "x"}}, sort_keys=False))
    code = main(["train-multi", "toy.yaml", "dup.yaml", "--output", "mt"])
    err = capsys.readouterr().err
    assert code == 2 and "labels['pos'] and labels['neg'] are one word 'x'" in err and not (cls_task / "mt").exists(), err


def test_labels_that_tokenize_alike_are_refused_by_the_check_every_command_runs():
    """check_lengths (train, train-multi, compose-fit, eval, predict) refuses them; only train did. Words that begin with
    one token are fine: each label is scored on all its tokens."""
    class Lower:  # a tokenizer that normalizes case, as some do
        def __call__(self, text, add_special_tokens=False):
            return type("Enc", (), {"input_ids": [ord(c) for c in text.lower()]})()

    with pytest.raises(DataError, match=r"labels 'Yes' and 'yes' of 't' tokenize to identical sequences \[32, 121, 101, 115\]"):
        check_label_tokens(_spec(["Yes", "yes"]), Lower())
    check_label_tokens(_spec(["neg", "negative"]), Lower())  # one a prefix of the other: told apart


def test_a_dev_split_without_a_class_is_said_once_and_scored_as_sklearn_scores_it(capsys, cls_task):
    """macro_f1 counted a class of no dev row and no prediction as F1 0 (a perfect run on a dev set without one of two
    classes scored 0.5); it is now sklearn's f1_score(average="macro") of the predictions `predict` gives, and per_class
    shows the absent class unmeasured (null). train and eval each say the class is absent, once."""
    _rows(cls_task / "dev_pos.jsonl", [{"text": f"aaaa {i}", "label": "pos"} for i in range(8)])
    code = main(["train", "toy.yaml", "data.dev=dev_pos.jsonl", "train.max_steps=2", "metric=[macro_f1, accuracy]", "--output", "out", "--no-progress"])
    err = capsys.readouterr().err
    said = "the 8 rows of 'dev_pos.jsonl' hold no row of class(es) 'z' (column value 'neg') (1 of 2): macro_f1 averages the classes"
    assert code == 0 and err.count(said) == 1, err
    _rows(cls_task / "mixed.jsonl", [{"text": f"{'aaaa' if i % 3 else 'bbbb'} {i}", "label": "pos"} for i in range(9)])
    code = main(["eval", "out", "--split", "mixed.jsonl", "--json", "--no-progress"])
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert code == 0 and err.count("the 9 rows of 'mixed.jsonl' hold no row of class(es) 'z'") == 1, err
    code = main(["predict", "out", "--input", "mixed.jsonl"])
    preds = [json.loads(line)["prediction"] for line in capsys.readouterr().out.splitlines()]
    gold = ["x"] * 9
    assert code == 0 and len(preds) == 9
    assert result["accuracy"] == round(accuracy_score(gold, preds), 4)
    assert result["macro_f1"] == round(f1_score(gold, preds, average="macro"), 4)
    report = classification_report(gold, preds, output_dict=True, zero_division=0)
    for word in ("x", "z"):
        if word in report:
            assert result["per_class"][word]["f1"] == round(report[word]["f1-score"], 4)
        else:  # never predicted and no row of it: nothing measured
            assert result["per_class"][word] == {"precision": None, "recall": None, "f1": None, "support": 0}
    sidecar = json.loads((cls_task / "out" / "adapterhub.json").read_text())["metrics"]
    assert sidecar["per_class"]["z"]["support"] == 0 and isinstance(sidecar["macro_f1"], float)
    # rows labelled otherwise than the adapter's labels: eval cannot 'add the value(s) to labels' (what it said) of a trained adapter
    _rows(cls_task / "words.jsonl", [{"text": "aaaa 1", "label": "x"}, {"text": "bbbb 1", "label": "neutral"}])
    code = main(["eval", "out", "--split", "words.jsonl"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "has label value(s) 'neutral', 'x' not in labels (first at line 2, 1)" in err and "add the value" not in err
    assert "adapter 'out' was trained on these labels alone; 'x' is the word of labels['pos']: the column holds a mapping's keys ('pos')" in err


def test_absent_classes_counts_the_rows_scored(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _rows(tmp_path / "t.jsonl", [{"a": "x", "label": "p"}, {"a": "y", "label": "p"}, {"a": "z", "label": "n"}])
    split = load_task_data(_spec(["p", "n"]), ("dev",))["dev"]
    assert absent_classes(_spec(["p", "n"]), split) is None
    assert "the first 2 rows of 't.jsonl' hold no row of class(es) 'n' (1 of 2)" in absent_classes(_spec(["p", "n"]), split, limit=2)

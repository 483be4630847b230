"""Label words, label keys and prompt fields are read as the user typed them. Labels: YAML's unquoted yes/no/on/off/true/false (booleans) and null are
refused at the spec, naming the word and saying to quote it; they made `labels: [no, yes]` the words False and True,
and training then stopped with a TypeError traceback (" " + False) instead of one line."""

import pytest

from adapterhub_lite.core.errors import SpecError
from adapterhub_lite.core.spec import load_spec

SPEC = "name: t\ntype: classification\ndata: {{train: a.csv, dev: a.csv}}\nprompt: '{{a}} ->'\nlabel: label\nlabels: {labels}\n"


@pytest.mark.parametrize("labels, needle", [
    ("[no, yes]", "labels[0]=False is the boolean False (YAML reads an unquoted yes, no, on, off, true or false so); quote it as written ('no')"),
    ("{0: off, 1: on}", "labels[1]=True is the boolean True"),
    ("{yes: positive, no: negative}", "the key True of 'labels' is the boolean True (YAML reads an unquoted yes, no, on, off, true or false so); quote it as written ('yes') or 'true' for a JSON true in the column"),
    ("[~, x]", "labels[0]=None is null"),
    ("[1, 2]", "labels[0]=1 is the number 1, not a word; quote it ('1')"),
    # a list was called "the number ['x']"; an empty word scored the bare space; ' pos' was answered as two spaces and pos
    ("[[x], y]", "labels[0]=['x'] is a list, not a word; give each class one word"),
    ("[pos, '']", "labels[1]='' is empty; give each class a word"),
    ("{a: ' pos', b: neg}", "labels['a']=' pos' has spaces around it (the word follows the prompt after one space); write 'pos'"),
    # the column is read as text, so 0 and '0' key one value: a row '0' was refused as "both" only if the data held one
    ("{0: neg, '0': pos}", "the keys 0 and '0' of 'labels' both mean the column value '0'; keep one"),
])
def test_yaml_booleans_nulls_and_numbers_are_not_label_words(tmp_path, labels, needle):
    (tmp_path / "t.yaml").write_text(SPEC.format(labels=labels))
    with pytest.raises(SpecError) as err:
        load_spec(tmp_path / "t.yaml")
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("labels, words", [
    ("['no', 'yes']", ["no", "yes"]),
    ("{0: negative, 1: positive}", {0: "negative", 1: "positive"}),  # whole-number keys stay: the column's 0 / 1
    ("{0: 'true', 1: 'false'}", {0: "true", 1: "false"}),  # rte.yaml
    ("['1', '2']", ["1", "2"]),
])
def test_quoted_words_and_whole_number_keys_are_accepted(tmp_path, labels, words):
    (tmp_path / "t.yaml").write_text(SPEC.format(labels=labels))
    assert load_spec(tmp_path / "t.yaml").labels == words


def test_a_column_name_with_a_space_or_hyphen_is_a_prompt_field(tmp_path, monkeypatch):
    """str.format fills `{review text}` and `{sentence-1}` from those columns; the spec refused them as 'not a column
    name', so a csv with such a header could not be used. Positional, attribute and item fields stay refused."""
    from adapterhub_lite.core.data import load_task_data
    from adapterhub_lite.core.spec import prompt_problems, spec_from_dict

    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.csv").write_text("review text,sentence-1,label\ngreat,ok,pos\n")
    spec = spec_from_dict({"name": "r", "type": "classification", "data": {"train": "r.csv", "dev": "r.csv"},
                           "prompt": "Review: {review text} / {sentence-1}\nSentiment:", "label": "label", "labels": ["neg", "pos"]})
    assert load_task_data(spec, ("train",))["train"].prompts == ["Review: great / ok\nSentiment:"]
    for field in ("{0}", "{a.b}", "{a[0]}", "{}"):
        assert prompt_problems(f"x {field}") == [f"prompt field {field} is not a column name; use {{column}} placeholders (literal braces: {{{{ and }}}})"]

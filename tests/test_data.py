"""Data loading keeps values exactly as written and checks them against the spec."""

import json

import pytest

from adapterhub_lite.data import load_split, load_task_data
from adapterhub_lite.errors import DataError
from adapterhub_lite.spec import spec_from_dict


def test_values_are_not_reinterpreted(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "3rd of March", "target": "2021-03-03"}) + "\n")
    (tmp_path / "d.csv").write_text("code,label\n007,yes\n1.50,no\n")
    (tmp_path / "d.tsv").write_text('label\tsentence\n1\tit \'s "quoted" , fine\n')
    assert load_split(str(tmp_path / "d.jsonl"))[0][0]["target"] == "2021-03-03"  # not a timestamp
    assert load_split(str(tmp_path / "d.csv"))[0]["code"] == ["007", "1.50"]  # not 7 and 1.5
    assert load_split(str(tmp_path / "d.tsv"))[0][0]["sentence"] == 'it \'s "quoted" , fine'


def test_rows_render_through_the_prompt_and_labels_map_to_indices(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.csv").write_text("a,b,label\nx,y,1\nz,w,0\n")
    spec = spec_from_dict({"name": "t", "type": "classification", "data": {"train": "t.csv", "dev": "t.csv"},
                           "prompt": "{a} / {b} ->", "label": "label", "labels": ["no", "yes"]})
    split = load_task_data(spec)["train"]
    assert split.prompts == ["x / y ->", "z / w ->"] and split.answers == [1, 0] and len(split.sha256) == 64


def test_a_broken_jsonl_line_is_named(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(DataError, match=r"b.jsonl:2 is not valid JSON"):
        load_split(str(tmp_path / "b.jsonl"))

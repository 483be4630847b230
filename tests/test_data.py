"""Data loading keeps values exactly as written and checks them against the spec."""

import json

import pytest

from adapterhub_lite.core.data import load_split, load_task_data, to_split
from adapterhub_lite.core.errors import DataError
from adapterhub_lite.core.spec import spec_from_dict


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


def _cls_spec(labels, data="t.csv", **train):
    return spec_from_dict({"name": "t", "type": "classification", "data": {"train": data, "dev": data},
                           "prompt": "{a} ->", "label": "label", "labels": labels, "train": train})


def test_digit_label_words_never_shift_classes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.csv").write_text("a,label\nx,1\ny,2\nz,3\n")
    with pytest.raises(DataError) as err:  # "1" is the word of class 0 and the index of class 1
        load_task_data(_cls_spec(["1", "2", "3"]))
    msg = str(err.value)
    assert "'1', which is both the label word of class 0 and the index of class 1 ('2')" in msg and "mapping" in msg
    assert load_task_data(_cls_spec({"1": "1", "2": "2", "3": "3"}))["train"].answers == [0, 1, 2]
    (tmp_path / "t.csv").write_text("a,label\nx,no\ny,1\nz,0\n")  # words and indices still both work when unambiguous
    assert load_task_data(_cls_spec(["no", "yes"]))["train"].answers == [0, 1, 0]


@pytest.mark.parametrize("name, text", [
    ("d.csv", "a,label\nx,no\n"), ("d.tsv", "a\tlabel\nx\tno\n"),
    ("d.jsonl", '{"a": "x", "label": "no"}\n'), ("d.json", '[{"a": "x", "label": "no"}]'),
])
def test_a_utf8_byte_order_mark_is_accepted_in_every_format(tmp_path, monkeypatch, name, text):
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
    split = load_task_data(_cls_spec(["no", "yes"], data=name))["train"]
    assert split.prompts == ["x ->"] and split.answers == [0]


@pytest.mark.parametrize("name, data, needle", [
    ("r.tsv", b"a\tlabel\nx\tno\ny\tno\textra\n", "r.tsv:3 has 3 fields but the header has 2 (tab-separated)"),
    ("h.csv", b"a,label\n", "h.csv has a header (a, label) but no rows"),
    ("i.csv", b",a,label\n0,x,no\n", "i.csv:1: the header has an empty column name; give every column a distinct name (pandas' to_csv"),
    ("d.csv", b"a,label,a\nx,no,y\n", "d.csv:1: the header repeats column(s) 'a'; give every column a distinct name"),  # not the last 'a' silently
    ("b.jsonl", b'{"a": "x", "label": "no"}\n{"a": "caf\xe9", "label": "no"}\n', "b.jsonl:2 is not UTF-8 (byte 0xe9"),
    ("b.csv", b"a,label\nx,no\ncaf\xe9,no\n", "b.csv:3 is not UTF-8"),
    ("l.jsonl", b'{"a": "x", "label": "no"}\n[1, 2]\n', "l.jsonl:2 is a JSON list, not an object"),
])
def test_bad_data_files_name_the_line_and_what_is_wrong(tmp_path, name, data, needle):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(DataError) as err:
        load_split(str(tmp_path / name))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_max_length_must_fit_the_longest_label_or_target(tmp_path, monkeypatch):
    from adapterhub_lite.core.data_checks import check_lengths
    from adapterhub_lite.model.weights import _tiny_tokenizer

    tok = _tiny_tokenizer()  # byte-level: " maybe" is 6 tokens
    with pytest.raises(DataError, match=r"longest label 'maybe' \(6 tokens\); use train.max_length ≥ 7"):
        check_lengths(_cls_spec(["no", "maybe"], max_length=6), tok)
    check_lengths(_cls_spec(["no", "maybe"], max_length=7), tok)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "g.jsonl").write_text('{"a": "x", "t": "abc"}\n{"a": "y", "t": "abcdefgh"}\n')
    gen = spec_from_dict({"name": "g", "type": "generation", "data": {"train": "g.jsonl", "dev": "g.jsonl"}, "prompt": "{a} ->",
                          "target": "t", "train": {"max_length": 10, "max_new_tokens": 4}})
    with pytest.raises(DataError, match=r"row 2 of 'g.jsonl': 9 tokens \+ EOS\); use train.max_length ≥ 11"):
        check_lengths(gen, tok, load_task_data(gen))


def test_a_generation_row_without_its_target_is_refused_not_trained_as_empty(tmp_path, monkeypatch):
    """A missing or null target used to become "" (the adapter then learns to stop at once), silently."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "g.jsonl").write_text('{"a": "x", "t": "abc"}\n{"a": "y"}\n{"a": "z", "t": null}\n{"a": "w", "t": ""}\n')
    gen = spec_from_dict({"name": "g", "type": "generation", "data": {"train": "g.jsonl", "dev": "g.jsonl"}, "prompt": "{a} ->", "target": "t"})
    with pytest.raises(DataError, match=r"split 'g.jsonl' has no 't' value in 2 row\(s\) \(line 2, 3\); give every row its target"):
        load_task_data(gen)
    (tmp_path / "g.jsonl").write_text('{"a": "x", "t": "abc"}\n{"a": "w", "t": ""}\n')  # an empty string is a value: kept as written
    assert load_task_data(gen)["train"].answers == ["abc", ""]


def test_a_null_prompt_column_in_a_request_is_refused():
    from adapterhub_lite.core.data import request_row

    spec = _cls_spec(["no", "yes"])
    assert request_row(spec, {"text": "hi"})["a"] == "hi"
    for row in ({"text": None}, {"a": None}):
        with pytest.raises(DataError, match="has null for 'a'"):
            request_row(spec, row)
    for row in ({"text": ["x", "y"]}, {"a": {"b": 1}}):  # predict --input rendered "['x', 'y']"; training refuses these too
        with pytest.raises(DataError, match="has a JSON object or list for 'a'"):
            request_row(spec, row)
    for row in ({"text": ""}, {"a": "  "}):  # the bare template, as training refuses such a row (30e291e)
        with pytest.raises(DataError, match="has an empty 'a'"):
            request_row(spec, row)


def test_a_split_is_tokenized_in_chunks_to_the_same_ids():
    """Issue 22: one tokenizer call over a whole split held every row's encoding at once; chunks give the same ids."""
    from adapterhub_lite.core.data import _token_ids
    from adapterhub_lite.model.backbone import load_backbone

    tok = load_backbone("tiny-random-llama", "none", dtype="fp32").tokenizer
    texts = [f"row {i}: " + "word " * (i % 4) for i in range(10)]
    assert _token_ids(tok, texts, True, chunk=3) == tok(texts, add_special_tokens=True).input_ids
    assert _token_ids(tok, texts, False, chunk=4) == tok(texts, add_special_tokens=False).input_ids


def test_a_tsv_reads_quoted_fields_as_pandas_and_datasets_do(tmp_path):
    """RTE's train.tsv quotes 504 fields csv-style ("… ""Little Red Book"" …"); read without quoting they were trained
    on with the outer quotes kept and every inner quote doubled, silently."""
    import pandas as pd

    text = 'sentence1\tsentence2\tlabel\n"Lin Piao wrote the ""Little Red Book""."\tA plain one.\t0\n"a\ttab"\tit \'s "fine"\t1\n'
    (tmp_path / "q.tsv").write_text(text)
    ours = load_split(str(tmp_path / "q.tsv"))[0]
    theirs = pd.read_csv(tmp_path / "q.tsv", sep="\t", dtype=str)
    assert ours["sentence1"] == list(theirs["sentence1"]) == ['Lin Piao wrote the "Little Red Book".', "a\ttab"]
    assert ours["sentence2"] == list(theirs["sentence2"])


def test_a_field_that_opens_a_quote_and_runs_on_is_refused_not_unquoted(tmp_path):
    """'"Hi," she said.' is not a quoted field: pandas would read 'Hi, she said.'; it is refused, naming the line."""
    (tmp_path / "g.tsv").write_text('sentence\tlabel\nfine\t0\n"Hi," she said.\t1\n')
    with pytest.raises(DataError) as err:
        load_split(str(tmp_path / "g.tsv"))
    msg = str(err.value)
    assert "g.tsv:3 cannot be read as tab-separated values" in msg and '"""Hi,"" she said."' in msg and "\t" not in msg


def test_a_missing_prompt_value_or_label_is_refused_not_rendered_as_empty(tmp_path, monkeypatch):
    """A row without a prompt column (or with null) was rendered with '' in its place, and a null label was compared
    as the text 'None' (class 0 of labels ["None", "Some"]), silently; pandas and datasets read both as missing."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.jsonl").write_text('{"a": "x", "label": "no"}\n{"label": "yes"}\n{"a": null, "label": "no"}\n')
    with pytest.raises(DataError, match=r"split 't.jsonl' has no 'a' value in 2 row\(s\) \(line 2, 3\); give every row a value"):
        load_task_data(_cls_spec(["no", "yes"], data="t.jsonl"))
    (tmp_path / "t.jsonl").write_text('{"a": "x", "label": "Some"}\n{"a": "y", "label": null}\n')
    with pytest.raises(DataError, match=r"has no 'label' value in 1 row\(s\) \(line 2\); give every row its label"):
        load_task_data(_cls_spec(["None", "Some"], data="t.jsonl"))


def test_parquet_nulls_and_nans_are_missing_values_as_pandas_wrote_them(tmp_path, monkeypatch):
    import pandas as pd

    monkeypatch.chdir(tmp_path)
    pd.DataFrame({"a": ["x", None, "z"], "label": pd.array([0, 1, None], dtype="Int64")}).to_parquet(tmp_path / "n.parquet")
    with pytest.raises(DataError, match=r"no 'a' value in 1 row\(s\) \(row 2\)"):
        load_task_data(_cls_spec(["no", "yes"], data="n.parquet"))
    pd.DataFrame({"a": [1.5, float("nan")], "label": [0, 1]}).to_parquet(tmp_path / "f.parquet")  # NaN: pandas' missing float
    with pytest.raises(DataError, match=r"no 'a' value in 1 row\(s\) \(row 2\)"):
        load_task_data(_cls_spec(["no", "yes"], data="f.parquet"))
    pd.DataFrame({"a": ["x", "y"], "label": pd.array([0, None], dtype="Int64")}).to_parquet(tmp_path / "l.parquet")
    with pytest.raises(DataError, match=r"no 'label' value in 1 row\(s\) \(row 2\)"):
        load_task_data(_cls_spec(["no", "yes"], data="l.parquet"))


@pytest.mark.parametrize("rows, column", [
    ('{"a": {"b": 1}, "t": "ok"}\n{"a": {"c": 2}, "t": "ok"}\n', "a"),  # was "{'b': 1, 'c': None}": Python's repr, keys added
    ('{"a": "x", "t": {"name": "Ada", "age": 36}}\n', "t"),  # a JSON target trained as "{'name': 'Ada', ...}", not JSON
    ('{"a": ["x", "y"], "t": "ok"}\n', "a"),
])
def test_a_json_object_or_list_where_text_is_read_is_refused(tmp_path, monkeypatch, rows, column):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "g.jsonl").write_text(rows)
    gen = spec_from_dict({"name": "g", "type": "generation", "data": {"train": "g.jsonl", "dev": "g.jsonl"}, "prompt": "{a} ->", "target": "t"})
    with pytest.raises(DataError, match=rf"split 'g.jsonl' column '{column}' holds JSON objects or lists .*write each value as a string"):
        load_task_data(gen)


def test_json_values_are_read_as_json_reads_them_not_as_arrow_unifies_them(tmp_path, monkeypatch):
    """Arrow made a target 7 beside 7.5 "7.0", could not load a label column holding 0 and "yes" (json and pandas read
    both), and took the columns from the first row only: a key missing there was 'no column', though row 2 has it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "g.jsonl").write_text('{"a": 1, "t": 7}\n{"a": 2.5, "t": 7.5}\n{"a": true, "t": "7"}\n')
    gen = spec_from_dict({"name": "g", "type": "generation", "data": {"train": "g.jsonl", "dev": "g.jsonl"}, "prompt": "{a} ->", "target": "t"})
    split = load_task_data(gen)["train"]
    rows = [json.loads(line) for line in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert split.answers == [str(r["t"]) for r in rows] == ["7", "7.5", "7"]
    assert split.prompts == ["1 ->", "2.5 ->", "true ->"]  # a JSON true as written (str() of the bool gave Python's 'True')
    (tmp_path / "t.jsonl").write_text('{"a": "x", "label": 0}\n{"a": "y", "label": "yes"}\n')
    assert load_task_data(_cls_spec(["no", "yes"], data="t.jsonl"))["train"].answers == [0, 1]
    (tmp_path / "t.jsonl").write_text('{"label": "no"}\n{"a": "y", "label": "yes"}\n')
    with pytest.raises(DataError, match=r"has no 'a' value in 1 row\(s\) \(line 1\)"):
        load_task_data(_cls_spec(["no", "yes"], data="t.jsonl"))


def test_jsonl_lines_end_at_newlines_only_and_nan_is_not_json(tmp_path):
    """str.splitlines broke a row at a U+2028 inside a string (valid JSON, read by json and pandas) and refused it; and
    Python's json took NaN / 1e400, which other readers refuse, so a target became the text 'nan' or 'inf'."""
    row = {"a": "one\u2028two\x85three", "label": "no"}
    (tmp_path / "u.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\r\n" + json.dumps(row) + "\n")
    assert load_split(str(tmp_path / "u.jsonl"))[0]["a"] == [row["a"], row["a"]]
    for bad, why in (('{"a": "x", "t": NaN}', "NaN is not JSON; write null or a string"), ('{"a": "x", "t": 1e400}', "1e400 is out of")):
        (tmp_path / "n.jsonl").write_text('{"a": "y", "t": "ok"}\n' + bad + "\n")
        with pytest.raises(DataError, match=rf"n.jsonl:2 is not valid JSON \({why}"):
            load_split(str(tmp_path / "n.jsonl"))
        (tmp_path / "n.json").write_text(f"[{bad}]")
        with pytest.raises(DataError, match=rf"n.json is not valid JSON \({why}"):
            load_split(str(tmp_path / "n.json"))


def test_an_empty_csv_target_is_missing_as_pandas_reads_it_not_trained_as_empty(tmp_path, monkeypatch):
    """pandas and datasets read an empty csv/tsv field as missing; it was trained as an empty answer (the adapter learns
    to stop at once for that prompt), silently. JSON's "" stays a value (test above)."""
    import pandas as pd

    monkeypatch.chdir(tmp_path)
    for name, text in (("g.csv", 'a,t\nx,abc\ny,\nz,""\n'), ("g.tsv", "a\tt\nx\tabc\ny\t\nz\t\n")):
        (tmp_path / name).write_text(text)
        assert pd.read_csv(name, sep="\t" if name.endswith(".tsv") else ",")["t"].isna().sum() == 2
        gen = spec_from_dict({"name": "g", "type": "generation", "data": {"train": name, "dev": name}, "prompt": "{a} ->", "target": "t"})
        with pytest.raises(DataError, match=rf"split '{name}' has no 't' value in 2 row\(s\) \(line 3, 4\); an empty csv/tsv field reads as missing"):
            load_task_data(gen)
        # Rows named other than by their file (compose-fit's shots: "g.csv (2 shots, seed 0)") are read by the file's type.
        ds, sha = load_split(name)
        with pytest.raises(DataError, match=r"has no 't' value in 2 row\(s\)"):
            to_split(gen, ds, f"{name} (3 shots, seed 0)", sha, file=name)
    (tmp_path / "g.jsonl").write_text('{"a": "x", "t": ""}\n')
    jsonl = spec_from_dict({"name": "g", "type": "generation", "data": {"train": "g.jsonl", "dev": "g.jsonl"}, "prompt": "{a} ->", "target": "t"})
    assert to_split(jsonl, load_split("g.jsonl")[0], "g.csv-like (1 shot)", "x", file="g.jsonl").answers == [""]


def test_a_classlabel_column_is_read_by_its_class_names(tmp_path, monkeypatch):
    """A parquet file datasets wrote (or an hf: split) holds class indices whose names datasets shows: labels listed in
    another order trained every 'negative' row as 'positive', silently; a mapping keyed by the names was refused."""
    import datasets

    monkeypatch.chdir(tmp_path)
    features = datasets.Features({"a": datasets.Value("string"), "label": datasets.ClassLabel(names=["negative", "positive"])})
    datasets.Dataset.from_dict({"a": ["bad", "good", "fine"], "label": [0, 1, 1]}, features=features).to_parquet("c.parquet")
    shown = load_split("c.parquet")[0]
    assert [shown.features["label"].int2str(v) for v in shown["label"]] == ["negative", "positive", "positive"]
    with pytest.raises(DataError, match=r"ClassLabel with 'positive' at index 1 \(classes: negative, positive\), but 'labels' puts it at 0"):
        load_task_data(_cls_spec(["positive", "negative"], data="c.parquet"))
    assert load_task_data(_cls_spec({"positive": "good", "negative": "bad"}, data="c.parquet"))["train"].answers == [1, 0, 0]
    assert load_task_data(_cls_spec(["bad", "good"], data="c.parquet"))["train"].answers == [0, 1, 1]  # free words: by index
    datasets.Dataset.from_dict({"a": ["x", "y"], "label": [0, -1]}, features=features).to_parquet("t.parquet")
    with pytest.raises(DataError, match=r"no 'label' value in 1 row\(s\) \(row 2\); a ClassLabel of -1 is no label"):
        load_task_data(_cls_spec(["negative", "positive"], data="t.parquet"))


def test_a_header_name_with_spaces_around_it_is_shown_and_named(tmp_path, monkeypatch):
    """'a, label' has the column ' label' (pandas and datasets read it so); the refusal listed it bare ('a,  label')."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.csv").write_text("a, label\nx,no\n")
    with pytest.raises(DataError, match=r"has no column 'label' \(columns: 'a', ' label'\); .*the header has ' label': remove the spaces"):
        load_task_data(_cls_spec(["no", "yes"]))


def test_a_line_of_spaces_is_skipped_as_pandas_skips_it(tmp_path):
    """pandas and datasets skip a line of spaces as blank; it was refused as 'has 1 fields but the header has 2'."""
    import pandas as pd

    (tmp_path / "w.csv").write_text("a,label\nx,no\n   \ny,yes\n")
    assert load_split(str(tmp_path / "w.csv"))[0].to_dict() == pd.read_csv(tmp_path / "w.csv", dtype=str).to_dict("list")


@pytest.mark.parametrize("text", ['{"a": ["x", "y"], "label": ["no", "yes"]}', '{\n  "a": "x",\n  "label": "no"\n}\n'])
def test_a_json_file_holding_one_object_is_refused_not_read_as_rows(tmp_path, text):
    """pandas reads {"a": [...], "label": [...]} as two rows, datasets as one row of lists (which trained on "['x', 'y']");
    an object over several lines was refused as 'line 1 is not valid JSON'. Either is refused, saying what to write."""
    (tmp_path / "o.json").write_text(text)
    with pytest.raises(DataError, match=r"o.json is one JSON object \(keys: 'a', 'label'\), not rows; write an array of row objects"):
        load_split(str(tmp_path / "o.json"))


def test_a_field_over_128_kib_is_read_as_pandas_reads_it(tmp_path):
    """The csv module's default field limit (131072 characters) refused a long document, which pandas reads, with a hint
    about quoting that did not apply."""
    (tmp_path / "l.csv").write_text('a,label\n"' + "word " * 40000 + '",no\n')
    assert load_split(str(tmp_path / "l.csv"))[0]["a"] == ["word " * 40000]


def test_a_json_metadata_column_of_mixed_objects_does_not_block_the_split(tmp_path, monkeypatch):
    """pandas reads a 'meta' column holding {"a": 1}, {"a": "s"}, [1] and "x"; arrow could not, so the whole file was
    refused ('cannot parse … as jsonl') though the prompt never reads it. Read where text is, it is still refused."""
    monkeypatch.chdir(tmp_path)
    metas = ['{"a": 1}', '{"a": "s"}', "[1]", '"x"', "null"]
    (tmp_path / "m.jsonl").write_text("".join(f'{{"text": "r{i}", "t": "y", "meta": {m}}}\n' for i, m in enumerate(metas)))
    spec = {"name": "g", "type": "generation", "data": {"train": "m.jsonl", "dev": "m.jsonl"}, "prompt": "{text}", "target": "t"}
    assert load_task_data(spec_from_dict(spec))["train"].prompts == ["r0", "r1", "r2", "r3", "r4"]
    with pytest.raises(DataError, match=r"column 'meta' holds JSON objects or lists \(e.g. \{\"a\": 1\}\), not text"):
        load_task_data(spec_from_dict({**spec, "prompt": "{meta}"}))


def test_a_parquet_list_of_dates_where_text_is_read_is_one_line(tmp_path, monkeypatch):
    """The refusal showed its example through json.dumps, which raised a TypeError traceback on a date inside a list."""
    import datetime

    import pandas as pd

    monkeypatch.chdir(tmp_path)
    pd.DataFrame({"a": [[datetime.date(2021, 3, 3)]], "t": ["x"]}).to_parquet("d.parquet")
    gen = spec_from_dict({"name": "g", "type": "generation", "data": {"train": "d.parquet", "dev": "d.parquet"}, "prompt": "{a}", "target": "t"})
    with pytest.raises(DataError, match=r"column 'a' holds JSON objects or lists \(e.g. \[\"2021-03-03\"\]\), not text"):
        load_task_data(gen)


def test_prompt_ids_never_hands_the_tokenizer_more_than_a_chunk():
    """Issue 22: resolve() and training tokenized the whole train split in one call (236 MB more at the peak for SST-2 on
    SmolLM2's tokenizer, 613 MB on the tiny one): Split.prompt_ids and answer_ids call the tokenizer a chunk at a time."""
    from adapterhub_lite.core.data import Split
    from adapterhub_lite.model.backbone import load_backbone

    real = load_backbone("tiny-random-llama", "none", dtype="fp32").tokenizer

    class Counting:
        name_or_path, calls = real.name_or_path, []

        def __len__(self):
            return len(real)

        def __call__(self, texts, **kw):
            self.calls.append(len(texts))
            return real(texts, **kw)

    tok = Counting()
    split = Split([f"p {i}" for i in range(2500)], [f"a {i}" for i in range(2500)], "x.jsonl", "0")
    assert split.prompt_ids(tok) == real(split.prompts, add_special_tokens=True).input_ids
    assert split.answer_ids(tok) == real([" " + a for a in split.answers], add_special_tokens=False).input_ids
    assert len(tok.calls) > 2 and max(tok.calls) <= 1024 and sum(tok.calls) == 5000


def test_each_prompt_column_is_rendered_stripped_of_whitespace_at_its_ends(tmp_path, monkeypatch):
    """The README's rendering rule (what a client sending `prompt` itself reproduces): a value's leading and trailing
    spaces and newlines are not part of the prompt; inner ones are kept."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t.jsonl").write_text(json.dumps({"a": "  two  words \n", "label": "yes"}) + "\n")
    assert load_task_data(_cls_spec(["no", "yes"], data="t.jsonl"))["train"].prompts == ["two  words ->"]


def test_a_parquet_nan_written_as_nan_is_a_missing_value(tmp_path, monkeypatch):
    """pyarrow (and polars) keep a float NaN a NaN in parquet, where pandas writes it as null: either is a missing value,
    refused naming the row, not rendered as the text 'nan'."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.chdir(tmp_path)
    pq.write_table(pa.table({"a": pa.array([1.5, float("nan")]), "label": pa.array([0, 1])}), tmp_path / "f.parquet")
    with pytest.raises(DataError, match=r"no 'a' value in 1 row\(s\) \(row 2\)"):
        load_task_data(_cls_spec(["no", "yes"], data="f.parquet"))


def test_prompts_cut_to_max_length_are_counted_and_said(capsys, cls_task):
    """A prompt longer than train.max_length loses its start (heads.keep_end); training and eval did so without a word."""
    from adapterhub_lite.cli import main
    from adapterhub_lite.core.data_checks import cut_rows
    from adapterhub_lite.model.weights import _tiny_tokenizer

    tok = _tiny_tokenizer()
    (cls_task / "long.jsonl").write_text(json.dumps({"text": "aaaa " + "b" * 40, "label": "pos"}) + "\n" + json.dumps({"text": "aaaa", "label": "neg"}) + "\n")
    spec = spec_from_dict({"name": "t", "type": "classification", "data": {"train": "long.jsonl", "dev": "long.jsonl"},
                           "prompt": "T: {text}\nL:", "label": "label", "labels": {"pos": "x", "neg": "z"}, "train": {"max_length": 32}})
    split = load_task_data(spec, ("train",))["train"]
    need = len(tok("T: aaaa " + "b" * 40 + "\nL:").input_ids) + len(tok(" x", add_special_tokens=False).input_ids)
    said = cut_rows(spec, tok, split, training=True)
    assert said.startswith("warning: 1 of 2 rows of 'long.jsonl' (row 1) do not fit train.max_length=32") and f"train.max_length={need} keeps" in said
    assert cut_rows(spec_from_dict({**spec.to_dict(), "train": {"max_length": need}}), tok, split, training=True) is None
    assert main(["train", "toy.yaml", "train.max_steps=1", "train.max_length=12", "--output", "out", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning: 96 of 96 rows of 'train.jsonl'" in err and "warning: 16 of 16 rows of 'dev.jsonl'" in err
    assert main(["eval", "out", "--limit", "3", "--no-progress"]) == 0
    assert "warning: 3 of 3 rows of 'dev.jsonl'" in capsys.readouterr().err


def test_dev_rows_that_are_train_rows_are_said(capsys, cls_task):
    """Leakage: a dev row with a train row's prompt scores an input the adapter trained on; training said nothing."""
    from adapterhub_lite.cli import main
    from adapterhub_lite.core.data_checks import dev_overlap

    (cls_task / "d.jsonl").write_text("".join(json.dumps({"text": t, "label": "pos"}) + "\n" for t in ("new", "aaaa 1", "other", "bbbb 2")))
    spec = spec_from_dict({"name": "t", "type": "classification", "data": {"train": "train.jsonl", "dev": "d.jsonl"},
                           "prompt": "T: {text}\nL:", "label": "label", "labels": {"pos": "x", "neg": "z"}})
    data = load_task_data(spec)
    assert dev_overlap(data).startswith("warning: 2 of 4 rows of 'd.jsonl' (row 2, 4) have the same prompt as a row of 'train.jsonl'")
    assert dev_overlap({"train": data["train"], "dev": to_split(spec, load_split("d.jsonl")[0].select([0, 2]), "d.jsonl", "")}) is None
    assert main(["train", "toy.yaml", "train.max_steps=1", "--output", "out", "--no-progress"]) == 0  # its dev is train's first 16 rows
    assert "warning: 16 of 16 rows of 'dev.jsonl' (row 1, 2, 3, 4, 5, …) have the same prompt as a row of 'train.jsonl'" in capsys.readouterr().err


def test_a_row_whose_prompt_columns_are_all_empty_is_refused(tmp_path):
    """An empty or all-space text renders the bare template: the row trained on no input at all, without a word."""
    (tmp_path / "e.jsonl").write_text('{"text": "a", "label": "pos"}\n{"text": "  ", "label": "neg"}\n{"text": "", "label": "pos"}\n')
    (tmp_path / "e.csv").write_text("a,b,label\n,x,pos\n, ,neg\n")
    one = spec_from_dict({"name": "t", "type": "classification", "data": {"train": "x", "dev": "x"}, "prompt": "T: {text}\nL:",
                          "label": "label", "labels": ["neg", "pos"]})
    with pytest.raises(DataError, match=r"has an empty 'text' in 2 row\(s\) \(line 2, 3\), so its prompt holds no input"):
        to_split(one, load_split(str(tmp_path / "e.jsonl"))[0], "e.jsonl", "")
    two = spec_from_dict({**one.to_dict(), "prompt": "{a} / {b}:"})  # one empty column of two still leaves an input
    with pytest.raises(DataError, match=r"has every prompt column \('a', 'b'\) empty in 1 row\(s\) \(line 3\)"):
        to_split(two, load_split(str(tmp_path / "e.csv"))[0], "e.csv", "")


def test_json_numbers_are_read_as_written(tmp_path):
    """A JSON number became the text Python writes for it: a target typed 2.50 trained as '2.5', 1e3 as '1000.0'."""
    (tmp_path / "n.jsonl").write_text('{"text": 0.10, "target": 2.50}\n{"text": 7, "target": 1e3}\n{"text": "x", "target": -0.0}\n')
    gen = spec_from_dict({"name": "g", "type": "generation", "data": {"train": "x", "dev": "x"}, "prompt": "In: {text}\nOut:", "target": "target"})
    split = to_split(gen, load_split(str(tmp_path / "n.jsonl"))[0], "n.jsonl", "")
    assert split.answers == ["2.50", "1e3", "-0.0"] and split.prompts[:2] == ["In: 0.10\nOut:", "In: 7\nOut:"]


def test_a_compressed_file_is_named_as_such(tmp_path):
    """A gzip file read as text was 'not UTF-8 (byte 0x8b at offset 1)'; a .gz data file, only an unsupported type."""
    import gzip

    from adapterhub_lite.core.text import read_text

    (tmp_path / "in.jsonl").write_bytes(gzip.compress(b'{"text": "a"}\n'))
    with pytest.raises(DataError, match=r"in.jsonl is gzip-compressed, not text; decompress it first \(gunzip -k "):
        read_text(tmp_path / "in.jsonl")
    (tmp_path / "t.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n'))
    with pytest.raises(DataError, match=r"unsupported type '.gz'; use one of .* decompress it first"):
        load_split(str(tmp_path / "t.jsonl.gz"))


def test_a_bad_or_empty_parquet_file_is_one_line(capfd, cls_task):
    """Read through load_dataset, a parquet file of no rows was "An error occurred while generating the dataset", and a
    broken one came after the builder's own log line and progress bar on stderr: not one line."""
    import pandas as pd

    from adapterhub_lite.cli import main

    pd.DataFrame({"text": pd.Series([], dtype=str), "label": pd.Series([], dtype=str)}).to_parquet(cls_task / "none.parquet")
    (cls_task / "bad.parquet").write_bytes(b"text,label\naaaa,pos\n")
    for name, needle in (("none", "data.dev 'none.parquet' is empty (no rows)"), ("bad", "cannot parse 'bad.parquet' as parquet")):
        assert main(["train", "toy.yaml", f"data.dev={name}.parquet", "--output", "out", "--no-progress"]) == 2
        lines = capfd.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], lines
    pd.DataFrame({"text": ["aaaa"], "label": ["pos"]}, index=[7]).to_parquet(cls_task / "ok.parquet")  # pandas' index is no column
    assert load_split("ok.parquet")[0].column_names == ["text", "label"]


def test_a_refused_row_is_named_by_its_line_in_the_file(tmp_path):
    """Refusals named a row by its index (and a label not in `labels` by nothing): with a header, a blank line or a
    quoted newline before it, "row 3" is not line 3. Now the line of the file it starts on; a label by where it first is."""
    spec = spec_from_dict({"name": "t", "type": "classification", "data": {"train": "x", "dev": "x"}, "prompt": "T: {text}\nL:",
                           "label": "label", "labels": ["neg", "pos"]})
    (tmp_path / "q.csv").write_text('text,label\n"two\nlines",pos\n\nc,neg\nd, pos\ne,Pos\nf, pos\n')
    with pytest.raises(DataError, match=r"label value\(s\) ' pos', 'Pos' not in labels \(first at line 6, 7\); write"):
        to_split(spec, load_split(str(tmp_path / "q.csv"))[0], "q.csv", "")
    (tmp_path / "b.jsonl").write_text('{"text": "a", "label": "pos"}\n\n\n{"text": null, "label": "neg"}\n')
    with pytest.raises(DataError, match=r"has no 'text' value in 1 row\(s\) \(line 4\)"):
        to_split(spec, load_split(str(tmp_path / "b.jsonl"))[0], "b.jsonl", "")
    ds = load_split(str(tmp_path / "b.jsonl"))[0].select([1, 0])  # rows that are no longer the file's: said as rows
    with pytest.raises(DataError, match=r"has no 'text' value in 1 row\(s\) \(row 1\)"):
        to_split(spec, ds, "b.jsonl", "")


def test_rows_without_the_answer_column_point_at_predict(tmp_path):
    """`eval --split FILE` on a file of inputs alone was told only to "fix the prompt/label/target keys" of a spec it
    cannot change (the adapter's); scoring needs the answers, and predict runs rows without them."""
    (tmp_path / "in.jsonl").write_text('{"text": "ab"}\n')
    gen = spec_from_dict({"name": "g", "type": "generation", "data": {"train": "x", "dev": "x"}, "prompt": "In: {text}\nOut:", "target": "target"})
    with pytest.raises(DataError, match=r"has no column 'target' \(columns: 'text'\); fix the prompt/label/target keys or add the 'target' column "
                                        r"the rows are scored against \(`predict --input` runs rows without answers\)"):
        to_split(gen, load_split(str(tmp_path / "in.jsonl"))[0], "in.jsonl", "")


def test_a_json_row_giving_a_key_twice_is_refused(tmp_path):
    """json keeps the last of two equal keys without a word: {"text": "b", "text": "c"} trained on "c"."""
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": "pos"}\n\n{"text": "b", "label": "neg", "text": "c"}\n')
    with pytest.raises(DataError, match=r"d.jsonl:3 gives the key 'text' twice \(json keeps the last, silently\); keep one"):
        load_split(str(tmp_path / "d.jsonl"))
    (tmp_path / "d.json").write_text('[{"text": "a", "label": "pos", "label": "neg"}]')
    with pytest.raises(DataError, match=r"d.json: an object of the array gives the key 'label' twice \(json keeps the last, silently\); keep one$"):
        load_split(str(tmp_path / "d.json"))  # not "is not valid JSON (…); fix the file": it is valid, and the key is the fix


def test_a_file_separated_otherwise_than_its_suffix_says_is_named(tmp_path):
    """A ;-separated .csv (or a comma-separated .tsv) reads as one column; it was told to fix the spec's keys and, since the
    answer column was among the missing, to add it. A .csv of blank lines only was "has a header () but no rows"."""
    spec = spec_from_dict({"name": "t", "type": "classification", "data": {"train": "x", "dev": "x"}, "prompt": "T: {text}\nL:",
                           "label": "label", "labels": ["neg", "pos"]})
    (tmp_path / "s.csv").write_text("text;label\na;pos\n")
    with pytest.raises(DataError, match=r"\(columns: 'text;label'\); fix the prompt/label/target keys; the header reads as one column, so the "
                                        r"file is ';'-separated, but a .csv is read comma-separated: save it so, or name it .tsv if tabs"):
        to_split(spec, load_split(str(tmp_path / "s.csv"))[0], "s.csv", "")
    (tmp_path / "c.tsv").write_text("text,label\na,pos\n")
    with pytest.raises(DataError, match=r"so the file is ','-separated, but a .tsv is read tab-separated: save it so, or name it .csv"):
        to_split(spec, load_split(str(tmp_path / "c.tsv"))[0], "c.tsv", "")
    (tmp_path / "b.csv").write_bytes(b"\xef\xbb\xbf\r\n\r\n")
    with pytest.raises(DataError, match=r"b.csv holds blank lines only \(no header, no rows\)"):
        load_split(str(tmp_path / "b.csv"))

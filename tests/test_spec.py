import pytest
import yaml

from adapterhub_lite.core.errors import SpecError
from adapterhub_lite.core.spec import load_spec, parse_overrides, spec_from_dict

VALID = {
    "name": "t", "type": "classification", "data": {"train": "a.csv", "dev": "b.csv"},
    "prompt": "X: {x}\nY:", "label": "y", "labels": ["no", "yes"],
}


def test_overrides_parse_yaml_values_into_nested_keys():
    assert parse_overrides(["train.lr=0.5", "method=prefix", "train.max_steps=300"]) == {
        "train": {"lr": 0.5, "max_steps": 300}, "method": "prefix"}
    assert spec_from_dict(VALID, ["train.lr=1e-3"]).train.lr == 1e-3  # YAML reads 1e-3 as a string


def test_overrides_apply_on_top_of_the_file(tmp_path):
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(VALID))
    spec = load_spec(tmp_path / "t.yaml", ["method=prefix", "train.max_steps=7", "method_args.num_virtual_tokens=4"])
    assert (spec.method, spec.train.max_steps, spec.method_args) == ("prefix", 7, {"num_virtual_tokens": 4})
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({**VALID, "method_args": {"r": 4}}))
    assert load_spec(tmp_path / "t.yaml", ["method=ia3"]).method_args == {}  # LoRA's args do not leak into IA3
    assert load_spec(tmp_path / "t.yaml", ["method_args.lora_alpha=8"]).method_args == {"r": 4, "lora_alpha": 8}
    assert spec.train.lr == 1e-3 and spec.metric == ["accuracy"]  # defaults kept


def test_every_problem_is_listed_at_once_with_valid_choices():
    bad = {**VALID, "type": "regression", "method": "adapterfusion", "bogus": 1, "train": {"lr": "fast", "num_epochs": 3}}
    with pytest.raises(SpecError) as err:
        spec_from_dict(bad)
    msg = str(err.value)
    assert "\n" not in msg
    for needle in ("unknown key 'bogus'", "unknown key 'train.num_epochs'", "'train.lr' must be float",
                   "type='regression' is not one of classification, generation",
                   "method='adapterfusion' is not one of lora, prefix, prompt, ia3"):
        assert needle in msg, needle
    assert len(err.value.problems) == 5


def test_missing_required_keys_and_bad_metric():
    with pytest.raises(SpecError) as err:
        spec_from_dict({"name": "t", "type": "generation", "metric": "accuracy"})
    problems = " | ".join(err.value.problems)
    assert "'data.train' is required" in problems and "'prompt' is required" in problems
    assert "'target'" in problems and "metric 'accuracy' is not valid for generation" in problems


def test_bad_yaml_and_missing_file(tmp_path):
    (tmp_path / "b.yaml").write_text("name: [unclosed")
    with pytest.raises(SpecError, match="YAML does not parse"):
        load_spec(tmp_path / "b.yaml")
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "nope.yaml")


def test_malformed_override_is_refused():
    with pytest.raises(SpecError, match="dotted.key=value"):
        spec_from_dict(VALID, ["train.lr"])


@pytest.mark.parametrize("items", [["train=5", "train.lr=0.1"], ["train.lr=0.1", "train={max_steps: 3}"]])
def test_an_override_beside_its_own_parent_is_refused_not_crashed_on_or_dropped(items):
    # train=5 then train.lr crashed (TypeError: 'int' object does not support item assignment); train.lr then a train
    # mapping dropped train.lr unsaid
    with pytest.raises(SpecError) as err:
        spec_from_dict(VALID, items)
    assert "both set 'train'; give its keys one way" in str(err.value) and str(err.value).count("\n") == 0


def test_the_same_override_twice_is_last_wins_as_an_argparse_option():
    assert spec_from_dict(VALID, ["train.lr=0.1", "train.lr=0.2"]).train.lr == 0.2


@pytest.mark.parametrize("override, needle", [
    ("train.lr=.inf", "train.lr=inf is not a finite number"),
    ("train.lr=nan", "train.lr='nan' is not a finite number"),
    ("train.max_grad_norm=-.inf", "train.max_grad_norm=-inf is not a finite number"),
    ("method_args.lora_dropout=.nan", "method_args.lora_dropout=nan must be a number in [0, 1)"),
    ("method_args.r=eight", "method_args.r='eight' must be a whole number ≥ 1"),
    ("method_args.r=0", "method_args.r=0 must be a whole number ≥ 1 (an adapter needs at least one rank)"),
    ("prompt=X: {x!r:>{width}}", "prompt field {x!r:>{width}} has a conversion or format spec"),
    ("prompt=X: {x.upper} {}", "prompt field {x.upper} is not a column name"),
    ("train=5", "train must be a mapping of keys, got int 5; set its keys (e.g. train.KEY=VALUE)"),
    ("data=[a, b]", "data must be a mapping of keys, got list ['a', 'b']; set its keys (e.g. data.KEY=VALUE)"),
    ("train.max_length=1", "train.max_length=1 leaves no room for one prompt token and a one-token label; use train.max_length ≥ 2"),
    # `label` / `target` are `str | None`, which went unchecked: a list crashed in data.py (TypeError), a number named no column
    ("label=[a]", "'label' must be a column name (text), got list ['a']"),
    ("label=5", "'label' must be a column name (text), got int 5; quote it ('5') if the column is named so"),
])
def test_bad_values_are_refused_in_one_line(override, needle):
    with pytest.raises(SpecError) as err:
        spec_from_dict(VALID, [override])
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_generation_max_length_must_leave_room_for_the_answer():
    gen = {**VALID, "type": "generation", "target": "y", "labels": None, "label": None}
    with pytest.raises(SpecError, match="max_new_tokens=8; use train.max_length ≥ 9"):
        spec_from_dict(gen, ["train.max_length=8", "train.max_new_tokens=8"])
    assert spec_from_dict(gen, ["train.max_length=9", "train.max_new_tokens=8"]).train.max_length == 9


def test_an_override_yaml_cannot_parse_is_taken_as_written():
    raw = "prompt=Review: {x}\\nSentiment:"  # as typed in a shell: a backslash and an n
    assert parse_overrides([raw]) == {"prompt": "Review: {x}\\nSentiment:"}
    assert spec_from_dict(VALID, [raw]).prompt == "Review: {x}\\nSentiment:"


def test_overriding_method_drops_the_files_method_args_even_with_new_ones(tmp_path):
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({**VALID, "method_args": {"r": 4, "lora_alpha": 8}}))
    spec = load_spec(tmp_path / "t.yaml", ["method=prefix", "method_args.num_virtual_tokens=4"])
    assert spec.method_args == {"num_virtual_tokens": 4}  # the file's LoRA r would make peft's PrefixTuningConfig fail
    assert load_spec(tmp_path / "t.yaml", ["method=lora", "method_args.r=2"]).method_args == {"r": 2, "lora_alpha": 8}  # same method: merged


SPEC_TEXT = """name: t
type: classification
data: {train: a.csv, dev: b.csv}
prompt: "X: {x}\\nY:"
label: y
labels: ['no', 'yes']
train:
  lr: 2.0e-3
  max_steps: 3
  lr: 0.5
"""


def test_a_key_given_twice_in_the_file_is_refused_naming_its_path_and_lines(tmp_path):
    # PyYAML keeps the last of two equal keys: this spec trained at lr 0.5 without a word.
    (tmp_path / "t.yaml").write_text(SPEC_TEXT)
    with pytest.raises(SpecError) as err:
        load_spec(tmp_path / "t.yaml")
    msg = str(err.value)
    assert "\n" not in msg and "'train.lr' is given twice (lines 8 and 10" in msg and "keep one" in msg and "t.yaml" in msg
    (tmp_path / "top.yaml").write_text(SPEC_TEXT.replace("  lr: 0.5\n", "") + "name: u\n")  # top level, flow mappings too
    with pytest.raises(SpecError, match=r"'name' is given twice \(lines 1 and 10"):
        load_spec(tmp_path / "top.yaml")
    (tmp_path / "flow.yaml").write_text(SPEC_TEXT.replace("  lr: 0.5\n", "").replace("dev: b.csv", "dev: b.csv, train: c.csv"))
    with pytest.raises(SpecError, match=r"'data.train' is given twice \(lines 3 and 3"):
        load_spec(tmp_path / "flow.yaml")
    # Still allowed: a merge key's values replaced by the mapping's own keys, and an override replacing the file's value.
    text = SPEC_TEXT.replace("  lr: 0.5\n", "")
    (tmp_path / "merge.yaml").write_text(text.replace("train:\n", "x-defaults: &d {lr: 0.1, max_steps: 9}\ntrain:\n  <<: *d\n"))
    with pytest.raises(SpecError, match="unknown key 'x-defaults'") as err:  # parsed: the spec refuses only the extra key
        load_spec(tmp_path / "merge.yaml")
    assert "given twice" not in str(err.value)
    (tmp_path / "ok.yaml").write_text(text)
    assert load_spec(tmp_path / "ok.yaml", ["train.lr=0.5"]).train.lr == 0.5
    assert load_spec(tmp_path / "ok.yaml").train.lr == 2.0e-3


def test_a_yaml_syntax_error_says_where_and_how_to_fix_it_in_one_line(tmp_path):
    (tmp_path / "b.yaml").write_text("name: t\ntrain:\n  lr: 1\n   max_steps: 3\n")
    with pytest.raises(SpecError) as err:
        load_spec(tmp_path / "b.yaml")
    msg = str(err.value)
    assert "\n" not in msg and "YAML does not parse" in msg and "check the indentation and quoting near line 4" in msg
    assert "<unicode string>" not in msg


@pytest.mark.parametrize("written, read_as", [("010", "octal number 8"), ("007", "octal number 7"), ("1:30", "base-60 number 90"),
                                             ("1:30.5", "base-60 number 90.5")])
def test_a_number_yaml_reads_as_another_is_refused_in_the_file_and_overrides(tmp_path, written, read_as):
    # PyYAML (YAML 1.1) reads 010 as 8 and 1:30 as 90: `labels: {010: ten}` keyed the column value '8' silently.
    text = SPEC_TEXT.replace("  lr: 0.5\n", "")
    (tmp_path / "n.yaml").write_text(text.replace("labels: ['no', 'yes']", f"labels: {{{written}: ten, '1': one}}"))
    with pytest.raises(SpecError) as err:
        load_spec(tmp_path / "n.yaml")
    msg = str(err.value)
    assert "\n" not in msg and f"{written} (line " in msg and read_as in msg and f"quote it ('{written}')" in msg
    (tmp_path / "ok.yaml").write_text(text)
    with pytest.raises(SpecError, match=rf"{written} in 'train.max_steps={written}' is read by YAML 1.1 as the {read_as}"):
        load_spec(tmp_path / "ok.yaml", [f"train.max_steps={written}"])
    # What says what it is stays: quoted text, hex, 1_000, and a prompt override that only looks like a mapping.
    assert parse_overrides([f"labels={{'{written}': ten}}", "a=0x1F", "b=1_000", f"prompt=Code: {written} {{x}}"]) == {
        "labels": {written: "ten"}, "a": 31, "b": 1000, "prompt": f"Code: {written} {{x}}"}

import pytest
import yaml

from adapterhub_lite.errors import SpecError
from adapterhub_lite.spec import load_spec, parse_overrides, spec_from_dict

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
    bad = {**VALID, "type": "regression", "method": "adapterfusion", "bogus": 1, "train": {"lr": "fast", "epochs": 3}}
    with pytest.raises(SpecError) as err:
        spec_from_dict(bad)
    msg = str(err.value)
    assert "\n" not in msg
    for needle in ("unknown key 'bogus'", "unknown key 'train.epochs'", "'train.lr' must be float",
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

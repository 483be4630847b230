"""The typed sidecar: one dataclass, save/load round trip, an explicit upgrade from older formats."""

import json
import shutil

import pytest

from adapterhub_lite.artifacts.folder import read_sidecar
from adapterhub_lite.artifacts.sidecar import FORMAT, SIDECAR, Sidecar, build
from adapterhub_lite.core.errors import AdapterLoadError


def test_save_and_load_round_trip_with_unknown_keys_kept(tmp_path):
    task = {"name": "toy", "type": "generation", "data": {"train": "t.jsonl", "dev": "d.jsonl"}, "prompt": "In: {text}\nOut:", "target": "target"}
    fingerprint = {"config_sha256": "c", "tokenizer_sha256": "t", "weights_sha256": "w", "quantization": "none", "id": "x"}
    meta = build("toy", task=task, method="lora", base={"name": "b", "hub_id": None, "fingerprint": fingerprint},
                 metrics={"accuracy": 0.5}, train_state={"steps": 3})
    meta.extra["from_a_newer_writer"] = [1, 2]
    meta.save(tmp_path)
    raw = json.loads((tmp_path / SIDECAR).read_text())
    assert raw["format"] == FORMAT and raw["from_a_newer_writer"] == [1, 2] and raw["versions"]["peft"]
    again = Sidecar.load(tmp_path)
    assert again == meta and again.to_dict() == raw


def test_a_format_1_sidecar_is_upgraded_on_load(tmp_path):
    """The reference adapters were written in format 1 (no base.dtype / base.weights)."""
    folder = tmp_path / "sst2"
    shutil.copytree("adapters/sst2/1.0.0", folder)
    raw = json.loads((folder / SIDECAR).read_text())
    assert raw["format"] == "adapterhub_lite.adapter/1" and "dtype" not in raw["base"]
    meta = read_sidecar(folder)
    assert meta["format"] == FORMAT and meta["base"]["dtype"] == "fp32" and meta["base"]["weights"] is None
    assert meta["base"]["fingerprint"] == raw["base"]["fingerprint"] and meta["metrics"] == raw["metrics"]
    assert json.loads((folder / SIDECAR).read_text()) == raw  # reading never rewrites a (possibly published) file


@pytest.mark.parametrize("change, needle", [
    ({"format": "adapterhub_lite.adapter/9"}, "has format 'adapterhub_lite.adapter/9'; this version reads"),
    ({"format": FORMAT, "name": None, "base": None, "task": None, "method": None, "_drop": ["name"]}, "lacks name"),
])
def test_unknown_formats_and_missing_fields_are_one_line(tmp_path, change, needle):
    raw = build("toy", task=None, method="lora", base={}).to_dict()
    for key in change.pop("_drop", []):
        raw.pop(key)
    raw.update({k: v for k, v in change.items() if k in ("format",)})
    (tmp_path / SIDECAR).write_text(json.dumps(raw))
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterLoadError, match=needle) as err:
        read_sidecar(tmp_path)
    assert "\n" not in str(err.value)

"""Shared fixtures: a tiny random backbone (built locally) and tiny task data written per test."""

import json
import os

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


REAL_CACHE = os.environ.get("ADAPTERHUB_CACHE")  # the slow test uses the user's real cache


@pytest.fixture(autouse=True, scope="session")
def _cache(tmp_path_factory):
    """Build the tiny backbone once per session in a private cache (the real one is left alone)."""
    os.environ["ADAPTERHUB_CACHE"] = str(tmp_path_factory.mktemp("cache"))


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def cls_task(tmp_path, monkeypatch):
    """A trivially learnable 2-class task: the word in the text decides the label."""
    monkeypatch.chdir(tmp_path)
    words = {"aaaa": "pos", "bbbb": "neg"}
    rows = [{"text": f"{w} {i % 7}", "label": lab} for i in range(48) for w, lab in words.items()]
    _write_jsonl(tmp_path / "train.jsonl", rows)
    _write_jsonl(tmp_path / "dev.jsonl", rows[:16])
    spec = {
        "name": "toy", "type": "classification",
        "data": {"train": "train.jsonl", "dev": "dev.jsonl"},
        "prompt": "Text: {text}\nLabel:", "label": "label", "labels": {"pos": "x", "neg": "z"},
        "metric": ["accuracy"], "method": "lora", "method_args": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
        "train": {"max_steps": 6, "batch_size": 8, "lr": 1e-2, "warmup_steps": 0, "eval_every": 3,
                  "eval_samples": 16, "checkpoint_every": 2, "max_length": 64},
        "base": "tiny-random-llama", "quantization": "none",
    }
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path


@pytest.fixture
def gen_task(tmp_path, monkeypatch):
    """A tiny copy task for the generation path."""
    monkeypatch.chdir(tmp_path)
    rows = [{"text": t, "target": t.upper()} for t in ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op"]]
    _write_jsonl(tmp_path / "train.jsonl", rows)
    _write_jsonl(tmp_path / "dev.jsonl", rows[:4])
    spec = {
        "name": "copy", "type": "generation", "data": {"train": "train.jsonl", "dev": "dev.jsonl"},
        "prompt": "In: {text}\nOut:", "target": "target", "metric": ["exact_match"], "method": "lora",
        "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "warmup_steps": 0, "eval_every": 2,
                  "eval_samples": 4, "max_length": 32, "max_new_tokens": 4},
        "base": "tiny-random-llama", "quantization": "none",
    }
    (tmp_path / "copy.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path


def train_tiny(folder, name="toy", **overrides):
    """Train a tiny classification adapter (2 labels, 16 rows) into folder/name; returns its path.

    `overrides` replace top-level spec keys (e.g. method_args=…) or, under `train`, training keys.
    """
    from adapterhub_lite.spec import spec_from_dict
    from adapterhub_lite.train import train

    rows = [{"text": f"{w} {i}", "label": w} for i in range(8) for w in ("pos", "neg")]
    data = folder / "toy.jsonl"
    if not data.exists():
        _write_jsonl(data, rows)
    raw = {
        "name": name, "type": "classification", "data": {"train": str(data), "dev": str(data)},
        "prompt": "T: {text}\nL:", "label": "label", "labels": ["pos", "neg"], "base": "tiny-random-llama",
        "quantization": "none", "train": {"max_steps": 2, "batch_size": 4, "eval_every": 2, "max_length": 32},
    }
    raw["train"].update(overrides.pop("train", {}))
    raw.update(overrides)
    return train(spec_from_dict(raw), folder / name, progress=False)

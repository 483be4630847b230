"""What a plain transformers + bitsandbytes + peft user needs to load an adapter's backbone as it was trained (the sidecar's
base.quantization_config, the card's snippet), and the warning when an adapter runs in another quantization."""

import json
import warnings

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from adapterhub_lite.artifacts.folder import model_card, read_sidecar
from adapterhub_lite.artifacts.loading import load_adapter

from .conftest import train_tiny


@pytest.fixture(scope="module")
def eight_bit(tmp_path_factory):
    """A tiny LoRA adapter trained on the 8-bit tiny Llama."""
    return train_tiny(tmp_path_factory.mktemp("q8"), "q8", quantization="8bit")


def test_the_sidecar_records_the_bitsandbytes_config_and_it_rebuilds_our_backbone(eight_bit):
    """llm_int8_threshold=0.0 (not bitsandbytes' default 6.0) is recorded, and BitsAndBytesConfig.from_dict of the record
    with plain from_pretrained + PeftModel gives exactly the logits adapterhub_lite computes."""
    record = read_sidecar(eight_bit)["base"]["quantization_config"]
    assert record["load_in_8bit"] is True and record["llm_int8_threshold"] == 0.0 and record["load_in_4bit"] is False
    ours, backbone, _, _ = load_adapter(eight_bit)
    plain_base = AutoModelForCausalLM.from_pretrained(backbone.path, quantization_config=BitsAndBytesConfig.from_dict(record))
    plain = PeftModel.from_pretrained(plain_base, eight_bit).eval()
    ids = backbone.tokenizer(["T: pos 3\nL:", "T: neg 5\nL: neg"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(ours(**ids).logits, plain(**ids).logits)


def test_the_card_loads_the_backbone_with_the_recorded_quantization(eight_bit):
    card = (eight_bit / "README.md").read_text()
    assert "quantization_config=BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0))" in card
    meta = read_sidecar(eight_bit)
    del meta["base"]["quantization_config"]  # a sidecar from before the record: every 8-bit backbone was loaded at 0.0
    assert "BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)" in model_card(meta)
    meta["base"]["fingerprint"]["quantization"], meta["base"]["dtype"] = "none", "bf16"
    snippet = model_card(meta)
    assert "BitsAndBytesConfig" not in snippet and 'from_pretrained("' + meta["base"]["hub_id"] + '", dtype=torch.bfloat16)' in snippet


def test_an_adapter_run_in_another_quantization_is_loaded_with_a_warning(eight_bit):
    with pytest.warns(UserWarning, match=r"was trained on an 8-bit backbone and runs here on an unquantized one \(--quantization none\): .* --quantization none\)"):
        load_adapter(eight_bit, quantization="none")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as trained: nothing said
        load_adapter(eight_bit)
    assert json.loads((eight_bit / "adapterhub.json").read_text())["base"]["fingerprint"]["quantization"] == "8bit"

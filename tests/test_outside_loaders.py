"""What a transformers / peft user runs on our adapter folders (not through this package), against the README's word."""

import re
from pathlib import Path

import pytest
import torch

from .conftest import train_tiny

README = (Path(__file__).parent.parent / "README.md").read_text()
IDS = [[5, 40, 41, 42, 9, 10, 77, 78]]


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """A tiny LoRA trained hard enough (lr 5e-2) that its logits differ from the backbone's."""
    return train_tiny(tmp_path_factory.mktemp("outside"), "toy", train={"max_steps": 3, "lr": 5e-2})


def _backbone():
    """The tiny backbone as a transformers user loads it: from its folder, in fp32."""
    from transformers import AutoModelForCausalLM

    from adapterhub_lite.model.weights import resolve

    return AutoModelForCausalLM.from_pretrained(str(resolve("tiny-random-llama")[0]), dtype=torch.float32).eval()


@torch.no_grad()
def _last(model) -> torch.Tensor:
    return model(input_ids=torch.tensor(IDS, device=model.device)).logits[0, -1].float().cpu()


def test_transformers_load_adapter_gives_peft_s_logits_and_the_readme_names_set_adapter_s_peft_floor(lora):
    """transformers' own PEFT integration loads the folder to plain peft's logits; `set_adapter` either switches to it
    or (transformers 5.24 and later with a peft below its floor, as installed here: 5.25 with 0.21.2) refuses, and then
    the README says which peft it needs and what to use instead."""
    from peft import PeftModel
    from transformers.integrations import peft as integration

    want = _last(PeftModel.from_pretrained(_backbone(), str(lora)).eval())
    assert (want - _last(_backbone())).abs().max() > 1e-3  # the adapter matters, so equal logits mean it was applied
    model = _backbone()
    model.load_adapter(str(lora), adapter_name="toy")
    assert (_last(model) - want).abs().max() <= 1e-5
    try:
        model.set_adapter("toy")
    except ValueError as exc:
        if "version of PEFT" not in str(exc):
            raise
        floor = re.escape(integration.MIN_PEFT_VERSION)
        assert re.search(rf"refuse `set_adapter`[^.]* with any peft below {floor}", README), exc
        assert "`PeftModel.from_pretrained(base, folder)`" in README
        return
    assert (_last(model) - want).abs().max() <= 1e-5


def test_auto_peft_model_loads_the_base_the_config_names(lora):
    """AutoPeftModelForCausalLM takes the base from adapter_config.json's base_model_name_or_path: for a local backbone
    folder (the tiny one) its absolute path, which loads here and gives plain peft's logits; the README says what it
    names and what to pass on another machine."""
    from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel

    from adapterhub_lite.model.weights import resolve

    assert PeftConfig.from_pretrained(str(lora)).base_model_name_or_path == str(resolve("tiny-random-llama")[0])
    auto = AutoPeftModelForCausalLM.from_pretrained(str(lora), dtype=torch.float32).eval()
    assert (_last(auto) - _last(PeftModel.from_pretrained(_backbone(), str(lora)).eval())).abs().max() <= 1e-6
    assert "`AutoPeftModelForCausalLM.from_pretrained(folder)` loads the base that adapter_config.json's" in README


def test_a_prefix_trained_with_prefix_projection_is_written_and_served_as_peft_serves_it(tmp_path):
    """train kept its best weights as get_peft_model_state_dict gives them: for prefix_projection the projected prefix,
    from which the embedding and MLP being trained cannot be set, so every such run failed at its end (a size-mismatch
    RuntimeError). The folder peft writes holds the projected prefix; plain peft and the bank serve it alike."""
    from peft import PeftModel

    from adapterhub_lite.model.backbone import load_backbone
    from adapterhub_lite.serving.bank import AdapterBank

    folder = train_tiny(tmp_path, "proj", method="prefix", method_args={"num_virtual_tokens": 3, "prefix_projection": True, "encoder_hidden_size": 8})
    ref = PeftModel.from_pretrained(_backbone(), str(folder)).eval()
    bank = AdapterBank(load_backbone("tiny-random-llama", "none", dtype="fp32").model)
    bank.add("proj", folder)
    got = bank.forward(IDS + [[7, 8]], ["proj", None])[0]
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(IDS)).logits[0]
    assert (got - want).abs().max() <= 1e-4 and (want[-1] - _last(_backbone())).abs().max() > 1e-3


@pytest.mark.parametrize("method, method_args", [("lora", {}), ("ia3", {}), ("prefix", {"num_virtual_tokens": 3}), ("prompt", {"num_virtual_tokens": 4})])
def test_a_pulled_version_of_every_kind_loads_with_plain_peft_to_the_bank_s_logits(tmp_path, method, method_args):
    """What a user of a published version runs: pull it, load the base its sidecar names with transformers and the folder
    with plain PeftModel.from_pretrained; the logits equal what our bank (the Router's) serves from the same pulled folder."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adapterhub_lite.artifacts.registry import LocalRegistry
    from adapterhub_lite.model.backbone import load_backbone
    from adapterhub_lite.serving.bank import AdapterBank

    folder = train_tiny(tmp_path, method, method=method, method_args=method_args, train={"max_steps": 3, "lr": 5e-2})
    reg = LocalRegistry(tmp_path / "reg")
    reg.publish(folder, "1.0.0")
    pulled = reg.pull(f"{method}@1.0.0", tmp_path / "pulled")
    base = json.loads((pulled / "adapterhub.json").read_text())["base"]["hub_id"]
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(pulled)).eval()
    bank = AdapterBank(load_backbone("tiny-random-llama", "none", dtype="fp32").model)
    bank.add(method, pulled)
    got = bank.forward(IDS + [[7, 8]], [method, None])[0]
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(IDS)).logits[0, -len(IDS[0]):]  # peft's prompt tuning also returns its virtual positions
    assert (got - want).abs().max() <= 1e-5 and (want[-1] - _last(_backbone())).abs().max() > 1e-3

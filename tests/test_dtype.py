"""Compute dtype: bf16/fp16 training reloads with plain peft and scores like fp32; the choices and refusals."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from adapterhub_lite.artifacts.loading import load_adapter
from adapterhub_lite.cli import main
from adapterhub_lite.core.errors import BackboneError, SpecError
from adapterhub_lite.core.spec import load_spec, spec_from_dict
from adapterhub_lite.model import heads
from adapterhub_lite.model.backbone import autocast, load_backbone, resolve_dtype
from adapterhub_lite.model.evaluate import label_token_ids

from .test_spec import VALID
from .test_train import _train

# bf16 keeps 8 mantissa bits: every logit of magnitude ~12 is rounded by up to 2^-9 × 12 ≈ 0.02 in
# each forward of training, and those errors feed the gradients. Measured on this task (6 steps,
# lr 1e-2, tiny Llama), the bf16-trained LoRA's label log-probs, scored in fp32 by plain peft, are
# within 0.0075 (no quantization) and 0.006 (8-bit) of the fp32-trained one's; prompt, prefix and
# IA3 within 0.0013. The bound is ~6× the largest of these and ~1/18 of the smallest margin (0.89) between
# the two labels' log-probs on these rows, so equal predictions are not luck.
MAX_LABEL_LOGPROB_DELTA = 0.05


def _label_logprobs(model, tokenizer, spec, rows=16) -> torch.Tensor:
    prompts = [f"Text: {w} {i % 7}\nLabel:" for i in range(rows // 2) for w in ("aaaa", "bbbb")]
    with torch.no_grad():
        return heads.label_scores(model, tokenizer, prompts, label_token_ids(tokenizer, spec), 64).float()


def _plain(out, quantization):
    """The adapter reloaded by plain peft on an fp32 base (8-bit through our loader: it sets the int8 threshold)."""
    base = (AutoModelForCausalLM.from_pretrained(load_backbone("tiny-random-llama", "none").path) if quantization == "none"
            else load_backbone("tiny-random-llama", quantization, dtype="fp32").model)
    return PeftModel.from_pretrained(base, out).eval()


@pytest.mark.parametrize("quantization", ["none", "8bit"])
def test_bf16_training_reloads_with_plain_peft_and_scores_like_fp32(cls_task, monkeypatch, quantization):
    seen = []  # (hidden-state dtype, autocast on?) of every training/eval forward
    final_hidden = heads.final_hidden
    monkeypatch.setattr(heads, "final_hidden", lambda *a: seen.append(((h := final_hidden(*a)).dtype, torch.is_autocast_enabled(h.device.type))) or h)

    fp32, spec = _train(cls_task, "toy", f"quantization={quantization}", "dtype=fp32")
    (cls_task / "out").rename(cls_task / "fp32")
    assert set(seen) == {(torch.float32, False)}
    seen.clear()
    bf16, _ = _train(cls_task, "toy", f"quantization={quantization}", "dtype=bf16")
    assert set(seen) == {(torch.bfloat16, True)}  # the backbone really computed in bf16, under autocast

    meta32 = json.loads((cls_task / "fp32" / "adapterhub.json").read_text())
    meta16 = json.loads((bf16 / "adapterhub.json").read_text())
    assert (meta32["base"]["dtype"], meta16["base"]["dtype"]) == ("fp32", "bf16")
    assert meta16["task"]["dtype"] == "bf16"
    assert meta16["base"]["fingerprint"] == meta32["base"]["fingerprint"]  # the dtype is not part of it
    assert all(t.dtype == torch.float32 for t in load_file(bf16 / "adapter_model.safetensors").values())  # adapter trained in fp32

    want = _label_logprobs(_plain(cls_task / "fp32", quantization), load_backbone("tiny-random-llama", "none").tokenizer, spec)
    got = _label_logprobs(_plain(bf16, quantization), load_backbone("tiny-random-llama", "none").tokenizer, spec)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert (got - want).abs().max().item() < MAX_LABEL_LOGPROB_DELTA
    assert meta16["metrics"] == meta32["metrics"]

    # served in bf16 by our loader (autocast), the same predictions as plain peft in fp32
    ours, backbone, spec2, _ = load_adapter(bf16, dtype="bf16")
    assert backbone.dtype == torch.bfloat16
    assert load_adapter(bf16)[1].dtype == torch.float32  # no dtype asked: auto (fp32 on the CPU), not the bf16 it trained in (--help says so)
    served = _label_logprobs(ours, backbone.tokenizer, spec2)
    assert torch.equal(served.argmax(-1), got.argmax(-1)) and (served - got).abs().max().item() < MAX_LABEL_LOGPROB_DELTA


def test_fp16_training_uses_a_loss_scaler_and_learns(cls_task, monkeypatch):
    scales = []
    step = torch.amp.GradScaler.step

    def spy(self, *args, **kwargs):
        scales.append(self.get_scale() if self.is_enabled() else None)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.amp.GradScaler, "step", spy)
    out, _ = _train(cls_task, "toy", "dtype=fp16", "train.max_steps=3", "train.eval_every=3")
    meta = json.loads((out / "adapterhub.json").read_text())
    assert meta["base"]["dtype"] == "fp16" and meta["metrics"]["accuracy"] == 1.0
    assert len(scales) == 3 and all(s is not None and s > 1 for s in scales)
    out, _ = _train(cls_task, "toy", "dtype=bf16", "train.max_steps=1", overwrite=True)
    assert scales[3:] == [None]  # bf16 has fp32's exponent range: no scaler


def test_cli_dtype_overrides_the_spec(capsys, cls_task):
    assert main(["train", "toy.yaml", "train.max_steps=1", "dtype=fp32", "--dtype", "bf16", "--output", "out", "--no-progress"]) == 0
    meta = json.loads((cls_task / "out" / "adapterhub.json").read_text())
    assert meta["base"]["dtype"] == "bf16" and meta["task"]["dtype"] == "bf16"
    assert main(["eval", "out", "--dtype", "fp16", "--json"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:  # argparse: not a choice
        main(["eval", "out", "--dtype", "int8"])
    assert exit_.value.code == 2 and "invalid choice: 'int8'" in capsys.readouterr().err


def test_resolve_dtype_choices_and_refusal(monkeypatch):
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert [resolve_dtype(n, "cpu") for n in ("bf16", "fp16", "fp32")] == [torch.bfloat16, torch.float16, torch.float32]
    assert resolve_dtype(torch.bfloat16, "cpu") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", "cuda") == torch.bfloat16 and resolve_dtype("auto", "cuda:1") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16  # pre-Ampere GPUs
    with pytest.raises(BackboneError, match="dtype 'int8' is not one of auto, bf16, fp16, fp32") as err:
        resolve_dtype("int8", "cpu")
    assert "\n" not in str(err.value)
    with pytest.raises(BackboneError, match="dtype 'half'"):
        load_backbone("tiny-random-llama", "none", dtype="half")


@pytest.mark.parametrize("quantization", ["none", "8bit", "4bit"])
def test_the_backbone_computes_in_its_dtype_and_keeps_its_fingerprint(quantization):
    fp32 = load_backbone("tiny-random-llama", quantization, dtype="fp32")
    bf16 = load_backbone("tiny-random-llama", quantization, dtype="bf16")
    assert (fp32.dtype, bf16.dtype) == (torch.float32, torch.bfloat16)
    assert bf16.device == next(bf16.model.parameters()).device
    assert bf16.fingerprint == fp32.fingerprint
    assert bf16.model.get_input_embeddings().weight.dtype == torch.bfloat16  # non-quantized weights
    q_proj = bf16.model.model.layers[0].self_attn.q_proj
    if quantization == "4bit":
        assert q_proj.compute_dtype == torch.bfloat16
    ids = torch.tensor([bf16.tokenizer("hello there").input_ids], device=bf16.device)
    with torch.no_grad(), autocast(bf16):
        logits = bf16.model(input_ids=ids).logits
        hidden = bf16.model.model(input_ids=ids).last_hidden_state
    assert hidden.dtype == torch.bfloat16  # activations stay in the compute dtype
    with torch.no_grad():
        want = fp32.model(input_ids=ids).logits
    # The same model, rounded to bf16 (8 mantissa bits) at every op: measured max |Δlogit| 0.0055 (none),
    # 0.0077 (8-bit: bitsandbytes' CPU int8 path takes bf16 activations), 0.015 (4-bit), on logits of
    # magnitude ~1.2. 0.05 is ~3× the worst; a wrong compute path (e.g. fp16 weights misread) is off by far more.
    assert (logits.float() - want).abs().max().item() < 0.05


def test_autocast_only_for_low_precision(device):
    with autocast(device, torch.float32):
        assert not torch.is_autocast_enabled(device.type)
    with autocast(device, torch.bfloat16):
        assert torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type) == torch.bfloat16


def test_spec_validates_the_dtype_with_every_other_problem(tmp_path):
    assert spec_from_dict(VALID).dtype == "auto"
    assert spec_from_dict(VALID, ["dtype=bf16"]).dtype == "bf16"
    with pytest.raises(SpecError) as err:
        spec_from_dict({**VALID, "dtype": "int4", "quantization": "2bit"})
    assert "dtype='int4' is not one of auto, bf16, fp16, fp32" in str(err.value) and "quantization='2bit'" in str(err.value)
    assert len(err.value.problems) == 2
    (tmp_path / "t.yaml").write_text(json.dumps({**VALID, "dtype": "fp16"}))
    assert load_spec(tmp_path / "t.yaml").dtype == "fp16"

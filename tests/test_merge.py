"""Merging LoRA adapters: peft's formulas reproduced by hand, clear refusals, a usable folder."""

import json

import pytest
import torch
from peft import PeftModel

from adapterhub_lite.backbone import load_backbone
from adapterhub_lite.router.merge import MergeError, fold_into_base, merge_adapters

from .conftest import train_tiny

LAYER = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Three tiny trained LoRA adapters: a and b with r=4, c with r=8."""
    d = tmp_path_factory.mktemp("merge")
    return {name: train_tiny(d, name, method_args={"r": r, "lora_alpha": 2 * r}, train={"max_steps": 3, "lr": 5e-2, "seed": seed})
            for name, r, seed in (("a", 4, 1), ("b", 4, 2), ("c", 8, 3))}


def _factors(model, adapter):
    layer = model.get_submodule(LAYER)
    return layer.lora_A[adapter].weight.detach(), layer.lora_B[adapter].weight.detach(), layer.scaling[adapter]


def test_linear_merge_equals_the_weighted_sum_by_hand(sources, tmp_path, device):
    weights = {"a": 0.7, "b": 0.3}
    model, meta = merge_adapters({k: sources[k] for k in weights}, weights, "linear", output=tmp_path / "mix", name="mix", report_rows=4, dtype="fp32")
    (a_A, a_B, a_s), (b_A, b_B, b_s) = _factors(model, "a"), _factors(model, "b")
    m_A, m_B, m_s = _factors(model, "mix")
    # peft's "linear" is a weighted sum of the LoRA factors, each side scaled by sqrt(weight·scaling)
    want_A = (0.7 * a_s) ** 0.5 * a_A + (0.3 * b_s) ** 0.5 * b_A
    want_B = (0.7 * a_s) ** 0.5 * a_B + (0.3 * b_s) ** 0.5 * b_B
    assert torch.allclose(m_A, want_A, atol=1e-6) and torch.allclose(m_B, want_B, atol=1e-6) and m_s == 1.0
    # the folder is an ordinary adapter: plain peft loads it and gives the merged model's logits
    bb = load_backbone("tiny-random-llama", "none", dtype="fp32")  # the merged model's dtype: the same numbers to 1e-5
    plain = PeftModel.from_pretrained(bb.model, tmp_path / "mix").eval()
    ids = bb.tokenizer(["T: pos 3\nL:"], return_tensors="pt").to(device)  # both models run on the suite's device
    with torch.no_grad():
        assert torch.allclose(plain(**ids).logits, model(**ids).logits, atol=1e-5)
    side = json.loads((tmp_path / "mix" / "adapterhub.json").read_text())
    assert side["merge"]["weights"] == weights and set(side["merge_report"]) == {"a", "b"}
    assert set(side["merge_report"]["a"]) >= {"merged", "own", "delta", "metric"}


def test_cat_merge_is_the_exact_weighted_sum_of_updates_and_takes_mixed_ranks(sources):
    weights = {"a": 0.5, "c": 2.0}
    model, _ = merge_adapters({k: sources[k] for k in weights}, weights, "cat", name="mix", report_rows=0)
    (a_A, a_B, a_s), (c_A, c_B, c_s) = _factors(model, "a"), _factors(model, "c")
    m_A, m_B, m_s = _factors(model, "mix")
    want = 0.5 * a_s * a_B @ a_A + 2.0 * c_s * c_B @ c_A
    assert m_A.shape[0] == 12 and torch.allclose(m_s * m_B @ m_A, want, atol=1e-6)


@pytest.mark.parametrize("method, density, needle", [
    ("ties", 0.5, "needs equal LoRA ranks but they are {'a': 4, 'c': 8}; use method 'cat' or 'svd'"),
    ("linear", None, "needs equal LoRA ranks"),
    ("average", None, "merge method 'average' is not one of"),
])
def test_rank_and_method_problems_are_refused(sources, method, density, needle):
    with pytest.raises(MergeError, match=needle.replace("(", r"\(").replace("{", r"\{").replace("}", r"\}").replace("[", r"\[")):
        merge_adapters({"a": sources["a"], "c": sources["c"]}, {"a": 0.5, "c": 0.5}, method, density=density, report_rows=0)


def test_ties_and_dare_need_a_density_and_run_with_one(sources):
    with pytest.raises(MergeError, match="needs a density"):
        merge_adapters({"a": sources["a"], "b": sources["b"]}, {"a": 0.5, "b": 0.5}, "ties", report_rows=0)
    for method in ("ties", "dare_linear", "dare_ties", "svd"):
        model, _ = merge_adapters({"a": sources["a"], "b": sources["b"]}, {"a": 0.5, "b": 0.5}, method, density=0.5, report_rows=0)
        assert model.active_adapter == "merged"


def test_fold_into_base_reports_its_error(sources):
    # exact up to rounding on an fp32 base, on any device (a bf16 base re-rounds the folded weights)
    model, _ = merge_adapters({"a": sources["a"]}, {"a": 1.0}, "linear", report_rows=0, dtype="fp32")
    bb = load_backbone("tiny-random-llama", "none", dtype="fp32")
    folded, err = fold_into_base(model, bb.tokenizer, ["T: pos 1\nL:", "T: neg 2\nL:"])
    assert err < 1e-4 and not isinstance(folded, PeftModel)


def test_router_merge_into_base_folds_the_update_into_the_backbone(sources, device):
    from adapterhub_lite.router.router import Router

    router = Router(load_backbone("tiny-random-llama", "none", dtype="fp32"))  # fp32: the fold is exact up to rounding
    for name in ("a", "b"):
        router.register(name, sources[name])
    ids = [router.bb.tokenizer("T: pos 1\nL:").input_ids]
    base_before = router.bank.forward(ids, [None])[0]
    sidecar = router.merge({"a": 0.5, "b": 0.5}, "linear", name="ab", into_base=True)
    merged_folder = router.folders["ab"]
    with torch.no_grad():
        want = PeftModel.from_pretrained(load_backbone("tiny-random-llama", "none", dtype="fp32").model, merged_folder)(input_ids=torch.tensor(ids, device=device)).logits[0]
    base_after = router.bank.forward(ids, [None])[0]  # "base" now runs the folded weights
    assert sidecar["fold"]["max_abs_dlogit"] < 1e-4 and router.folded == ["ab"]
    assert (base_after - want).abs().max() < 1e-4 and (base_after - base_before).abs().max() > 1e-4

"""Merging LoRA adapters: peft's formulas reproduced by hand, clear refusals, a usable folder."""

import hashlib
import json
import re
import shutil

import pytest
import torch
from peft import PeftModel

from adapterhub_lite.core.errors import AdapterHubError
from adapterhub_lite.model.adapter import read_lora
from adapterhub_lite.model.backbone import load_backbone
from adapterhub_lite.ops.merge import MergeError, fold_into_base, merge_adapters

from .conftest import train_tiny

LAYER = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Three tiny trained LoRA adapters of one task ("toy"): a and b with r=4, c with r=8."""
    d = tmp_path_factory.mktemp("merge")
    out = {}
    for name, r, seed in (("a", 4, 1), ("b", 4, 2), ("c", 8, 3)):
        (d / name).mkdir()
        out[name] = train_tiny(d / name, "toy", method_args={"r": r, "lora_alpha": 2 * r}, train={"max_steps": 3, "lr": 5e-2, "seed": seed})
    return out


@pytest.fixture(scope="module")
def other_tasks(tmp_path_factory):
    """A classification adapter of another task ("other") and a generation adapter ("gen")."""
    d = tmp_path_factory.mktemp("merge_other")
    return {"other": train_tiny(d, "other", method_args={"r": 4, "lora_alpha": 8}),
            "gen": train_tiny(d, "gen", type="generation", target="label", label=None, labels=None, method_args={"r": 4, "lora_alpha": 8},
                              train={"max_new_tokens": 4})}


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
    backbone = load_backbone("tiny-random-llama", "none", dtype="fp32")  # the merged model's dtype: the same numbers to 1e-5
    plain = PeftModel.from_pretrained(backbone.model, tmp_path / "mix").eval()
    ids = backbone.tokenizer(["T: pos 3\nL:"], return_tensors="pt").to(device)  # both models run on the suite's device
    with torch.no_grad():
        assert torch.allclose(plain(**ids).logits, model(**ids).logits, atol=1e-5)
    side = json.loads((tmp_path / "mix" / "adapterhub.json").read_text())
    assert side["merge"]["weights"] == weights and set(side["merge_report"]) == {"a", "b"}
    assert set(side["merge_report"]["a"]) >= {"merged", "own", "delta", "metric"}


def test_cat_merge_is_the_exact_weighted_sum_of_updates_and_takes_mixed_ranks(sources):
    weights = {"a": 0.5, "c": 2.0}
    model, _ = merge_adapters({k: sources[k] for k in weights}, weights, "cat", name="mix", report_rows=0, dtype="fp32")
    (a_A, a_B, a_s), (c_A, c_B, c_s) = _factors(model, "a"), _factors(model, "c")
    m_A, m_B, m_s = _factors(model, "mix")
    want = 0.5 * a_s * a_B @ a_A + 2.0 * c_s * c_B @ c_A
    assert m_A.shape[0] == 12 and torch.allclose(m_s * m_B @ m_A, want, atol=1e-6)


@pytest.mark.parametrize("method, density, needle", [
    ("ties", 0.5, "needs equal LoRA ranks but they are {'a': 4, 'c': 8}; use method 'delta_linear' (or 'cat') or 'svd'"),
    ("linear", None, "needs equal LoRA ranks"),
    ("average", None, "merge method 'average' is not one of"),
])
def test_rank_and_method_problems_are_refused(sources, method, density, needle):
    with pytest.raises(MergeError, match=re.escape(needle)):
        merge_adapters({"a": sources["a"], "c": sources["c"]}, {"a": 0.5, "c": 0.5}, method, density=density, report_rows=0)


def test_ties_and_dare_need_a_density_and_run_with_one(sources):
    with pytest.raises(MergeError, match="needs a density"):
        merge_adapters({"a": sources["a"], "b": sources["b"]}, {"a": 0.5, "b": 0.5}, "ties", report_rows=0)
    for method in ("ties", "dare_linear", "dare_ties", "magnitude_prune"):
        model, _ = merge_adapters({"a": sources["a"], "b": sources["b"]}, {"a": 0.5, "b": 0.5}, method, density=0.5, report_rows=0, dtype="fp32")
        assert model.active_adapter == "merged"
        # the merged factors are peft's own add_weighted_adapter result on the same folders
        ref = PeftModel.from_pretrained(load_backbone("tiny-random-llama", "none", dtype="fp32").model, sources["a"], adapter_name="a")
        ref.load_adapter(sources["b"], adapter_name="b")
        ref.add_weighted_adapter(["a", "b"], [0.5, 0.5], "ref", combination_type=method, density=0.5)
        m_A, m_B, _ = _factors(model, "merged")
        r_A, r_B, _ = _factors(ref, "ref")
        a_A, a_B, _ = _factors(model, "a")
        if not method.startswith("dare"):  # dare drops at random (its draws depend on what ran before): compared for shape only
            assert torch.allclose(m_A, r_A, atol=1e-6) and torch.allclose(m_B, r_B, atol=1e-6), method
        assert m_A.shape == r_A.shape and m_B.shape == r_B.shape, method
        assert not torch.allclose(m_A, a_A, atol=1e-3) and (m_B != 0).any(), method  # a real merge, not a copy or nothing


@pytest.mark.parametrize("ties, linear", [("dare_ties", "dare_linear"), ("dare_ties_svd", "dare_linear_svd")])
def test_dare_ties_elects_signs_where_dare_linear_does_not(sources, tmp_path, ties, linear):
    """DARE draws at random, so it cannot be compared with peft's own run; under one seed the draws are the same, and
    then dare_ties (DARE, then TIES' sign election) must differ from dare_linear, and repeat itself exactly."""
    def merged(method, tag):
        torch.manual_seed(0)
        merge_adapters({"a": sources["a"], "b": sources["b"]}, {"a": 0.5, "b": 0.5}, method, density=0.5, output=tmp_path / tag,
                       name="mix", report_rows=0, dtype="fp32")
        return _updates(tmp_path / tag)

    first, again, other = merged(ties, "first"), merged(ties, "again"), merged(linear, "other")
    assert all(torch.equal(first[m], again[m]) for m in first)
    assert max((first[m] - other[m]).abs().max().item() for m in first) > 1e-4


def test_fold_into_base_reports_its_error(sources):
    # exact up to rounding on an fp32 base, on any device (a bf16 base re-rounds the folded weights)
    model, _ = merge_adapters({"a": sources["a"]}, {"a": 1.0}, "linear", report_rows=0, dtype="fp32")
    backbone = load_backbone("tiny-random-llama", "none", dtype="fp32")
    folded, err = fold_into_base(model, backbone.tokenizer, ["T: pos 1\nL:", "T: neg 2\nL:"])
    assert err < 1e-4 and not isinstance(folded, PeftModel)


def test_router_merge_into_base_folds_the_update_into_the_backbone(sources, device):
    from adapterhub_lite.serving.router import Router

    router = Router(load_backbone("tiny-random-llama", "none", dtype="fp32"))  # fp32: the fold is exact up to rounding
    for name in ("a", "b"):
        router.register(name, sources[name])
    ids = [router.backbone.tokenizer("T: pos 1\nL:").input_ids]
    base_before = router.bank.forward(ids, [None])[0]
    sidecar = router.merge({"a": 0.5, "b": 0.5}, "linear", name="ab", into_base=True)
    merged_folder = router.folders["ab"]
    with torch.no_grad():
        want = PeftModel.from_pretrained(load_backbone("tiny-random-llama", "none", dtype="fp32").model, merged_folder)(input_ids=torch.tensor(ids, device=device)).logits[0]
    base_after = router.bank.forward(ids, [None])[0]  # "base" now runs the folded weights
    assert sidecar["fold"]["max_abs_dlogit"] < 1e-4 and router.folded == ["ab"]
    assert (base_after - want).abs().max() < 1e-4 and (base_after - base_before).abs().max() > 1e-4
    # the folded merge is in every row now: named as an adapter it was applied a second time on top (W + 2ΔW), unsaid
    for ask in (lambda: router.hold(["ab"]), lambda: router.run([{"adapter": "ab", "text": "pos 1"}])):
        with pytest.raises(AdapterHubError, match=r"adapter 'ab' is folded into the backbone's weights .*name 'base' for it$"):
            ask()
    assert router.run([{"adapter": "a", "text": "pos 1"}])[0]["adapter"] == "a"  # the others are served (on the folded base)


def _updates(folder) -> dict:
    """ΔW = s·B·A of every module of a saved LoRA folder."""
    lora = read_lora(folder)
    return {m: lora.update(m) for m in lora.modules}


def test_delta_linear_is_the_exact_weighted_sum_of_updates_and_linear_is_not(sources, tmp_path):
    weights = {"a": 0.7, "b": -0.4}
    want = {m: 0.7 * ua + -0.4 * _updates(sources["b"])[m] for m, ua in _updates(sources["a"]).items()}
    for method in ("delta_linear", "cat"):  # delta_linear is peft's cat under the name of what it does
        _, meta = merge_adapters({k: sources[k] for k in weights}, weights, method, output=tmp_path / method, name="mix", report_rows=0, dtype="fp32")
        got = _updates(tmp_path / method)
        assert set(got) == set(want) and meta["merge"]["acts_on"] == "delta_w" and meta["merge"]["rank"] == 8
        assert max((got[m] - want[m]).abs().max().item() for m in want) < 1e-6
    merge_adapters({k: sources[k] for k in weights}, weights, "linear", output=tmp_path / "linear", name="mix", report_rows=0, dtype="fp32")
    linear = _updates(tmp_path / "linear")  # factors summed separately: B·A carries the cross terms B_a·A_b, B_b·A_a
    assert max((linear[m] - want[m]).abs().max().item() for m in want) > 1e-3


@pytest.mark.parametrize("method", ["ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"])
def test_svd_variants_act_on_the_update_and_take_mixed_ranks(sources, tmp_path, method):
    _, meta = merge_adapters({"a": sources["a"], "c": sources["c"]}, {"a": 0.5, "c": 0.5}, method, density=1.0 if method == "magnitude_prune_svd" else 0.5,
                             output=tmp_path / "m", name="mix", report_rows=0)
    assert meta["merge"]["acts_on"] == "delta_w" and meta["merge"]["rank"] == 8
    if method == "magnitude_prune_svd":  # density 1 prunes nothing: the best rank-8 approximation of Σ w·ΔW
        ua, uc = _updates(sources["a"]), _updates(sources["c"])
        for m, got in _updates(tmp_path / "m").items():
            total = 0.5 * ua[m] + 0.5 * uc[m]
            u, sv, vh = torch.linalg.svd(total)
            assert torch.allclose(got, (u[:, :8] * sv[:8]) @ vh[:8], atol=1e-5)


@pytest.mark.parametrize("weights, method, density, needle", [
    ({"a": float("nan"), "b": 0.5}, "linear", None, "merge weights must be finite numbers"),
    ({"a": 0.5, "b": 0.5}, "linear", 0.3, "method 'linear' does not use a density"),
    ({"a": 0.5, "b": 0.5}, "ties", 1.5, r"density must be in \(0, 1\], got 1.5"),
])
def test_non_finite_weights_and_stray_densities_are_refused(sources, weights, method, density, needle):
    with pytest.raises(MergeError, match=needle):
        merge_adapters({"a": sources["a"], "b": sources["b"]}, weights, method, density=density, report_rows=0)


def test_a_merged_name_that_is_a_source_name_is_refused(sources):
    # peft's add_weighted_adapter silently keeps an existing adapter of that name: "a" would be saved as the merge
    with pytest.raises(MergeError, match="is also a source's name"):
        merge_adapters({"a": sources["a"], "b": sources["b"]}, {"a": 0.5, "b": 0.5}, name="a", report_rows=0)
    with pytest.raises(MergeError, match=r"contain '\.'"):
        merge_adapters({"a": sources["a"], "b": sources["b"]}, {"a": 0.5, "b": 0.5}, name="mix.v2", report_rows=0)


def test_sources_named_with_a_dot_merge_as_under_plain_names(sources):
    """A source's name with '.' (the server's pinned id `toy@1.0.0`, a folder `v1.2`) was refused ("choose names without
    '.' (--name)", a flag a request has not): peft now loads it under another name, and the sidecar keeps the given one."""
    plain, _ = merge_adapters({"a": sources["a"], "c": sources["c"]}, {"a": 0.5, "c": 2.0}, "cat", name="mix", report_rows=0, dtype="fp32")
    dotted, meta = merge_adapters({"toy@1.0.0": sources["a"], "v1.2": sources["c"]}, {"toy@1.0.0": 0.5, "v1.2": 2.0}, "cat", name="mix",
                                  report_rows=0, dtype="fp32")
    (p_A, p_B, p_s), (d_A, d_B, d_s) = _factors(plain, "mix"), _factors(dotted, "mix")
    assert torch.equal(p_A, d_A) and torch.equal(p_B, d_B) and p_s == d_s
    assert set(meta["merge"]["sources"]) == {"toy@1.0.0", "v1.2"} and meta["merge"]["weights"] == {"toy@1.0.0": 0.5, "v1.2": 2.0}
    empty, _ = merge_adapters({"": sources["a"], "c": sources["c"]}, {"": 0.5, "c": 2.0}, "cat", name="mix", report_rows=0, dtype="fp32")
    assert torch.equal(_factors(empty, "mix")[0], p_A)


def test_sources_whose_peft_names_would_meet_are_merged_apart(sources):
    """peft gets 'x_1' for a source named 'x.1' (a ModuleDict key cannot hold '.'): a source already named 'x_1', another
    name made so ('a.b_' after 'a.b' took 'a_b_'), or the merged adapter's own name must not be that name too, or two
    sources would load under one (the dict of sources keeps one of them, the merge reads it twice), unsaid."""
    weights = {"a": 0.5, "b": 0.3, "c": 2.0}
    plain, _ = merge_adapters({k: sources[k] for k in weights}, weights, "cat", name="mix", report_rows=0, dtype="fp32")
    want = _factors(plain, "mix")
    for given, merged in ((("x.1", "x_1", "c"), "mix"), (("x.1", "b", "c"), "x_1"), (("a.b", "a_b", "a.b_"), "mix")):
        named = dict(zip(given, ("a", "b", "c")))
        model, meta = merge_adapters({n: sources[k] for n, k in named.items()}, {n: weights[k] for n, k in named.items()}, "cat",
                                     name=merged, report_rows=0, dtype="fp32")
        got = _factors(model, merged)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2], given
        assert set(meta["merge"]["sources"]) == set(given)


def test_the_report_scores_sources_named_with_a_dot_under_their_own_adapters(sources):
    """peft holds a source named 'toy@1.0.0' under another name; the report's "own" score reads it under that name, so a
    merge of dotted sources reports as the same merge of plain names does, keyed by the names given."""
    weights = {"a": 0.7, "b": 0.3}
    _, plain = merge_adapters({k: sources[k] for k in weights}, weights, "linear", name="mix", report_rows=4, dtype="fp32")
    named = {"toy@1.0.0": "a", "v1.2": "b"}
    _, dotted = merge_adapters({n: sources[k] for n, k in named.items()}, {n: weights[k] for n, k in named.items()}, "linear", name="mix",
                               report_rows=4, dtype="fp32")
    assert dotted["merge_report"] == {n: plain["merge_report"][k] for n, k in named.items()}


def test_a_merge_is_built_from_the_bytes_it_read_not_the_file_read_again(sources, tmp_path, monkeypatch):
    """merge_adapters reads each source's files once (read_source: the bytes the sidecar's adapter_sha256 hashes) and
    builds the merge from them: a file rewritten after that read changes neither the merge nor its recorded hash."""
    import hashlib

    from safetensors.torch import load_file, save_file

    from adapterhub_lite.ops import merge

    copies = {n: shutil.copytree(sources[n], tmp_path / n) for n in ("a", "b")}
    weights = {"a": 0.5, "b": 0.5}
    merge_adapters(copies, weights, "delta_linear", output=tmp_path / "clean", name="mix", report_rows=0, dtype="fp32")
    file = copies["b"] / "adapter_model.safetensors"
    kept, read = file.read_bytes(), merge.read_source

    def then_rewritten(folder, *a, **k):  # another writer replaces the weights right after they were read
        out = read(folder, *a, **k)
        if folder == copies["b"]:
            save_file({k: v * 3 for k, v in load_file(file).items()}, file)
        return out

    monkeypatch.setattr(merge, "read_source", then_rewritten)
    _, meta = merge_adapters(copies, weights, "delta_linear", output=tmp_path / "raced", name="mix", report_rows=0, dtype="fp32")
    want, got = load_file(tmp_path / "clean" / "adapter_model.safetensors"), load_file(tmp_path / "raced" / "adapter_model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert meta["merge"]["sources"]["b"]["adapter_sha256"] == hashlib.sha256(kept).hexdigest() != hashlib.sha256(file.read_bytes()).hexdigest()


def test_the_merged_sidecar_is_built_for_the_merge_not_copied_from_a_source(sources, tmp_path):
    merge_adapters({"a": sources["a"], "b": sources["b"]}, {"a": 0.5, "b": 0.5}, "cat", output=tmp_path / "mix", name="mix", report_rows=4)
    side = json.loads((tmp_path / "mix" / "adapterhub.json").read_text())
    first = json.loads((sources["a"] / "adapterhub.json").read_text())
    assert side["routing"] is None and first["routing"]  # no borrowed routing record
    assert side["metrics"] == side["merge_report"]["a"]["merged"] and side["metrics_rows"] == 4  # measured on the merge itself
    assert side["task"]["name"] == "toy" and side["name"] == "mix" and side["train_state"] is None and side["data"] == {}  # nothing copied from a source
    src = side["merge"]["sources"]["b"]
    assert src["task"] == "toy" and src["rank"] == 4 and src["folder"] == str(sources["b"]) and len(src["adapter_sha256"]) == 64
    assert side["merge"]["method"] == "cat" and side["merge"]["weights"] == {"a": 0.5, "b": 0.5}


def test_sources_of_different_tasks_need_a_named_task(sources, other_tasks):
    with pytest.raises(MergeError, match=r"serve different tasks \(a: toy \(classification\), other: other \(classification\)\); name .* --task"):
        merge_adapters({"a": sources["a"], "other": other_tasks["other"]}, {"a": 0.5, "other": 0.5}, report_rows=0)
    with pytest.raises(MergeError, match=r"gen: gen \(generation\)"):
        merge_adapters({"a": sources["a"], "gen": other_tasks["gen"]}, {"a": 0.5, "gen": 0.5}, report_rows=0)
    with pytest.raises(MergeError, match="--task 'sst2' is not the task of any source"):
        merge_adapters({"a": sources["a"], "gen": other_tasks["gen"]}, {"a": 0.5, "gen": 0.5}, task="sst2", report_rows=0)
    _, meta = merge_adapters({"a": sources["a"], "gen": other_tasks["gen"]}, {"a": 0.5, "gen": 0.5}, task="gen", report_rows=0)
    assert meta["task"]["name"] == "gen" and meta["task"]["type"] == "generation"
    _, meta = merge_adapters({"a": sources["a"], "other": other_tasks["other"]}, {"a": 0.5, "other": 0.5}, task="none", report_rows=0)
    assert meta["task"] is None and meta["label_words"] is None


def test_a_published_merge_is_left_out_of_auto_routing_with_a_warning(sources, tmp_path):
    from adapterhub_lite.artifacts.registry import LocalRegistry
    from adapterhub_lite.serving.router import Router

    merge_adapters({"a": sources["a"], "b": sources["b"]}, {"a": 0.5, "b": 0.5}, "linear", output=tmp_path / "mix", name="mix", report_rows=0)
    reg = LocalRegistry(tmp_path / "reg")
    reg.publish(sources["a"], name="a")
    reg.publish(tmp_path / "mix", name="mix")
    router = Router.from_registry(tmp_path / "reg")
    with pytest.warns(UserWarning, match="adapter 'mix' is left out of content routing: .* has no routing file"):
        out = router.run([{"adapter": "auto", "text": "pos 3"}, {"adapter": "mix", "text": "neg 1"}])
    assert out[0]["adapter"] == "a" and out[1]["adapter"] == "mix" and all(o["prediction"] in ("pos", "neg") for o in out)


@pytest.mark.parametrize("method, density", [("delta_linear", None), ("linear", None), ("svd", None), ("ties", 0.5), ("ties_svd", 0.5),
                                             ("dare_linear", 0.5), ("dare_ties_svd", 0.5)])
def test_a_merge_on_the_weightless_model_equals_the_merge_on_the_backbone(sources, tmp_path, monkeypatch, method, density):
    """The server's merges (Router.build_merge) load no second backbone, and their factors are the ones peft makes on the real one."""
    from safetensors.torch import load_file

    from adapterhub_lite.ops import merge
    from adapterhub_lite.serving.router import Router

    names = ("a", "b") if method in ("linear", "ties", "dare_linear") else ("a", "c")
    weights = {n: w for n, w in zip(names, (0.6, 0.4))}
    # (DARE's methods drop at random: both sides seed torch's generator before loading, so they draw alike)
    merge_adapters({n: sources[n] for n in names}, weights, method, density=density, output=tmp_path / "full", name="mix", report_rows=0, dtype="fp32")
    router = Router(load_backbone("tiny-random-llama", "none", dtype="fp32"))
    for n in names:
        router.register(n, sources[n])

    def no_backbone(*args, **kwargs):
        raise AssertionError("a merge without a report loaded a backbone")

    monkeypatch.setattr(merge, "load_backbone", no_backbone)
    folder, side = router.build_merge(weights, method, density=density, name="mix", output=tmp_path / "light")
    full, light = load_file(tmp_path / "full" / "adapter_model.safetensors"), load_file(folder / "adapter_model.safetensors")
    assert full.keys() == light.keys() and all(torch.equal(full[k], light[k]) for k in full)
    assert side["merge"]["method"] == method and json.loads((folder / "adapter_config.json").read_text())["r"] == side["merge"]["rank"]


def test_the_merged_card_has_a_trained_card_s_metadata_and_no_local_base_model(sources, tmp_path):
    """The merged adapter's README.md reads back with huggingface_hub as a trained adapter's does: library_name peft,
    pipeline_tag text-generation, and base_model only when it is a Hub model id (the tiny backbone's is a local folder,
    which the Hub refuses as base_model); ModelCard and metadata_load agree."""
    from huggingface_hub import ModelCard, metadata_load

    merge_adapters({"a": sources["a"], "b": sources["b"]}, {"a": 0.5, "b": 0.5}, "cat", output=tmp_path / "mix", name="mix", report_rows=0)
    readme = tmp_path / "mix" / "README.md"
    data = ModelCard.load(readme).data
    assert data.to_dict() == metadata_load(readme)
    assert (data.library_name, data.pipeline_tag, data.base_model) == ("peft", "text-generation", None)
    assert data.tags == ["adapterhub_lite", "lora", "merged"]
    from adapterhub_lite.ops.merge import merged_card  # a Hub base model: named, with its adapter tag

    side = json.loads((tmp_path / "mix" / "adapterhub.json").read_text())
    side["base"]["hub_id"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    hub = ModelCard(merged_card("mix", side)).data
    assert hub.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and "base_model:adapter:HuggingFaceTB/SmolLM2-135M-Instruct" in hub.tags


def test_a_first_source_with_rslora_does_not_scale_the_merge(sources, tmp_path):
    """peft's merged config is the first source's with lora_alpha = r (scale 1), but it kept that source's use_rslora: the
    merge ran and was saved at √r times its update (delta_linear, the exact Σ w·ΔW, off by √(r_a + r_b) = √8 here)."""
    d = tmp_path / "rs"
    d.mkdir()
    rs = train_tiny(d, "toy", method_args={"r": 4, "lora_alpha": 8, "use_rslora": True}, train={"max_steps": 3, "lr": 5e-2, "seed": 4})
    weights = {"rs": 0.7, "a": 0.3}
    model, _ = merge_adapters({"rs": rs, "a": sources["a"]}, weights, "delta_linear", output=tmp_path / "m", name="mix", report_rows=0, dtype="fp32")
    ur, ua = _updates(rs), _updates(sources["a"])
    want = {m: 0.7 * ur[m] + 0.3 * ua[m] for m in ur}
    got = _updates(tmp_path / "m")  # the saved folder, as plain peft loads it
    assert not json.loads((tmp_path / "m" / "adapter_config.json").read_text())["use_rslora"]
    assert max((got[m] - want[m]).abs().max().item() for m in want) < 1e-6
    layer = model.get_submodule(LAYER)  # and the merged model returned (the report, into_base's fold) scales it so too
    assert layer.scaling["mix"] == 1.0


@pytest.mark.parametrize("other", ["b", "c"])  # r=4 (peft's largest ranks differ: 8 and 4), r=8 (they are equal)
def test_factor_methods_refuse_a_source_with_other_ranks_per_module(sources, tmp_path, other):
    """peft sizes by each source's largest rank (r or a rank_pattern entry) and stacks A and B layer by layer, so a source
    whose rank_pattern gives a module another rank was a bare ValueError from peft (a 500 in the server) beside an r=4
    source, and a failed stack of 4 and 8 beside an r=8 one, which the check of r alone refused as ranks 4 and 8."""
    (tmp_path / "p").mkdir()
    patterned = train_tiny(tmp_path / "p", "toy", method_args={"r": 4, "lora_alpha": 8, "rank_pattern": {"v_proj": 8}})
    with pytest.raises(MergeError, match=r"method 'linear' needs one LoRA rank in every layer, but \['p'\] .*'v_proj': 8.*delta_linear"):
        merge_adapters({"p": patterned, other: sources[other]}, {"p": 0.5, other: 0.5}, "linear", report_rows=0)
    _, meta = merge_adapters({"p": patterned, other: sources[other]}, {"p": 0.5, other: 0.5}, "svd", report_rows=0)
    assert meta["merge"]["ranks"] == {"p": 8, other: 4 if other == "b" else 8}  # each source's largest, as peft sizes the merge


def test_a_build_merge_merges_the_bytes_it_checked(sources, tmp_path, monkeypatch):
    """build_merge hashed the sources, then peft read the files again: a file swapped in between (and put back before
    the second hash) was merged unchecked. The bytes are now read once, checked, and merged: the swap changes nothing."""
    from safetensors.torch import load_file, save_file

    from adapterhub_lite.ops import merge
    from adapterhub_lite.serving.router import Router

    router = Router(load_backbone("tiny-random-llama", "none", dtype="fp32"))
    copies = {n: shutil.copytree(sources[n], tmp_path / n) for n in ("a", "b")}
    for n, f in copies.items():
        router.register(n, f)
    weights = {"a": 0.5, "b": 0.5}
    clean, _ = router.build_merge(weights, "delta_linear", name="mix", output=tmp_path / "clean")
    file = copies["b"] / "adapter_model.safetensors"
    kept = file.read_bytes()
    make, add = merge.factor_model, merge.add_merged

    def swapped(*args, **kwargs):  # after the check (and, now, after the one read): another adapter's weights
        save_file({k: v * 3 for k, v in load_file(file).items()}, file)
        return make(*args, **kwargs)

    def put_back(*args, **kwargs):  # before the check that followed the merge
        file.write_bytes(kept)
        return add(*args, **kwargs)

    monkeypatch.setattr(merge, "factor_model", swapped)
    monkeypatch.setattr(merge, "add_merged", put_back)
    folder, side = router.build_merge(weights, "delta_linear", name="mix", output=tmp_path / "raced")
    want, got = load_file(clean / "adapter_model.safetensors"), load_file(folder / "adapter_model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert side["merge"]["sources"]["b"]["adapter_sha256"] == hashlib.sha256(kept).hexdigest()


@pytest.mark.parametrize("second, needle", [("a", "is given twice (weights 0.5 and 0.25); give each source once, with the summed weight 0.75"),
                                            ("b", "are both named 'toy'")])
def test_the_cli_refuses_a_source_given_twice_or_two_of_one_name(sources, tmp_path, capsys, second, needle):
    """`merge` keyed its sources by name in a dict: a folder given twice, or two folders of one name (a/toy, b/toy: two
    runs of one task), kept the last alone, so the merge was one source at its own weight (0.25 here), exit 0, unsaid."""
    from adapterhub_lite.cli.main import main

    code = main(["merge", str(sources["a"]), str(sources[second]), "--weights", "0.5", "0.25", "--output", str(tmp_path / "m"),
                 "--report-rows", "0", "--quantization", "none"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("where, needle", [("file/m", "file' is a file, not a folder"), ("taken", "taken' already exists")],
                         ids=["under-a-file", "exists"])
def test_the_cli_refuses_an_output_under_a_file_or_taken_in_one_line(sources, tmp_path, capsys, where, needle):
    """`merge --output file/m` (file a file) merged, then mkdir's FileExistsError came out as a traceback, exit 1."""
    from adapterhub_lite.cli.main import main

    (tmp_path / "file").write_text("x")
    (tmp_path / "taken").mkdir()
    shutil.copytree(sources["c"], tmp_path / "c")  # another folder name: the CLI names its sources by folder
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code = main(["merge", str(sources["a"]), str(tmp_path / "c"), "--weights", "0.5", "0.5", "--method", "delta_linear", "--output", str(tmp_path / where),
                 "--report-rows", "0", "--quantization", "none"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no hidden temp folder left either


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties_svd"])
def test_a_dare_merge_is_peft_s_after_its_seed_and_one_adapter_per_seed(sources, tmp_path, method):
    """DARE drops at random from torch's generator: two builds of one recipe were two adapters (the server rebuilds an
    evicted merge under the same name; replicas build their own). The merge seeds it (seed=0) before loading the sources,
    so it is what peft gives after torch.manual_seed(0), and the same each time; another seed drops others."""
    from safetensors.torch import load_file

    names = ("a", "b")
    weights = {"a": 0.6, "b": 0.4}

    def ours(tag, **kw):
        merge_adapters({n: sources[n] for n in names}, weights, method, density=0.5, output=tmp_path / tag, name="mix", report_rows=0,
                       dtype="fp32", **kw)
        return load_file(tmp_path / tag / "adapter_model.safetensors")

    torch.manual_seed(0)
    ref = PeftModel.from_pretrained(load_backbone("tiny-random-llama", "none", dtype="fp32").model, sources["a"], adapter_name="a")
    ref.load_adapter(sources["b"], adapter_name="b")
    ref.add_weighted_adapter(list(names), list(weights.values()), "mix", combination_type=method, density=0.5)
    ref.save_pretrained(tmp_path / "peft", selected_adapters=["mix"], save_embedding_layers=False)
    want = load_file(tmp_path / "peft" / "mix" / "adapter_model.safetensors")
    first, again, other = ours("one"), ours("two"), ours("three", seed=1)
    assert first.keys() == want.keys() and all(torch.equal(first[k], want[k]) for k in want)
    assert all(torch.equal(first[k], again[k]) for k in want)
    assert any(not torch.equal(first[k], other[k]) for k in want)
    assert json.loads((tmp_path / "one" / "adapterhub.json").read_text())["merge"]["seed"] == 0


def test_a_source_whose_target_modules_is_a_regex_merges_with_a_list_one(sources, tmp_path):
    """peft merges sources whose target_modules are all lists or all regexes and refuses a mix (a bare ValueError: a 500
    from a per-request merge); the regex source's modules are named one by one, so the merge is the one of its list form."""
    regex = tmp_path / "rx"
    shutil.copytree(sources["a"], regex)
    config = json.loads((regex / "adapter_config.json").read_text())
    (regex / "adapter_config.json").write_text(json.dumps({**config, "target_modules": rf".*\.({'|'.join(config['target_modules'])})"}))
    merge_adapters({"a": sources["a"], "b": sources["b"]}, {"a": 0.7, "b": 0.3}, "delta_linear", output=tmp_path / "list", name="mix", report_rows=0)
    merge_adapters({"a": regex, "b": sources["b"]}, {"a": 0.7, "b": 0.3}, "delta_linear", output=tmp_path / "mixed", name="mix", report_rows=0)
    want, got = _updates(tmp_path / "list"), _updates(tmp_path / "mixed")
    assert set(got) == set(want) and max((got[m] - want[m]).abs().max().item() for m in want) < 1e-6


def test_majority_sign_method_is_peft_s_and_refused_where_unused(sources, tmp_path):
    """peft's add_weighted_adapter elects TIES signs by 'total' (default) or 'frequency'; the merge passes it on (the CLI's
    --majority-sign-method, a recipe's majority_sign_method), records it, and refuses it for a method that elects none."""
    from safetensors.torch import load_file

    weights = {"a": 0.6, "b": -0.4}
    torch.manual_seed(0)
    ref = PeftModel.from_pretrained(load_backbone("tiny-random-llama", "none", dtype="fp32").model, sources["a"], adapter_name="a")
    ref.load_adapter(sources["b"], adapter_name="b")
    ref.add_weighted_adapter(["a", "b"], [0.6, -0.4], "mix", combination_type="ties", density=0.5, majority_sign_method="frequency")
    ref.save_pretrained(tmp_path / "peft", selected_adapters=["mix"], save_embedding_layers=False)
    want = load_file(tmp_path / "peft" / "mix" / "adapter_model.safetensors")
    got = {}
    for sign in ("frequency", None):
        _, meta = merge_adapters({k: sources[k] for k in weights}, weights, "ties", density=0.5, output=tmp_path / str(sign), name="mix",
                                 report_rows=0, majority_sign_method=sign)
        got[sign] = load_file(tmp_path / str(sign) / "adapter_model.safetensors")
        assert meta["merge"]["majority_sign_method"] == (sign or "total")
    assert all(torch.equal(got["frequency"][k], want[k]) for k in want)
    assert any(not torch.equal(got["frequency"][k], got[None][k]) for k in want)
    with pytest.raises(MergeError, match="method 'svd' elects no signs, so majority_sign_method .'frequency'. is unused"):
        merge_adapters({k: sources[k] for k in weights}, weights, "svd", report_rows=0, majority_sign_method="frequency")
    with pytest.raises(MergeError, match="majority_sign_method is 'most'; give 'total'"):
        merge_adapters({k: sources[k] for k in weights}, weights, "ties", density=0.5, report_rows=0, majority_sign_method="most")


def test_a_first_source_on_some_layers_does_not_drop_the_others_updates_elsewhere(sources, tmp_path):
    """peft builds the merged adapter's config from the first source's, keeping its layers_to_transform: with a first
    source on layer 0 only, the merge held no layer-1 modules, and the second source's updates there were dropped, unsaid
    (probe: 0.30 off the exact sum in the logits). The merge now holds every module a source holds, and is the sum."""
    (tmp_path / "g").mkdir()
    first = train_tiny(tmp_path / "g", "toy", method_args={"r": 4, "lora_alpha": 8, "layers_to_transform": [0]}, train={"max_steps": 3, "lr": 5e-2})
    weights = {"g": 0.7, "a": 0.3}
    merge_adapters({"g": first, "a": sources["a"]}, weights, "delta_linear", output=tmp_path / "m", name="mix", report_rows=0)
    ug, ua = _updates(first), _updates(sources["a"])
    want = {m: 0.7 * ug.get(m, 0) + 0.3 * ua.get(m, 0) for m in ug.keys() | ua.keys()}
    got = _updates(tmp_path / "m")
    assert set(got) == set(want) and max((got[m] - want[m]).abs().max().item() for m in want) < 1e-6


def test_a_source_with_tensors_besides_its_factors_is_refused(sources, tmp_path):
    """peft's add_weighted_adapter merges the A and B factors alone: a source's lora_bias (B's bias), DoRA magnitudes, a
    trained module copy were dropped from the merge, unsaid. Such a source is refused in one line naming a tensor."""
    from safetensors.torch import load_file, save_file

    biased = tmp_path / "biased"
    shutil.copytree(sources["a"], biased)
    config = json.loads((biased / "adapter_config.json").read_text())
    (biased / "adapter_config.json").write_text(json.dumps({**config, "lora_bias": True}))
    state = load_file(biased / "adapter_model.safetensors")
    state.update({k.replace(".weight", ".bias"): torch.full(v.shape[:1], 0.5) for k, v in state.items() if ".lora_B." in k})
    save_file(state, biased / "adapter_model.safetensors")
    with pytest.raises(MergeError, match=r"holds \d+ trained tensor\(s\) besides the LoRA factors \(e\.g\. .*lora_B\.bias\)"):
        merge_adapters({"x": biased, "b": sources["b"]}, {"x": 0.5, "b": 0.5}, "delta_linear", report_rows=0)


def test_a_source_that_targets_parameters_is_refused_by_its_field_in_merges_and_serving(sources, tmp_path):
    """A LoRA on nn.Parameter (peft's target_parameters, e.g. MoE experts) reached peft's add_weighted_adapter, whose
    bare ValueError ('does not support targeting nn.Parameter') was a 500 from the server's per-request merge. The merge
    refuses it in one line naming the field and the fix; the per-row serving bank refuses such an adapter by the field."""
    from peft import LoraConfig, get_peft_model

    from adapterhub_lite.serving.router import Router

    folder = tmp_path / "params"
    shutil.copytree(sources["a"], folder)  # its sidecar (task, base); peft's own files replaced
    base = load_backbone("tiny-random-llama", "none", dtype="fp32")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], target_parameters=["mlp.gate_proj.weight"])
    get_peft_model(base.model, config).save_pretrained(folder)
    assert json.loads((folder / "adapter_config.json").read_text())["target_parameters"] == ["mlp.gate_proj.weight"]
    with pytest.raises(MergeError, match=r"^\['p'\] set target_parameters \{'p': \['mlp.gate_proj.weight'\]\} .*retrain without target_parameters$"):
        merge_adapters({"p": folder, "a": sources["a"]}, {"p": 0.5, "a": 0.5}, "delta_linear", output=tmp_path / "m", name="mix", report_rows=0)
    assert not (tmp_path / "m").exists()
    router = Router(load_backbone("tiny-random-llama", "none", dtype="fp32"))
    router.register("p", folder)
    with pytest.raises(AdapterHubError, match=r"'p'.* sets target_parameters=\['mlp.gate_proj.weight'\], which per-row LoRA does not implement"):
        router.hold(["p"])


def test_a_dare_mask_is_drawn_on_the_cpu_whatever_the_device_so_a_seed_is_one_merge_everywhere(sources, tmp_path, monkeypatch):
    """peft drew DARE's mask with torch.bernoulli on the tensor's own device: a merge on a GPU backbone took CUDA's
    generator and dropped other entries than `merge --seed 0` on a CPU. In a merge, a drop of a tensor on another device
    (meta here: no GPU needed) now draws on the CPU generator, the same mask as for a CPU tensor under the same seed."""
    from peft.utils import merge_utils

    from adapterhub_lite.ops import merge as merge_mod

    real_bernoulli, drawn = torch.bernoulli, []
    monkeypatch.setattr(torch, "bernoulli", lambda p, *a, **kw: drawn.append(real_bernoulli(p, *a, **kw)) or drawn[-1])
    real_add, masks = merge_mod.add_merged, {}

    def add_merged(model, *args, **kwargs):  # inside the merge's seeded block: drop one tensor per device, same seed
        for device in ("cpu", "meta"):
            torch.manual_seed(0)
            drawn.clear()
            merge_utils.prune(torch.ones(16, 16, device=device), 0.5, "random")
            masks[device] = drawn[-1]
        return real_add(model, *args, **kwargs)

    monkeypatch.setattr(merge_mod, "add_merged", add_merged)
    merge_adapters({n: sources[n] for n in ("a", "b")}, {"a": 0.5, "b": 0.5}, "dare_linear", density=0.5, output=tmp_path / "m",
                   name="mix", report_rows=0, dtype="fp32")
    assert masks["meta"].device.type == "cpu", f"the mask for a meta tensor was drawn on {masks['meta'].device}"
    assert torch.equal(masks["meta"], masks["cpu"])
    assert merge_utils.random_pruning is not merge_mod.cpu_random_pruning  # peft's own again after the merge


@pytest.mark.parametrize("init, first", [("pissa", False), ("pissa", True), ("olora", True), ("corda", False)])
def test_a_source_made_for_a_rewritten_base_is_refused_in_one_line(sources, tmp_path, init, first):
    """A source initialised with PiSSA / OLoRA / CorDA (init_lora_weights names one) holds the residual of a base that
    init rewrote, so it fits only that base. As a merge's second source it was merged unsaid and the merged adapter (the
    first source's config: no such init) served, on the unchanged backbone, factors made for another base; first, the
    merged adapter was saved saying init_lora_weights='pissa'; OLoRA and CorDA sources raised a RuntimeError / peft's
    bare ValueError. Each is refused in one line naming the source and the init, before anything loads."""
    rewritten = tmp_path / "rewritten"
    shutil.copytree(sources["b"], rewritten)
    config = json.loads((rewritten / "adapter_config.json").read_text())
    (rewritten / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": init}))
    folders = {"r": rewritten, "a": sources["a"]} if first else {"a": sources["a"], "r": rewritten}
    with pytest.raises(MergeError, match=rf"^merge source 'r' was initialised with init_lora_weights='{init}', which rewrites the base weights; "
                                         r".* merge that$"):
        merge_adapters(folders, {"r": 0.5, "a": 0.5}, "delta_linear", output=tmp_path / "m", name="mix", report_rows=0,
                       base_config=load_backbone("tiny-random-llama", "none", dtype="fp32").model.config)
    assert not (tmp_path / "m").exists()


def test_a_full_disk_while_the_cli_writes_a_merge_is_one_line_exit_2_and_the_server_s_merge_keeps_the_oserror(sources, tmp_path, capsys,
                                                                                                            monkeypatch):
    """`merge --output` on a full disk was a multi-line OSError traceback, exit 1 (nothing half-written was left). The
    server's own merges (build_merge calls merge_adapters(output=...)) keep the OSError: a scratch-disk failure is a 500."""
    import errno
    import os

    import adapterhub_lite.ops.merge as merge
    from adapterhub_lite.cli.main import main

    def full(path, data, mode=0o644):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    monkeypatch.setattr(merge, "atomic_write", full)
    shutil.copytree(sources["c"], tmp_path / "c")  # another folder name: the CLI names its sources by folder
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "m"
    code = main(["merge", str(sources["a"]), str(tmp_path / "c"), "--weights", "0.5", "0.5", "--method", "delta_linear", "--output", str(out),
                 "--report-rows", "0", "--quantization", "none", "--no-progress"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert re.fullmatch(rf"error: cannot write the merged adapter to --output '{re.escape(str(out))}': No space left on device \(ENOSPC\) at .*; "
                        r"free disk space or choose a writable --output, then run again \(nothing was written\)", lines[0]), lines
    assert list(out.parent.iterdir()) == []
    with pytest.raises(OSError) as err:
        merge_adapters({n: sources[n] for n in "ac"}, {"a": 0.5, "c": 0.5}, "delta_linear", output=out, report_rows=0)
    assert not isinstance(err.value, ValueError) and list(out.parent.iterdir()) == []


def test_a_source_with_a_lora_on_the_tied_lm_head_is_refused_as_that(sources, tmp_path):
    """peft saves the base's (tied) embedding weight beside a LoRA on lm_head: the refusal called it a "trained tensor"
    and sent the user looking for DoRA or lora_bias. It says what the source is (and still refuses it)."""
    from peft import LoraConfig, get_peft_model

    config = json.loads((sources["a"] / "adapter_config.json").read_text())
    base = load_backbone("tiny-random-llama", "none", dtype="fp32").model
    assert base.config.tie_word_embeddings
    targets = sorted(config["target_modules"]) + ["lm_head"]
    get_peft_model(base, LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"], target_modules=targets)).save_pretrained(tmp_path / "peft")
    head = tmp_path / "head"
    shutil.copytree(sources["a"], head)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(tmp_path / "peft" / f, head / f)
    with pytest.raises(MergeError, match=r"holds a LoRA on the tied lm_head/embedding: peft saved the base's tied weight beside it "
                                         r"\(.*lm_head\.base_layer\.weight\), .*; merge adapters trained without that target .* or untie"):
        merge_adapters({"x": head, "b": sources["b"]}, {"x": 0.5, "b": 0.5}, "delta_linear", report_rows=0)


@pytest.mark.parametrize("intruder", ["a file inside", "empty"])
def test_an_output_made_by_another_writer_while_merging_is_left_alone(sources, tmp_path, monkeypatch, intruder):
    """save_merged checked that --output was free, then shutil.move'd its temp folder there: a folder made meanwhile (a
    second merge into it, a user) got the merge put *inside* it as output/<name>/ (no error, exit 0), and an empty one
    was taken over. As pull does, the rename now refuses a destination that appeared, leaving it as it is."""
    from adapterhub_lite.ops import merge

    out = tmp_path / "mix"
    card = merge.merged_card

    def meanwhile(*args):  # the last step before the folder is renamed into place
        out.mkdir()
        if intruder == "a file inside":
            (out / "theirs.txt").write_text("x")
        return card(*args)

    monkeypatch.setattr(merge, "merged_card", meanwhile)
    with pytest.raises(MergeError, match="was created while"):
        merge_adapters({k: sources[k] for k in ("a", "b")}, {"a": 0.5, "b": 0.5}, "linear", output=out, name="mix", report_rows=0)
    assert sorted(p.name for p in out.iterdir()) == (["theirs.txt"] if intruder == "a file inside" else [])
    assert [p.name for p in tmp_path.iterdir()] == ["mix"]  # no temp folder left beside it


def test_the_cli_merges_two_versions_of_one_registry_adapter_named_by_their_refs(sources, tmp_path, capsys):
    """`merge toy@1.0.0 toy@1.1.0` (a soup of two versions) was refused as two sources 'both named toy', with the advice
    to copy one out or publish it again under another name, though a server recipe merges the same two ids. A pinned
    reference now names its source as written, as the server names it; the same version given twice is still refused."""
    from adapterhub_lite.artifacts.registry import LocalRegistry
    from adapterhub_lite.cli.main import main

    reg = LocalRegistry(tmp_path / "reg")
    reg.publish(sources["a"], "1.0.0")
    reg.publish(sources["b"], "1.1.0")
    argv = ["--registry", str(tmp_path / "reg"), "--report-rows", "0", "--quantization", "none"]
    assert main(["merge", "toy@1.0.0", "toy@1.1.0", "--weights", "0.5", "0.5", "--output", str(tmp_path / "soup"), *argv]) == 0, \
        capsys.readouterr().err
    side = json.loads((tmp_path / "soup" / "adapterhub.json").read_text())
    assert side["merge"]["weights"] == {"toy@1.0.0": 0.5, "toy@1.1.0": 0.5}
    assert {n: s["registry_ref"] for n, s in side["merge"]["sources"].items()} == {"toy@1.0.0": "toy@1.0.0", "toy@1.1.0": "toy@1.1.0"}
    # name@latest is the name itself, as the server names it
    assert main(["merge", "toy@latest", "toy@1.0.0", "--weights", "0.5", "0.5", "--output", str(tmp_path / "latest"), *argv]) == 0
    assert set(json.loads((tmp_path / "latest" / "adapterhub.json").read_text())["merge"]["weights"]) == {"toy", "toy@1.0.0"}
    shutil.copytree(sources["b"], tmp_path / "runs" / "b@2")  # a folder whose path holds '@' is named by its folder, not the path
    assert main(["merge", "toy@1.0.0", str(tmp_path / "runs" / "b@2"), "--weights", "0.5", "0.5", "--output", str(tmp_path / "dir"), *argv]) == 0
    assert set(json.loads((tmp_path / "dir" / "adapterhub.json").read_text())["merge"]["weights"]) == {"toy@1.0.0", "b@2"}
    capsys.readouterr()
    for twice in (["toy", "toy@1.1.0"], ["toy@latest", "toy@1.1.0"]):  # one version under two references
        assert main(["merge", *twice, "--weights", "0.5", "0.25", "--output", str(tmp_path / "m"), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert "is given twice (weights 0.5 and 0.25)" in err and "\n" not in err, (twice, err)
    assert not (tmp_path / "m").exists()


def test_a_source_config_that_leaves_r_and_lora_alpha_to_peft_merges_as_peft_reads_it(sources, tmp_path):
    """Plain peft loads an adapter_config.json without r or lora_alpha (LoraConfig's defaults, 8 and 8); a merge reads
    it so too, as the config with those defaults written (it was a KeyError: 'r' traceback)."""
    config = json.loads((sources["c"] / "adapter_config.json").read_text())  # c has rank 8, peft's default
    bare, written = tmp_path / "bare", tmp_path / "written"
    for folder, cfg in ((bare, {k: v for k, v in config.items() if k not in ("r", "lora_alpha")}), (written, {**config, "r": 8, "lora_alpha": 8})):
        shutil.copytree(sources["c"], folder)
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
    for method in ("linear", "delta_linear"):  # a factor method (ranks must be equal: c's 8) and a ΔW one
        merge_adapters({"x": bare, "c": sources["c"]}, {"x": 0.6, "c": 0.4}, method, output=tmp_path / f"bare_{method}", name="mix", report_rows=0)
        merge_adapters({"x": written, "c": sources["c"]}, {"x": 0.6, "c": 0.4}, method, output=tmp_path / f"written_{method}", name="mix", report_rows=0)
        want, got = _updates(tmp_path / f"written_{method}"), _updates(tmp_path / f"bare_{method}")
        assert set(got) == set(want) and max((got[m] - want[m]).abs().max().item() for m in want) < 1e-6
    with pytest.raises(MergeError, match="merge source 'x'.s adapter_config.json has peft_type None, which peft does not know"):
        (bare / "adapter_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "peft_type"}))
        merge_adapters({"x": bare, "c": sources["c"]}, {"x": 0.6, "c": 0.4}, "delta_linear", name="mix", report_rows=0)


@pytest.mark.parametrize("kwargs, needle", [
    ({"report_rows": -1}, "report_rows is -1; give a whole number of dev rows ≥ 0"),  # it scored every dev row but the last
    ({"report_rows": True}, "report_rows is True; give a whole number"),  # one row
    ({"report_rows": 1.5}, "report_rows is 1.5; give a whole number"),
    ({"seed": 1.5}, "seed is 1.5; give a whole number ≥ 0"),  # torch.manual_seed(1.5) seeds 1
    ({"weights": {"a": True, "b": 0.5}}, r"merge weights must be finite numbers, got \{'a': True\}"),  # a weight of 1
    ({"method": "ties", "density": True}, r"density must be in \(0, 1\], got True"),  # density 1
])
def test_python_api_numbers_that_python_would_coerce_are_refused(sources, kwargs, needle):
    args = {"weights": {"a": 0.5, "b": 0.5}, "method": "linear", "report_rows": 0, **kwargs}
    with pytest.raises(MergeError, match=needle):
        merge_adapters({k: sources[k] for k in ("a", "b")}, args.pop("weights"), args.pop("method"), name="mix", dtype="fp32", **args)

"""IA3 adapters served per row by the bank: equal to plain peft, side by side with every other kind."""

import json
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file, save_file

from adapterhub_lite.artifacts.loading import check_fits
from adapterhub_lite.core.errors import AdapterLoadError
from adapterhub_lite.model.backbone import load_backbone
from adapterhub_lite.model.rowconfig import check_ia3_config
from adapterhub_lite.model.rowcontext import RowContext
from adapterhub_lite.model.rowlora import RowLoraLinear
from adapterhub_lite.serving.bank import AdapterBank
from adapterhub_lite.serving.router import Router

from .conftest import train_tiny
from .test_router import alone

TINY = "tiny-random-llama"
IDS = [[5, 40, 41, 42, 9, 10], [7, 8, 9], [30, 31, 32, 33, 34, 35, 36, 37], [11, 12, 13, 14], [50, 51, 52, 53, 54], [60, 61]]


def randomized(folder, out, seed):
    """A copy of an IA3 folder with its vectors set to 1 + 0.5·N(0, 1): IA3 starts at ones (the
    identity) and two training steps barely move it, so the copy makes the adapter matter."""
    shutil.copytree(folder, out)
    gen = torch.Generator().manual_seed(seed)
    weights = load_file(str(out / "adapter_model.safetensors"))
    save_file({k: 1 + 0.5 * torch.randn(v.shape, generator=gen) for k, v in weights.items()}, str(out / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def folders(_cache, tmp_path_factory):
    d = tmp_path_factory.mktemp("ia3")
    # ia3_a: the toolkit's default IA3 targets (k_proj, v_proj scale outputs; down_proj, a feedforward
    # module, scales its input). ia3_b turns it round: up_proj scales its input, down_proj its output;
    # o_proj is square and feedforward, so scaling its output instead would fit and go unnoticed but for the values.
    a = train_tiny(d, "ia3_a_trained", method="ia3", train={"lr": 0.5, "seed": 3})
    b = train_tiny(d, "ia3_b_trained", method="ia3", train={"lr": 0.5, "seed": 4},
                   method_args={"target_modules": ["q_proj", "k_proj", "o_proj", "up_proj", "down_proj"], "feedforward_modules": ["up_proj", "o_proj"]})
    out = {"ia3_a": randomized(a, d / "ia3_a", 1), "ia3_b": randomized(b, d / "ia3_b", 2)}
    torch.manual_seed(0)
    others = {  # the other kinds, on modules IA3 also scales (k_proj, down_proj): one layer holds both
        "lora": LoraConfig(r=4, target_modules=["k_proj", "down_proj"], task_type="CAUSAL_LM", init_lora_weights=False),
        "prefix": PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
        "prompt": PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    }
    for name, cfg in others.items():
        model = get_peft_model(load_backbone(TINY, "none", dtype="fp32").model, cfg)
        if name != "lora":  # peft initialises these near zero; make them matter
            torch.nn.init.normal_(model.prompt_encoder["default"].embedding.weight, std=1.0)
        model.save_pretrained(d / name)
        out[name] = d / name
    return out


_REFS: dict = {}


def reference(folders, adapter):
    """Plain peft on a fresh fp32 backbone (the plain backbone for None)."""
    if adapter not in _REFS:
        model = load_backbone(TINY, "none", dtype="fp32").model
        _REFS[adapter] = model if adapter is None else PeftModel.from_pretrained(model, str(folders[adapter])).eval()
    return _REFS[adapter]


@torch.no_grad()
def ref_logits(folders, adapter, ids):
    model = reference(folders, adapter)
    return model(input_ids=torch.tensor([ids], device=model.device)).logits[0, -len(ids):]


def bank_with(folders, names):
    bank = AdapterBank(load_backbone(TINY, "none", dtype="fp32").model)
    for n in names:
        bank.add(n, folders[n])
    return bank


def test_ia3_changes_the_outputs(folders):
    """Without this the equality tests below would also pass for a bank that ignores IA3."""
    bank = bank_with(folders, ["ia3_a", "ia3_b"])
    base = bank.forward([IDS[0]], [None])[0]
    for name in ("ia3_a", "ia3_b"):
        assert (bank.forward([IDS[0]], [name])[0] - base).abs().max() > 1e-2, name
        assert (ref_logits(folders, name, IDS[0]) - base).abs().max() > 1e-2, name


def test_ia3_rows_equal_plain_peft(folders):
    bank = bank_with(folders, ["ia3_a", "ia3_b"])
    for name in ("ia3_a", "ia3_b"):
        got = bank.forward(IDS[:3], [name] * 3)  # one slot for every row
        for g, ids in zip(got, IDS[:3]):
            assert (g - ref_logits(folders, name, ids)).abs().max() <= 1e-5, name
    adapters = ["ia3_b", "ia3_a", None, "ia3_a"]  # per-row vectors, a base row among them
    for g, a, ids in zip(bank.forward(IDS[:4], adapters), adapters, IDS[:4]):
        assert (g - ref_logits(folders, a, ids)).abs().max() <= 1e-5, a


def test_mixed_batch_of_every_kind_equals_each_row_alone(folders):
    bank = bank_with(folders, ["ia3_a", "lora", "ia3_b", "prefix", "prompt"])
    adapters = ["ia3_a", "lora", "prefix", "ia3_b", None, "prompt", "ia3_a", "lora"]
    ids = IDS + [[70, 71, 72], [80, 81, 82, 83]]
    got = bank.forward(ids, adapters)
    for g, a, r in zip(got, adapters, ids):
        ref = ref_logits(folders, a, r)
        assert g.shape == ref.shape and (g - ref).abs().max() <= 1e-4, a
    # and each row run alone through the bank gives the same as in the batch
    for g, a, r in zip(got, adapters, ids):
        assert (bank.forward([r], [a])[0] - g).abs().max() <= 1e-5, a


def test_lora_rows_are_bit_identical_beside_ia3(folders):
    """An IA3 adapter sharing a LoRA's layers (k_proj, down_proj) and its batch leaves the LoRA rows' numbers as they were."""
    alone_bank, shared = bank_with(folders, ["lora"]), bank_with(folders, ["lora", "ia3_a"])
    ids = IDS[:3]
    want = alone_bank.forward(ids, ["lora", None, "lora"])
    for beside in (None, "ia3_a"):  # IA3 resident but not in the batch; then an IA3 row in the batch
        got = shared.forward(ids, ["lora", beside, "lora"])
        assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2]), beside


def test_greedy_generation_equals_peft(folders):
    bank = bank_with(folders, ["ia3_a", "lora", "ia3_b"])
    eos = reference(folders, None).config.eos_token_id
    rows, adapters, budgets = [IDS[0], IDS[1], IDS[2], IDS[3]], ["ia3_a", "lora", None, "ia3_b"], [6, 3, 5, 6]
    got = bank.generate(rows, adapters, budgets, eos_token_id=eos)
    for toks, a, r, n in zip(got, adapters, rows, budgets):
        model = reference(folders, a)
        with torch.no_grad():
            want = model.generate(input_ids=torch.tensor([r], device=model.device), max_new_tokens=n, do_sample=False,
                                  eos_token_id=eos, pad_token_id=eos)[0, len(r):].tolist()
        assert toks == want, a


def test_router_serves_an_ia3_classification_adapter(folders):
    r = Router(load_backbone(TINY, "none", dtype="fp32"))
    r.register("ia3_a", folders["ia3_a"])
    r.register("ia3_b", folders["ia3_b"])  # a second IA3 adapter in the same batch
    texts = ["pos 1", "neg 2", "pos 3", "neg 4", "pos 5", "neg 6"]
    out = r.run([{"adapter": "ia3_a", "text": t} for t in texts] + [{"adapter": "ia3_b", "text": t} for t in texts[:2]])
    assert [o["prediction"] for o in out[:6]] == alone(folders["ia3_a"], texts)
    assert [o["prediction"] for o in out[6:]] == alone(folders["ia3_b"], texts[:2])
    assert r.bank.nbytes("ia3_a") == sum(v.numel() * 4 for v in load_file(str(folders["ia3_a"] / "adapter_model.safetensors")).values())


def test_remove_gives_back_the_plain_backbone(folders):
    bank = bank_with(folders, ["ia3_a", "lora"])
    k_proj = bank.model.model.layers[0].self_attn.k_proj
    assert isinstance(k_proj, RowLoraLinear) and set(k_proj.scales) == {"ia3_a"} and set(k_proj.entries) == {"lora"}
    bank.remove("lora")  # ia3_a still scales k_proj: the layer stays, with its vector only
    assert isinstance(bank.model.model.layers[0].self_attn.k_proj, RowLoraLinear)
    assert (bank.forward([IDS[0]], ["ia3_a"])[0] - ref_logits(folders, "ia3_a", IDS[0])).abs().max() <= 1e-5
    bank.remove("ia3_a")
    assert bank.names() == [] and not any(isinstance(m, RowLoraLinear) for m in bank.model.modules())
    with torch.no_grad():
        plain = bank.model(input_ids=torch.tensor([IDS[0]], device=bank.device)).logits[0]
    assert (plain - ref_logits(folders, None, IDS[0])).abs().max() == 0
    bank.add("ia3_b", folders["ia3_b"])  # the freed slot is reused
    assert (bank.forward([IDS[1]], ["ia3_b"])[0] - ref_logits(folders, "ia3_b", IDS[1])).abs().max() <= 1e-5


def test_layer_scales_each_row_by_its_slot(device):
    """Row i: s_out ⊙ base(s_in ⊙ x_i); ones where the slot has no vector; a weight w gives 1 + w·(l − 1)."""
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 6).to(device)  # square: scaling the wrong side would fit, and must still show
    ctx = RowContext()
    layer = RowLoraLinear(base, ctx, cache=True)
    l_in, l_out = torch.rand(6, device=device) + 0.5, torch.rand(6, device=device) + 0.5
    layer.put_scale("in", l_in, on_input=True)
    layer.put_scale("out", l_out, on_input=False)
    ctx.define(0, [])
    ctx.define(1, [("in", 1.0)])
    ctx.define(2, [("out", 1.0)])
    ctx.define(3, [("in", 1.0), ("out", 0.5)])
    x = torch.randn(4, 3, 6, device=device)
    with torch.no_grad(), ctx.assign([1, 2, 0, 3], device):
        got = layer(x)
    with torch.no_grad():
        want = torch.stack([base(x[0] * l_in), base(x[1]) * l_out, base(x[2]), base(x[3] * l_in) * (1 + 0.5 * (l_out - 1))])
        assert (got - want).abs().max() <= 1e-6
        assert torch.equal(layer(x), base(x))  # not routed: the base layer alone
    with pytest.raises(AdapterLoadError, match="rows"), ctx.assign([1, 2], device):
        layer(x)
    with pytest.raises(AdapterLoadError, match="does not fit the input"):
        layer.put_scale("bad", torch.ones(5, device=device), on_input=True)
    layer.drop("in")
    layer.drop("out")
    assert not layer.scales


def test_gradient_reaches_the_rows_own_vector(device):
    base = torch.nn.Linear(4, 4).to(device)
    ctx = RowContext()
    layer = RowLoraLinear(base, ctx)
    vecs = {n: torch.ones(4, device=device, requires_grad=True) for n in "ab"}
    for n, v in vecs.items():
        layer.put_scale(n, v, on_input=n == "a")
        ctx.define(ord(n), [(n, 1.0)])
    with ctx.assign([ord("a"), ord("a")], device):
        layer(torch.randn(2, 3, 4, device=device)).sum().backward()
    assert vecs["a"].grad.abs().sum() > 0 and vecs["b"].grad is None


def test_unimplemented_ia3_fields_are_refused_in_one_line(folders, tmp_path):
    from peft import IA3Config

    with pytest.raises(AdapterLoadError) as err:
        check_ia3_config(IA3Config(target_modules=["k_proj"], feedforward_modules=[], modules_to_save=["score"]), "adapter 'x'")
    assert "modules_to_save" in str(err.value) and "\n" not in str(err.value)
    check_ia3_config(IA3Config(target_modules=["k_proj"], feedforward_modules=[], fan_in_fan_out=True, init_ia3_weights=False), "adapter 'x'")
    bad = tmp_path / "bad"
    shutil.copytree(folders["ia3_a"], bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "modules_to_save": ["lm_head"]}))
    bank = AdapterBank(load_backbone(TINY, "none", dtype="fp32").model)
    with pytest.raises(AdapterLoadError, match="modules_to_save"):
        bank.add("bad", bad)
    assert bank.names() == [] and not any(isinstance(m, RowLoraLinear) for m in bank.model.modules())


def test_check_fits_reads_ia3_vectors(folders, tmp_path):
    model = load_backbone(TINY, "none", dtype="fp32").model
    check_fits(folders["ia3_a"], model)
    wrong = tmp_path / "wrong"
    shutil.copytree(folders["ia3_a"], wrong)
    weights = load_file(str(wrong / "adapter_model.safetensors"))
    key = next(k for k in weights if "k_proj" in k)
    save_file({**weights, key: torch.ones(7, 1)}, str(wrong / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(AdapterLoadError, match="ia3_l has shape"):
        check_fits(wrong, model)


def test_ia3_rows_on_the_8bit_backbone_equal_plain_peft(folders):
    """peft's IA3 on bitsandbytes layers (peft/tuners/ia3/bnb.py) scales the int8 layer's input or output as on nn.Linear,
    and so does the bank. 1e-4 as in fp32: on the CPU bitsandbytes quantises activations per token (threshold 0), so a
    row's numbers do not depend on the rows beside it; fp32 compute, so no rounding of the scaled product differs."""
    bank = AdapterBank(load_backbone(TINY, "8bit", dtype="fp32").model)
    for name in ("ia3_a", "ia3_b", "lora"):
        bank.add(name, folders[name])
    assert type(bank.model.model.layers[0].self_attn.k_proj.base_layer).__name__ == "Linear8bitLt"
    adapters = ["ia3_b", "ia3_a", None, "lora", "ia3_a"]
    for g, a, ids in zip(bank.forward(IDS[:5], adapters), adapters, IDS[:5]):
        model = load_backbone(TINY, "8bit", dtype="fp32").model
        if a:
            model = PeftModel.from_pretrained(model, str(folders[a])).eval()
        with torch.no_grad():
            want = model(input_ids=torch.tensor([ids], device=model.device)).logits[0]
        assert (g - want).abs().max() <= 1e-4, a

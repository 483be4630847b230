"""The one per-row LoRA layer: what it refuses, the LM head, and that its update is what counts."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from adapterhub_lite.core.errors import AdapterLoadError
from adapterhub_lite.model.backbone import load_backbone
from adapterhub_lite.model.rowconfig import check_lora_config, unsupported_lora_fields
from adapterhub_lite.model.rowcontext import RowContext
from adapterhub_lite.model.rowlora import RowLoraLinear, wrap
from adapterhub_lite.serving.bank import AdapterBank

TINY = "tiny-random-llama"


def _save(tmp_path, name, **cfg):
    torch.manual_seed(0)
    model = get_peft_model(load_backbone(TINY, "none", dtype="fp32").model, LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **cfg))
    model.save_pretrained(tmp_path / name, save_embedding_layers=False)  # the LM head's own weight is the backbone's
    return tmp_path / name


@pytest.mark.parametrize("field, value", [("use_dora", True), ("lora_bias", True), ("bias", "all"),
                                          ("alora_invocation_tokens", [5, 6]), ("layer_replication", [[0, 1]])])
def test_fields_the_layer_does_not_implement_are_refused_by_name(field, value):
    cfg = LoraConfig(r=4, target_modules=["q_proj"], **{field: value})
    with pytest.raises(AdapterLoadError) as err:
        check_lora_config(cfg, "adapter 'x'")
    msg = str(err.value)
    assert field in msg and "\n" not in msg and isinstance(err.value, ValueError)


def test_implemented_fields_pass():
    cfg = LoraConfig(r=4, lora_alpha=7, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3},
                     use_rslora=True, lora_dropout=0.1, layers_to_transform=[0], base_model_name_or_path="x", init_lora_weights=False)
    assert unsupported_lora_fields(cfg) == []
    check_lora_config(cfg, "adapter 'x'")


def test_bank_refuses_a_dora_folder_and_stays_as_it_was(tmp_path):
    dora = _save(tmp_path, "dora", r=4, target_modules=["q_proj"], use_dora=True)
    bank = AdapterBank(load_backbone(TINY, "none", dtype="fp32").model)
    with pytest.raises(AdapterLoadError, match="use_dora"):
        bank.add("dora", dora)
    assert bank.names() == [] and not any(isinstance(m, RowLoraLinear) for m in bank.model.modules())


def test_lora_on_the_lm_head_is_served(tmp_path):
    """It used to be skipped silently: the LM head ran outside the routed region."""
    folder = _save(tmp_path, "head", r=4, target_modules=["q_proj", "lm_head"])
    ids = [[5, 9, 14, 30, 7], [40, 41]]
    bank = AdapterBank(load_backbone(TINY, "none", dtype="fp32").model)
    bank.add("head", folder)
    assert isinstance(bank.lm_head, RowLoraLinear) and isinstance(bank.lm_head.base_layer, torch.nn.Linear)
    ref = PeftModel.from_pretrained(load_backbone(TINY, "none", dtype="fp32").model, str(folder)).eval()
    got = bank.forward(ids, ["head", None])
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([ids[0]], device=ref.device)).logits[0]
        base = ref.get_base_model()
        with ref.disable_adapter():
            plain = base(input_ids=torch.tensor([ids[1]], device=ref.device)).logits[0]
    assert (got[0] - want).abs().max() <= 1e-4
    assert (got[1] - plain).abs().max() <= 1e-4  # the base row beside it is untouched
    # generation: the head's update decides every token
    tokens = bank.generate([ids[0]], ["head"], 4, eos_token_id=-1)[0]
    seq = list(ids[0])
    with torch.no_grad():
        for _ in range(4):
            seq.append(int(ref(input_ids=torch.tensor([seq], device=ref.device)).logits[0, -1].argmax()))
    assert tokens == seq[len(ids[0]):]


def test_the_update_is_what_makes_rows_differ(device):
    """Row i gets Σ w·s·B·A x_i of its slot, exactly; slots without entries here get nothing."""
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5).to(device)
    ctx = RowContext()
    layer = wrap(torch.nn.Sequential(base), ["0"], ctx)["0"]
    a1, b1 = torch.randn(2, 6, device=device), torch.randn(5, 2, device=device)
    a2, b2 = torch.randn(3, 6, device=device), torch.randn(5, 3, device=device)
    layer.put("one", a1, b1, 0.5)
    layer.put("two", a2, b2, 2.0)
    ctx.define(0, [])
    ctx.define(1, [("one", 1.0)])
    ctx.define(2, [("one", -1.0), ("two", 0.25)])
    x = torch.randn(3, 4, 6, device=device)
    with torch.no_grad(), ctx.assign([2, 0, 1], device):
        got = layer(x)
    want = base(x)
    want[0] += x[0] @ (-0.5 * b1 @ a1 + 0.25 * 2.0 * b2 @ a2).T
    want[2] += x[2] @ (0.5 * b1 @ a1).T
    assert (got - want).abs().max() < 1e-5
    with torch.no_grad():
        assert torch.equal(layer(x), base(x))  # not routed: the base layer alone
    with pytest.raises(AdapterLoadError, match="rows"), ctx.assign([1, 2], device):
        layer(x)


def test_gradient_reaches_each_rows_own_entries(device):
    base = torch.nn.Linear(4, 4).to(device)
    ctx = RowContext()
    layer = RowLoraLinear(base, ctx)
    params = {n: (torch.randn(2, 4, device=device, requires_grad=True), torch.randn(4, 2, device=device, requires_grad=True)) for n in "ab"}
    for n, (a, b) in params.items():
        layer.put(n, a, b, 1.0)
        ctx.define(ord(n), [(n, 1.0)])
    x = torch.randn(2, 3, 4, device=device)
    with ctx.assign([ord("a"), ord("a")], device):
        layer(x).sum().backward()
    assert params["a"][0].grad.abs().sum() > 0 and params["b"][0].grad is None


def test_prompt_scores_through_a_lora_on_the_lm_head_equal_peft(tmp_path):
    """The prompt's log-probs (echo, prompt_logprobs) run the LM head with each row's own slot."""
    folder = _save(tmp_path, "head", r=4, target_modules=["v_proj", "lm_head"])
    ids = [5, 9, 14, 30, 7, 40, 41]
    bank = AdapterBank(load_backbone(TINY, "none", dtype="fp32").model)
    bank.add("head", folder)
    dec = bank.start([ids, ids[:3]], ["head", None], keys=["a", "b"], score_prompt={"a": 2, "b": 0})
    ref = PeftModel.from_pretrained(load_backbone(TINY, "none", dtype="fp32").model, str(folder)).eval()
    with torch.no_grad():
        logp = ref(input_ids=torch.tensor([ids], device=ref.device)).logits[0].float().log_softmax(-1)
        with ref.disable_adapter():
            base = ref(input_ids=torch.tensor([ids[:3]], device=ref.device)).logits[0].float().log_softmax(-1)
    got, plain = dec.prompt_scores["a"], dec.prompt_scores["b"]
    assert got.logprobs[0] is None and got.logprobs[1:] == pytest.approx([logp[t - 1, ids[t]].item() for t in range(1, len(ids))], abs=1e-4)
    assert [t for t, _ in got.top[3]] == logp[2].topk(2).indices.tolist()
    assert plain.logprobs[1:] == pytest.approx([base[t - 1, ids[t]].item() for t in range(1, 3)], abs=1e-4) and plain.top[1] == []


def test_lora_dropout_acts_in_training_mode_only(device):
    """As peft's: dropout on the LoRA branch while training; in eval mode the update is exact and repeatable."""
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 8).to(device)
    ctx = RowContext()
    layer = RowLoraLinear(base, ctx, dropout=0.5)
    a, b = torch.randn(4, 8, device=device), torch.randn(8, 4, device=device)
    layer.put("one", a, b, 1.0)
    ctx.define(1, [("one", 1.0)])
    x = torch.randn(2, 3, 8, device=device)
    with torch.no_grad(), ctx.assign([1, 1], device):
        layer.eval()
        assert (layer(x) - (base(x) + x @ (b @ a).T)).abs().max() < 1e-5
        layer.train()
        assert not torch.allclose(layer(x), base(x) + x @ (b @ a).T, atol=1e-3)


def test_an_inner_assignment_gives_the_outer_one_back(device):
    """`base_only()` inside an assigned call (and any nested assignment) restores the outer rows' slots when it ends."""
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5).to(device)
    ctx = RowContext()
    layer = wrap(torch.nn.Sequential(base), ["0"], ctx)["0"]
    layer.put("one", torch.randn(2, 6, device=device), torch.randn(5, 2, device=device), 1.0)
    ctx.define(1, [("one", 1.0)])
    x = torch.randn(2, 6, device=device)
    with torch.no_grad(), ctx.assign([1, 1], device):
        adapted = layer(x)
        with ctx.assign(None):
            assert torch.equal(layer(x), base(x))
        assert torch.equal(layer(x), adapted) and not torch.equal(adapted, base(x))


def test_a_slot_of_one_weighted_entry_scales_its_update(device):
    """A slot naming a single entry with weight w (a composition of one source) adds w·s·B·A, as with several."""
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5).to(device)
    ctx = RowContext()
    layer = wrap(torch.nn.Sequential(base), ["0"], ctx)["0"]
    a, b = torch.randn(3, 6, device=device), torch.randn(5, 3, device=device)
    layer.put("two", a, b, 2.0)
    ctx.define(0, [])
    ctx.define(1, [("two", 0.25)])
    x = torch.randn(2, 4, 6, device=device)
    with torch.no_grad(), ctx.assign([1, 0], device):
        got = layer(x)
    want = base(x)
    want[0] += x[0] @ (0.25 * 2.0 * b @ a).T
    assert (got - want).abs().max() < 1e-5


def test_an_adapter_put_again_under_its_name_is_served_with_its_new_factors(device, monkeypatch):
    """A reload drops an adapter and puts it again under its name and slot; its new tensors may sit at the freed ones'
    addresses. The slot pool decided what to copy by id() of the factor tensors, so such a reload kept serving the old
    factors. id() is made to collide here (every object the same) to stand for that; the pool must follow the put."""
    import adapterhub_lite.model.rowlora as rowlora

    monkeypatch.setattr(rowlora, "id", lambda obj: 0, raising=False)
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5).to(device)
    ctx = RowContext()
    layer = wrap(torch.nn.Sequential(base), ["0"], ctx, cache=True)["0"]
    ctx.define(1, [("x", 1.0)])
    x = torch.randn(1, 4, 6, device=device)
    for _ in range(2):
        a, b = torch.randn(2, 6, device=device), torch.randn(5, 2, device=device)
        layer.drop("x")
        layer.put("x", a, b, 0.5)
        with torch.no_grad(), ctx.assign([1], device):
            got = layer(x)
        assert (got - (base(x) + x @ (0.5 * b @ a).T)).abs().max() < 1e-5


@pytest.mark.parametrize("quant", ["none", "8bit"])
def test_peft_s_own_copy_of_the_lm_head_is_served_and_a_changed_one_refused(tmp_path, quant):
    """peft's save_pretrained writes the LM head's whole weight (lm_head.base_layer.weight) beside the factors when
    target_modules names lm_head (save_embedding_layers="auto", its default). It was refused ('holds tensor …', and
    check_fits said the folder fits no module 'lm_head.base_layer'); equal to the backbone's it changes nothing and is
    served as peft serves it; a copy that differs would change the base for every row, and is refused by name."""
    import shutil

    from safetensors.torch import load_file, save_file

    from adapterhub_lite.artifacts.loading import check_fits

    torch.manual_seed(0)
    cfg = LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, r=4, target_modules=["q_proj", "lm_head"])
    get_peft_model(load_backbone(TINY, quant, dtype="fp32").model, cfg).save_pretrained(tmp_path / "auto")  # peft's defaults
    key = "base_model.model.lm_head.base_layer.weight"
    weights = load_file(str(tmp_path / "auto" / "adapter_model.safetensors"))
    assert key in weights
    bank = AdapterBank(load_backbone(TINY, quant, dtype="fp32").model)
    check_fits(tmp_path / "auto", bank.model)
    bank.add("head", tmp_path / "auto")
    ids = [[5, 9, 14, 30, 7], [40, 41]]
    got = bank.forward(ids, ["head", None])
    ref = PeftModel.from_pretrained(load_backbone(TINY, quant, dtype="fp32").model, str(tmp_path / "auto")).eval()
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([ids[0]], device=ref.device)).logits[0]
        with ref.disable_adapter():
            plain = ref(input_ids=torch.tensor([ids[1]], device=ref.device)).logits[0]
    assert (got[0] - want).abs().max() <= 1e-4 and (got[1] - plain).abs().max() <= 1e-4
    shutil.copytree(tmp_path / "auto", tmp_path / "changed")
    save_file({**weights, key: weights[key] + 0.01}, str(tmp_path / "changed" / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(AdapterLoadError, match="save_embedding_layers") as err:
        bank.add("changed", tmp_path / "changed")
    assert "\n" not in str(err.value) and bank.names() == ["head"]


def test_fan_in_fan_out_as_peft_saves_it_on_an_8bit_base_is_served(tmp_path):
    """peft keeps fan_in_fan_out=True in the config of a LoRA made on bitsandbytes layers (it resets it on nn.Linear
    only); it only says how peft would transpose a merge, peft's forward ignores it, and the folder was refused by name."""
    torch.manual_seed(0)
    cfg = LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, r=4, target_modules=["q_proj", "v_proj"], fan_in_fan_out=True)
    get_peft_model(load_backbone(TINY, "8bit", dtype="fp32").model, cfg).save_pretrained(tmp_path / "fifo")
    assert LoraConfig.from_pretrained(str(tmp_path / "fifo")).fan_in_fan_out is True
    ids = [[5, 9, 14, 30, 7], [40, 41]]
    for quant in ("8bit", "none"):  # on the base it was made on, and on the unquantized one (peft resets it there)
        bank = AdapterBank(load_backbone(TINY, quant, dtype="fp32").model)
        bank.add("fifo", tmp_path / "fifo")
        got = bank.forward(ids, ["fifo", None])[0]
        ref = PeftModel.from_pretrained(load_backbone(TINY, quant, dtype="fp32").model, str(tmp_path / "fifo")).eval()
        with torch.no_grad():
            want = ref(input_ids=torch.tensor([ids[0]], device=ref.device)).logits[0]
            with ref.disable_adapter():
                assert (want - ref(input_ids=torch.tensor([ids[0]], device=ref.device)).logits[0]).abs().max() > 1e-3
        assert (got - want).abs().max() <= 1e-4, quant


def test_a_folder_with_trainable_tokens_loads_with_peft_and_the_bank_names_the_field(tmp_path):
    """`train` takes peft's trainable_token_indices (method_args) and writes the delta under the embedding
    ("model.embed_tokens.token_adapter.trainable_tokens_delta"); check_fits took 'model.embed_tokens.token_adapter' for the
    module, found none, and refused our own folder in eval / predict / serve as trained on another backbone. peft loads it
    (load_adapter); the bank, which does not implement it, refuses it by the field."""
    from adapterhub_lite.artifacts.loading import load_adapter
    from adapterhub_lite.serving.router import Router

    from .conftest import train_tiny

    folder = train_tiny(tmp_path, "tokens", method_args={"r": 4, "target_modules": ["q_proj"], "trainable_token_indices": [5, 9]})
    model = load_adapter(folder)[0]
    assert any("trainable_tokens_delta" in n for n, _ in model.named_parameters())
    router = Router(load_backbone(TINY, "none", dtype="fp32"))
    router.register("tokens", folder)
    with pytest.raises(AdapterLoadError, match=r"trainable_token_indices=\[5, 9\]"):
        router.run([{"adapter": "tokens", "text": "pos 1"}])


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_a_trained_lm_head_copy_is_refused_as_modules_to_save(tmp_path, kind):
    """peft saves a modules_to_save copy of lm_head as base_model.model.lm_head.weight, the name save_embedding_layers
    gives an untargeted head; the refusal names the field the folder sets (it named save_embedding_layers)."""
    from peft import IA3Config

    torch.manual_seed(0)
    cfg = (LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False, modules_to_save=["lm_head"], task_type="CAUSAL_LM") if kind == "lora"
           else IA3Config(target_modules=["k_proj"], feedforward_modules=[], modules_to_save=["lm_head"], task_type="CAUSAL_LM"))
    model = get_peft_model(load_backbone(TINY, "none", dtype="fp32").model, cfg)
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.1)  # trained
    model.save_pretrained(tmp_path / "mts")
    bank = AdapterBank(load_backbone(TINY, "none", dtype="fp32").model)
    with pytest.raises(AdapterLoadError, match=r"modules_to_save=\['lm_head'\]"):
        bank.add("mts", tmp_path / "mts")
    assert bank.names() == []


def test_an_eva_initialised_lora_is_served_as_peft_serves_it(tmp_path):
    """EVA (init_lora_weights="eva") only initialises the factors, on the unchanged base, and saves the ranks and alphas
    it chose in rank_pattern / alpha_pattern; the folder was refused by its eva_config."""
    from peft.tuners.lora import EvaConfig

    folder = _save(tmp_path, "eva", r=4, target_modules=["q_proj", "v_proj"], eva_config=EvaConfig(rho=2.0))
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "eva", "rank_pattern": {"v_proj": 4}, "alpha_pattern": {"v_proj": 3}}))
    bank = AdapterBank(load_backbone(TINY, "none", dtype="fp32").model)
    bank.add("eva", folder)
    ids = [5, 9, 14, 30, 7]
    ref = PeftModel.from_pretrained(load_backbone(TINY, "none", dtype="fp32").model, str(folder)).eval()
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([ids], device=ref.device)).logits[0]
    assert ref.peft_config["default"].init_lora_weights == "eva" and ref.peft_config["default"].eva_config is not None
    assert (bank.forward([ids], ["eva"])[0] - want).abs().max() <= 1e-4


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_a_folder_without_factors_is_refused_in_one_line_and_the_bank_stays_as_it_was(tmp_path, kind):
    """An adapter_model.safetensors holding no LoRA factors (or no IA3 vectors): a LoRA folder's load raised a bare
    ValueError ('max() arg is an empty sequence', from the rank check; Router.hold showed it as is), an IA3 one took a
    slot and served the plain backbone under the adapter's name. Both are refused by name as damaged."""
    from peft import IA3Config
    from safetensors.torch import save_file

    config = LoraConfig(r=4, target_modules=["q_proj"]) if kind == "lora" else IA3Config(target_modules=["q_proj"], feedforward_modules=[])
    get_peft_model(load_backbone(TINY, "none", dtype="fp32").model, config).save_pretrained(tmp_path / "empty")
    save_file({}, str(tmp_path / "empty" / "adapter_model.safetensors"))
    bank = AdapterBank(load_backbone(TINY, "none", dtype="fp32").model)
    with pytest.raises(AdapterLoadError, match=r"^.* adapter 'e' holds no (LoRA factors|IA3 vectors) .*; the folder is damaged"):
        bank.add("e", tmp_path / "empty")
    assert bank.names() == [] and bank.free_slot() is None and not any(isinstance(m, RowLoraLinear) for m in bank.model.modules())

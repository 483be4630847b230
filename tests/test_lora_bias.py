"""LoRA adapters that train biases (peft's bias="lora_only" / "all", lora_bias=True), served per row: equal to plain
peft row by row, or refused by name where a bias would change the base for every row."""

import copy
import json
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from adapterhub_lite.artifacts.loading import check_fits
from adapterhub_lite.core.errors import AdapterLoadError
from adapterhub_lite.model.backbone import load_backbone
from adapterhub_lite.model.rowconfig import LoraFactors
from adapterhub_lite.model.rowcontext import RowContext
from adapterhub_lite.model.rowlora import RowLoraLinear
from adapterhub_lite.serving.bank import AdapterBank
from adapterhub_lite.serving.router import Router
from adapterhub_lite.serving.static import StaticBatch

from .conftest import TEST_DEVICE, train_tiny
from .test_router import alone

TINY = "tiny-random-llama"
IDS = [[5, 40, 41, 42, 9, 10], [7, 8, 9], [30, 31, 32, 33, 34, 35, 36, 37], [11, 12, 13, 14], [50, 51, 52, 53, 54], [60, 61]]
_QWEN: dict = {}


def qwen() -> Qwen2ForCausalLM:
    """A fresh copy of one tiny random Qwen2 (q/k/v projections with biases, set random so that b_saved − b_base is
    not b_saved), fp32 and frozen as the bank takes a backbone, on the suite's device."""
    if "model" not in _QWEN:
        torch.manual_seed(0)
        cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
        model = Qwen2ForCausalLM(cfg)
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):
                torch.nn.init.normal_(p, std=0.5)
        _QWEN["model"] = model.float().eval().requires_grad_(False).to(TEST_DEVICE)
    return copy.deepcopy(_QWEN["model"])


def _save(model, cfg: LoraConfig, folder, seed: int):
    """`cfg` on `model` with every trainable tensor (factors and the biases the config trains) set random, saved."""
    peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if name.endswith("bias") else 0.2))  # host → device: a copy
    peft_model.save_pretrained(folder, save_embedding_layers=False)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora_bias")
    configs = {
        # o_proj has no bias: peft saves base_layer.bias for q_proj and v_proj only
        "only": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], bias="lora_only", init_lora_weights=False),
        # lora_B's bias, scaled by alpha/r (3 here); gate_proj has no base bias, which lora_bias does not need
        "lora_bias": LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "k_proj", "gate_proj"], lora_bias=True, init_lora_weights=False),
        "plain": LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "down_proj"], init_lora_weights=False),
        # trains k_proj's and v_proj's biases too, which it holds no factors for
        "all": LoraConfig(r=2, target_modules=["q_proj"], bias="all", init_lora_weights=False),
    }
    return {name: _save(qwen(), cfg, d / name, seed) for seed, (name, cfg) in enumerate(configs.items())}


@torch.no_grad()
def ref_logits(folder, ids) -> torch.Tensor:
    """The row alone through plain peft on a fresh backbone (None: the plain backbone)."""
    model = qwen() if folder is None else PeftModel.from_pretrained(qwen(), str(folder)).eval()
    return model(input_ids=torch.tensor([ids], device=model.device)).logits[0]


def test_saved_biases_are_what_peft_saves(folders):
    """The folders hold the tensors this file is about (peft's names), so the tests below test them."""
    only, lb = load_file(str(folders["only"] / "adapter_model.safetensors")), load_file(str(folders["lora_bias"] / "adapter_model.safetensors"))
    assert sorted(k.split(".")[-3] for k in only if k.endswith("base_layer.bias")) == ["q_proj", "q_proj", "v_proj", "v_proj"]
    assert sum(k.endswith("lora_B.bias") for k in lb) == 6


def test_lora_only_and_lora_bias_rows_equal_plain_peft_beside_other_rows(folders):
    bank = AdapterBank(qwen())
    for name in ("only", "lora_bias", "plain"):
        bank.add(name, folders[name])
    adapters = ["only", "lora_bias", None, "plain", "only", "lora_bias"]
    got = bank.forward(IDS, adapters)
    worst = 0.0
    for g, a, ids in zip(got, adapters, IDS):
        worst = max(worst, (g - ref_logits(a and folders[a], ids)).abs().max().item())
    print(f"fp32 Qwen2 mixed batch with trained biases: max |Δlogit| = {worst:.2e}")
    assert worst <= 1e-4
    # one slot for every row (the pool's views, no gather) is exact too
    for name in ("only", "lora_bias"):
        alone = bank.forward(IDS[:2], [name, name])
        assert max((g - ref_logits(folders[name], ids)).abs().max().item() for g, ids in zip(alone, IDS)) <= 1e-4
    # greedy decoding (the cached per-row stacks of the decode steps) gives plain peft's tokens
    tokens = bank.generate(IDS[:3], ["only", "lora_bias", None], 3, eos_token_id=-1)
    for toks, a, ids in zip(tokens, ["only", "lora_bias", None], IDS):
        seq = list(ids)
        for _ in range(3):
            seq.append(int(ref_logits(a and folders[a], seq)[-1].argmax()))
        assert toks == seq[len(ids):]


@pytest.mark.parametrize("name", ["only", "lora_bias"])
def test_the_biases_matter(folders, tmp_path, name):
    """Without its bias tensors the adapter gives other logits, so serving them is what the equality above checks."""
    stripped = shutil.copytree(folders[name], tmp_path / "stripped")
    weights = load_file(str(stripped / "adapter_model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.endswith(".bias")}, str(stripped / "adapter_model.safetensors"))
    assert (ref_logits(folders[name], IDS[0]) - ref_logits(stripped, IDS[0])).abs().max() > 1e-2


def test_bias_all_on_modules_it_does_not_adapt_is_refused_by_name(folders):
    bank = AdapterBank(qwen())
    with pytest.raises(AdapterLoadError) as err:
        bank.add("all", folders["all"])
    msg = str(err.value)
    assert "k_proj" in msg and "v_proj" in msg and "bias='all'" in msg and "bias='none'" in msg and "peft" in msg and "\n" not in msg
    assert bank.names() == [] and not any(isinstance(m, RowLoraLinear) for m in bank.model.modules())  # left as it was


def test_bias_all_that_saved_the_backbones_own_biases_elsewhere_is_served(folders, tmp_path):
    """peft loads such a bias into the base as it is: nothing changes for any row, so only the adapted layer's count."""
    same = shutil.copytree(folders["all"], tmp_path / "same")
    weights, own = load_file(str(same / "adapter_model.safetensors")), {k: v.cpu() for k, v in qwen().state_dict().items()}
    weights = {k: own[k.removeprefix("base_model.model.")] if k.endswith(("k_proj.bias", "v_proj.bias")) else v for k, v in weights.items()}
    save_file(weights, str(same / "adapter_model.safetensors"))
    bank = AdapterBank(qwen())
    bank.add("same", same)
    got = bank.forward(IDS[:2], ["same", None])
    assert (got[0] - ref_logits(same, IDS[0])).abs().max() <= 1e-4 and (got[1] - ref_logits(None, IDS[1])).abs().max() <= 1e-4


def test_check_fits_reads_saved_biases(folders):
    """The router's pre-check takes peft's bias names (a targeted layer's is saved under base_layer), on the plain
    backbone and on one whose layers are already wrapped; a bias of the wrong width does not fit."""
    check_fits(folders["only"], qwen())
    check_fits(folders["lora_bias"], qwen())
    bank = AdapterBank(qwen())
    bank.add("plain", folders["plain"])  # q_proj is a per-row layer now
    check_fits(folders["only"], bank.model)
    small = qwen()
    small.model.layers[0].self_attn.q_proj = torch.nn.Linear(32, 16)
    with pytest.raises(AdapterLoadError, match="q_proj: lora_B gives|saved bias has shape"):
        check_fits(folders["only"], small)


def test_bias_configs_without_bias_tensors_are_served_as_peft_serves_them(tmp_path):
    """On Llama (no biases) peft's bias="all" / "lora_only" save no bias tensor: the adapter is a bias="none" one."""
    folders = {}
    for seed, bias in enumerate(["all", "lora_only"]):
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], bias=bias, task_type="CAUSAL_LM", init_lora_weights=False)
        folders[bias] = _save(load_backbone(TINY, "none", dtype="fp32").model, cfg, tmp_path / bias, seed)
        assert not any(k.endswith(".bias") for k in load_file(str(folders[bias] / "adapter_model.safetensors")))
        assert json.loads((folders[bias] / "adapter_config.json").read_text())["bias"] == bias
    bank = AdapterBank(load_backbone(TINY, "none", dtype="fp32").model)
    for bias, folder in folders.items():
        bank.add(bias, folder)
    got = bank.forward(IDS[:3], ["all", None, "lora_only"])
    with torch.no_grad():
        for g, a, ids in zip(got, ["all", None, "lora_only"], IDS):
            model = load_backbone(TINY, "none", dtype="fp32").model
            model = model if a is None else PeftModel.from_pretrained(model, str(folders[a])).eval()
            assert (g - model(input_ids=torch.tensor([ids], device=model.device)).logits[0]).abs().max() <= 1e-4


def test_pool_bytes_count_the_biases_and_leave_with_them(folders):
    """Whatever a layer holds resident is in stack_nbytes (and the adapter's nbytes), the biases as the factors."""
    bank = AdapterBank(qwen())
    bank.add("plain", folders["plain"])
    bank.forward(IDS[:1], ["plain"])
    before = bank.stack_bytes()
    bank.add("lora_bias", folders["lora_bias"])
    bank.forward(IDS[:2], ["plain", "lora_bias"])
    layers = [m for m in bank.model.modules() if isinstance(m, RowLoraLinear)]
    for layer in layers:  # the pool as allocated is what is counted
        assert layer.stack_nbytes() == sum(t.numel() * t.element_size() for t in layer._pool if t is not None)
    q = bank.model.model.layers[0].self_attn.q_proj
    assert q._pool[2] is not None and q._pool[2].shape == (3, 32)  # slots 0..2, a bias each
    saved = load_file(str(folders["lora_bias"] / "adapter_model.safetensors"))  # fp32 factors and biases, as the bank holds them here
    assert bank.nbytes("lora_bias") == 4 * sum(v.numel() for v in saved.values())
    bank.remove("lora_bias")
    bank.forward(IDS[:1], ["plain"])
    assert q._pool[2] is None and bank.stack_bytes() == before  # its biases left with it


def test_layer_adds_each_slots_weighted_bias(device):
    """Row i adds Σ w·c of its slot's entries (the training path, no pool); a slot without one adds nothing."""
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5).to(device)
    ctx = RowContext()
    layer = RowLoraLinear(base, ctx)
    a1, b1, c1 = torch.randn(2, 6, device=device), torch.randn(5, 2, device=device), torch.randn(5, device=device)
    a2, b2 = torch.randn(3, 6, device=device), torch.randn(5, 3, device=device)
    layer.put("one", a1, b1, 0.5, bias=c1)
    layer.put("two", a2, b2, 2.0)
    ctx.define(1, [("one", 1.0)])
    ctx.define(2, [("one", 0.25), ("two", 1.0)])
    ctx.define(3, [("two", 1.0)])
    x = torch.randn(4, 3, 6, device=device)
    with ctx.assign([1, 2, 3, 0], device), torch.no_grad():
        y = layer(x)
    want = [base(x[0]) + 0.5 * x[0] @ a1.T @ b1.T + c1,
            base(x[1]) + 0.25 * 0.5 * x[1] @ a1.T @ b1.T + 2.0 * x[1] @ a2.T @ b2.T + 0.25 * c1,
            base(x[2]) + 2.0 * x[2] @ a2.T @ b2.T, base(x[3])]
    for got, w in zip(y, want):
        assert (got - w).abs().max() <= 1e-5


def test_composition_refuses_a_saved_bias_by_name(folders):
    """Composition takes plain factors: a trained bias is named, not dropped."""
    cfg = LoraConfig.from_pretrained(str(folders["lora_bias"]))
    weights = load_file(str(folders["lora_bias"] / "adapter_model.safetensors"))
    with pytest.raises(AdapterLoadError, match=r"trained bias .*lora_B\.bias.*lora_bias=True.*retrain") as err:
        LoraFactors.from_state_dict(cfg, weights, "LoRA adapter 'x'")
    assert "\n" not in str(err.value)


def test_router_serves_a_bias_all_adapter_trained_on_llama(tmp_path):
    """Through the router (register, run): an adapter this package trained with bias="all" on the Llama backbone
    (peft saved no bias tensor) is served as plain peft serves it, beside a base row."""
    folder = train_tiny(tmp_path, "ball", method_args={"bias": "all", "init_lora_weights": False})
    assert json.loads((folder / "adapter_config.json").read_text())["bias"] == "all"
    router = Router(load_backbone(TINY, "none", dtype="fp32"))
    router.register("ball", folder)
    texts = ["pos 3", "neg 5"]
    out = router.run([{"adapter": "ball", "text": t} for t in texts] + [{"adapter": "base", "text": "hello", "max_new_tokens": 2}])
    assert [o["prediction"] for o in out[:2]] == alone(folder, texts)
    with torch.no_grad():
        ref = PeftModel.from_pretrained(load_backbone(TINY, "none", dtype="fp32").model, str(folder)).eval()
        want = ref(input_ids=torch.tensor(IDS[:1], device=ref.device)).logits[0]
    assert (router.bank.forward(IDS[:1], ["ball"])[0] - want).abs().max() <= 1e-4


def test_static_decode_with_a_fixed_pool_equals_peft_and_keeps_the_factor_pool(folders):
    """With --max-loras / --max-lora-rank the pool is allocated once: an adapter with a trained bias adds the bias rows
    beside it without reallocating A and B, and the static decode batch (rows gathered from the live slot buffer)
    gives each row plain peft's greedy tokens."""
    bank = AdapterBank(qwen(), max_loras=3, max_lora_rank=8)
    bank.add("plain", folders["plain"])
    bank.forward(IDS[:1], ["plain"])
    q = bank.model.model.layers[0].self_attn.q_proj
    before = q._pool[0].data_ptr()
    for name in ("only", "lora_bias"):
        bank.add(name, folders[name])
    adapters, budget, out, scores = ["only", "plain", "lora_bias", None], 4, {}, {}

    def record(j, key, tok):
        out.setdefault(key, []).append(int(tok))
        scores.setdefault(key, []).append(dec.logits[j].clone())
        return len(out[key]) < budget

    dec = bank.batch(bank.start(IDS[:4], adapters, keys=list(range(4))), max_rows=4)
    assert isinstance(dec, StaticBatch)
    while bank.step(dec, dec.logits.argmax(-1), record):
        pass
    assert q._pool[0].data_ptr() == before and q._pool[2] is not None
    for key, (a, ids) in enumerate(zip(adapters, IDS)):
        ref = ref_logits(a and folders[a], ids + out[key][:-1])[len(ids) - 1:]
        assert [int(t) for t in ref.argmax(-1)] == out[key], a
        assert (torch.stack(scores[key]) - ref).abs().max() <= 1e-4, a

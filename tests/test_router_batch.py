"""The heterogeneous-batch engine equals running each row alone through plain peft."""

import random

import pytest
import torch
from peft import LoraConfig, PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model

from adapterhub_lite.core.errors import AdapterLoadError
from adapterhub_lite.model.backbone import load_backbone
from adapterhub_lite.model.rowlora import RowLoraLinear
from adapterhub_lite.serving.bank import AdapterBank

TINY = "tiny-random-llama"
CONFIGS = {
    # different ranks and different target modules; rsLoRA scaling on one of them
    "lora_a": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=False),
    "lora_b": LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=["k_proj", "o_proj", "gate_proj", "down_proj"],
                         task_type="CAUSAL_LM", init_lora_weights=False),
    # overlaps both on q_proj / k_proj (ranks padded in one stack), per-module rank and alpha
    "lora_c": LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "k_proj", "up_proj"], rank_pattern={"k_proj": 6},
                         alpha_pattern={"up_proj": 7}, task_type="CAUSAL_LM", init_lora_weights=False),
    "prefix": PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM"),
    "prefix_long": PrefixTuningConfig(num_virtual_tokens=6, task_type="CAUSAL_LM"),  # prefixes of unequal length
    "prompt": PromptTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"),
}


@pytest.fixture(scope="module")
def folders(_cache, tmp_path_factory):
    """One saved peft adapter folder per config, each made on a fresh backbone."""
    root = tmp_path_factory.mktemp("adapters")
    torch.manual_seed(1)
    out = {}
    for name, cfg in CONFIGS.items():
        model = get_peft_model(load_backbone(TINY, "none", dtype="fp32").model, cfg)
        if name.startswith(("prefix", "prompt")):  # peft initialises these near zero; make them matter
            torch.nn.init.normal_(model.prompt_encoder["default"].embedding.weight, std=1.0)
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


_REFS: dict = {}


def reference(folders, adapter, quant="none"):
    """A fresh backbone, plain PeftModel.from_pretrained (or the plain backbone for None)."""
    key = (adapter and str(folders[adapter]), quant)  # by folder: another module's `folders` (test_static_decode) holds its own copies
    if key not in _REFS:
        model = load_backbone(TINY, quant, dtype="fp32").model
        _REFS[key] = model if adapter is None else PeftModel.from_pretrained(model, str(folders[adapter])).eval()
    return _REFS[key]


@torch.no_grad()
def ref_logits(folders, adapter, ids, quant="none"):
    """The row alone: batch of 1, no padding; prompt-tuning virtual positions dropped."""
    model = reference(folders, adapter, quant)
    logits = model(input_ids=torch.tensor([ids], device=model.device)).logits[0]
    return logits[-len(ids):]


@torch.no_grad()
def peft_mixed_logits(folders, adapters, ids, quant):
    """Plain peft on the same right-padded batch, each row through its own LoRA (adapter_names)."""
    names = sorted({a for a in adapters if a})
    model = PeftModel.from_pretrained(load_backbone(TINY, quant, dtype="fp32").model, str(folders[names[0]]), adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(str(folders[n]), adapter_name=n)
    model.eval()
    width = max(map(len, ids))
    batch = torch.tensor([r + [0] * (width - len(r)) for r in ids], device=model.device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids], device=model.device)
    logits = model(input_ids=batch, attention_mask=mask, adapter_names=[a or "__base__" for a in adapters]).logits
    return [logits[i, :len(r)] for i, r in enumerate(ids)]


def ref_greedy(folders, adapter, ids, max_new, eos):
    out = []
    while len(out) < max_new and (not out or out[-1] != eos):
        out.append(int(ref_logits(folders, adapter, ids + out)[-1].argmax()))
    return out


def rows(lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 259) for _ in range(n)] for n in lengths]


def bank_with(folders, quant, names):
    bank = AdapterBank(load_backbone(TINY, quant, dtype="fp32").model)
    for n in names:
        bank.add(n, folders[n])
    return bank


def test_mixed_batch_equals_per_row_peft(folders):
    bank = bank_with(folders, "none", list(CONFIGS))
    adapters = ["lora_a", "prefix", None, "prompt", "lora_b", "lora_a", "prefix_long", None, "prompt", "lora_c"]
    ids = rows([7, 4, 9, 3, 6, 2, 8, 1, 5, 4])
    got = bank.forward(ids, adapters)
    worst = 0.0
    for g, a, r in zip(got, adapters, ids):
        ref = ref_logits(folders, a, r)
        assert g.shape == ref.shape
        worst = max(worst, (g - ref).abs().max().item())
    print(f"fp32 mixed batch: max |Δlogit| = {worst:.2e}")
    assert worst <= 1e-4
    # the LM head only at the requested positions (negative = from the end)
    positions = [[-1], [0, 3], [], [2], [5, 0], [1], [-2, -1], [0], [4], [1, 2]]
    some = bank.forward(ids, adapters, logits_positions=positions)
    for s, g, p in zip(some, got, positions):
        assert s.shape == (len(p), g.shape[1])
        if p:
            assert (s - g[p]).abs().max() <= 1e-5
    # outside the bank the backbone is the plain backbone: the hooks are inert
    plain = bank.model(input_ids=torch.tensor([ids[0]], device=bank.device)).logits[0]
    assert (plain - ref_logits(folders, None, ids[0])).abs().max() <= 1e-5
    with bank.base_only():
        plain = bank.model(input_ids=torch.tensor([ids[0]], device=bank.device)).logits[0]
    assert (plain - ref_logits(folders, None, ids[0])).abs().max() <= 1e-5


def test_mixed_batch_8bit_equals_per_row_peft(folders):
    bank = bank_with(folders, "8bit", list(CONFIGS))
    q_proj = bank.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, RowLoraLinear) and type(q_proj.base_layer).__name__ == "Linear8bitLt"
    adapters = ["lora_a", None, "lora_b", "prefix", "lora_a", "prompt", None, "lora_c"]
    ids = rows([5, 8, 3, 6, 9, 4, 2, 5], seed=1)
    worst = 0.0
    for g, a, r in zip(bank.forward(ids, adapters), adapters, ids):
        worst = max(worst, (g - ref_logits(folders, a, r, "8bit")).abs().max().item())
    print(f"8-bit mixed batch: max |Δlogit| = {worst:.2e}")
    # On the CPU 1e-4 holds: with llm_int8_threshold=0 bitsandbytes quantises activations per token,
    # so a row's numbers do not depend on the rows beside it or on padding. CUDA's int8 GEMMs pick
    # their kernel (and fp16 rounding of the dequantised output) by the batch shape, so a row run
    # alone differs from the same row in a batch by fp16 rounding amplified through the layers:
    # there the bound is that of 8-bit inference itself, and the exact check is the one below.
    assert worst <= (1e-4 if bank.device.type == "cpu" else 0.1)
    # Same batch shape on both sides (the LoRA rows also through plain peft's mixed-adapter batch),
    # so any difference left is the bank's own.
    lora = [i for i, a in enumerate(adapters) if a is None or a.startswith("lora")]
    ref = peft_mixed_logits(folders, [adapters[i] for i in lora], [ids[i] for i in lora], "8bit")
    got = bank.forward([ids[i] for i in lora], [adapters[i] for i in lora])
    same = max((g - r).abs().max().item() for g, r in zip(got, ref))
    print(f"8-bit LoRA rows vs peft's mixed batch of the same shape: max |Δlogit| = {same:.2e}")
    assert same <= 1e-3


def test_generate_equals_per_row_greedy_and_finished_rows_leave(folders):
    bank = bank_with(folders, "none", list(CONFIGS))
    adapters = ["lora_b", "prefix", None, "prompt", "lora_a", "prefix_long", "lora_c"]
    ids = rows([4, 6, 3, 5, 2, 3, 5], seed=2)
    budget = [7, 4, 5, 6, 3, 8, 2]
    # The tiny random backbone mostly repeats one token, lora_b does not: EOS = a token row 0 emits
    # for the first time at step k ≥ 1, so row 0 surely stops early, at EOS, mid-batch.
    free = ref_greedy(folders, adapters[0], ids[0], budget[0], eos=-1)
    k = next(k for k in range(1, len(free) - 1) if free[k] not in free[:k])
    eos = free[k]
    refs = [ref_greedy(folders, a, r, n, eos) for a, r, n in zip(adapters, ids, budget)]
    assert len(refs[0]) == k + 1 < budget[0]

    got, scores = bank.generate(ids, adapters, budget, eos_token_id=eos, output_scores=True)
    assert got == refs
    # the logits behind every choice, not only the argmax (the tiny backbone's greedy tokens are
    # robust to small errors, e.g. a decode step that sees the padding)
    worst = 0.0
    for s, a, r, g in zip(scores, adapters, ids, got):
        assert s.shape[0] == len(g)
        ref = ref_logits(folders, a, r + g[:-1])[len(r) - 1:]
        worst = max(worst, (s - ref).abs().max().item())
    print(f"generate, per-step logits: max |Δlogit| = {worst:.2e}")
    assert worst <= 1e-4
    # at decode step s (the prefill is step 0) only rows that still emit a token are in the batch
    expected = [sum(len(r) > s for r in refs) for s in range(1, max(map(len, refs)))]
    assert bank.decode_batch_sizes == expected
    assert expected[0] == len(ids) and expected[-1] < len(ids)
    # a single max_new_tokens for all rows, and a row with no budget
    assert bank.generate(ids[:2], adapters[:2], 2, eos_token_id=-1) == [ref_greedy(folders, a, r, 2, -1) for a, r in zip(adapters[:2], ids[:2])]
    assert bank.generate(ids[:2], adapters[:2], [0, 1], eos_token_id=-1)[0] == []


def test_add_remove_and_unknown_adapter(folders):
    bank = bank_with(folders, "none", ["lora_a", "lora_b", "lora_c", "prefix"])
    assert bank.names() == ["lora_a", "lora_b", "lora_c", "prefix"]
    slot_a = bank._adapters["lora_a"].slot
    attn = bank.model.model.layers[0].self_attn
    assert isinstance(attn.v_proj, RowLoraLinear) and isinstance(attn.q_proj, RowLoraLinear)  # one layer per module
    # 2 layers × (q: A 4×64 + B 64×4, v: A 4×64 + B 32×4) × 4 bytes; the prefix: 3 × 2 layers × (k, v) × 32 × 4 bytes
    assert bank.nbytes("lora_a") == 2 * (4 * 64 + 64 * 4 + 4 * 64 + 32 * 4) * 4 == 7168
    assert bank.nbytes("prefix") == 3 * 2 * 2 * 32 * 4

    bank.remove("lora_a")
    assert bank.names() == ["lora_b", "lora_c", "prefix"]
    assert bank._slots[slot_a] is None
    assert isinstance(attn.v_proj, torch.nn.Linear)  # no resident LoRA targets it: the original module again
    assert isinstance(attn.q_proj, RowLoraLinear)  # lora_c still does
    with pytest.raises(AdapterLoadError) as err:
        bank.forward(rows([3]), ["lora_a"])
    msg = str(err.value)
    assert isinstance(err.value, ValueError) and "\n" not in msg
    assert all(f"'{n}'" in msg for n in ("lora_a", "lora_b", "lora_c", "prefix"))
    with pytest.raises(AdapterLoadError):
        bank.nbytes("lora_a")

    ids = rows([5, 4, 6, 3])
    def check(adapters, refs):
        for g, a, r in zip(bank.forward(ids, adapters), refs, ids):
            assert (g - ref_logits(folders, a, r)).abs().max() <= 1e-4
    check(["lora_c", "lora_b", None, "lora_c"], ["lora_c", "lora_b", None, "lora_c"])  # stacks shrunk, others intact
    bank.add("again", folders["lora_a"])  # reuses the freed slot and still computes the same numbers
    assert bank._adapters["again"].slot == slot_a
    check(["again", "lora_b", "lora_c", "again"], ["lora_a", "lora_b", "lora_c", "lora_a"])
    check(["again"] * 4, ["lora_a"] * 4)  # every row on one LoRA: the in-place path
    with pytest.raises(AdapterLoadError):
        bank.add("again", folders["lora_b"])
    with pytest.raises(AdapterLoadError):
        bank.add("missing", folders["lora_a"].parent / "nope")


def test_bf16_bank_matches_plain_peft_in_bf16(folders):
    """The compute dtype end to end: factors and activations in bf16, no casts per matmul. peft
    computes the LoRA update in fp32 and rounds it once; we round x·A to bf16 too, so the bound is a
    few bf16 ulps of logits of size ~1 (bf16 has 8 bits of mantissa: 2^-8 ≈ 0.004 relative)."""
    bank = AdapterBank(load_backbone(TINY, "none", dtype="bf16").model)
    for n in ("lora_a", "lora_b", "prefix", "prompt"):
        bank.add(n, folders[n])
    adapters = ["lora_a", "prefix", None, "prompt", "lora_b"]
    ids = rows([5, 3, 6, 4, 2], seed=3)
    got = bank.forward(ids, adapters)
    assert all(g.dtype == torch.bfloat16 for g in got)
    worst = 0.0
    for g, a, r in zip(got, adapters, ids):
        model = load_backbone(TINY, "none", dtype="bf16").model
        if a:
            model = PeftModel.from_pretrained(model, str(folders[a])).eval()
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([r], device=model.device)).logits[0][-len(r):]
        worst = max(worst, (g.float() - ref.float()).abs().max().item())
    print(f"bf16 mixed batch: max |Δlogit| = {worst:.2e}")
    assert worst <= 0.05


def test_removing_an_adapter_gives_its_slot_back_to_the_pools(folders):
    """Unloading the adapter in the highest slot shrinks the slot pools of the layers it shared back to what the others
    need (the slot table forgets it), so an eviction frees the memory the budget counts."""
    bank = bank_with(folders, "none", ["lora_a", "lora_c"])  # both target q_proj
    alone = bank_with(folders, "none", ["lora_a"])
    assert bank.stack_bytes() > alone.stack_bytes()
    bank.remove("lora_c")
    assert sorted(bank.context.table) == sorted(alone.context.table) and bank.stack_bytes() == alone.stack_bytes()


def test_kv_bytes_per_token_is_what_the_cache_holds(folders):
    """--kv-cache-mb becomes cache positions through kv_bytes_per_token: keys and values of every layer, per position."""
    bank = bank_with(folders, "none", [])
    dec = bank.start([[5, 6, 7, 8]], [None])
    held = sum(t.numel() * t.element_size() for layer in dec.cache.layers for t in (layer.keys, layer.values))
    assert bank.kv_bytes_per_token() * 4 == held


@pytest.mark.parametrize("config", [PrefixTuningConfig, PromptTuningConfig])
def test_prompt_learning_with_more_than_its_virtual_tokens_is_refused_by_name(tmp_path, config):
    """peft saves a prefix / prompt adapter's modules_to_save (here a trained copy of the LM head) beside its
    prompt_embeddings and serves them; the bank read the prompt_embeddings alone and served the backbone's head
    (logits 14 off on the tiny backbone, other tokens). Refused by the field, or by the tensor when the config hides it."""
    import json

    torch.manual_seed(0)
    model = get_peft_model(load_backbone(TINY, "none", dtype="fp32").model, config(num_virtual_tokens=3, task_type="CAUSAL_LM", modules_to_save=["lm_head"]))
    model.save_pretrained(tmp_path / "mts")
    bank = AdapterBank(load_backbone(TINY, "none", dtype="fp32").model)
    with pytest.raises(AdapterLoadError, match=r"modules_to_save=\['lm_head'\]") as err:
        bank.add("mts", tmp_path / "mts")
    assert "\n" not in str(err.value)
    cfg = json.loads((tmp_path / "mts" / "adapter_config.json").read_text())
    (tmp_path / "mts" / "adapter_config.json").write_text(json.dumps({**cfg, "modules_to_save": None}))
    with pytest.raises(AdapterLoadError, match="holds tensor 'base_model.lm_head.weight'"):
        bank.add("mts", tmp_path / "mts")
    assert bank.names() == []


def test_a_lora_on_the_embedding_is_refused_by_the_option_that_made_it(tmp_path):
    """peft's LoRA on embed_tokens (lora_embedding_A/B) is not a linear layer's factors: refused naming the embedding and
    target_modules, with what to do, not only by the tensor's name; nothing is left loaded."""
    torch.manual_seed(0)
    model = get_peft_model(load_backbone(TINY, "none", dtype="fp32").model,
                           LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "emb")
    bank = AdapterBank(load_backbone(TINY, "none", dtype="fp32").model)
    with pytest.raises(AdapterLoadError, match=r"adapts the embedding 'model\.embed_tokens' \(target_modules names it.*serve it alone with peft") as err:
        bank.add("emb", tmp_path / "emb")
    assert "\n" not in str(err.value)
    assert bank.names() == []

"""Evaluation's data handling on its own: a sharded eval equals one process, left padding marks only real tokens, and
every path that cuts a long prompt keeps its end (where the answer cue sits)."""

import json

import pytest
import torch

from adapterhub_lite.core.data import load_task_data
from adapterhub_lite.core.spec import load_spec
from adapterhub_lite.model.backbone import load_backbone
from adapterhub_lite.model.evaluate import evaluate_split
from adapterhub_lite.model.heads import generate_ids, label_plan_ids, loss_plan_ids, pad_batch


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny-random-llama", "none", dtype="fp32")


class _Gathered(Exception):
    pass


@pytest.mark.parametrize("task, limit", [("toy", 15), ("copy", 3)])
def test_a_sharded_eval_equals_one_process(tiny, request, task, limit):
    """Each of 3 processes predicts every third row from its rank, and all of them, gathered, score the rows in
    their order: the same predictions and metrics as one process, with a row count the processes do not divide."""
    folder = request.getfixturevalue("cls_task" if task == "toy" else "gen_task")
    if task == "copy":  # prompts of different lengths: batched generation pads on the left
        rows = [{"text": t, "target": t.upper()} for t in ["ab", "cdefgh", "i", "jk lm no"]]
        (folder / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = load_spec(folder / f"{task}.yaml")
    dev = load_task_data(spec, ("dev",))["dev"]
    one, preds, _ = evaluate_split(tiny.model, tiny.tokenizer, spec, dev, limit=limit)
    assert len(preds) == limit
    parts = {}
    for rank in range(3):
        def capture(mine, rank=rank):
            parts[rank] = mine
            raise _Gathered

        with pytest.raises(_Gathered):
            evaluate_split(tiny.model, tiny.tokenizer, spec, dev, limit=limit, shard=(rank, 3), gather=capture)
    assert sorted(len(p) for p in parts.values()) == sorted(len(range(r, limit, 3)) for r in range(3))
    for rank in range(3):
        got, got_preds, _ = evaluate_split(tiny.model, tiny.tokenizer, spec, dev, limit=limit, shard=(rank, 3),
                                           gather=lambda mine: [parts[0], parts[1], parts[2]])
        assert got_preds == preds and got == one


def test_left_padding_marks_only_the_real_tokens():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, device=torch.device("cpu"), left=True)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0, device=torch.device("cpu"))
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_batched_generation_answers_as_each_prompt_alone(tiny):
    tok = tiny.tokenizer
    prompts = [tok(p).input_ids for p in ("In: ab\nOut:", "In: a much longer prompt here\nOut:", "x")]
    together = generate_ids(tiny.model, tok, prompts, max_new_tokens=4, max_length=64)
    assert together == [generate_ids(tiny.model, tok, [p], max_new_tokens=4, max_length=64)[0] for p in prompts]


def test_every_cut_keeps_the_prompts_end(tiny, monkeypatch):
    """A prompt longer than train.max_length loses its start, in scoring, in the loss and in generation alike."""
    long = list(range(3, 40))
    scored = label_plan_ids([long], [[50], [51]], max_length=10)
    assert scored.seqs == [long[-9:]]
    loss = loss_plan_ids([long], [[60, 61]], max_length=10, eos_id=2)
    assert loss.seqs == [long[-7:] + [60, 61]]  # 7 + the answer and EOS = 10; EOS is scored, not fed
    seen = []

    def fake_generate(input_ids, attention_mask, **kw):
        seen.append(input_ids.tolist())
        return torch.cat([input_ids, torch.full((len(input_ids), 1), tiny.tokenizer.eos_token_id)], dim=1)

    monkeypatch.setattr(tiny.model, "generate", fake_generate)
    generate_ids(tiny.model, tiny.tokenizer, [long], max_new_tokens=4, max_length=10)
    assert seen == [[long[-6:]]]


def _greedy_alone(model, tok, ids, n):
    """The first line of plain peft's greedy answer for one row alone: its forward, token by token (no generate())."""
    from adapterhub_lite.core.text import first_line

    seq = list(ids)
    with torch.no_grad():
        while len(seq) < len(ids) + n and (len(seq) == len(ids) or seq[-1] != tok.eos_token_id):
            seq.append(int(model(input_ids=torch.tensor([seq], device=model.device)).logits[0, -1].argmax()))
    return first_line(tok.decode(seq[len(ids):], skip_special_tokens=True))


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_generation_through_a_prompt_learning_adapter_is_the_adapter_s_as_peft_s_forward_gives_it(kind):
    """peft 0.21.2's generate() on transformers 5.25 hands a prefix to the model under the cache argument transformers
    renamed, so eval's generate_ids decoded the plain backbone (or, left-padded, a mix), and a prompt adapter's every
    step after the first ran off: dev metrics that were not the adapter's. Each row must be the greedy decode of plain
    peft's forward, run alone (left-padded rows here); inside disable_adapter(), the backbone's. The tiny backbone
    copies its last token whatever a prompt adds, so the prompt case fails without the fix on the real one only
    (test_slow); the prefix case fails here."""
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    torch.manual_seed(0)
    config = (PrefixTuningConfig if kind == "prefix" else PromptTuningConfig)(num_virtual_tokens=4, task_type="CAUSAL_LM")
    made = get_peft_model(load_backbone("tiny-random-llama", "none", dtype="fp32").model, config)
    torch.nn.init.normal_(made.prompt_encoder["default"].embedding.weight, std=8.0)  # a prefix this strong changes the answers
    made.eval()
    tok, rows, n = load_backbone("tiny-random-llama", "none", dtype="fp32").tokenizer, [[5, 40, 41, 42, 9, 10, 77], [30, 31, 32], [60, 61, 62, 63, 64]], 6
    want = [_greedy_alone(made, tok, r, n) for r in rows]
    with made.disable_adapter():
        plain = [_greedy_alone(made, tok, r, n) for r in rows]
        assert generate_ids(made, tok, rows, n, 64) == plain
    assert kind == "prompt" or want != plain  # the prefix decides the answers
    assert generate_ids(made, tok, rows, n, 64) == want


@pytest.mark.parametrize("kind", ["lora", "prefix"])
def test_eval_stops_at_the_generation_configs_other_end_ids_as_the_server_does(kind, monkeypatch):
    """A backbone whose generation config lists end ids besides the tokenizer's EOS (Llama 3's <|eom_id|>, Qwen's
    <|endoftext|>): the server ends a choice there (vLLM's rule), and eval's answers must be the same answers, through
    generate() (LoRA) and through the prompt-learning decoder (prefix) alike."""
    from peft import LoraConfig, PrefixTuningConfig, get_peft_model

    torch.manual_seed(0)
    backbone = load_backbone("tiny-random-llama", "none", dtype="fp32")
    tok = backbone.tokenizer
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"]) if kind == "lora" else PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")
    made = get_peft_model(backbone.model, config)
    made.eval()
    rows = [[5, 40, 41, 42, 9, 10, 77], [30, 31, 32]]
    free = generate_ids(made, tok, rows, 6, 64)
    first = [generate_ids(made, tok, [r], 1, 64)[0] for r in rows]  # each row's first greedy token, as text
    assert all(len(f) < len(a) for f, a in zip(first, free)), (first, free)  # they run on past it unless told to stop
    ids = [tok.encode(f, add_special_tokens=False) for f in first]
    assert all(len(i) == 1 for i in ids), ids
    monkeypatch.setattr(made.get_base_model().generation_config, "eos_token_id", [tok.eos_token_id, *(i[0] for i in ids)])
    assert generate_ids(made, tok, rows, 6, 64) == first

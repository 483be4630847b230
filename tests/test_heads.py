"""Label scoring: equals brute-force likelihoods, and follows the model on a constructed case."""

import pytest
import torch

from adapterhub_lite.model.backbone import load_backbone
from adapterhub_lite.model.heads import answer_ids, encode_prompt, label_scores, task_loss


@pytest.fixture(scope="module")
def tiny():
    return load_backbone("tiny-random-llama", "none", dtype="fp32")  # exact comparisons (auto is bf16 on CUDA)


def brute_force(model, tok, prompt, word):
    """log p(word | prompt) from the full logits of one unpadded sequence."""
    p, c = encode_prompt(tok, prompt, 64), answer_ids(tok, word)
    logp = model(input_ids=torch.tensor([p + c], device=model.device)).logits[0].log_softmax(-1)
    return sum(logp[len(p) - 1 + j, t].item() for j, t in enumerate(c))


@pytest.mark.parametrize("words", [["yes", "no!"], ["a", "b", "c"]])
def test_scores_equal_brute_force_likelihoods(tiny, words):
    prompts = ["I like it:", "bad", "a much longer prompt than the others:"]
    label_tokens = [answer_ids(tiny.tokenizer, w) for w in words]
    got = label_scores(tiny.model, tiny.tokenizer, prompts, label_tokens, 64)
    want = torch.tensor([[brute_force(tiny.model, tiny.tokenizer, p, w) for w in words] for p in prompts])
    assert torch.allclose(got.cpu(), want, atol=1e-4)


def test_single_token_labels_use_the_next_token_distribution(tiny):
    tok, model = tiny.tokenizer, tiny.model
    ids = [[tok.convert_tokens_to_ids("x")], [tok.convert_tokens_to_ids("z")]]
    got = label_scores(model, tok, ["hello", "hi"], ids, 64)
    for row, prompt in enumerate(["hello", "hi"]):
        p = encode_prompt(tok, prompt, 64)
        logp = model(input_ids=torch.tensor([p], device=model.device)).logits[0, -1].log_softmax(-1)
        assert torch.allclose(got[row], logp[[i[0] for i in ids]], atol=1e-5)


def test_scoring_picks_the_label_the_constructed_model_prefers():
    """Zero every block's output so logits = norm(e_last) · E^T: the model predicts its last
    token again. Give the space token the embedding of 'x' (then 'z') and the label ' x' (' z')
    must win, whatever the prompt."""
    backbone = load_backbone("tiny-random-llama", "none")
    model, tok = backbone.model, backbone.tokenizer
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    emb = model.get_input_embeddings().weight
    space, x, z = (tok.convert_tokens_to_ids(t) for t in ("Ġ", "x", "z"))
    labels = [answer_ids(tok, "x"), answer_ids(tok, "z")]
    assert labels[0][0] == space  # the answer starts with the space token
    for winner, source in ((0, x), (1, z)):
        with torch.no_grad():
            emb[space] = emb[source]
        scores = label_scores(model, tok, ["Text: anything\nLabel:", "other"], labels, 64)
        assert scores.argmax(-1).tolist() == [winner, winner]


def test_generation_loss_covers_only_target_tokens(tiny):
    tok, model = tiny.tokenizer, tiny.model
    loss = task_loss(model, tok, ["In: ab\nOut:"], ["AB"], 64)
    p, c = encode_prompt(tok, "In: ab\nOut:", 64), answer_ids(tok, "AB") + [tok.eos_token_id]
    logp = model(input_ids=torch.tensor([p + c], device=model.device)).logits[0].log_softmax(-1)
    want = -sum(logp[len(p) - 1 + j, t] for j, t in enumerate(c)) / len(c)
    assert abs(loss.item() - want.item()) < 1e-5


@pytest.mark.parametrize("words", [["yes", "no!"], ["a", "b", "c"]])
def test_classification_loss_is_the_cross_entropy_of_the_gold_labels_scores(tiny, words):
    from adapterhub_lite.model.heads import loss_plan_ids

    tok = tiny.tokenizer
    prompts = ["I like it:", "bad", "a much longer prompt than the others:", "meh"]
    gold = [1, 0, len(words) - 1, 0]
    label_tokens = [answer_ids(tok, w) for w in words]
    scores = torch.tensor([[brute_force(tiny.model, tok, p, w) for w in words] for p in prompts])
    ids = [encode_prompt(tok, p, 64) for p in prompts]
    for reduction in ("mean", "sum"):
        with torch.no_grad():
            got = loss_plan_ids(ids, gold, 64, label_tokens, reduction=reduction).run(tiny.model, tok.pad_token_id)
        want = torch.nn.functional.cross_entropy(scores, torch.tensor(gold), reduction=reduction)
        assert abs(got.item() - want.item()) < 1e-4, (reduction, got, want)


@pytest.mark.parametrize("method", ["lora", "prefix", "prompt", "ia3"])
def test_scores_equal_brute_force_under_every_peft_method(method):
    """heads reads the final norm's output by a hook (not output_hidden_states): still right when
    prompt tuning prepends virtual tokens, prefix tuning adds virtual keys/values, or LoRA / IA3
    change the layers. Random adapter weights, so that each one really moves the scores."""
    from adapterhub_lite.model.adapter import attach

    backbone = load_backbone("tiny-random-llama", "none", dtype="fp32")  # exact comparisons (auto is bf16 on CUDA)
    model = attach(backbone.model, method, {"num_virtual_tokens": 3} if method in ("prefix", "prompt") else {}).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    tok, words = backbone.tokenizer, ["yes", "no!"]
    prompts = ["I like it:", "a much longer prompt than the other:"]
    got = label_scores(model, tok, prompts, [answer_ids(tok, w) for w in words], 64)
    want = []
    for prompt in prompts:
        row = []
        for w in words:
            p, c = encode_prompt(tok, prompt, 64), answer_ids(tok, w)
            with torch.no_grad():  # peft's logits include prompt tuning's virtual positions in front: keep the real ones
                logp = model(input_ids=torch.tensor([p + c], device=model.device)).logits[0, -(len(p) + len(c)):].log_softmax(-1)
            row.append(sum(logp[len(p) - 1 + j, t].item() for j, t in enumerate(c)))
        want.append(row)
    with torch.no_grad():
        base = label_scores(load_backbone("tiny-random-llama", "none", dtype="fp32").model, tok, prompts, [answer_ids(tok, w) for w in words], 64)
    assert (got - base).abs().max().item() > 1e-2  # the adapter changes the scores
    assert torch.allclose(got.cpu(), torch.tensor(want), atol=1e-4)


def _tiny_post_processed(kind: str):
    """A tiny random causal LM whose forward post-processes its logits: Gemma 2 soft-caps, Granite divides, Cohere scales."""
    from transformers import AutoModelForCausalLM, CohereConfig, Gemma2Config, GraniteConfig

    sizes = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    config = {
        "gemma2": lambda: Gemma2Config(**sizes, head_dim=8, final_logit_softcapping=2.0, attn_logit_softcapping=None, sliding_window=16),
        "granite": lambda: GraniteConfig(**sizes, logits_scaling=4.0),
        "cohere": lambda: CohereConfig(**sizes, logit_scale=3.0),
    }[kind]()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # make the post-processing matter: logits well beyond the soft cap
        model.get_output_embeddings().weight.mul_(50)
    return model


@pytest.mark.parametrize("kind", ["gemma2", "granite", "cohere"])
def test_scores_apply_the_models_own_logit_post_processing(kind):
    from adapterhub_lite.model.heads import continuation_plan

    model = _tiny_post_processed(kind)
    seqs = [[5, 9, 17, 3, 22, 40], [7, 7, 2, 31, 8, 11]]
    with torch.no_grad():
        want = model(input_ids=torch.tensor(seqs)).logits.float().log_softmax(-1)  # the model's full forward
        got = continuation_plan([s[:3] for s in seqs], [s[3:] for s in seqs]).run(model, 0)
    assert torch.allclose(got, torch.stack([want[r, 2:5].gather(-1, torch.tensor(s[3:])[:, None]).sum() for r, s in enumerate(seqs)]), atol=1e-4)


def test_a_continuations_last_token_is_scored_but_not_fed():
    """No position after the last target token is read, so feeding it is a position of work for nothing; the scores
    still equal the whole sequence's forward (a causal model: no earlier position sees the last token)."""
    from adapterhub_lite.model.heads import continuation_plan

    model = _tiny_post_processed("granite")
    prompts, conts = [[5, 9, 17], [7, 7]], [[3, 22, 40], [2]]
    plan = continuation_plan(prompts, conts)
    assert plan.seqs == [[5, 9, 17, 3, 22], [7, 7]]
    with torch.no_grad():
        got = plan.run(model, 0)
        want = [model(input_ids=torch.tensor([p + c])).logits[0].float().log_softmax(-1)[len(p) - 1:-1].gather(-1, torch.tensor(c)[:, None]).sum()
                for p, c in zip(prompts, conts)]
    assert torch.allclose(got, torch.stack(want), atol=1e-4)


@pytest.mark.parametrize("labels", [None, [[5]], [[5], [6]], [[5, 7, 8], [6]]])
def test_read_tokens_is_what_the_loss_plan_runs(labels):
    """Issue 22: tokens/s counted each prompt before truncation; read_tokens is the plan's sequences' length."""
    from adapterhub_lite.model.heads import loss_plan_ids, read_tokens

    g = torch.Generator().manual_seed(0)
    max_length = 12
    prompts = [list(range(3, 3 + int(n))) for n in torch.randint(1, 30, (20,), generator=g)]  # many longer than max_length
    if labels is None:
        answers = [list(range(40, 40 + int(n))) for n in torch.randint(1, 15, (20,), generator=g)]  # some cut too
    else:
        answers = [i % len(labels) for i in range(20)]
    plan = loss_plan_ids(prompts, answers, max_length, labels, eos_id=2, reduction="sum")
    assert max(len(s) for s in plan.seqs) <= max_length
    assert sum(read_tokens(len(p), a, max_length, labels) for p, a in zip(prompts, answers)) == sum(len(s) for s in plan.seqs)
    assert sum(len(p) > max_length for p in prompts) > 5  # the case that was miscounted: prompts the plan cuts


@pytest.mark.parametrize("labels", [None, [[5]], [[5, 7, 8], [6]]])
def test_loss_items_counts_what_the_summed_loss_sums_over(labels):
    """The loss contract (StepLoss): a step divides the summed loss by loss_items, so it must count exactly the terms the
    plan sums: each target token plus its EOS, after the cut to max_length (generation), or one a row (classification).
    Counting targets without their EOS made every step's loss a sum over N + rows tokens divided by N."""
    from adapterhub_lite.model.heads import loss_items, loss_plan_ids

    g = torch.Generator().manual_seed(0)
    max_length = 12
    prompts = [list(range(3, 3 + int(n))) for n in torch.randint(1, 30, (20,), generator=g)]
    if labels is None:
        answers = [list(range(40, 40 + int(n))) for n in torch.randint(1, 15, (20,), generator=g)]  # some cut too
        assert sum(len(a) + 1 > max_length - 1 for a in answers) > 2
    else:
        answers = [i % len(labels) for i in range(20)]
    plan = loss_plan_ids(prompts, answers, max_length, labels, eos_id=2, reduction="sum")
    terms = len(answers) if labels is not None else len(plan.rows)  # classification: one cross-entropy term a row
    assert loss_items(answers, max_length, labels) == terms


def test_the_lm_head_projects_only_the_positions_read(tiny):
    """A classification batch projects one position per row onto the vocabulary (the label-read position), a
    generation loss one per target token: the model's own forward projects none. With logits_to_keep=1 it projected
    every row's last position too and threw the result away (a [B,1,H]×[H,V] product: 60 ms of a 730 ms CPU step of
    the 135M)."""
    tok, model = tiny.tokenizer, tiny.model
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[:-1].numel()))
    try:
        label_scores(model, tok, ["I like it:", "bad", "a longer prompt:"], [[tok.convert_tokens_to_ids("x")], [tok.convert_tokens_to_ids("z")]], 64)
        assert seen == [0, 3]  # the model's forward: nothing; ours: the 3 rows' last prompt tokens
        seen.clear()
        task_loss(model, tok, ["copy: ab", "copy: c"], ["ab", "c"], 64)
        targets = sum(len(tok(" " + t, add_special_tokens=False).input_ids) + 1 for t in ("ab", "c"))  # + EOS per row
        assert seen == [0, targets]
    finally:
        handle.remove()

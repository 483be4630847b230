"""Prefix- and prompt-tuning adapters at the edge of the context, through the server: their virtual tokens take
positions, so a request whose prompt, virtual tokens and max_tokens fill max_model_len exactly is answered (as plain
peft's forward decodes it, whole or in pieces under a step budget smaller than the virtual tokens), one token more is
refused naming every number, and usage counts the prompt as read (the virtual tokens are the adapter's, not the
client's)."""

import concurrent.futures as cf
import random

import pytest
import torch
from peft import PeftModel

from adapterhub_lite.model.backbone import load_backbone
from adapterhub_lite.serving.scheduler import Budgets

from .serving import Served

CONTEXT, NEW = 40, 6


@pytest.fixture(scope="module")
def edge(serve_registry):
    # a step budget of 3 tokens: gen_prompt's first piece (5 virtual tokens and the first token) is larger than any step
    s = Served(serve_registry, max_model_len=CONTEXT, budgets=Budgets(max_rows=2, max_num_batched_tokens=3))
    yield s
    s.close()


@torch.no_grad()
def peft_greedy(folder, ids, new):
    """Plain peft, greedy over its own forward (README: peft's generate() does not decode these kinds as its forward
    scores them): the prompt's log-probs (from its second token) and the new tokens with theirs."""
    model = PeftModel.from_pretrained(load_backbone("tiny-random-llama", "none", dtype="fp32").model, str(folder)).eval()
    out = []
    for _ in range(new):
        logp = model(input_ids=torch.tensor([ids + [t for t, _ in out]])).logits[0, -len(ids) - len(out):].float().log_softmax(-1)
        token = int(logp[-1].argmax())
        out.append((token, float(logp[-1, token])))
    prompt = [float(logp[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    return prompt, out


@pytest.mark.parametrize("name", ["gen_prefix", "gen_prompt"])
def test_a_request_that_fills_the_context_exactly_is_answered_as_peft_decodes_it(edge, serve_registry, name):
    virtual = edge.router.virtual_tokens(name)[1]
    assert virtual >= 2
    rng = random.Random(virtual)
    ids = [rng.randrange(3, 250) for _ in range(CONTEXT - virtual - NEW)]
    prompt, out = peft_greedy(serve_registry / name / "1.0.0", ids, NEW)
    body = {"model": name, "prompt": ids, "max_tokens": NEW, "temperature": 0, "logprobs": 1, "ignore_eos": True,
            "return_token_ids": True}
    # echoed with log-probs (its prompt runs whole, scored) and not (in pieces), at once: they share steps
    with cf.ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda extra: edge.post("/v1/completions", {**body, **extra}), [{"echo": True}, {}]))
    for r, echo in zip(got, (True, False)):
        assert r.status_code == 200, r.text
        choice, usage = r.json()["choices"][0], r.json()["usage"]
        assert usage == {"prompt_tokens": len(ids), "completion_tokens": NEW, "total_tokens": len(ids) + NEW}
        assert choice["finish_reason"] == "length"
        logprobs = choice["logprobs"]["token_logprobs"]
        if echo:
            assert logprobs[0] is None and len(logprobs) == len(ids) + NEW
            assert max(abs(a - b) for a, b in zip(logprobs[1:len(ids)], prompt)) <= 1e-4
            logprobs = logprobs[len(ids):]
        assert max(abs(a - b) for a, b in zip(logprobs, [lp for _, lp in out])) <= 1e-4, (echo, logprobs, out)
        assert choice["token_ids"] == [t for t, _ in out] and choice["prompt_token_ids"] == ids
    # one token more does not fit: refused, naming the prompt, the virtual tokens, the completion and the context
    r = edge.post("/v1/completions", {**body, "prompt": ids + [5]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    said = f"the request needs {CONTEXT + 1} tokens ({len(ids) + 1} in the prompt, {virtual} virtual tokens of adapter '{name}', {NEW} for the completion)"
    assert said in r.json()["error"]["message"], r.text

"""The server as other tools use it: no prompt cut, prompt log-probs (echo / prompt_logprobs) for every
adapter kind, the tokenizer routes, every sampling field implemented as specified or refused by name,
log-probs that join to the text, and the operations around requests (access log, CORS, errors logged).

References are computed apart from the server: plain peft (load_adapter) for log-probs, and a greedy
loop over the plain backbone with each field's formula for the sampling settings.
"""

import asyncio
import json
import logging
import math
import shutil

import httpx
import openai
import pytest
import torch

from adapterhub_lite.artifacts.loading import check_fits, load_adapter
from adapterhub_lite.core.errors import AdapterHubError, AdapterLoadError, ContextLengthError
from adapterhub_lite.model.backbone import load_backbone
from adapterhub_lite.ops.export import lora_problems, read_layout
from adapterhub_lite.serving.params import FIELDS, IGNORED_HEADER
from adapterhub_lite.serving.router import Router

from .serving import KEY, Served

TINY = "tiny-random-llama"
PROMPT = "T: pos 1\nL:"


@pytest.fixture(scope="module")
def tok(served):
    return served.router.backbone.tokenizer


@pytest.fixture(scope="module")
def plain():
    """The backbone alone, outside any server (fp32, like the servers under test)."""
    return load_backbone(TINY, "none", dtype="fp32").model.eval()


# What the openai client takes as keyword arguments; every other field goes in its extra_body, as users send vLLM's extras.
OPENAI_COMPLETIONS = {"model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n", "presence_penalty",
                      "seed", "stop", "stream", "stream_options", "suffix", "temperature", "top_p", "user"}


def complete(served, **body):
    """A completion through the openai client (model 'base', the prompt PROMPT unless given), as a dict."""
    body = {"model": "base", "prompt": PROMPT, **body}
    known = {k: v for k, v in body.items() if k in OPENAI_COMPLETIONS}
    extra = {k: v for k, v in body.items() if k not in OPENAI_COMPLETIONS}
    return served.client.completions.create(**known, extra_body=extra or None).model_dump()


# -- no prompt is cut -------------------------------------------------------------------------------

def test_a_generous_max_tokens_never_cuts_a_task_prompt(served, tok):
    """gen_a was trained at max_length 32: the old server kept only 32 - max_tokens prompt tokens (1 from 31 on)."""
    rendered = "In: abcd\nOut:"
    full = len(tok(rendered).input_ids)
    for max_tokens in (4, 31, 40, 200):
        for body in ({"input": "abcd"}, {"prompt": rendered}):
            got = served.post("/v1/completions", {"model": "gen_a", "max_tokens": max_tokens, **body}).json()
            assert got["usage"]["prompt_tokens"] == full, (max_tokens, body, got["usage"])
    chat = served.client.chat.completions.create(model="gen_a", messages=[{"role": "user", "content": "abcd"}], max_tokens=200)
    assert chat.usage.prompt_tokens == full


def test_what_does_not_fit_the_context_is_refused_naming_every_number(serve_registry, tok):
    s = Served(serve_registry, max_model_len=40)
    try:
        prompt = "x" * 30  # 30 tokens: one byte each
        r = s.post("/v1/completions", {"model": "base", "prompt": prompt, "max_tokens": 11})
        assert r.status_code == 400, r.text
        msg = r.json()["error"]["message"]
        assert all(str(n) in msg for n in (41, 30, 11, 40)), msg
        assert s.post("/v1/completions", {"model": "base", "prompt": prompt, "max_tokens": 10}).status_code == 200
        # a prefix adapter's virtual tokens take positions too (gen_prefix: 2)
        r = s.post("/v1/completions", {"model": "gen_prefix", "prompt": prompt, "max_tokens": 10})
        assert r.status_code == 400 and "2 virtual tokens" in r.json()["error"]["message"], r.text
        # no --max-tokens: only the context bounds max_tokens (vLLM has no other bound), and its refusal names the numbers
        r = s.post("/v1/completions", {"model": "base", "prompt": "x" * 3, "max_tokens": 600})
        assert r.status_code == 400 and all(str(n) in r.json()["error"]["message"] for n in (603, 600, 40)), r.text
        assert r.json()["error"]["code"] == "context_length_exceeded"  # OpenAI's code, which clients test for
        # base chat without max_tokens gets what the context leaves, never a cut prompt
        chat = s.client.chat.completions.create(model="base", messages=[{"role": "user", "content": "y" * 20}])
        assert chat.usage.prompt_tokens + chat.usage.completion_tokens <= 40 and chat.usage.prompt_tokens > 20
    finally:
        s.close()
    capped = Served(serve_registry, max_tokens=8)  # --max-tokens 8: larger is refused naming both; base chat gets at most 8
    try:
        r = capped.post("/v1/completions", {"model": "base", "prompt": "ab", "max_tokens": 9})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens" and "between 0 and 8" in r.json()["error"]["message"], r.text
        chat = capped.client.chat.completions.create(model="base", messages=[{"role": "user", "content": "y"}], extra_body={"ignore_eos": True})
        assert chat.usage.completion_tokens == 8
    finally:
        capped.close()


def test_router_run_refuses_instead_of_cutting(serve_registry):
    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32", max_model_len=24)
    assert router.run([{"adapter": "gen_a", "text": "ab"}])[0]["prediction"] is not None
    with pytest.raises(ContextLengthError, match=r"needs 2\d tokens \(\d+ in the prompt, 4 for the completion\).*maximum context length is 24"):
        router.run([{"adapter": "gen_a", "text": "a" * 16}])
    with pytest.raises(AdapterLoadError, match="max_model_len=9999"):
        Router.from_registry(serve_registry, quantization="none", max_model_len=9999)
    # a generation setting run() does not apply (it answers greedily) is refused, not answered as if applied
    with pytest.raises(AdapterHubError, match=r"request\(s\) \[1\] set \['temperature', 'top_p'\], which run\(\) does not read"):
        router.run([{"adapter": "gen_a", "text": "ab"}, {"adapter": "gen_a", "text": "ab", "temperature": 0.5, "top_p": 0.9, "id": 7}])


# -- prompt log-probs --------------------------------------------------------------------------------

def reference_logprobs(folder, ids):
    """log p(token t | tokens before t) through plain peft (or the plain backbone), t = 1..T-1."""
    model = load_backbone(TINY, "none", dtype="fp32").model if folder is None else load_adapter(folder, dtype="fp32")[0]
    with torch.no_grad():
        logp = model.eval()(input_ids=torch.tensor([ids], device=model.device)).logits[0, -len(ids):].float().log_softmax(-1)
    return [logp[t - 1, ids[t]].item() for t in range(1, len(ids))], logp


@pytest.mark.parametrize("model", ["cls_a", "cls_ia3", "cls_prefix", "cls_prompt", "gen_b", "base"])
def test_echo_and_prompt_logprobs_equal_plain_peft_for_every_adapter_kind(served, tok, model):
    ids = tok(PROMPT).input_ids
    want, logp = reference_logprobs(None if model == "base" else served.router.folders[model], ids)
    # lm-eval's loglikelihood request: token ids, echo, logprobs 1, max_tokens 1
    got = complete(served, model=model, prompt=[ids], echo=True, logprobs=1, max_tokens=1, temperature=0, seed=1234)
    choice = got["choices"][0]
    lp = choice["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing before the first token
    assert len(lp["token_logprobs"]) == len(ids) + 1  # the prompt's tokens, then the one generated
    assert lp["token_logprobs"][1:-1] == pytest.approx(want, abs=1e-4)
    assert lp["token_logprobs"][-1] == pytest.approx(logp[-1].max().item(), abs=1e-4)  # greedy: the most likely next token
    assert choice["text"].startswith(PROMPT) and "".join(lp["tokens"]) == choice["text"]
    assert got["usage"]["prompt_tokens"] == len(ids) and got["usage"]["completion_tokens"] == 1
    # max_tokens 0: the prompt alone; vLLM's prompt_logprobs give the same numbers with ranks
    scored = complete(served, model=model, prompt=PROMPT, echo=True, logprobs=2, max_tokens=0, prompt_logprobs=2)["choices"][0]
    assert scored["text"] == PROMPT and scored["logprobs"]["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
    positions = scored["prompt_logprobs"]
    assert positions[0] is None and len(positions) == len(ids)
    for t in range(1, len(ids)):
        mine = positions[t][str(ids[t])]
        assert mine["logprob"] == pytest.approx(want[t - 1], abs=1e-4)
        assert mine["rank"] == int((logp[t - 1] > logp[t - 1, ids[t]] + 1e-6).sum()) + 1
        assert len(positions[t]) in (2, 3) and any(v["rank"] == 1 for v in positions[t].values())


def test_prompt_forms_and_scoring_rows_batch_with_generation(served, tok):
    ids = [tok(p).input_ids for p in ("T: neg 2\nL:", "In: ab\nOut:", "x y z")]
    alone = [complete(served, model="gen_b", prompt=[i], echo=True, logprobs=0, max_tokens=0)["choices"][0] for i in ids]
    assert all(a["logprobs"]["top_logprobs"] is None for a in alone)  # logprobs 0: OpenAI's null
    together = complete(served, model="gen_b", prompt=ids, echo=True, logprobs=0, max_tokens=0)["choices"]
    for c, a in zip(together, alone):  # padded beside longer rows: equal up to float rounding
        assert c["logprobs"]["token_logprobs"][0] is None and c["logprobs"]["token_logprobs"][1:] == pytest.approx(a["logprobs"]["token_logprobs"][1:], abs=1e-5)
    texts = complete(served, model="gen_b", prompt=["T: neg 2\nL:", "x y z"], echo=True, max_tokens=0)["choices"]
    assert [c["text"] for c in texts] == ["T: neg 2\nL:", "x y z"]

    async def burst():  # scoring requests beside generating ones, in one batch
        async with httpx.AsyncClient(base_url=served.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as h:
            calls = [h.post("/v1/completions", json={"model": "gen_b", "prompt": [i], "echo": True, "logprobs": 0, "max_tokens": 0}) for i in ids]
            calls += [h.post("/v1/completions", json={"model": m, "input": "cd"}) for m in ("gen_a", "gen_prefix", "cls_b")]
            return await asyncio.gather(*calls)

    answers = asyncio.run(burst())
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    for got, a in zip(answers[:3], alone):
        assert got.json()["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(a["logprobs"]["token_logprobs"][1:], abs=1e-5)


# -- the tokenizer routes -------------------------------------------------------------------------------

def test_tokenize_detokenize_tokenizer_info_and_version(served, tok):
    got = httpx.post(served.url + "/tokenize", json={"prompt": "héllo", "add_special_tokens": False}).json()
    assert got["tokens"] == tok("héllo", add_special_tokens=False).input_ids and got["count"] == len(got["tokens"])
    assert got["max_model_len"] == 512
    assert httpx.post(served.url + "/detokenize", json={"tokens": got["tokens"]}).json() == {"prompt": "héllo"}
    chat = httpx.post(served.url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == tok(tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True),
                                 add_special_tokens=False).input_ids
    info = httpx.get(served.url + "/tokenizer_info").json()
    assert info["eos_token"] == tok.eos_token and info["model_max_length"] == 512 and "chat_template" in info
    assert httpx.get(served.url + "/version").json()["version"]
    bad = httpx.post(served.url + "/detokenize", json={"tokens": [10**6]})
    assert bad.status_code == 400 and "vocabulary" in bad.json()["error"]["message"]
    both = httpx.post(served.url + "/tokenize", json={"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]})  # one would go unread
    assert both.status_code == 400 and both.json()["error"]["param"] == "prompt", both.text
    # a template of the client's own is refused, as in chat; a field these routes do not read is named
    own = httpx.post(served.url + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}], "chat_template": "{{ messages }}"})
    assert own.status_code == 400 and own.json()["error"]["param"] == "chat_template", own.text
    odd = httpx.post(served.url + "/tokenize", json={"prompt": "hi", "truncate_prompt_tokens": 1})
    assert odd.status_code == 200 and odd.headers[IGNORED_HEADER] == "truncate_prompt_tokens" and odd.json()["count"] == len(tok("hi").input_ids)
    assert httpx.post(served.url + "/detokenize", json={"tokens": [5], "skip_special_tokens": False}).headers[IGNORED_HEADER] == "skip_special_tokens"
    assert IGNORED_HEADER not in httpx.post(served.url + "/tokenize", json={"prompt": "hi", "return_token_strs": True}).headers


def test_add_special_tokens_decides_whether_the_bos_is_read(serve_registry):
    """A tokenizer that adds a BOS (the tiny one adds none): vLLM's defaults — a text prompt gets its special tokens
    (/tokenize, completions), a chat does not (its template writes them) — and `add_special_tokens` turns each over."""
    from tokenizers import processors

    s = Served(serve_registry)
    tok = s.router.backbone.tokenizer
    saved = tok.backend_tokenizer.post_processor
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    try:
        bos = tok.bos_token_id
        assert tok("ab").input_ids == [bos, *tok("ab", add_special_tokens=False).input_ids]  # the test's own premise

        def tokens(**body):
            return httpx.post(s.url + "/tokenize", json=body).json()["tokens"]

        def prompt_tokens(path, **body):
            r = s.post(path, {"model": "base", "max_tokens": 1, **body})
            assert r.status_code == 200, r.text
            return r.json()["usage"]["prompt_tokens"]

        assert tokens(prompt="ab") == [bos, *tokens(prompt="ab", add_special_tokens=False)]
        chat = [{"role": "user", "content": "hi"}]
        assert tokens(messages=chat, add_special_tokens=True) == [bos, *tokens(messages=chat)]
        assert prompt_tokens("/v1/completions", prompt="ab") == prompt_tokens("/v1/completions", prompt="ab", add_special_tokens=False) + 1
        assert prompt_tokens("/v1/chat/completions", messages=chat) + 1 == prompt_tokens("/v1/chat/completions", messages=chat, add_special_tokens=True)
        assert prompt_tokens("/v1/chat/completions", messages=chat) == len(tokens(messages=chat))  # the chat reads what /tokenize says
    finally:
        tok.backend_tokenizer.post_processor = saved
        s.close()


# -- every sampling field does what it says ---------------------------------------------------------------

def greedy_reference(plain, ids, steps, shape):
    """Greedy decoding over the plain backbone, `shape(logits [V], prompt, out)` applied before each argmax."""
    out = []
    for _ in range(steps):
        with torch.no_grad():
            logits = plain(input_ids=torch.tensor([ids + out])).logits[0, -1].float()
        out.append(int(shape(logits.clone(), ids, out).argmax()))
    return out


@pytest.mark.parametrize("model", ["gen_b", "base"])
def test_generated_tokens_logprobs_are_their_own_positions(served, tok, model):
    """Each generated token's log-prob, and its top list, is what the model gives at that token's own position: a
    plain-peft forward over the prompt and the tokens generated (a shift by one position would still agree with its
    own top list and stay ≤ 0, so only the reference can see it)."""
    ids = tok(PROMPT).input_ids
    got = complete(served, model=model, max_tokens=5, temperature=0, ignore_eos=True, logprobs=2, return_token_ids=True)["choices"][0]
    out, lp = got["token_ids"], got["logprobs"]
    want, logp = reference_logprobs(None if model == "base" else served.router.folders[model], ids + out)
    assert len(out) == 5 and lp["token_logprobs"] == pytest.approx(want[len(ids) - 1:], abs=1e-4)
    tops = [sorted(t.values(), reverse=True) for t in lp["top_logprobs"]]
    assert tops == [pytest.approx(logp[len(ids) - 1 + k].topk(2).values.tolist(), abs=1e-4) for k in range(5)]


def test_a_stream_ends_with_the_usage_a_plain_request_reports(served):
    """stream_options.include_usage (OpenAI, vLLM): one last chunk with no choices, whose usage is the request's."""
    plain = served.client.completions.create(model="gen_b", prompt=PROMPT, max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    chunks = list(served.client.completions.create(model="gen_b", prompt=PROMPT, max_tokens=4, temperature=0, stream=True,
                                                   stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage.model_dump() == plain.usage.model_dump() and plain.usage.completion_tokens == 4
    assert "".join(c.choices[0].text for c in chunks[:-1]) == plain.choices[0].text


def test_usage_counts_each_prompt_once_however_many_choices(served, tok):
    """n choices continue one prompt that is read once: OpenAI and vLLM count its tokens once in prompt_tokens and
    every choice's tokens in completion_tokens — plain, streamed, chat, several prompts."""
    prompts = ["a b", "c d e"]
    want = sum(len(tok(p).input_ids) for p in prompts)
    got = complete(served, prompt=prompts, max_tokens=3, n=2, ignore_eos=True)
    assert [got["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")] == [want, 4 * 3, want + 12]
    chunks = list(served.client.completions.create(model="base", prompt=prompts, max_tokens=3, n=2, stream=True, stream_options={"include_usage": True},
                                                   extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.model_dump() == got["usage"]
    messages = [{"role": "user", "content": "pos 1"}]
    read = len(httpx.post(served.url + "/tokenize", json={"model": "base", "messages": messages}).json()["tokens"])
    chat = served.client.chat.completions.create(model="base", messages=messages, max_tokens=2, n=3, temperature=1.0, seed=1,
                                                 extra_body={"ignore_eos": True})
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (read, 6)


def token_ids(served, **body):
    got = complete(served, return_token_ids=True, **body)
    return got["choices"][0]["token_ids"], got


def test_penalties_equal_their_formulas(served, tok, plain):
    ids = tok(PROMPT).input_ids

    def repetition(x, prompt, out, p=2.5):
        seen = torch.tensor(sorted(set(prompt + out)))
        x[seen] = torch.where(x[seen] > 0, x[seen] / p, x[seen] * p)
        return x

    def penalties(f, pr):
        def shape(x, prompt, out):
            for t in set(out):
                x[t] -= f * out.count(t) + pr
            return x
        return shape

    base = greedy_reference(plain, ids, 8, lambda x, *_: x)
    got, _ = token_ids(served, max_tokens=8, ignore_eos=True)
    assert got == base
    # The top token leads the next by ~0.49: a frequency penalty of 0.3 lets it repeat once, a presence penalty of
    # 0.3 never stops it, 2.0 stops it at once; so each case below tells the penalties apart.
    cases = [({"repetition_penalty": 2.5}, repetition), ({"frequency_penalty": 0.3}, penalties(0.3, 0)), ({"presence_penalty": 2.0}, penalties(0, 2.0))]
    wants = []
    for body, shape in cases:
        want = greedy_reference(plain, ids, 8, shape)
        assert want != base and want not in wants, body  # the setting matters here, and differently from the others
        wants.append(want)
        got, _ = token_ids(served, max_tokens=8, ignore_eos=True, **body)
        assert got == want, body


def test_logit_bias_allowed_tokens_stop_tokens_eos_and_min_tokens(served, tok):
    eos = tok.eos_token_id
    plain, _ = token_ids(served, max_tokens=6, ignore_eos=True)
    forced = tok("q").input_ids[0]
    got, _ = token_ids(served, max_tokens=4, logit_bias={str(forced): 100})
    assert got == [forced] * 4
    got, _ = token_ids(served, max_tokens=6, ignore_eos=True, logit_bias={str(plain[0]): -100})
    assert got[0] != plain[0]
    allowed = tok("ab").input_ids
    got, _ = token_ids(served, max_tokens=6, allowed_token_ids=allowed)
    assert set(got) <= set(allowed)
    # EOS made certain: it ends the choice at once, unless ignore_eos or before min_tokens
    got, body = token_ids(served, max_tokens=5, logit_bias={str(eos): 100})
    assert got == [eos] and body["choices"][0]["finish_reason"] == "stop" and body["choices"][0]["text"] == ""
    got, body = token_ids(served, max_tokens=5, logit_bias={str(eos): 100}, ignore_eos=True)
    assert got == [eos] * 5 and body["choices"][0]["finish_reason"] == "length"
    got, body = token_ids(served, max_tokens=8, logit_bias={str(eos): 100}, min_tokens=3)
    assert len(got) == 4 and eos not in got[:3] and got[3] == eos and body["choices"][0]["finish_reason"] == "stop"
    # the stopping token is listed but not rendered, special or not, unless include_stop_str_in_output (vLLM's detokenizer)
    shown = complete(served, max_tokens=5, logit_bias={str(eos): 100}, skip_special_tokens=False)["choices"][0]["text"]
    kept = complete(served, max_tokens=5, logit_bias={str(eos): 100}, skip_special_tokens=False, include_stop_str_in_output=True)["choices"][0]["text"]
    assert (shown, kept) == ("", tok.eos_token)
    # a stop token ends the choice where it is generated; its text is left out of the choice's, as vLLM does
    # (the stop token made certain by logit_bias, and masked by min_tokens for the first two: text comes before it)
    stop = dict(max_tokens=6, ignore_eos=True, stop_token_ids=[forced], logit_bias={str(forced): 100}, min_tokens=2)
    got, body = token_ids(served, logprobs=1, **stop)
    choice = body["choices"][0]
    assert got == plain[:2] + [forced] and choice["finish_reason"] == "stop" and choice["text"] == tok.decode(plain[:2]) != ""
    assert choice["stop_reason"] == forced
    assert len(choice["logprobs"]["tokens"]) == 3 and "".join(choice["logprobs"]["tokens"]) == choice["text"]  # listed, adds nothing
    got, body = token_ids(served, include_stop_str_in_output=True, **stop)
    assert got == plain[:2] + [forced] and body["choices"][0]["text"] == tok.decode(got)


def test_min_tokens_above_the_default_max_tokens_is_refused_not_cut_short(served):
    """min_tokens 20 without max_tokens was checked against nothing: the choice ended at the completion default of 16 (or what
    the context leaves a base chat) with finish_reason length, 4 tokens short of what was asked. It is a 400 naming min_tokens,
    streamed or not, as vLLM refuses min_tokens above max_tokens; with max_tokens given the check is the one it always was."""
    for path, body in (("/v1/completions", {"prompt": PROMPT, "min_tokens": 20}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a" * (served.router.max_model_len - 40)}], "min_tokens": 60})):
        for stream in (False, True):
            r = served.post(path, {"model": "base", **body, "stream": stream})
            assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens", r.text
    ok = complete(served, min_tokens=16, ignore_eos=False)
    assert ok["usage"]["completion_tokens"] == 16 and ok["choices"][0]["finish_reason"] == "length"


def test_the_generation_configs_other_eos_ids_end_a_choice_as_vllm_ends_it(served, tok, monkeypatch):
    """A backbone whose generation config lists EOS ids besides the tokenizer's (Llama 3's <|eom_id|>, Qwen's <|endoftext|>)
    ran past them: only the tokenizer's EOS ended a choice. vLLM (and transformers' generate) stop there too: they join a
    row's stop_token_ids (finish_reason stop, stop_reason the id, its text left out) unless ignore_eos."""
    first = complete(served, max_tokens=4, ignore_eos=True, return_token_ids=True)["choices"][0]["token_ids"][0]  # the greedy first token
    assert first != tok.eos_token_id
    monkeypatch.setattr(served.router.backbone.model.generation_config, "eos_token_id", [tok.eos_token_id, first])
    got = complete(served, max_tokens=4, return_token_ids=True)
    choice = got["choices"][0]
    assert (choice["finish_reason"], choice["stop_reason"], choice["token_ids"], choice["text"]) == ("stop", first, [first], "")
    assert complete(served, max_tokens=4, ignore_eos=True)["usage"]["completion_tokens"] == 4
    assert complete(served, model="cls_a", prompt="", input="pos 1")["choices"][0]["text"] in ("pos", "neg")  # a label answer is untouched


def test_sampling_filters_seeds_and_n(served):
    greedy = complete(served, max_tokens=6, ignore_eos=True)["choices"][0]["text"]
    for filt in ({"top_k": 1}, {"min_p": 1.0}, {"top_p": 1e-9}, {"temperature": 1e-45}, {"top_k": 1, "top_p": 0.99}):  # the filters stack
        body = {"temperature": 1.5, **filt} if "temperature" not in filt else filt
        assert complete(served, max_tokens=6, ignore_eos=True, seed=7, **body)["choices"][0]["text"] == greedy, filt
    sampled = [complete(served, max_tokens=6, ignore_eos=True, temperature=1.5, seed=s)["choices"][0]["text"] for s in range(6)]
    assert len(set(sampled)) > 1 and sampled[0] == complete(served, max_tokens=6, ignore_eos=True, temperature=1.5, seed=0)["choices"][0]["text"]
    # every drawn token within the filter, read from the model's own top log-probs (chat's are a list: no two
    # alternatives share a key, as two byte tokens that decode to "\ufffd" do in the legacy dict)
    drawn = set()
    for body, ok in (({"top_k": 3}, lambda lp, top: lp >= top[2] - 1e-6), ({"min_p": 0.3}, lambda lp, top: lp >= top[0] + 2.0 * math.log(0.3) - 1e-6)):  # min_p acts after T = 2
        for seed in range(4):
            got = served.client.chat.completions.create(model="base", messages=[{"role": "user", "content": "pos 1"}], max_tokens=6, temperature=2.0,
                                                        seed=seed, logprobs=True, top_logprobs=5, extra_body={"ignore_eos": True, **body})
            content = got.choices[0].logprobs.content
            assert all(ok(e.logprob, [a.logprob for a in e.top_logprobs]) for e in content), (body, seed)
            drawn |= {e.token for e in content}
    assert len(drawn) > 1  # the draws were not all greedy
    n = complete(served, max_tokens=6, ignore_eos=True, temperature=1.5, seed=3, n=3)["choices"]
    assert [c["index"] for c in n] == [0, 1, 2]
    assert [c["text"] for c in n] == [complete(served, max_tokens=6, ignore_eos=True, temperature=1.5, seed=3 + i)["choices"][0]["text"]
                                      for i in range(3)]
    two = complete(served, prompt=["a b", "c d"], max_tokens=3, n=2)["choices"]
    assert [c["index"] for c in two] == [0, 1, 2, 3] and two[0]["text"] == two[1]["text"]  # greedy: both samples of a prompt agree
    chat = served.client.chat.completions.create(model="base", messages=[{"role": "user", "content": "pos 1"}], max_tokens=6, temperature=1.5,
                                                 seed=3, n=3, extra_body={"ignore_eos": True}).choices
    assert [c.index for c in chat] == [0, 1, 2] and len({c.message.content for c in chat}) > 1  # chat too: n indexed draws


def test_stop_strings_truncation_token_ids_and_request_id(served, tok):
    text = complete(served, max_tokens=8, ignore_eos=True)["choices"][0]["text"]
    stop = text[3:5]
    cut = text[: text.find(stop)]
    assert complete(served, max_tokens=8, ignore_eos=True, stop=[stop])["choices"][0]["text"] == cut
    # vLLM's stop_reason: the stop string (or stop token id) that ended the choice; None at the length (or at EOS)
    ended = complete(served, max_tokens=8, ignore_eos=True, stop=["zz", stop])["choices"][0]
    assert (ended["finish_reason"], ended["stop_reason"]) == ("stop", stop)
    assert complete(served, max_tokens=8, ignore_eos=True)["choices"][0]["stop_reason"] is None
    last = [ch for ch in served.client.completions.create(model="base", prompt=PROMPT, max_tokens=8, stop=[stop], stream=True,
                                                          extra_body={"ignore_eos": True}) if ch.choices][-1].choices[0]
    assert (last.finish_reason, last.model_extra["stop_reason"]) == ("stop", stop)
    chat = served.post("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "a"}], "max_tokens": 2,
                                                "ignore_eos": True}).json()
    assert chat["choices"][0]["stop_reason"] is None and chat["choices"][0]["finish_reason"] == "length"
    assert complete(served, max_tokens=8, ignore_eos=True, stop=[stop], include_stop_str_in_output=True)["choices"][0]["text"] == cut + stop
    ids = tok(PROMPT).input_ids
    short = complete(served, max_tokens=4, truncate_prompt_tokens=3, return_token_ids=True)
    assert short["usage"]["prompt_tokens"] == 3 and short["choices"][0]["prompt_token_ids"] == ids[-3:]
    assert short["choices"][0]["text"] == complete(served, prompt=[ids[-3:]], max_tokens=4)["choices"][0]["text"]
    assert complete(served, max_tokens=1, request_id="abc-1")["id"] == "cmpl-abc-1"


def test_an_echoed_prompt_that_truncate_prompt_tokens_cut_is_what_was_read(served, tok):
    """With truncate_prompt_tokens, `echo` returned the text prompt as sent ('T: pos 1\nL:') while only its last 3 tokens
    were read (usage 3): the echoed text claimed tokens the model never saw, and the log-prob tokens (the 3 read, then the
    completion) no longer joined to it. The echo is the kept tokens' text, streamed or not; a prompt shorter than k is whole."""
    ids = tok(PROMPT).input_ids
    read = tok.decode(ids[-3:])
    got = complete(served, max_tokens=2, ignore_eos=True, echo=True, logprobs=1, truncate_prompt_tokens=3)
    choice = got["choices"][0]
    assert got["usage"]["prompt_tokens"] == 3 and choice["text"].startswith(read) and not choice["text"].startswith(PROMPT[:4])
    assert "".join(choice["logprobs"]["tokens"]) == choice["text"] and len(choice["logprobs"]["tokens"]) == 3 + 2
    chunks = list(served.client.completions.create(model="base", prompt=PROMPT, max_tokens=2, echo=True, stream=True,
                                                   extra_body={"ignore_eos": True, "truncate_prompt_tokens": 3}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice["text"]
    assert complete(served, max_tokens=1, echo=True, truncate_prompt_tokens=len(ids) + 5)["choices"][0]["text"].startswith(PROMPT)


def test_an_echoed_text_prompt_whose_tokenizer_adds_a_bos_joins_to_its_log_prob_tokens(served, tok, monkeypatch):
    """A tokenizer that adds a BOS (Llama's, Mistral's) reads '<s>' before a text prompt the client sent without it: the echo
    is the prompt as sent, but the BOS entry's token was '<s>', so the log-prob tokens joined to '<s>' + the text and every
    text_offset ran 3 characters past its token. The BOS adds "" to the echoed text, as an EOS adds "" to a completion."""
    from tokenizers.processors import TemplateProcessing

    monkeypatch.setattr(tok.backend_tokenizer, "post_processor", TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]))
    assert tok(PROMPT).input_ids[0] == tok.bos_token_id
    choice = complete(served, max_tokens=2, ignore_eos=True, echo=True, logprobs=1)["choices"][0]
    lp = choice["logprobs"]
    assert choice["text"].startswith(PROMPT) and lp["tokens"][0] == "" and "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"][:3] == [0, 0, 1] and lp["token_logprobs"][0] is None


def test_prompt_logprobs_in_a_chat_stream_are_refused_not_dropped(served):
    """A streamed chat with prompt_logprobs answered 200 and no chunk carried them (a whole chat response does, at its top
    level): now a 400 naming the field, as vLLM refuses prompt_logprobs with stream. A completions stream carries them."""
    chat = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "prompt_logprobs": 1}
    assert len(served.post("/v1/chat/completions", chat).json()["prompt_logprobs"]) > 1
    r = served.post("/v1/chat/completions", {**chat, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"
    chunks = list(served.client.completions.create(model="base", prompt=PROMPT, max_tokens=2, stream=True, extra_body={"prompt_logprobs": 1}))
    assert [c.choices[0].model_extra.get("prompt_logprobs") for c in chunks if c.choices][0][0] is None  # the first position's


def test_request_shapes_vllm_takes(served):
    """What vLLM (and OpenAI's newer fields) take, read as vLLM reads it: max_completion_tokens over the deprecated
    max_tokens (the unread one named aloud), more than OpenAI's 4 stop strings, an assistant turn with null content;
    stream_options without a stream is refused, as vLLM refuses it."""
    messages = [{"role": "user", "content": "pos 1"}]
    r = httpx.post(served.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "base", "messages": messages, "max_completion_tokens": 3, "max_tokens": 5, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3 and r.headers[IGNORED_HEADER] == "max_tokens"
    same = httpx.post(served.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "base", "messages": messages, "max_completion_tokens": 3, "max_tokens": 3, "ignore_eos": True})
    assert same.status_code == 200 and IGNORED_HEADER not in same.headers
    stops = [f"zz{i}" for i in range(6)] + ["q"]
    text = complete(served, max_tokens=8, ignore_eos=True)["choices"][0]["text"]
    assert complete(served, max_tokens=8, ignore_eos=True, stop=stops + [text[2:4]])["choices"][0]["text"] == text[:text.find(text[2:4])]
    for body, field in (({"stop": [f"s{i}" for i in range(65)]}, "stop"), ({"stream_options": {"include_usage": True}}, "stream_options")):
        with pytest.raises(openai.BadRequestError, match=field):
            complete(served, max_tokens=2, **body)
    # the openai client's models.retrieve: one card, as GET /v1/models lists it; an unknown id is OpenAI's 404
    listed = {m.id: m for m in served.client.models.list()}
    assert served.client.models.retrieve("gen_b@1.0.0") == listed["gen_b@1.0.0"] and served.client.models.retrieve("base") == listed["base"]
    with pytest.raises(openai.NotFoundError) as lost:
        served.client.models.retrieve("nope@9")
    assert lost.value.body["code"] == "model_not_found"
    turns = messages + [{"role": "assistant", "content": None}, {"role": "user", "content": "pos 2"}]
    assert served.client.chat.completions.create(model="base", messages=turns, max_tokens=2).choices[0].message.content is not None
    with pytest.raises(openai.BadRequestError, match=r"messages\[1\].tool_calls"):
        served.client.chat.completions.create(model="base", messages=turns[:1] + [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}] + turns[2:], max_tokens=2)


def test_chat_template_switches_for_base(served, tok):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hel"}]
    cont = served.client.chat.completions.create(model="base", messages=messages, max_tokens=2,
                                                 extra_body={"add_generation_prompt": False, "continue_final_message": True})
    want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False, continue_final_message=True)
    assert cont.usage.prompt_tokens == len(tok(want, add_special_tokens=False).input_ids)
    fresh = served.client.chat.completions.create(model="base", messages=messages[:1], max_tokens=2)
    want = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert fresh.usage.prompt_tokens == len(tok(want, add_special_tokens=False).input_ids) != cont.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError, match="continue_final_message"):
        served.client.chat.completions.create(model="gen_a", messages=messages[:1], extra_body={"continue_final_message": True})


# -- refused and unknown fields ----------------------------------------------------------------------

REFUSED = [(name, endpoint) for name, f in FIELDS.items() if f.status == "refused" for endpoint in f.endpoints]


@pytest.mark.parametrize(("name", "endpoint"), REFUSED)
def test_every_refused_field_is_a_400_naming_it(served, name, endpoint):
    field = "echo" if name == "chat_echo" else name
    value = {"best_of": 3}.get(field, {"x": 1})  # not one of the values that change nothing
    body = {"model": "base", field: value, **({"prompt": "a"} if endpoint == "completions" else {"messages": [{"role": "user", "content": "a"}]})}
    r = served.post(f"/v1/{'chat/' if endpoint == 'chat' else ''}completions", body)
    assert r.status_code == 400, (name, r.text)
    assert f"`{field}`" in r.json()["error"]["message"] and r.json()["error"]["param"] == field
    with pytest.raises(openai.BadRequestError):
        if endpoint == "completions":
            served.client.completions.create(model="base", prompt="a", extra_body={field: value})
        else:
            served.client.chat.completions.create(model="base", messages=[{"role": "user", "content": "a"}], extra_body={field: value})


def test_a_label_answer_refuses_every_setting_it_cannot_honour(served):
    """A classification adapter answers its task input with the most probable label: nothing is sampled or
    generated, so sampling, EOS, stop and log-prob settings are refused, all named in one 400 (they were
    answered 200 and ignored: a load tester sending ignore_eos read its output lengths wrong). A task
    answer is its first line, so ignore_eos (run to max_tokens) is refused for every task input."""
    greedy = served.post("/v1/completions", {"model": "cls_a", "input": "pos 1"}).json()["choices"][0]["text"]
    asks = {"temperature": 0.7, "top_k": 5, "ignore_eos": True, "stop": ["x"], "logprobs": 2}
    for path, body in (("/v1/completions", {"input": "pos 1"}), ("/v1/chat/completions", {"messages": [{"role": "user", "content": "pos 1"}]})):
        for stream in (False, True):
            for name in ("temperature", "top_k", "stop"):
                r = served.post(path, {"model": "cls_a", "stream": stream, name: asks[name], **body})
                assert r.status_code == 400 and r.json()["error"]["param"] == name, (path, name, stream, r.text)
                assert "scoring its labels" in r.json()["error"]["message"]
        r = served.post(path, {"model": "cls_a", "temperature": 0.7, "top_k": 5, "stop": ["x"], **body})
        assert all(f"`{name}`" in r.json()["error"]["message"] for name in ("temperature", "top_k", "stop")), r.text  # every one named
        for model in ("cls_a", "gen_a"):  # a task answer is its first line: it never runs to max_tokens
            r = served.post(path, {"model": model, "ignore_eos": True, "max_tokens": 8, **body})
            assert r.status_code == 400 and r.json()["error"]["param"] == "ignore_eos", (path, model, r.text)
    # a raw prompt and a task input in one request: one would go unread, so it is refused
    r = served.post("/v1/completions", {"model": "gen_a", "input": "ab", "prompt": "In: cd\nOut:"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "not both" in r.json()["error"]["message"], r.text
    # what a label answer can honour: a cap on new tokens, n choices, a seed, greedy temperature, neutral values
    ok = served.post("/v1/completions", {"model": "cls_a", "input": "pos 1", "max_tokens": 3, "n": 2, "seed": 1, "temperature": 0,
                                         "top_p": 1, "ignore_eos": False, "stop": []})
    assert ok.status_code == 200 and [c["text"] for c in ok.json()["choices"]] == [greedy, greedy], ok.text
    # a raw prompt to the same adapter is generated: every setting applies there
    assert served.post("/v1/completions", {"model": "cls_a", "prompt": "T: pos 1\nL:", "temperature": 0.7, "ignore_eos": True,
                                           "max_tokens": 4}).json()["usage"]["completion_tokens"] == 4


def test_a_stream_refused_while_read_gets_its_status_not_a_200(serve_registry):
    """A streamed request the engine refuses while reading it (over the context, a setting its adapter cannot
    honour) is answered with its 400, as vLLM does, before any event; it was a 200 stream carrying the error
    (the openai client then raised mid-iteration, and load testers counted a success with no content)."""
    s = Served(serve_registry, max_model_len=40)
    try:
        for body in ({"model": "base", "prompt": "x" * 30, "max_tokens": 11},
                     {"model": "cls_a", "input": "pos 1", "temperature": 0.5}):
            with httpx.stream("POST", s.url + "/v1/completions", json={**body, "stream": True}, headers={"Authorization": f"Bearer {KEY}"}) as r:
                assert r.status_code == 400 and r.headers["content-type"].startswith("application/json"), (body, r.status_code)
                assert json.loads(r.read())["error"]["message"]
        with pytest.raises(openai.BadRequestError, match="context"):  # the openai client: raised by create(), not mid-iteration
            s.client.completions.create(model="base", prompt="x" * 30, max_tokens=11, stream=True)
        with pytest.raises(openai.BadRequestError, match="scoring its labels"):
            s.client.chat.completions.create(model="cls_a", messages=[{"role": "user", "content": "pos 1"}], temperature=0.5, stream=True)
        # a stream that is read goes on as before, its events whole (chat's role chunk first, then text)
        chunks = list(s.client.chat.completions.create(model="gen_a", messages=[{"role": "user", "content": "ab"}], max_tokens=4, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        whole = s.client.chat.completions.create(model="gen_a", messages=[{"role": "user", "content": "ab"}], max_tokens=4)
        assert chunks[0].choices[0].delta.role == "assistant" and text == whole.choices[0].message.content
    finally:
        s.close()


def test_neutral_values_of_refused_fields_are_accepted(served):
    body = {"tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "use_beam_search": False, "length_penalty": 1, "store": False}
    assert served.post("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "a"}], "max_tokens": 1, **body}).status_code == 200


def test_an_unknown_field_is_ignored_aloud(served, caplog):
    with caplog.at_level(logging.WARNING, logger="adapterhub_lite.serve"):
        r = served.client.completions.with_raw_response.create(model="base", prompt="a", max_tokens=1, user="u1", extra_body={"frobnicate": 1})
    assert r.http_response.status_code == 200 and r.headers[IGNORED_HEADER] == "frobnicate"
    assert any("frobnicate" in rec.getMessage() for rec in caplog.records)
    assert IGNORED_HEADER not in served.post("/v1/completions", {"model": "base", "prompt": "a", "max_tokens": 1}).headers
    # /v1/classify reads model and input: a sampling field sent there changes nothing, and is named
    r = served.post("/v1/classify", {"model": "cls_a", "input": "pos 1", "temperature": 0.5, "user": "u1"})
    assert r.status_code == 200 and r.headers[IGNORED_HEADER] == "temperature", r.headers
    assert IGNORED_HEADER not in served.post("/v1/classify", {"model": "cls_a", "input": "pos 1"}).headers


def test_the_readme_field_table_is_the_servers(served):
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    rows = {}
    for line in readme.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 4:
            rows[cells[0].strip("`")] = (cells[1], cells[2])
    for name, f in FIELDS.items():
        assert rows.get(name) == (", ".join(f.endpoints), f.status), name
    assert set(rows) == set(FIELDS)


# -- log-probs match the text --------------------------------------------------------------------------

def test_logprob_tokens_join_to_the_text_everywhere(served):
    c = served.client
    for kw in ({"model": "gen_a", "prompt": "", "extra_body": {"input": "ab"}}, {"model": "gen_b", "prompt": "", "extra_body": {"input": "  cd"}},
               {"model": "base", "prompt": PROMPT, "max_tokens": 8, "stop": ["11"]}):
        got = c.completions.create(logprobs=2, **kw).choices[0]
        assert "".join(got.logprobs.tokens) == got.text, kw
        assert got.logprobs.text_offset == [sum(map(len, got.logprobs.tokens[:i])) for i in range(len(got.logprobs.tokens))]
        streamed = list(c.completions.create(logprobs=2, stream=True, **kw))
        tokens = [t for ch in streamed if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens]
        offsets = [o for ch in streamed if ch.choices and ch.choices[0].logprobs for o in ch.choices[0].logprobs.text_offset]
        assert "".join(tokens) == got.text == "".join(ch.choices[0].text for ch in streamed if ch.choices)
        assert offsets == got.logprobs.text_offset  # running over the whole choice, not restarting per chunk
        # the chosen token is keyed by its text in `tokens` (lm-eval's greedy check compares the best key with it)
        assert all(top[t] == lp for t, lp, top in zip(got.logprobs.tokens, got.logprobs.token_logprobs, got.logprobs.top_logprobs)), kw
    # a character over two byte tokens (the first adds "", its own decoding is "\ufffd"), echoed with the prompt
    echo = complete(served, prompt="é ab", echo=True, max_tokens=1, logprobs=2)["choices"][0]["logprobs"]
    assert "" in echo["tokens"] and all(top is None or top[t] == lp for t, lp, top in zip(echo["tokens"], echo["token_logprobs"], echo["top_logprobs"]))
    chat = c.chat.completions.create(model="gen_a", messages=[{"role": "user", "content": "ab"}], logprobs=True, top_logprobs=0)
    content = chat.choices[0].logprobs.content
    assert "".join(e.token for e in content) == chat.choices[0].message.content and all(e.top_logprobs == [] for e in content)
    chat = c.chat.completions.create(model="base", messages=[{"role": "user", "content": "ab"}], max_tokens=6, logprobs=True, top_logprobs=20,
                                     stop=["1"], extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert all(any(a.token == e.token and a.logprob == e.logprob for a in e.top_logprobs) for e in content)  # greedy: the chosen is listed
    for field in ("logprobs", "prompt_logprobs"):  # a classifier's task answer is a label scored, not tokens generated
        r = served.post("/v1/completions", {"model": "cls_a", "input": "pos 1", field: 1})
        assert r.status_code == 400 and "/v1/classify" in r.json()["error"]["message"], field
    task = complete(served, model="gen_a", prompt="", input="ab", prompt_logprobs=0)  # a task input's rendered prompt, scored
    assert len(task["choices"][0]["prompt_logprobs"]) == task["usage"]["prompt_tokens"] == len(served.router.backbone.tokenizer("In: ab\nOut:").input_ids)


def test_ignored_field_names_and_user_ids_with_line_breaks_or_non_ascii_are_percent_encoded(served, caplog):
    """A client names its fields: one named 'a\\r\\nb' went into the ignored-fields header as it was, h11 refused the
    response and the client got no answer at all (the connection closed; a traceback in the log), and the log line
    split in two; 'é' went out as raw UTF-8. A `user` with a line break split the access line. Each is now
    percent-encoded (ordinary names stay as they are)."""
    with caplog.at_level(logging.INFO):
        r = served.post("/v1/completions", {"model": "base", "prompt": "a", "max_tokens": 1, "a\r\nb": 1, "é,x%": 2, "tool_prompt": 3,
                                            "user": "eve\nPOST /v1/completions status=200 user=alice"})
    assert r.status_code == 200, r.text
    assert r.headers[IGNORED_HEADER] == "a%0D%0Ab,%C3%A9%2Cx%25,tool_prompt"
    assert any("ignored a%0D%0Ab, %C3%A9%2Cx%25, tool_prompt: not read" in rec.getMessage() for rec in caplog.records)
    access = [rec.getMessage() for rec in caplog.records if rec.name == "adapterhub_lite.serve.access" and r.json()["id"] in rec.getMessage()]
    assert len(access) == 1 and "\n" not in access[0] and access[0].endswith(" user=eve%0APOST%20/v1/completions%20status=200%20user=alice"), access


# -- operations ------------------------------------------------------------------------------------------

def test_access_log_one_line_per_request(served, caplog):
    with caplog.at_level(logging.INFO, logger="adapterhub_lite.serve.access"):
        ok = served.post("/v1/completions", {"model": "gen_a", "input": "ab", "user": "alice"}).json()
        served.post("/v1/completions", {"model": "nope", "prompt": "a"})
    lines = [r.getMessage() for r in caplog.records if r.name == "adapterhub_lite.serve.access"]
    mine = [line for line in lines if line.startswith(ok["id"] + " ")]  # (a line of the test before may land here too)
    assert len(mine) == 1 and "POST /v1/completions status=200 model=gen_a adapter=gen_a" in mine[0], lines
    assert f"prompt_tokens={ok['usage']['prompt_tokens']} completion_tokens={ok['usage']['completion_tokens']}" in mine[0] and "user=alice" in mine[0]
    assert any("POST /v1/completions status=404 model=-" in line for line in lines), lines


def test_cors_only_when_asked(serve_registry, served):
    preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    off = httpx.options(served.url + "/v1/completions", headers=preflight)
    assert off.status_code != 200 and "access-control-allow-origin" not in off.headers  # no CORS unless --allowed-origins
    s = Served(serve_registry, allowed_origins=("http://app.example",))
    try:
        r = httpx.options(s.url + "/v1/completions", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
        assert httpx.options(s.url + "/v1/completions", headers={**preflight, "Origin": "http://evil.example"}).status_code == 400
    finally:
        s.close()


def test_engine_errors_are_logged_with_their_stack(serve_registry, monkeypatch, caplog):
    s = Served(serve_registry, request_timeout=15)
    try:
        def boom(*args, **kwargs):
            raise RuntimeError("simulated out of memory")

        monkeypatch.setattr(s.router.bank, "step", boom)
        with caplog.at_level(logging.ERROR, logger="adapterhub_lite.serve"):
            assert s.post("/v1/completions", {"model": "gen_a", "prompt": "x", "max_tokens": 5}).status_code == 500
        failed = [r for r in caplog.records if "decode step failed" in r.getMessage()]
        assert failed and failed[0].exc_info and "simulated out of memory" in failed[0].getMessage()
    finally:
        s.close()


def test_lora_that_needs_a_rewritten_base_is_refused_by_every_reader(serve_registry, tmp_path):
    folder = tmp_path / "pissa"
    shutil.copytree(serve_registry / "gen_a" / "1.0.0", folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "pissa_niter_4"}))
    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32")
    with pytest.raises(AdapterLoadError, match="pissa_niter_4.*rewrites the base"):
        check_fits(folder, router.backbone.model)
    router.register("pissa", folder)
    with pytest.raises(AdapterLoadError, match="pissa_niter_4.*rewrites the base"):
        router.run([{"adapter": "pissa", "text": "ab"}])
    with pytest.raises(AdapterLoadError, match="pissa_niter_4.*rewrites the base"):  # the per-row layer's own check, without check_fits
        router.bank.add("pissa", folder)
    assert any("pissa_niter_4" in p and "rewrites the base" in p for p in lora_problems(*read_layout(folder), "vllm"))


def test_a_refused_value_is_shown_as_the_json_the_client_sent(served):
    """The 400's message quotes the value as the client wrote it (JSON: true, null, "x"), not as Python prints it
    (True, None, 'x'), so a client author can find it in the body they sent."""
    for field, value, shown in (("stream", "yes", '"yes"'), ("echo", 1.5, "1.5"), ("logprobs", True, "true"),
                                ("stop", {"a": None}, '{"a": null}')):
        r = served.post("/v1/completions", {"model": "base", "prompt": "ab", "max_tokens": 1, field: value})
        assert r.status_code == 400, (field, r.text)
        assert f"`{field}` is {shown};" in r.json()["error"]["message"], (field, r.json())


def test_a_refused_non_ascii_value_is_shown_as_written(served):
    """A refused value with non-ASCII text is quoted as the client wrote it ("oui ✓"), not as JSON escapes ("oui \\u2713")
    that appear nowhere in the body it sent."""
    r = served.post("/v1/completions", {"model": "base", "prompt": "ab", "max_tokens": 1, "stream": "oui ✓"})
    assert r.status_code == 400 and '`stream` is "oui ✓";' in r.json()["error"]["message"], r.text


def test_a_task_input_number_keeps_its_written_text_as_predict_reads_it(served, tok):
    """{"text": 2.50} is the prompt "In: 2.50" in a data file and in predict --input (core.text.WrittenFloat); the server
    parsed the body with plain json, so str() of the float made it "In: 2.5": the same row, another prompt."""
    import httpx
    for written in ("2.50", "1e3"):
        raw = httpx.post(served.url + "/v1/completions", content=f'{{"model": "gen_a", "input": {{"text": {written}}}, "max_tokens": 1}}',
                         headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}, timeout=60).json()
        as_text = served.post("/v1/completions", {"model": "gen_a", "input": {"text": written}, "max_tokens": 1}).json()
        assert raw["usage"]["prompt_tokens"] == as_text["usage"]["prompt_tokens"] == len(tok(f"In: {written}\nOut:").input_ids), (written, raw)


def test_an_empty_task_input_is_refused_as_training_refuses_it(served):
    """An empty text renders the task's bare template ("In: \nOut:"): an answer to no input, which training refuses."""
    for path, body in (("/v1/completions", {"model": "gen_a", "input": {"text": " "}}),
                       ("/v1/chat/completions", {"model": "cls_a", "messages": [{"role": "user", "content": ""}]})):
        r = served.post(path, {**body, "max_tokens": 2})
        assert r.status_code == 400 and "has an empty 'text'" in r.json()["error"]["message"], (path, r.text)


def test_a_task_input_is_judged_as_predict_infer_and_router_run_judge_its_row(served):
    """`input` {"text": "ab", "adapter": "gen_a"} to model cls_a was answered by gen_a (the row's key overrode `model`),
    and one with a "prompt" key was continued as a raw prompt; a null, nested or missing column was refused with a
    message of its own ("an object of strings") where predict, infer and Router.run name the problem (request_row)."""
    for inp, said in (({"text": "ab", "adapter": "gen_a"}, "'adapter' is a request's own key"), ({"text": "ab", "prompt": "zz"}, "'prompt' is a request's own key"),
                      ({"text": None}, "an input row has null for 'text'"), ({"text": {"a": 1}}, "a JSON object or list for 'text'"),
                      ({"text": [1]}, "a JSON object or list for 'text'"), ({}, "input rows lack key(s) ['text']")):
        for path in ("/v1/completions", "/v1/classify"):
            r = served.post(path, {"model": "cls_a", "input": inp, "prompt": ""} if path == "/v1/completions" else {"model": "cls_a", "input": inp})
            assert r.status_code == 400 and said in r.json()["error"]["message"], (path, inp, r.text)


def test_completions_top_logprobs_keep_every_alternative_when_two_tokens_share_a_text(served):
    """Legacy top_logprobs are a dict keyed by text, and two tokens may decode to the same text (here the byte-level
    tokenizer's bytes 0x80-0xFF, each "\ufffd" alone): the second was dropped, so a client asking for 20 alternatives
    saw fewer, without a word (vLLM drops them too, vllm-project/vllm#44319). The later one is keyed "token_id:<id>"
    (return_tokens_as_token_ids' spelling), so every alternative is there with its own log-prob."""
    body = {"model": "base", "prompt": PROMPT, "max_tokens": 4, "logprobs": 20, "temperature": 0, "ignore_eos": True}
    by_text = complete(served, **body)["choices"][0]["logprobs"]["top_logprobs"]
    by_id = complete(served, **body, return_tokens_as_token_ids=True)["choices"][0]["logprobs"]["top_logprobs"]
    for text_keyed, id_keyed in zip(by_text, by_id, strict=True):
        assert len(text_keyed) == len(id_keyed) >= 20, (len(text_keyed), len(id_keyed))
        assert sorted(text_keyed.values()) == sorted(id_keyed.values())
        assert all(text_keyed[k] == id_keyed[k] for k in text_keyed if k.startswith("token_id:"))
    assert any(any(k.startswith("token_id:") for k in top) for top in by_text)  # a collision happened here

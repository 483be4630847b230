"""The request shapes of the load testers used to size a vLLM deployment, sent as they send them (raw HTTP against a
tests/serving.Served server), and read back as they read them.

- guidellm (vllm-project/guidellm, `backends/openai/request_handlers.py`) streams every request with
  `stream_options: {"include_usage": true, "continuous_usage_stats": true}`, fixes output lengths with `ignore_eos` and
  `max_tokens` (chat: `max_completion_tokens`), sends chat content as a list of text parts, and takes a request's token
  counts from the last `usage` it sees, its first token from the first chunk with text.
- vLLM's own client (`vllm bench serve`, vllm/benchmarks/lib/endpoint_request_func.py) sends
  `stream_options: {"include_usage": true}`, `repetition_penalty: 1.0`, `logprobs` (null unless asked), `ignore_eos`
  and an `x-request-id` header, and times the first token by the first chunk that has choices.
"""

import json
import threading

import httpx
import pytest

from .serving import KEY

PROMPT = "pos 1 neg 2 pos 3"
GUIDELLM_STREAM = {"stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}


def events(served, path, body, headers=None):
    """The response and its streamed JSON chunks, in order."""
    r = httpx.post(served.url + path, json=body, headers={"Authorization": f"Bearer {KEY}", **(headers or {})}, timeout=60)
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    return r, chunks


def guidellm_body(chat: bool, tokens: int) -> dict:
    if chat:
        return {"model": "base", **GUIDELLM_STREAM, "max_completion_tokens": tokens, "ignore_eos": True,
                "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}]}
    return {"model": "base", **GUIDELLM_STREAM, "max_tokens": tokens, "ignore_eos": True, "prompt": PROMPT}


@pytest.mark.parametrize("chat", [False, True])
def test_guidellms_stream_is_served_with_usage_in_every_chunk(served, chat):
    """guidellm's request (continuous_usage_stats was a 400, so every request of a guidellm run failed): every chunk
    carries its choice's usage so far (vLLM's shape: the prompt's tokens, the tokens streamed so far; chat's role chunk
    0), the finishing chunk and the last usage chunk the whole count, which is what guidellm reports."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    r, chunks = events(served, path, guidellm_body(chat, 6))
    assert r.status_code == 200, r.text
    with_choices, last = [c for c in chunks if c["choices"]], chunks[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 6
    prompt = last["usage"]["prompt_tokens"]
    assert all(c["usage"]["prompt_tokens"] == prompt and c["usage"]["total_tokens"] == prompt + c["usage"]["completion_tokens"]
               for c in with_choices)
    counts = [c["usage"]["completion_tokens"] for c in with_choices]
    assert counts == sorted(counts) and counts[-1] == 6 and with_choices[-1]["choices"][0]["finish_reason"] == "length"
    if chat:
        assert with_choices[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""} and counts[0] == 0
    # each chunk's count is the tokens whose text it and the chunks before it hold (vLLM's token_ids show which)
    r, chunks = events(served, path, {**guidellm_body(chat, 6), "return_token_ids": True})
    seen = 0
    for c in (c for c in chunks if c["choices"]):
        seen += len(c["choices"][0].get("token_ids", []))
        assert c["usage"]["completion_tokens"] == seen


def test_continuous_usage_stats_without_include_usage_is_named_not_applied(served):
    """vLLM reads continuous_usage_stats only beside include_usage: alone it adds no usage, and the response header
    names it as not read."""
    body = {"model": "base", "prompt": PROMPT, "max_tokens": 3, "stream": True, "stream_options": {"continuous_usage_stats": True}}
    r, chunks = events(served, "/v1/completions", body)
    assert r.status_code == 200 and r.headers["x-adapterhub-ignored-fields"] == "stream_options.continuous_usage_stats"
    assert chunks and not any("usage" in c for c in chunks)


def test_a_chat_stream_says_nothing_before_its_first_token(served, monkeypatch):
    """vLLM sends a chat stream's role chunk with the first output, and `vllm bench serve` times the first token by the
    first chunk with choices: a role chunk sent when the request was accepted (before its prefill) was timed as its
    first token. With the prefill held, the stream has started (200) but carries no chunk until the prefill runs."""
    held, admit = threading.Event(), served.engine._admit

    def admit_when_let(plan):
        held.wait(30)
        return admit(plan)

    monkeypatch.setattr(served.engine, "_admit", admit_when_let)
    body = {"model": "base", "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}], "max_completion_tokens": 2,
            "stream": True, "stream_options": {"include_usage": True}}
    first, before_prefill = threading.Event(), []
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()

        def read_first():
            for line in lines:
                if line.startswith("data: {"):
                    before_prefill.append(not held.is_set())
                    first.set()
                    return

        reader = threading.Thread(target=read_first)
        reader.start()
        first.wait(1.0)  # a chunk sent before the prefill comes within this; none should
        held.set()
        reader.join(30)
        assert before_prefill == [False]
        rest = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert rest[-1]["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("logprobs", [None, 2])
def test_vllm_bench_completions_request(served, logprobs):
    """`vllm bench serve --backend openai` on a random dataset: ignore_eos, logprobs null (or k), repetition_penalty 1.0,
    include_usage; its output length comes from the usage chunk, its prompt length too."""
    body = {"model": "gen_a", "prompt": PROMPT, "repetition_penalty": 1.0, "max_tokens": 5, "logprobs": logprobs, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    r, chunks = events(served, "/v1/completions", body, {"x-request-id": "bench-1234-0"})
    assert r.status_code == 200 and "x-adapterhub-ignored-fields" not in r.headers
    assert {c["id"] for c in chunks} == {"cmpl-bench-1234-0"}  # vLLM names the request by the header
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == 5 and usage["prompt_tokens"] > 0
    lps = [c["choices"][0]["logprobs"] for c in chunks if c["choices"]]
    if logprobs is None:
        assert all(lp is None for lp in lps)
    else:
        assert sum(len(lp["tokens"]) for lp in lps if lp) == 5 and all(len(t) == 2 for lp in lps if lp for t in lp["top_logprobs"])


def test_the_x_request_id_header_names_the_request_before_the_field(served):
    """vLLM takes a request's id from X-Request-Id first, then from `request_id`: the header wins, and a field that
    then goes unread is named in the ignored-fields header; a header no id can be is a 400 naming it."""
    body = {"model": "base", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 1}
    r, _ = events(served, "/v1/chat/completions", body, {"X-Request-Id": "abc-7"})
    assert r.json()["id"] == "chatcmpl-abc-7" and "x-adapterhub-ignored-fields" not in r.headers
    r, _ = events(served, "/v1/chat/completions", {**body, "request_id": "other"}, {"X-Request-Id": "abc-7"})
    assert r.json()["id"] == "chatcmpl-abc-7" and r.headers["x-adapterhub-ignored-fields"] == "request_id"
    r, _ = events(served, "/v1/chat/completions", {**body, "request_id": "same"}, {"X-Request-Id": "same"})
    assert r.json()["id"] == "chatcmpl-same" and "x-adapterhub-ignored-fields" not in r.headers
    r, _ = events(served, "/v1/completions", {"model": "base", "prompt": PROMPT, "max_tokens": 1}, {"X-Request-Id": "x" * 200})
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Request-Id (header)"


def test_vllm_bench_chat_request_to_a_task_adapter_is_refused_in_one_line(served):
    """`--backend openai-chat --lora-modules cls_a` with ignore_eos (a random dataset): a task adapter's chat answer is its
    task's answer, where ignore_eos cannot apply: a 400 naming it (which the bench counts as a failed request), not
    output lengths it never asked for."""
    body = {"model": "cls_a", "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}], "max_completion_tokens": 5,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
    r, _ = events(served, "/v1/chat/completions", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "ignore_eos"


def test_the_base_models_root_names_the_base_on_the_tokenizer_routes(served):
    """`vllm bench serve` without --model reads data[0] of /v1/models (id and root) and aligns its prompts with
    POST /tokenize {"model": root, "add_special_tokens": false} (then /detokenize): a 404 there made it skip the
    alignment ("/tokenize unavailable"). The base's root tokenizes as the base does; another unknown name stays a 404."""
    headers = {"Authorization": f"Bearer {KEY}"}
    first = httpx.get(served.url + "/v1/models", headers=headers).json()["data"][0]
    assert first["id"] == "base"
    by_root = httpx.post(served.url + "/tokenize", json={"model": first["root"], "prompt": PROMPT, "add_special_tokens": False})
    by_id = httpx.post(served.url + "/tokenize", json={"model": "base", "prompt": PROMPT, "add_special_tokens": False})
    assert by_root.status_code == 200 and by_root.json()["tokens"] == by_id.json()["tokens"]
    text = httpx.post(served.url + "/detokenize", json={"model": first["root"], "tokens": by_root.json()["tokens"]})
    assert text.status_code == 200 and text.json()["prompt"] == PROMPT
    assert httpx.post(served.url + "/tokenize", json={"model": first["root"] + "-other", "prompt": PROMPT}).status_code == 404
    assert httpx.post(served.url + "/detokenize", json={"model": first["root"] + "-other", "tokens": [5]}).status_code == 404


def test_continuous_usage_counts_tokens_held_for_a_stop_string(served):
    """Text that may begin a stop string is held back, so a later chunk streams several tokens at once (here the first
    four, whose bytes make no whole character alone), and the tokens that make up a matched stop string are never
    streamed. Each chunk's usage still counts the tokens whose text it and the chunks before it hold (its token_ids
    show them), and the finishing chunk every generated token, as the last usage chunk does."""
    held = {**guidellm_body(False, 8), "return_token_ids": True, "stop": ["zz"], "temperature": 1.0, "seed": 0}
    matched = {**guidellm_body(False, 8), "return_token_ids": True, "stop": ["333"]}  # the base answers 3s greedily
    for body, reason in ((held, "length"), (matched, "stop")):
        r, chunks = events(served, "/v1/completions", body)
        assert r.status_code == 200, r.text
        with_choices, seen = [c for c in chunks if c["choices"]], 0
        for c in with_choices:
            seen += len(c["choices"][0].get("token_ids", []))
            assert c["usage"]["completion_tokens"] == seen, (body["stop"], with_choices)
        assert with_choices[-1]["choices"][0]["finish_reason"] == reason
        assert with_choices[-1]["usage"]["completion_tokens"] == chunks[-1]["usage"]["completion_tokens"] == seen
        if reason == "length":  # what this test is about: one chunk released several held tokens mid-stream
            assert any(len(c["choices"][0].get("token_ids", [])) > 1 for c in with_choices[:-2]), with_choices


def test_a_chat_stream_that_fails_before_its_first_token_sends_no_role_chunk(serve_registry, tmp_path):
    """The role chunk comes with a choice's first output; a request accepted (the stream started, 200) whose adapter
    then fails as it is read (its files changed on disk since the server checked them) sends the error alone, as
    vLLM does, not a role chunk a load tester would time as the first token of a request that failed."""
    import shutil

    from .serving import Served

    reg = tmp_path / "registry"
    shutil.copytree(serve_registry, reg)
    s = Served(reg)
    try:
        weights = reg / "gen_b" / "1.0.0" / "adapter_model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
        body = {"model": "gen_b", "messages": [{"role": "user", "content": "ab"}], "stream": True}
        r = httpx.post(s.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        data_lines = [line[6:] for line in r.text.splitlines() if line.startswith("data: {")]
        assert r.status_code == 200 and data_lines and "error" in json.loads(data_lines[0]), r.text
        assert not any(json.loads(d).get("choices") for d in data_lines), data_lines
    finally:
        s.close()

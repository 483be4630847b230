"""vLLM's own OpenAI-server tests (tests/entrypoints/openai/), replayed against our server where they apply.

Each test names the vLLM test whose expectation it holds (status codes, error shapes), written anew here.
"""

import json

import httpx
import openai
import pytest

from .serving import KEY, slowed


def test_load_lora_adapter_from_a_missing_path_is_404(served, tmp_path):
    """vLLM's test_dynamic_lora_not_found: a lora_path with nothing there is a NotFoundError (404);
    a folder whose adapter_config.json cannot be read stays a 400 (test_dynamic_lora_invalid_files)."""
    with pytest.raises(openai.NotFoundError) as err:
        served.client.post("load_lora_adapter", cast_to=str, body={"lora_name": "notfound", "lora_path": "/not/an/adapter"})
    assert err.value.body["param"] == "lora_path" and "/not/an/adapter" in err.value.body["message"]
    afile = tmp_path / "adapter_config.json"
    afile.write_text("this is not json")
    for path in (str(afile), str(tmp_path)):
        with pytest.raises(openai.BadRequestError) as bad:
            served.client.post("load_lora_adapter", cast_to=str, body={"lora_name": "invalid", "lora_path": path})
    assert bad.value.body["code"] == "adapter_load_error", bad.value.body  # a word, as every code here, not a class name
    assert "notfound" not in [m.id for m in served.client.models.list().data]


def test_load_lora_adapter_from_a_folder_with_no_adapter_in_it_is_404(served, tmp_path):
    """vLLM reads a folder's adapter_config.json first; with none there it answers "No adapter found" as a NotFoundError
    (404), as for a path with nothing at all: a folder with no adapter in it was a 400 here. vLLM's exact body, raw."""
    (tmp_path / "README.md").write_text("not an adapter")
    r = served.post("/v1/load_lora_adapter", {"lora_name": "empty", "lora_path": str(tmp_path)})
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert error["code"] == "adapter_not_found" and error["param"] == "lora_path"
    assert str(tmp_path) in error["message"] and "adapter_config.json" in error["message"]
    assert "empty" not in [m.id for m in served.client.models.list().data]


def test_load_inplace_true_loads_a_new_name_and_replaces_a_served_one_nobody_is_using(served, serve_registry, monkeypatch):
    """vLLM's load_inplace replaces a served adapter's weights, and for a name not loaded yet is a plain load. Clients that
    push each new version under one name send load_inplace: true once the name is loaded (was_loaded); that was a 400 here,
    so their second push failed. It replaces the adapter now; while running or queued requests use it, it is a 409
    (in_use: retry), so no answer is made of two adapters' weights (an unload is answered at once and lets them finish:
    tests/test_unload_drain.py). Without load_inplace a served name stays vLLM's 400."""
    body = {"model": "pushed", "prompt": "ab", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    want = {a: served.post("/v1/completions", {**body, "model": a}).json()["choices"][0]["text"] for a in ("gen_a", "gen_b")}
    assert want["gen_a"] != want["gen_b"]
    push = {"lora_name": "pushed", "lora_path": str(serve_registry / "gen_a" / "1.0.0"), "load_inplace": True}
    try:
        r = served.post("/v1/load_lora_adapter", push)
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'pushed' added successfully.", r.text
        assert served.post("/v1/completions", body).json()["choices"][0]["text"] == want["gen_a"]
        again = served.post("/v1/load_lora_adapter", {**push, "load_inplace": False})
        assert again.status_code == 400 and again.json()["error"]["code"] == "already_loaded", again.text
        r = served.post("/v1/load_lora_adapter", {**push, "lora_path": str(serve_registry / "gen_b" / "1.0.0")})
        assert r.status_code == 200, r.text
        assert served.post("/v1/completions", body).json()["choices"][0]["text"] == want["gen_b"]
        assert [m.root for m in served.client.models.list().data if m.id == "pushed"] == [str(serve_registry / "gen_b" / "1.0.0")]
        slowed(served, monkeypatch)
        stream = served.client.completions.create(model="pushed", prompt="ab", max_tokens=40, temperature=0, stream=True,
                                                  extra_body={"ignore_eos": True})
        first = next(iter(stream))
        busy = served.post("/v1/load_lora_adapter", push)
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "in_use", busy.text
        text = first.choices[0].text + "".join(c.choices[0].text for c in stream)
        assert text.startswith(want["gen_b"])  # answered by the adapter it started with, to the end
    finally:
        served.post("/v1/unload_lora_adapter", {"lora_name": "pushed"})


def test_load_lora_adapter_expands_a_home_relative_path_as_vllm_does(served, serve_registry, tmp_path, monkeypatch):
    """vLLM's get_adapter_absolute_path expands a lora_path that starts with '~' (os.path.expanduser) before reading it;
    here '~/adapters/gen_a' was looked up literally, a folder named '~' in the server's working directory: a 404 for a
    path vLLM loads."""
    import shutil

    shutil.copytree(serve_registry / "gen_a" / "1.0.0", tmp_path / "adapters" / "gen_a")
    monkeypatch.setenv("HOME", str(tmp_path))
    try:
        r = served.post("/v1/load_lora_adapter", {"lora_name": "homed", "lora_path": "~/adapters/gen_a"})
        assert r.status_code == 200, r.text
        assert served.post("/v1/completions", {"model": "homed", "prompt": "ab", "max_tokens": 2}).status_code == 200
        nobody = served.post("/v1/load_lora_adapter", {"lora_name": "nobody", "lora_path": "~nosuchuser/gen_a"})  # no such home: as sent
        assert nobody.status_code == 404 and nobody.json()["error"]["param"] == "lora_path", nobody.text
    finally:
        served.post("/v1/unload_lora_adapter", {"lora_name": "homed"})


def test_load_lora_adapter_wider_than_max_lora_rank_is_refused_at_the_load(serve_registry):
    """vLLM's worker refuses, at /v1/load_lora_adapter, an adapter whose rank is over --max-lora-rank ('LoRA rank 16 is
    greater than max_lora_rank 8', a 400). Here the load was answered 200 and listed in /v1/models, and only each
    request to it was then refused. A narrower adapter still loads."""
    from .serving import Served

    s = Served(serve_registry, max_lora_rank=8)
    try:
        wide = s.post("/v1/load_lora_adapter", {"lora_name": "wide", "lora_path": str(serve_registry / "gen_b" / "1.0.0")})  # r=16
        assert wide.status_code == 400, wide.text
        error = wide.json()["error"]
        assert error["code"] == "adapter_load_error" and "16" in error["message"] and "--max-lora-rank" in error["message"], error
        assert "wide" not in [m.id for m in s.client.models.list().data]
        narrow = s.post("/v1/load_lora_adapter", {"lora_name": "narrow", "lora_path": str(serve_registry / "gen_a" / "1.0.0")})  # r=8
        assert narrow.status_code == 200, narrow.text
    finally:
        s.close()


def test_load_lora_adapter_counts_a_rank_pattern_entry_one_over_max_lora_rank(serve_registry, tmp_path):
    """The load's rank is the largest peft sizes the factors by: r=4 with v_proj at 9 under --max-lora-rank 8 is vLLM's
    400 at the load (9 > 8: one over the limit is over it), not a 200 whose every request the slots then refuse."""
    from .conftest import train_tiny
    from .serving import Served

    folder = train_tiny(tmp_path, "patterned", method_args={"r": 4, "lora_alpha": 8, "rank_pattern": {"v_proj": 9}})
    s = Served(serve_registry, max_lora_rank=8)
    try:
        r = s.post("/v1/load_lora_adapter", {"lora_name": "patterned", "lora_path": str(folder)})
        assert r.status_code == 400, r.text
        assert "rank 9" in r.json()["error"]["message"] and "--max-lora-rank" in r.json()["error"]["message"], r.text
        assert "patterned" not in [m.id for m in s.client.models.list().data]
    finally:
        s.close()


@pytest.mark.parametrize("method, path, status, allow", [("POST", "/v1/nope", 404, None), ("GET", "/v1/completions", 405, "POST"),
                                                          ("POST", "/v1/models", 405, "GET")])
def test_unknown_route_or_method_answers_in_the_error_shape(served, method, path, status, allow):
    """vLLM answers a route or method it does not have in its error shape ({"error": {message, type, code, param}},
    its HTTPException handler), as OpenAI does; Starlette's own {"detail": "Not Found"} has no error.message to read."""
    r = httpx.request(method, served.url + path, json={} if method == "POST" else None, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "code", "param"} and path in error["message"]
    assert r.headers.get("allow") == allow


def test_truncation_side_right_is_refused_left_is_what_is_done(served):
    """vLLM's test_completion_truncation_side_controls_prompt_truncation: "right" keeps the first k tokens. We keep the
    last k (vLLM's "left"), so "right" is a 400 naming it rather than an answer to another prompt than the one asked."""
    body = {"model": "base", "prompt": list(range(8)), "max_tokens": 1, "temperature": 0, "return_token_ids": True, "truncate_prompt_tokens": 4}
    r = served.post("/v1/completions", {**body, "truncation_side": "right"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "truncation_side"
    r = served.post("/v1/completions", {**body, "truncation_side": "left"})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["prompt_token_ids"] == [4, 5, 6, 7]


@pytest.mark.parametrize("stream", [False, True])
def test_return_tokens_as_token_ids_completion(served, stream):
    """vLLM's test_completion_return_tokens_as_token_ids_completion: every log-prob token is "token_id:<id>", the top
    alternatives are keyed the same way (the greedy pick first), and the ids decode to the text. The prompt holds a
    character of 4 bytes, which this byte-level tokenizer splits over 4 tokens whose own text is no text at all."""
    tok = served.router.backbone.tokenizer
    body = {"model": "base", "prompt": "Say 'Hello, world! 🎉'", "echo": True, "temperature": 0, "max_tokens": 5, "logprobs": 1,
            "return_tokens_as_token_ids": True}
    if stream:
        text, tokens, tops = "", [], []
        for chunk in served.client.completions.create(**{k: v for k, v in body.items() if k != "return_tokens_as_token_ids"}, stream=True,
                                                      extra_body={"return_tokens_as_token_ids": True}):
            choice = chunk.choices[0]
            text += choice.text
            if choice.logprobs is not None:
                tokens += choice.logprobs.tokens
                tops += choice.logprobs.top_logprobs
    else:
        choice = served.post("/v1/completions", body).json()["choices"][0]
        text, tokens, tops = choice["text"], choice["logprobs"]["tokens"], choice["logprobs"]["top_logprobs"]
    assert all(t.startswith("token_id:") for t in tokens)
    assert tokens[1:] == [next(iter(top)) for top in tops[1:]]  # the first (the prompt's) has no alternatives
    ids = [int(t.removeprefix("token_id:")) for t in tokens]
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert ids[:len(tok("Say 'Hello, world! 🎉'").input_ids)] == tok("Say 'Hello, world! 🎉'").input_ids


def test_return_tokens_as_token_ids_chat(served):
    """vLLM's test_chat_return_tokens_as_token_ids_completion: each content token is "token_id:<id>" (its bytes that
    string's, as vLLM), and the ids decode to the message."""
    tok = served.router.backbone.tokenizer
    r = served.client.chat.completions.create(model="base", messages=[{"role": "user", "content": "Please write some emojis: 🐱🐶🎉"}],
                                              temperature=0, max_tokens=8, logprobs=True, top_logprobs=2,
                                              extra_body={"return_tokens_as_token_ids": True})
    content = r.choices[0].logprobs.content
    assert all(c.token.startswith("token_id:") and bytes(c.bytes).decode() == c.token for c in content)
    assert all(c.top_logprobs[0].token == c.token for c in content)  # greedy: the pick is the best alternative
    ids = [int(c.token.removeprefix("token_id:")) for c in content]
    assert tok.decode(ids, skip_special_tokens=True) == r.choices[0].message.content


def _events(response) -> list[dict]:
    """The JSON chunks of a server-sent event stream (the [DONE] line left out)."""
    return [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]


@pytest.mark.parametrize("chat", [False, True])
def test_streamed_return_token_ids_carry_the_same_ids_as_the_whole_answer(served, chat):
    """vLLM's streamed return_token_ids (test_return_token_ids.py): every chunk carries the ids of its tokens, which
    join to the whole answer's token_ids, and the first chunk the prompt's ids (completions: in the choice; chat: beside
    the choices, on the role chunk). The stream used to leave the field out: it was read for whole answers only."""
    body = {"model": "base", "temperature": 0, "max_tokens": 6, "ignore_eos": True, "logprobs": 1 if not chat else True,
            "return_token_ids": True}
    body |= {"messages": [{"role": "user", "content": "Count: 1 2 3"}]} if chat else {"prompt": "Count: 1 2 3 🎉"}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    whole = served.post(path, body).json()
    want_prompt = whole["prompt_token_ids"] if chat else whole["choices"][0]["prompt_token_ids"]
    want_ids = whole["choices"][0]["token_ids"]
    assert len(want_ids) == 6 and want_prompt
    chunks = [c for c in _events(served.post(path, {**body, "stream": True})) if c["choices"]]
    prompts = [c.get("prompt_token_ids") if chat else c["choices"][0].get("prompt_token_ids") for c in chunks]
    assert prompts[0] == want_prompt and not any(prompts[1:])
    assert all("token_ids" in c["choices"][0] for c in chunks)
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == want_ids


@pytest.mark.parametrize("field, value, param", [("return_token_ids", "yes", "return_token_ids"),
                                                 ("return_tokens_as_token_ids", "yes", "return_tokens_as_token_ids"),
                                                 ("stream_options", {"include_usage": "yes"}, "stream_options.include_usage")])
def test_a_streamed_request_with_a_bad_answer_flag_is_a_400_not_a_cut_stream(served, field, value, param):
    """The flags that shape the answer were read only when it was written: in a stream, after its 200 went out, so
    return_tokens_as_token_ids: "yes" cut the stream mid-way (the client saw an incomplete chunked read) and
    return_token_ids / include_usage: "yes" were taken as true. They are checked with the rest of the request (vLLM:
    its pydantic model refuses them with a 400)."""
    body = {"model": "base", "prompt": "hello", "max_tokens": 2, "logprobs": 1, "stream": True, field: value}
    r = served.post("/v1/completions", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain"])
def test_a_body_not_sent_as_json_is_refused(served, content_type):
    """vLLM's test_request_wrong_content_type: a body whose Content-Type is not application/json is refused (vLLM
    answers 415 or 400), however valid its JSON: a web page can POST a form or text/plain to a local server without a
    CORS preflight, and reading such a body as JSON would run its request. application/json with a charset is JSON."""
    body = b'{"model": "base", "prompt": "x", "max_tokens": 1}'
    headers = {"Authorization": f"Bearer {KEY}", **({"Content-Type": content_type} if content_type else {})}
    r = httpx.post(served.url + "/v1/completions", content=body, headers=headers)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", r.text
    with pytest.raises(openai.APIStatusError):
        served.client.chat.completions.create(model="base", messages=[{"role": "user", "content": "x"}], max_tokens=1,
                                              extra_headers={"Content-Type": "application/x-www-form-urlencoded"})
    ok = httpx.post(served.url + "/v1/completions", content=body, headers={**headers, "Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200, ok.text


def test_models_list_the_base_first_and_the_last_loaded_last(served, serve_registry):
    """vLLM's test_check_models / test_static_lora_lineage / test_dynamic_lora_lineage: data[0] is the served base
    (root its weights, parent None), which clients take as the default model (vLLM's own examples:
    `client.models.list().data[0].id`); adapters follow with parent = the base, and an adapter loaded at run time
    is listed last, root the folder it came from."""
    data = served.client.models.list().data
    assert data[0].id == "base" and data[0].parent is None and data[0].model_extra["max_model_len"] > 0
    assert all(m.parent == "base" for m in data[1:])
    for name in ("zz_first", "aa_second"):  # loaded in this order, which is not the names' order
        folder = str(serve_registry / "gen_a" / "1.0.0")
        assert served.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": folder}).status_code == 200
    try:
        data = served.client.models.list().data
        assert [m.id for m in data[-2:]] == ["zz_first", "aa_second"] and data[-1].root == folder and data[-1].parent == "base"
    finally:
        for name in ("zz_first", "aa_second"):
            served.post("/v1/unload_lora_adapter", {"lora_name": name})


def test_every_model_card_carries_vllms_permission(served):
    """vLLM's ModelCard carries `permission`: [one model_permission object]; a client written for vLLM reads it."""
    cards = httpx.get(served.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
    for card in cards:
        (perm,) = card["permission"]
        assert perm["object"] == "model_permission" and perm["allow_sampling"] and perm["allow_logprobs"] and not perm["allow_fine_tuning"]
        assert httpx.get(served.url + "/v1/models/" + card["id"], headers={"Authorization": f"Bearer {KEY}"}).json()["permission"] == [perm]


def test_load_inplace_that_is_not_a_boolean_is_refused_by_name(served, serve_registry):
    """load_inplace is vLLM's boolean; "yes" (or 1) is a 400 naming it, as every flag here, not read as true and loaded."""
    for value in ("yes", 1):
        r = served.post("/v1/load_lora_adapter", {"lora_name": "pushed_flag", "lora_path": str(serve_registry / "gen_a" / "1.0.0"), "load_inplace": value})
        assert r.status_code == 400 and r.json()["error"]["param"] == "load_inplace", r.text
    assert "pushed_flag" not in [m.id for m in served.client.models.list().data]


def test_each_cards_max_model_len_is_what_a_request_to_it_may_fill(served):
    """vLLM's max_model_len on a card: a request to that id may fill exactly that many positions (prompt and answer).
    A prefix adapter's virtual tokens sit in the cache and a prompt adapter's run before the prompt, so both take theirs
    off the context; a plain LoRA takes none. A request one token past the card's figure is refused as over the context."""
    cards = {m.id: m.model_extra for m in served.client.models.list().data}
    for name in ("gen_a", "gen_prefix", "gen_prompt"):
        fill = cards[name]["max_model_len"]
        fits = served.post("/v1/completions", {"model": name, "prompt": [5] * (fill - 1), "max_tokens": 1})
        assert fits.status_code == 200, (name, fits.text)
        over = served.post("/v1/completions", {"model": name, "prompt": [5] * fill, "max_tokens": 1})
        assert over.status_code == 400 and over.json()["error"]["code"] == "context_length_exceeded", (name, over.text)
    assert cards["gen_prefix"]["max_model_len"] < cards["gen_a"]["max_model_len"]

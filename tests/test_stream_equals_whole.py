"""A streamed answer says exactly what the whole answer to the same request says: its chunks, joined (text, log-prob
lists with text_offset running on, token ids; the finishing chunk's finish_reason, stop_reason, adapter and routing; the
first chunk's prompt_token_ids and prompt_logprobs; the usage chunk) rebuild the whole answer field by field, for every
adapter kind, and every chunk is framed as vLLM frames it (one id, created and model; object names; [DONE])."""

import json

import httpx
import pytest

from .serving import KEY

H = {"Authorization": f"Bearer {KEY}"}
KEYS = ("stop_reason", "adapter", "routing", "prompt_token_ids", "prompt_logprobs")  # said once per choice, as the whole choice says them


def sse(response) -> list[dict]:
    """The JSON chunks of a stream, after checking it ends with vLLM's [DONE] line."""
    lines = [line for line in response.text.split("\n") if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines), response.text[-300:]
    return [json.loads(line[6:]) for line in lines[:-1]]


def rebuild(chunks: list[dict], chat: bool) -> dict:
    """The whole answer the chunks say, in the whole answer's shape."""
    choices, out = {}, {"usage": None}
    for c in chunks:
        if not c["choices"]:
            assert out["usage"] is None, "one usage chunk"
            out["usage"] = c["usage"]
            continue
        if "prompt_token_ids" in c:  # chat: beside the choices, on the role chunk
            out["prompt_token_ids"] = c["prompt_token_ids"]
        (ch,) = c["choices"]
        o = choices.setdefault(ch["index"], {"index": ch["index"], "text": "", "finish_reason": None, "logprobs": None})
        assert o["finish_reason"] is None, "nothing after a choice's finishing chunk"
        o["text"] += (ch["delta"].get("content") or "") if chat else ch["text"]
        if chat and "role" in ch["delta"]:
            o["role"] = ch["delta"]["role"]
        if ch["logprobs"] is not None:
            o["logprobs"] = {k: None if v is None else (o["logprobs"] or {}).get(k, []) + v for k, v in ch["logprobs"].items()}
        o["finish_reason"] = ch["finish_reason"]
        if "token_ids" in ch:
            o["token_ids"] = o.get("token_ids", []) + ch["token_ids"]
        for k in KEYS:
            if k in ch and (k != "stop_reason" or ch["finish_reason"] is not None):
                assert k not in o, f"{k} said twice"
                o[k] = ch[k]
    out["choices"] = [choices[i] for i in sorted(choices)]
    if chat:
        for o in out["choices"]:
            o["message"] = {"role": o.pop("role", None), "content": o.pop("text")}
    return out


PROMPT = {"prompt": "ab cd"}
CHAT = {"messages": [{"role": "user", "content": "ab cd"}]}
MERGE = {"merged_adapters": {"ids": ["gen_a", "gen_b"], "weights": [0.5, 0.5], "merge_strategy": "cat"}, "model": "gen_a"}
SAMPLED = {"n": 3, "temperature": 1.0, "seed": 7}
USAGE = {"stream_options": {"include_usage": True}}
CASES = [  # (chat, body): every adapter kind, n 1 and 3, greedy and seeded, and the fields that shape a choice
    *[(False, {"model": m, **PROMPT, "logprobs": 2, "return_token_ids": True, **USAGE})
      for m in ("gen_a", "cls_ia3", "gen_prefix", "gen_prompt", "base", "gen_b@0.9.0")],
    (False, {**MERGE, **PROMPT, "logprobs": 1, **SAMPLED}),
    (False, {"model": "gen_b", "prompt": ["ab", "cd ef"], **SAMPLED, "logprobs": 3, "echo": True, "return_token_ids": True, **USAGE}),
    (False, {"model": "gen_b", **PROMPT, "logprobs": 0, "echo": True, "max_tokens": 0}),
    (False, {"model": "base", **PROMPT, "prompt_logprobs": 2, "logprobs": 2, "return_tokens_as_token_ids": True}),
    (False, {"model": "base", **PROMPT, "max_tokens": 12, "ignore_eos": True, "stop": ["\n"], "include_stop_str_in_output": True}),
    (False, {"model": "base", **PROMPT, "min_tokens": 3, "max_tokens": 8, "logprobs": 1, "return_token_ids": True,
             "stream_options": {"include_usage": True, "continuous_usage_stats": True}}),
    (False, {"model": "auto", "input": "pos 3", "n": 3, **USAGE}),
    (False, {"model": "cls_a", "input": "pos 3", "return_token_ids": True}),
    (False, {"model": "gen_a", "input": "ab", "logprobs": 2, "return_token_ids": True}),
    (True, {"model": "base", **CHAT, **SAMPLED, "logprobs": True, "top_logprobs": 2, "return_token_ids": True, **USAGE}),
    (True, {"model": "base", **CHAT, "logprobs": True, "top_logprobs": 0, "return_tokens_as_token_ids": True, "max_tokens": 12, "ignore_eos": True}),
    (True, {"model": "gen_prompt", **CHAT, "logprobs": True, "top_logprobs": 1}),
    (True, {"model": "auto", "messages": [{"role": "user", "content": "pos 3"}], "n": 3, **USAGE}),
    (True, {"model": "cls_prefix", **CHAT, "return_token_ids": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}),
    (True, {**MERGE, **CHAT, **USAGE}),
]


@pytest.mark.parametrize("chat, body", CASES, ids=[f"{'chat' if c else 'cmpl'}-{b['model']}-{i}" for i, (c, b) in enumerate(CASES)])
def test_a_stream_rebuilds_the_whole_answer(served, chat, body):
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"max_tokens": 6, "temperature": 0, **body}
    whole = httpx.post(served.url + path, json={k: v for k, v in body.items() if k != "stream_options"}, headers=H, timeout=60)
    streamed = httpx.post(served.url + path, json={**body, "stream": True}, headers=H, timeout=60)
    assert whole.status_code == streamed.status_code == 200, (whole.text, streamed.text)
    for header in ("x-adapterhub-routing", "x-adapterhub-ignored-fields"):
        assert whole.headers.get(header) == streamed.headers.get(header)
    whole, chunks = whole.json(), sse(streamed)
    assert {(c["id"], c["created"], c["model"], c["object"]) for c in chunks} == {
        (chunks[0]["id"], chunks[0]["created"], whole["model"], "chat.completion.chunk" if chat else "text_completion")}
    got = rebuild(chunks, chat)
    assert got["usage"] == (whole["usage"] if "stream_options" in body else None)
    assert got.get("prompt_token_ids") == whole.get("prompt_token_ids")
    assert got["choices"] == whole["choices"]


def test_a_completions_chunk_carries_stop_reason_as_vllms_do(served):
    """vLLM's completions stream sets stop_reason on every chunk (null until the choice ends: its stream choice is dumped
    with exclude_unset after stop_reason is set), so a client reads chunk.choices[0].stop_reason on any chunk; a chat
    stream's choice carries it on its finishing chunk only, as vLLM's chat stream does."""
    body = {"model": "base", "prompt": "ab cd", "max_tokens": 4, "temperature": 0}
    chunks = [c for c in served.client.completions.create(**body, stream=True)]
    assert len(chunks) > 2 and all("stop_reason" in c.choices[0].model_extra for c in chunks)
    assert [c.choices[0].model_extra["stop_reason"] for c in chunks] == [None] * len(chunks)
    chat = list(served.client.chat.completions.create(model="base", messages=CHAT["messages"], max_tokens=4, temperature=0, stream=True))
    assert ["stop_reason" in c.choices[0].model_extra for c in chat] == [False] * (len(chat) - 1) + [True]

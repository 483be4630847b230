"""Chat messages as vLLM reads them before the template: what the template renders is what vLLM would render."""

import pytest
import torch

from adapterhub_lite.model.backbone import load_backbone
from adapterhub_lite.model.weights import _tiny_tokenizer
from adapterhub_lite.serving import protocol as P


def test_text_parts_are_joined_with_a_newline_as_vllm_joins_them():
    """The openai client sends content as [{"type": "text", "text": ...}, ...]; vLLM joins the parts with "\\n" for a
    template that reads content as a string (SmolLM2's, the tiny one's), so the same chat gives the same prompt ids."""
    tok = _tiny_tokenizer()
    parts = [{"role": "system", "content": [{"type": "text", "text": "be brief"}]},
             {"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]}]
    as_vllm = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "part one\npart two"}]
    assert P.check_messages(parts) == as_vllm
    assert (tok.apply_chat_template(P.check_messages(parts), add_generation_prompt=True)
            == tok.apply_chat_template(as_vllm, add_generation_prompt=True))


CHATS = [
    [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "again"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "héllo 世界 🎉"}],
    [{"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]}],
    # a special token typed in content ('</s>', the tiny template's end of turn) is that token, as transformers' template
    # tokenization and vLLM (which tokenizes the rendered text whole) read it; the README says so
    [{"role": "user", "content": "a </s> b"}],
]


@pytest.mark.parametrize("messages", CHATS, ids=["system", "turns", "unicode", "parts", "typed-special"])
def test_base_chat_is_the_template_and_greedy_generate_of_transformers(served, messages):
    """What vLLM does with a chat, computed by transformers: the template's ids (add_generation_prompt, no special
    tokens added on top), usage counting them, the greedy answer of model.generate on them, and each token's log-prob
    and top 3 the log_softmax of the model's own logits (fp32)."""
    tok, model = served.router.backbone.tokenizer, load_backbone("tiny-random-llama", "none", dtype="fp32").model.eval()
    as_vllm = [{**m, "content": "\n".join(p["text"] for p in m["content"]) if isinstance(m["content"], list) else m["content"]} for m in messages]
    ids = tok.apply_chat_template(as_vllm, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    got = served.client.chat.completions.create(model="base", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3,
                                                extra_body={"return_token_ids": True})
    choice = got.choices[0]
    assert got.model_extra["prompt_token_ids"] == ids and got.usage.prompt_tokens == len(ids)
    with torch.no_grad():
        want = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        logp = model(torch.tensor([ids + want])).logits[0, len(ids) - 1:-1].float().log_softmax(-1)
    assert choice.model_extra["token_ids"] == want and choice.message.content == tok.decode(want, skip_special_tokens=True)
    for entry, token, row in zip(choice.logprobs.content, want, logp):
        assert entry.logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert [a.logprob for a in entry.top_logprobs] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
    assert "".join(e.token for e in choice.logprobs.content) == choice.message.content


def test_an_assistant_prefill_is_continued_as_transformers_renders_and_generates_it(served):
    tok, model = served.router.backbone.tokenizer, load_backbone("tiny-random-llama", "none", dtype="fp32").model.eval()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure, th"}]
    ids = tok.apply_chat_template(messages, continue_final_message=True, tokenize=True, return_dict=True)["input_ids"]
    got = served.client.chat.completions.create(model="base", messages=messages, max_tokens=5, temperature=0,
                                                extra_body={"add_generation_prompt": False, "continue_final_message": True, "return_token_ids": True})
    with torch.no_grad():
        want = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    assert got.model_extra["prompt_token_ids"] == ids and got.usage.prompt_tokens == len(ids)
    assert got.choices[0].model_extra["token_ids"] == want


def test_a_speakers_name_reaches_a_template_that_reads_it_and_is_named_where_none_does():
    """vLLM hands a message's `name` to the chat template. It used to be dropped before the template; now it is given,
    and where the template renders the same text without it (SmolLM2's, the tiny one's) it is named as not read."""
    tok = _tiny_tokenizer()
    messages = P.check_messages([{"role": "user", "content": "hi", "name": "ada"}])
    assert messages == [{"role": "user", "content": "hi", "name": "ada"}]
    text, unread = P.render_chat(tok, messages, add_generation_prompt=True)
    assert unread == ["messages[0].name"] and text == tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    tok.chat_template = "{% for m in messages %}{{ m.get('name', m.role) }}: {{ m.content }}\n{% endfor %}"
    text, unread = P.render_chat(tok, messages)
    assert unread == [] and text == "ada: hi\n"


def test_message_keys_nothing_reads_are_named_and_tool_calls_refused_with_content_too():
    raw = [{"role": "user", "content": "hi", "name": "ada"}, {"role": "assistant", "content": "yo", "reasoning_content": "think", "refusal": None}]
    assert P.unread_message_keys(raw) == ["messages[1].reasoning_content"]  # name is read (by the template, or named by render_chat)
    with pytest.raises(P.ApiError) as err:  # the calls would reach no template and no tool
        P.check_messages([{"role": "assistant", "content": "calling", "tool_calls": [{"id": "c1", "type": "function"}]}])
    assert err.value.body()["error"]["param"] == "messages[0].tool_calls"
    with pytest.raises(P.ApiError) as err:
        P.check_messages([{"role": "user", "content": "hi", "name": 7}])
    assert err.value.body()["error"]["param"] == "messages[0].name"


def test_chat_names_the_message_keys_it_does_not_read(served):
    from adapterhub_lite.serving.params import IGNORED_HEADER

    messages = [{"role": "user", "content": "hi", "name": "ada"}, {"role": "assistant", "content": "yo", "reasoning_content": "think"},
                {"role": "user", "content": "again"}]
    r = served.post("/v1/chat/completions", {"model": "base", "messages": messages, "max_tokens": 2})
    assert r.status_code == 200 and r.headers[IGNORED_HEADER] == "messages[1].reasoning_content,messages[0].name", r.text
    r = served.post("/tokenize", {"messages": messages})
    assert r.status_code == 200 and r.headers[IGNORED_HEADER] == "messages[1].reasoning_content,messages[0].name", r.text

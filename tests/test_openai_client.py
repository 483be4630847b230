"""The server through the installed `openai` client: every keyword its create() methods take is known to the field
table (honoured, accepted with no effect, or refused by name), never left to the ignored-fields header, and the
fields a route cannot honour for a task adapter are refused, not dropped."""

import inspect

import openai
import pytest
from openai.resources.chat.completions import Completions as ChatCompletions
from openai.resources.completions import Completions

from adapterhub_lite.serving.params import FIELDS, IGNORED_HEADER, _entry

# the client's own transport keywords, not request fields
TRANSPORT = {"self", "extra_headers", "extra_query", "extra_body", "timeout"}
CHAT = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(("endpoint", "create"), [("completions", Completions.create), ("chat", ChatCompletions.create)])
def test_every_keyword_of_the_openai_clients_create_is_in_the_field_table(endpoint, create):
    """A keyword the client sends that the table does not know would only be named in a response header the client never
    reads: openai 3.x added `moderation` (a block policy) and `prompt_cache_options` to chat.completions.create."""
    missing = [name for name in inspect.signature(create).parameters if name not in TRANSPORT and _entry(endpoint, name) is None]
    assert not missing, f"openai {openai.__version__}'s {endpoint} create() takes {missing}, which params.FIELDS does not list"


def test_a_moderation_policy_is_refused_and_prompt_cache_settings_are_accepted(served):
    """A moderation policy that blocks was answered unmoderated (named only in the ignored-fields header); it is a 400
    naming it. The prompt-cache settings change no answer here (no prompt cache), as prompt_cache_key."""
    with pytest.raises(openai.BadRequestError) as err:
        served.client.chat.completions.create(model="base", messages=CHAT, max_tokens=1,
                                              moderation={"policy": {"input": {"mode": "block"}, "output": {"mode": "block"}}})
    assert err.value.body["param"] == "moderation" and err.value.body["code"] == "unsupported_field", err.value.body
    r = served.client.chat.completions.with_raw_response.create(model="base", messages=CHAT, max_tokens=1, prompt_cache_retention="24h",
                                                                prompt_cache_options={"mode": "explicit"})
    assert IGNORED_HEADER not in r.headers and r.parse().choices[0].finish_reason == "length"
    assert FIELDS["moderation"].status == "refused"


@pytest.mark.parametrize("chat", [False, True])
def test_the_clients_include_obfuscation_stream_option_false_is_accepted_true_refused_by_name(served, chat):
    """openai's stream_options type has `include_obfuscation`; false (no padding, what is done) was a 400 that named the
    whole object as if malformed. False now streams; true, which asks for padding no chunk carries, is refused by name."""
    def send(flag):
        options = {"include_usage": True, "include_obfuscation": flag}
        if chat:
            return served.client.chat.completions.create(model="base", messages=CHAT, max_tokens=2, stream=True, stream_options=options)
        return served.client.completions.create(model="base", prompt="ab", max_tokens=2, stream=True, stream_options=options)

    chunks = list(send(False))
    assert chunks[-1].usage.completion_tokens == 2 and not chunks[-1].choices
    with pytest.raises(openai.BadRequestError) as err:
        send(True)
    assert err.value.body["param"] == "stream_options.include_obfuscation" and err.value.body["code"] == "unsupported_field", err.value.body


def test_add_special_tokens_false_for_a_tasks_input_is_refused_not_dropped(served):
    """A task's input (chat to a task adapter, completions `input`, 'auto') is tokenized with the special tokens whatever
    `add_special_tokens` says: false was answered as if it had been read. It is a 400 naming it; true (what is done) and
    a raw prompt's false are answered."""
    for send in (lambda flag: served.client.chat.completions.create(model="gen_a", messages=CHAT, max_tokens=1, extra_body={"add_special_tokens": flag}),
                 lambda flag: served.client.completions.create(model="gen_a", prompt="", max_tokens=1, extra_body={"input": "hi", "add_special_tokens": flag}),
                 lambda flag: served.client.completions.create(model="auto", prompt="hi", extra_body={"add_special_tokens": flag})):
        with pytest.raises(openai.BadRequestError) as err:
            send(False)
        assert err.value.body["param"] == "add_special_tokens", err.value.body
        assert send(True).usage.prompt_tokens > 0
    raw = served.client.completions.create(model="gen_a", prompt="hi", max_tokens=1, extra_body={"add_special_tokens": False})
    assert raw.usage.prompt_tokens > 0


@pytest.mark.parametrize("model", ["base", "gen_a", "gen_prompt", "cls_a"])
def test_tokenize_counts_the_messages_a_chat_to_that_model_reads(served, model):
    """usage.prompt_tokens equals /tokenize's count for the same model and messages (vLLM's contract). A task adapter
    reads the last user message through its own template, which /tokenize counted as the whole chat template (21 tokens
    for a chat of 11 read)."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "ab cd"}]
    answer = served.client.chat.completions.create(model=model, messages=messages, max_tokens=1)
    counted = served.post("/tokenize", {"model": model, "messages": messages})
    assert counted.status_code == 200, counted.text
    assert answer.usage.prompt_tokens == counted.json()["count"], (model, answer.usage, counted.json())
    if model != "base":  # the system message is not read by a task's template: said on both routes
        assert counted.headers[IGNORED_HEADER] == "messages[0]"


def test_tokenize_refuses_auto_messages_whose_template_it_cannot_know(served):
    """'auto' picks the adapter, and so the template a chat is read with, by content: a count of the messages through any
    one template would not be what the chat reads. 7a0a1eb refuses it (400 naming `model`); it had no test."""
    r = served.post("/tokenize", {"model": "auto", "messages": CHAT})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
    assert served.post("/tokenize", {"model": "auto", "prompt": "hi"}).status_code == 200  # a prompt is counted as sent


def test_a_negative_seed_is_taken_and_repeats_as_vllm_takes_it(served):
    """vLLM takes any signed 64-bit seed (and clients send -1); it was a 400. A seeded draw repeats exactly, n choices too."""
    def draw(seed):
        r = served.client.completions.create(model="gen_b", prompt="ab", max_tokens=8, temperature=1.0, n=2, seed=seed)
        return [c.text for c in r.choices]
    assert draw(-1) == draw(-1) and draw(-(2**63)) == draw(-(2**63))
    assert draw(2**63 - 1) == draw(2**63 - 1)  # choice 1 draws with seed + 1, past the signed range: the generator takes it
    with pytest.raises(openai.BadRequestError) as err:
        draw(-(2**63) - 1)
    assert err.value.body["param"] == "seed"


def test_reasoning_effort_none_asks_for_what_is_done_and_is_answered(served):
    """openai's ReasoningEffort takes "none" (no reasoning), which this model does without asking; it was refused as if
    reasoning had been asked for. Any effort above none is still a 400 naming the field."""
    r = served.client.chat.completions.create(model="base", messages=CHAT, max_tokens=1, reasoning_effort="none")
    assert r.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as err:
        served.client.chat.completions.create(model="base", messages=CHAT, max_tokens=1, reasoning_effort="minimal")
    assert err.value.body["param"] == "reasoning_effort"


@pytest.mark.parametrize("key", ["user", "safety_identifier"])
def test_a_user_that_is_not_a_string_is_refused_not_left_out_of_the_log(served, key):
    """`user` (and safety_identifier) is written to the access log; a number was answered 200 and logged as nothing."""
    with pytest.raises(openai.BadRequestError) as err:
        served.client.chat.completions.create(model="base", messages=CHAT, max_tokens=1, extra_body={key: 42})
    assert err.value.body["param"] == key
    assert served.client.completions.create(model="base", prompt="ab", max_tokens=1, extra_body={key: "alice"}).usage.completion_tokens == 1


def test_a_refused_max_completion_tokens_is_named_as_sent(served):
    """max_completion_tokens 0 (no prompt_logprobs) was refused naming `max_tokens`, a field the client did not send."""
    with pytest.raises(openai.BadRequestError) as err:
        served.client.chat.completions.create(model="base", messages=CHAT, max_completion_tokens=0)
    assert err.value.body["param"] == "max_completion_tokens" and "`max_completion_tokens` is 0" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        served.client.chat.completions.create(model="base", messages=CHAT, max_tokens=0)
    assert err.value.body["param"] == "max_tokens"


@pytest.mark.parametrize("model", ["gen_a", "gen_prefix", "gen_prompt"])
def test_tokenize_says_the_context_a_request_to_that_model_may_fill(served, model):
    """/tokenize's max_model_len was the backbone's (512) for every model, while a prompt adapter's virtual tokens take 5
    of it (its card says 507): a client fitting prompts by it got a 400 for 508 to 512. It is the card's figure, and a
    prompt of that many tokens less one, with max_tokens 1, is answered."""
    card = served.client.models.retrieve(model).model_extra["max_model_len"]
    said = served.post("/tokenize", {"model": model, "prompt": "ab"}).json()["max_model_len"]
    assert said == card, (model, said, card)
    fits = served.client.completions.create(model=model, prompt=[5] * (said - 1), max_tokens=1)
    assert fits.usage.prompt_tokens + fits.usage.completion_tokens == said
    assert served.post("/tokenize", {"prompt": "ab"}).json()["max_model_len"] == served.client.models.retrieve("base").model_extra["max_model_len"]

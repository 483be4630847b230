"""The requests client libraries send (LangChain, LiteLLM, LlamaIndex), replayed with raw HTTP in the shape each sends,
and the answers they read: what a client raises or returns must be what the same request sent raw says.

The shapes were read from the libraries' traffic against the server (langchain-openai 1.8.1, litellm 1.110.2,
llama-index-llms-openai-like 0.8.1, openai 2.54.0); the tests need none of them installed.
"""


import httpx
import openai
import pytest

from adapterhub_lite.serving.answers import as_api_error
from adapterhub_lite.serving.manager import AdapterUnavailable

from .serving import KEY, Served, damaged_registry, slowed

# LangChain's `OpenAI` (completions) sends every prompt as a list and these defaults beside it
LANGCHAIN_COMPLETIONS = {"frequency_penalty": 0, "logprobs": None, "max_tokens": 256, "n": 1, "presence_penalty": 0, "seed": None,
                         "temperature": 0.0, "top_p": 1}


def test_an_overlong_request_says_in_the_words_clients_match_that_it_is_over_the_context(served):
    """LiteLLM raises ContextWindowExceededError (what its context-window fallbacks act on) only when the error's text
    holds one of its phrases, such as vLLM's and OpenAI's "This model's maximum context length is N tokens"; our code
    `context_length_exceeded` alone is not found in the compact JSON body it reads. Sent as LiteLLM's hosted_vllm sends it."""
    context = served.router.max_model_len
    r = served.post("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "word " * context}], "max_tokens": 10})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    message = r.json()["error"]["message"]
    assert f"this model's maximum context length is {context} tokens" in message.lower(), message
    assert "10 for the completion" in message and "in the prompt" in message, message  # still names every number
    r = served.post("/v1/completions", {"model": "base", "prompt": ["word " * context], **LANGCHAIN_COMPLETIONS})
    assert f"this model's maximum context length is {context} tokens" in r.json()["error"]["message"].lower(), r.text


def test_a_prompt_over_max_input_tokens_says_it_exceeds_the_configured_limit(serve_registry):
    """--max-input-tokens: the phrase LiteLLM and LangChain both read as a context overflow ("input tokens exceed the
    configured limit"), with the numbers."""
    s = Served(serve_registry, max_input_tokens=8)
    try:
        r = s.post("/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": "a long enough question"}], "max_tokens": 4})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
        message = r.json()["error"]["message"]
        assert "input tokens exceed the configured limit of 8" in message and "--max-input-tokens" in message, message
    finally:
        s.close()


def test_langchain_completions_with_a_task_input_are_answered(served):
    """LangChain's OpenAI(extra_body={"input": ...}).invoke("") sends `prompt: [""]`: an empty prompt, as the openai
    client's "" is, so the task's input is answered, with the same text as the openai client's shape."""
    for model, text in (("gen_a", "ab"), ("cls_a", "pos 1")):
        want = served.post("/v1/completions", {"model": model, "prompt": "", "input": text, "temperature": 0})
        got = served.post("/v1/completions", {"model": model, "prompt": [""], "input": text, **LANGCHAIN_COMPLETIONS})
        assert want.status_code == got.status_code == 200, (want.text, got.text)
        assert got.json()["choices"][0]["text"] == want.json()["choices"][0]["text"]
        assert got.json()["usage"] == want.json()["usage"]
    r = served.post("/v1/completions", {"model": "gen_a", "prompt": ["x"], "input": "ab"})  # a prompt that would go unread: still refused
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text


def test_an_unavailable_adapter_is_not_retried_by_the_openai_client(serve_registry, tmp_path):
    """An adapter whose files failed their check is a 503 until it is re-published and reloaded: a retry cannot cure it.
    The openai client (LangChain's and LlamaIndex's too) retries every 5xx unless x-should-retry says false, so the
    request was sent 3 times (12 through LlamaIndex's OpenAILike); it is now sent once and raises the 503 at once."""
    reg = damaged_registry(serve_registry, tmp_path)
    with pytest.warns(UserWarning, match="gen_b.*unavailable"):
        s = Served(reg)
    sent = []
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=2, http_client=httpx.Client(event_hooks={"request": [sent.append]}))
        with pytest.raises(openai.InternalServerError) as err:
            client.chat.completions.create(model="gen_b", messages=[{"role": "user", "content": "ab"}])
        assert err.value.status_code == 503 and err.value.body["code"] == "adapter_unavailable"
        assert len(sent) == 1 and err.value.response.headers["x-should-retry"] == "false"
        assert client.chat.completions.create(model="gen_a", messages=[{"role": "user", "content": "ab"}], max_tokens=2).choices  # the others are served
    finally:
        s.close()
    # the same refusal when the engine finds it (an adapter that fails as it is read for a batch)
    assert as_api_error(AdapterUnavailable("adapter 'x' is unavailable")).headers == {"x-should-retry": "false"}


def test_a_typed_error_is_answered_with_a_snake_case_code_not_a_class_name():
    """OpenAI's codes are words (model_not_found); a client matching `code` should not meet a Python class name."""
    from adapterhub_lite.core.errors import AdapterLoadError, SpecError

    assert as_api_error(SpecError("bad spec")).code == "spec_error"
    assert as_api_error(AdapterLoadError("bad folder")).code == "adapter_load_error"


# Bodies as huggingface_hub 2.4.0's InferenceClient(base_url=.../v1).chat_completion and openai 3.63.0's
# chat.completions.parse sent them (read through a logging proxy); none of these libraries is needed here.
HF_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}}
STRUCTURED = {
    "InferenceClient json_schema (sent as TGI's shape)": ({"response_format": {"type": "json_object", "value": HF_SCHEMA}}, "response_format"),
    "openai parse(response_format=<pydantic>)": ({"stream": False, "response_format": {"type": "json_schema", "json_schema": {
        "schema": {**HF_SCHEMA, "required": ["name"], "title": "Person", "additionalProperties": False}, "name": "Person", "strict": True}}},
        "response_format"),
    "InferenceClient tools, tool_choice auto": ({"tool_choice": "auto", "tools": [{"type": "function", "function": {"name": "f", "parameters": HF_SCHEMA}}]},
                                                "tool_choice"),
    "tools with tool_choice none": ({"tool_choice": "none", "tools": [{"type": "function", "function": {"name": "f", "parameters": HF_SCHEMA}}]}, "tools"),
}


@pytest.mark.parametrize("case", list(STRUCTURED))
def test_structured_output_requests_are_refused_naming_the_field_streamed_or_not(served, case):
    """Structured output and tools are refused (400, the field named), never ignored; a streamed one before its stream starts."""
    extra, param = STRUCTURED[case]
    for stream in (False, True):
        body = {"model": "base", "messages": [{"role": "user", "content": "Ada Lovelace, 36"}], **extra, "stream": stream}
        r = served.post("/v1/chat/completions", body)
        assert r.status_code == 400 and r.headers["content-type"].startswith("application/json"), (case, stream, r.text)
        error = r.json()["error"]
        assert error["param"] == param and error["code"] == "unsupported_field" and "does not implement" in error["message"], error


def test_inference_client_bodies(served):
    """InferenceClient's chat body (always `stream`) is answered; with no model, or the server's URL as model, it sends
    "dummy", which is a 404 as vLLM's; its TGI-only `tool_prompt` is named as a field not read."""
    messages = [{"role": "user", "content": "ab"}]
    r = served.post("/v1/chat/completions", {"model": "gen_a", "messages": messages, "max_tokens": 4, "tool_prompt": "x", "stream": False})
    assert r.status_code == 200 and r.headers["x-adapterhub-ignored-fields"] == "tool_prompt", r.text
    r = served.post("/v1/chat/completions", {"model": "dummy", "messages": messages, "max_tokens": 4, "stream": False})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text


def test_a_tool_result_message_is_refused_saying_tools_are_not_called(served):
    """A history with a tool's result (openai's {"role": "tool", "tool_call_id", "content"}, as agent loops send it) was
    refused as if the message were malformed ("each message needs a role ... and content", though it has both): the
    refusal now names the role and why, so the client's error says what to change."""
    messages = [{"role": "user", "content": "what is 6 x 7?"}, {"role": "tool", "tool_call_id": "call_1", "content": "42"}]
    for model in ("base", "gen_a"):
        r = served.post("/v1/chat/completions", {"model": model, "messages": messages, "max_tokens": 4})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages[1].role", r.text
        assert '"tool"' in r.json()["error"]["message"] and "does not call tools" in r.json()["error"]["message"]


def test_a_function_result_message_is_refused_as_a_tool_result_is(served):
    """OpenAI's deprecated function-calling history ({"role": "function", "name", "content"}, still sent by older agent
    code) is well formed too: its refusal names the role and why, not a malformed message."""
    messages = [{"role": "user", "content": "what is 6 x 7?"}, {"role": "function", "name": "multiply", "content": "42"}]
    r = served.post("/v1/chat/completions", {"model": "base", "messages": messages, "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[1].role", r.text
    assert '"function"' in r.json()["error"]["message"] and "does not call tools" in r.json()["error"]["message"]


def test_a_developer_message_is_read_as_a_system_one(served):
    """OpenAI's newer clients send the system prompt as role "developer"; vLLM's templates read it as "system". It is
    answered (the refusal's own line lists it as accepted), on the very prompt a system message makes."""
    def prompt(role):
        messages = [{"role": role, "content": "Answer briefly."}, {"role": "user", "content": "hi"}]
        r = served.post("/v1/chat/completions", {"model": "base", "messages": messages, "max_tokens": 1, "return_token_ids": True})
        assert r.status_code == 200, r.text
        return r.json()["prompt_token_ids"]
    assert prompt("developer") == prompt("system")


def counted_client(s, sent: list) -> openai.OpenAI:
    """The openai client with its default retries (max_retries=2), counting what reaches the server's engine in `sent`."""
    submit = s.engine.submit

    def counting(*jobs):
        sent.append(len(jobs))
        return submit(*jobs)

    s.engine.submit = counting
    return openai.OpenAI(base_url=s.url + "/v1", api_key=KEY, max_retries=2)


def test_a_request_past_the_timeout_is_not_run_again_by_the_openai_client(serve_registry, monkeypatch):
    """A 504 (the request ran past --request-timeout) was retried by the openai client, as every 5xx is: one slow request
    ran 3 times, tripling the load just when the server was too slow. The same work meets the same timeout again, so the
    504 says x-should-retry: false and the request runs once."""
    s = Served(serve_registry, request_timeout=0.3)
    sent = []
    try:
        slowed(s, monkeypatch)  # 400 tokens at 0.05 s a step: surely past 0.3 s
        client = counted_client(s, sent)
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(model="gen_a", prompt="ab", max_tokens=400, extra_body={"ignore_eos": True})
        assert sent == [1], sent
        assert err.value.status_code == 504 and err.value.body["code"] == "request_timeout", err.value
        assert err.value.response.headers["x-should-retry"] == "false"
    finally:
        s.close()


def test_an_engine_fault_is_not_run_again_by_the_openai_client(serve_registry, monkeypatch):
    """A 500 (a fault of the server's own) was retried twice by the openai client. The server cannot tell a passing fault
    from one the request causes, and a request that breaks a decode step breaks it again, failing every row beside it
    each time (an out-of-memory at admission already waits for memory on the server), so the 500 says x-should-retry: false."""
    s = Served(serve_registry)
    sent = []
    try:
        def broken(*args, **kwargs):
            raise RuntimeError("decode fault")

        monkeypatch.setattr(s.router.bank, "step", broken)
        client = counted_client(s, sent)
        with pytest.raises(openai.InternalServerError) as err:
            client.completions.create(model="gen_a", prompt="ab", max_tokens=4)
        assert sent == [1], sent
        assert err.value.status_code == 500 and "decode fault" in err.value.body["message"], err.value
        assert err.value.response.headers["x-should-retry"] == "false"
    finally:
        s.close()


def test_refusals_a_retry_can_cure_invite_one():
    """A full queue (429) and a server shutting down (503: another replica, or this one restarted, takes it) are cured by
    waiting: they say when to retry and never x-should-retry: false; the openai client retries them."""
    from adapterhub_lite.serving.jobs import QueueFull, ShuttingDown

    for exc in (QueueFull("full"), ShuttingDown("stopping")):
        headers = as_api_error(exc).headers
        assert headers.get("retry-after") == "1" and headers.get("x-should-retry") != "false", (exc, headers)

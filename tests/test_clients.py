"""The requests client libraries send (LangChain, LiteLLM, LlamaIndex), replayed with raw HTTP in the shape each sends,
and the answers they read: what a client raises or returns must be what the same request sent raw says.

The shapes were read from the libraries' traffic against the server (langchain-openai 1.8.1, litellm 1.110.2,
llama-index-llms-openai-like 0.8.1, openai 2.54.0); the tests need none of them installed.
"""

from .serving import Served

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

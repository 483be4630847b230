"""OpenAI request and response shapes: what a prompt or a message may be, and how answers are written.

Parsing is strict where a silent guess would give a wrong answer (a non-string message, a
token id outside the vocabulary): such a request gets a 400 naming the field, the value and the
fix, in OpenAI's error shape. Which fields exist and what the server does with each is
serve/params.py.
"""

from __future__ import annotations

import json
import re
import time
import uuid

from adapterhub_lite.core.errors import AdapterHubError
from adapterhub_lite.core.names import AUTO
from adapterhub_lite.core.numbers import is_count


class ApiError(AdapterHubError):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "code", "param"}} with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 headers: dict | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.type, self.code, self.headers, self.param = status, type, code, headers or {}, param

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "code": self.code, "param": self.param}}


def error_code(exc: Exception) -> str:
    """A typed error's `code` in an answer: its class name as a snake_case word (AdapterLoadError → adapter_load_error),
    as OpenAI's codes are (model_not_found), not a Python class name."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(exc).__name__).lower()


# Whether a client should send a refused request again. The openai client, and LangChain and LlamaIndex through it, retry
# every 5xx, 408, 409 and 429 unless x-should-retry says false (openai's _base_client._should_retry), after retry-after
# seconds when given: one request became 3 (openai's default max_retries=2) or 12 (LlamaIndex's OpenAILike, over 12 s).
# Only what waiting cures invites a retry (a full queue; a server shutting down, whose replacement takes it): RETRY_SOON.
# The rest say NO_RETRY: a timeout (504) runs the same work into the same deadline, a fault of ours (500) meets the same
# fault, an adapter that failed its checks (503) stays refused until re-published; each retry adds that load just when
# the server can least take it.
NO_RETRY = {"x-should-retry": "false"}
RETRY_SOON = {"retry-after": "1"}


def unavailable(message: str) -> ApiError:
    """The 503 for an adapter that failed its checks (`adapter_unavailable`): the server's files, not the request, are at
    fault, and no retry cures it (NO_RETRY) until the adapter is re-published and reloaded."""
    return ApiError(503, message, "server_error", "adapter_unavailable", headers=NO_RETRY)


def bad(field: str, value, fix: str, code: str = "invalid_value") -> ApiError:
    """A 400 naming the field, the value seen (shortened, as the JSON the client sent: `true`, `null`, "x") and the fix."""
    try:
        shown = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):  # not a JSON value (a caller passed a Python object): its repr
        shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return ApiError(400, f"`{field}` is {shown}; {fix}", code=code, param=field)


# -- requests --------------------------------------------------------------------------------------

def prompts(value, vocab: int) -> list[dict]:
    """`prompt` as router requests: a string, a list of strings, a token-id list, or a list of token-id lists."""
    def ids(x) -> bool:
        return isinstance(x, list) and bool(x) and all(is_count(t) for t in x)

    if isinstance(value, str):
        items = [value]
    elif ids(value):
        items = [value]
    elif isinstance(value, list) and value and all(isinstance(p, str) or ids(p) for p in value):
        items = value
    else:
        raise bad("prompt", value, "give a string, a list of strings, a list of token ids or a list of token-id lists")
    out = []
    for p in items:
        if isinstance(p, str):
            out.append({"prompt": p})
            continue
        outside = [t for t in p if not 0 <= t < vocab]
        if outside:
            raise bad("prompt", value, f"token id {outside[0]} is outside this model's vocabulary [0, {vocab})")
        out.append({"prompt_ids": list(p)})
    return out


# keys a request to the engine carries as its own settings, never as task columns: in `input` they answered through
# another adapter than `model` names ("adapter") or continued a raw prompt instead of answering the task ("prompt")
ENGINE_KEYS = ("adapter", "prompt", "prompt_ids")


def task_input(value, model: str) -> dict:
    """The `input` of a task-aware request: the task's columns (a dict) or one text (a string).

    The columns' values are judged where predict, infer and Router.run judge them (core.data.request_row: a missing
    column, null, an object or list, no text), so each entry point names the same problem."""
    if isinstance(value, str):
        return {"text": value}
    if isinstance(value, dict):
        if model == AUTO:
            raise bad("input", value, "'auto' routes by one text: send input as a string")
        taken = [k for k in ENGINE_KEYS if k in value]
        if taken:
            raise bad("input", value, f"{taken[0]!r} is a request's own key, not read as a task column: name the adapter in `model`, send a "
                      "raw prompt as `prompt`, and give `input` the task's columns only (a one-column prompt takes one string)")
        return dict(value)
    raise bad("input", value, "give the task's columns as an object of strings (e.g. {\"sentence\": \"...\"}) or one string")


def chat_text(content, where: str) -> str:
    """A message's content as one string (a string, or OpenAI's list of text parts). Parts are joined with a newline,
    as vLLM joins them for a template that reads content as a string (SmolLM2's): the same prompt, the same tokens."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return "\n".join(p["text"] for p in content)
    raise bad(where, content, "give message content as a string or a list of {\"type\": \"text\", \"text\": ...} parts")


MESSAGE_KEYS = ("role", "content", "name")  # what a chat template is given of each message (vLLM gives these too)


def check_messages(messages) -> list[dict]:
    """`messages` as vLLM hands them to the chat template: {"role", "content"} with string contents ("developer" read as
    "system"), and the speaker's "name" where one is given. Other keys are not read (see unread_message_keys)."""
    if not isinstance(messages, list) or not messages:
        raise bad("messages", messages, "give a non-empty list of {\"role\", \"content\"} objects")
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, dict) and m.get("role") in ("tool", "function"):  # a well-formed message: say what is not done, not that it is malformed
            raise bad(f"messages[{i}].role", m["role"], "this server does not call tools, so no call awaits a tool's result; "
                      "send the result as a user message")
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise bad(f"messages[{i}]", m, "each message needs a role (system, developer, user or assistant) and content")
        if m.get("tool_calls"):  # with or without content: the calls would reach no template and no tool
            raise bad(f"messages[{i}].tool_calls", m["tool_calls"], "this server does not call tools; send the assistant's text as content")
        content = m.get("content")
        if content is None and m["role"] == "assistant":  # OpenAI and vLLM take an assistant turn with no content
            content = ""
        message = {"role": "system" if m["role"] == "developer" else m["role"], "content": chat_text(content, f"messages[{i}].content")}
        if m.get("name") is not None:
            if not isinstance(m["name"], str):
                raise bad(f"messages[{i}].name", m["name"], "give the speaker's name as a string, or leave it out")
            message["name"] = m["name"]
        out.append(message)
    return out


def unread_message_keys(messages: list) -> list[str]:
    """The keys of the (checked) chat messages that nothing here reads, as messages[i].key: named aloud, not dropped."""
    return [f"messages[{i}].{k}" for i, m in enumerate(messages) for k, v in m.items() if k not in MESSAGE_KEYS and v is not None]


def render_chat(tokenizer, messages: list[dict], **kwargs) -> tuple[str, list[str]]:
    """The chat template's text for checked `messages`, and the speakers' names it does not read (messages[i].name): a
    template that renders the same text without them ignores them (SmolLM2's does), which the caller says aloud."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    named = [i for i, m in enumerate(messages) if "name" in m]
    if named and tokenizer.apply_chat_template([{k: v for k, v in m.items() if k != "name"} for m in messages], tokenize=False, **kwargs) == text:
        return text, [f"messages[{i}].name" for i in named]
    return text, []


# -- responses -------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    """A fresh response id, e.g. cmpl-3f2a…"""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(results, n: int = 1) -> dict:
    """OpenAI's usage object over a request's choices, in choice order: n per prompt (None for one that did not
    finish). Each prompt is counted once however many choices continue it (as OpenAI and vLLM count: the prompt is
    read once), every choice's completion tokens are counted."""
    groups = [results[i:i + n] for i in range(0, len(results), n)]
    p = sum(next((r.prompt_tokens for r in group if r is not None), 0) for group in groups)
    c = sum(r.completion_tokens for r in results if r is not None)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def usage_so_far(prompt_tokens: int, completion_tokens: int) -> dict:
    """One choice's usage while it streams (vLLM's `continuous_usage_stats`): its prompt's tokens and those generated
    so far."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def token_id_text(token: int) -> str:
    """A token as vLLM's `return_tokens_as_token_ids` names it: "token_id:<id>", which every token has, where its text
    may be a piece of a character or the same text as another token's (so two alternatives keep apart keys)."""
    return f"token_id:{token}"


def completion_logprobs(tokenizer, entries: list, top_k: int, offset: int = 0, as_ids: bool = False) -> dict:
    """Legacy completions logprobs: tokens (each the text it added, so they join to the text), token_logprobs,
    top_logprobs (the top k and the chosen token, as vLLM; null for logprobs 0, as OpenAI) and text_offset
    (from `offset`: where this part starts in the whole text, so a stream's offsets run on).

    The chosen token is keyed in its top_logprobs by the same text as in `tokens` (the text it added, which differs
    from its own decoding where a stop string cuts it or a character spans tokens), so top_logprobs[i][tokens[i]]
    is its log-prob (and the first key): lm-eval's greedy check compares the best key with tokens[i]. An alternative whose
    text is a key already (another token's) is keyed "token_id:<id>", so none is lost. With `as_ids` (vLLM's
    return_tokens_as_token_ids) every token and key is "token_id:<id>" instead; text_offset still counts the text."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [] if top_k else None, "text_offset": []}
    for e in entries:
        shown = token_id_text(e.token) if as_ids else e.text
        out["tokens"].append(shown)
        out["token_logprobs"].append(e.logprob)
        if top_k:
            top = None
            if e.top is not None:
                top = {shown: e.logprob}  # the chosen token first, as vLLM orders them (an echoed prompt's is often not the best)
                for t, lp in e.top[:top_k]:
                    if t == e.token:
                        continue
                    key = token_id_text(t) if as_ids else tokenizer.decode([t])
                    # two tokens of one text (byte pieces, each "\ufffd" alone; "a" and "▁a"): a dict holds one, and the other
                    # would vanish: fewer alternatives than asked (vLLM loses them so). It is named by its id instead.
                    top[token_id_text(t) if key in top else key] = lp
            out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(e.text)
    return out


def chat_logprobs(tokenizer, entries: list, as_ids: bool = False) -> dict:
    """Chat logprobs: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}; "token" is the text it added,
    and the chosen token's alternative carries the same text (see completion_logprobs). With `as_ids` each "token" is
    "token_id:<id>" and "bytes" that string's, as vLLM's return_tokens_as_token_ids gives them."""
    def shown(e, tok):
        return token_id_text(tok) if as_ids else e.text if tok == e.token else tokenizer.decode([tok])

    def alt(e, tok, lp):
        text = shown(e, tok)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}
    return {"content": [{**alt(e, e.token, e.logprob), "top_logprobs": [alt(e, t, lp) for t, lp in (e.top or [])]} for e in entries]}


def prompt_logprobs(tokenizer, scores, top_k: int) -> list:
    """vLLM's prompt_logprobs: per prompt token None (the first) or {token id: {logprob, rank, decoded_token}}
    for the token itself and the top k."""
    out = [None]
    for tok, lp, rank, top in list(zip(scores.tokens, scores.logprobs, scores.ranks, scores.top))[1:]:
        position = {str(tok): {"logprob": lp, "rank": rank, "decoded_token": tokenizer.decode([tok])}}
        for r, (t, v) in enumerate(top[:top_k], 1):
            position.setdefault(str(t), {"logprob": v, "rank": r, "decoded_token": tokenizer.decode([t])})
        out.append(position)
    return out


def completion_body(rid: str, model: str, choices: list[dict], results, n: int = 1, created: int | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created or int(time.time()), "model": model,
            "choices": choices, "usage": usage(results, n)}


def chat_body(rid: str, model: str, choices: list[dict], results, n: int = 1) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model, "choices": choices, "usage": usage(results, n)}

"""OpenAI request and response shapes: what a body may say, and how the server answers.

Parsing is strict where a silent guess would give a wrong answer (an unsupported sampling
parameter, n > 1, a non-string prompt): such a request gets a 400 naming the field, the value
and the fix, in OpenAI's error shape. Fields clients send that change nothing (user, seed for
greedy requests, …) are accepted.
"""

from __future__ import annotations

import time
import uuid

from ..errors import AdapterHubError


class ApiError(AdapterHubError):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.type, self.code, self.headers = status, type, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "code": self.code, "param": None}}


def bad(field: str, value, fix: str) -> ApiError:
    shown = repr(value) if not isinstance(value, str) or len(value) < 60 else repr(value[:57] + "...")
    return ApiError(400, f"`{field}` is {shown}; {fix}", code="invalid_value")


# Parameters that would change the answer and that the server does not implement: refused, not ignored.
_UNSUPPORTED = {"n": 1, "best_of": 1, "echo": False, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None,
                "suffix": None, "tools": None, "tool_choice": None, "response_format": None, "functions": None}


def check_unsupported(body: dict) -> None:
    for name, neutral in _UNSUPPORTED.items():
        value = body.get(name, neutral)
        if value not in (neutral, None) and not (name == "response_format" and value == {"type": "text"}):
            raise bad(name, value, f"this server supports only {name}={neutral!r}; drop it from the request")


def number(body: dict, name: str, default, low: float, high: float, kind=float):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise bad(name, value, f"give {'an integer' if kind is int else 'a number'} between {low} and {high}")
    if not low <= value <= high:
        raise bad(name, value, f"give a value between {low} and {high}")
    return kind(value)


def stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise bad("stop", stop, "give a non-empty string or a list of up to 4 non-empty strings")
    return tuple(stops)


def task_input(value, model: str) -> dict:
    """The `input` of a task-aware request: the task's columns (a dict) or one text (a string)."""
    if isinstance(value, str):
        return {"text": value}
    if isinstance(value, dict) and value and all(isinstance(k, str) and isinstance(v, (str, int, float)) for k, v in value.items()):
        if model == "auto":
            raise bad("input", value, "'auto' routes by one text: send input as a string")
        return dict(value)
    raise bad("input", value, "give the task's columns as an object of strings (e.g. {\"sentence\": \"...\"}) or one string")


def chat_text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise bad(where, content, "give message content as a string or a list of {\"type\": \"text\", \"text\": ...} parts")


def check_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise bad("messages", messages, "give a non-empty list of {\"role\", \"content\"} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise bad(f"messages[{i}]", m, "each message needs a role (system, user or assistant) and content")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": chat_text(m.get("content"), f"messages[{i}].content")})
    return out


# -- responses -----------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(results) -> dict:
    p = sum(r.prompt_tokens for r in results)
    c = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def completion_logprobs(tokenizer, steps: list) -> dict:
    """Legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0
    for tok, info in steps:
        text = tokenizer.decode([tok])
        out["tokens"].append(text)
        out["token_logprobs"].append(info[0])
        out["top_logprobs"].append({tokenizer.decode([t]): lp for t, lp in info[1]} or None)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(tokenizer, steps: list) -> dict:
    """Chat logprobs: {"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}."""
    def entry(tok, lp):
        text = tokenizer.decode([tok])
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}
    return {"content": [{**entry(tok, info[0]), "top_logprobs": [entry(t, lp) for t, lp in info[1]]} for tok, info in steps]}


def completion_body(rid: str, model: str, choices: list[dict], results, created: int | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": created or int(time.time()), "model": model,
            "choices": choices, "usage": usage(results)}


def chat_body(rid: str, model: str, choices: list[dict], results) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model, "choices": choices, "usage": usage(results)}

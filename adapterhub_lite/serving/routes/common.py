"""What every route shares: the objects the app serves, the JSON body reader and the runtime-loading check.

create_app (serving/api.py) puts one `ServerState` on `app.state.server`; a route reaches it with
`server(request)`, so the routers hold no engine of their own and one module serves any app.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import JSONResponse

from adapterhub_lite.core.text import WrittenFloat, nested_too_deep
from adapterhub_lite.serving import protocol as P
from adapterhub_lite.serving.engine import Engine
from adapterhub_lite.serving.handlers import Handlers, Settings
from adapterhub_lite.serving.runtime import Catalogue


@dataclass(frozen=True)
class ServerState:
    """The engine an app serves, its settings, its catalogue of adapters and the routes' work over them."""

    engine: Engine
    settings: Settings
    catalogue: Catalogue
    handlers: Handlers


def server(request: Request) -> ServerState:
    """The served objects of the app that received `request` (set by create_app)."""
    return request.app.state.server


def error_response(err: P.ApiError) -> JSONResponse:
    """An API error as the JSON answer a client receives (its status and headers)."""
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def read_json(request: Request) -> dict:
    """The request's body as a JSON object, or an ApiError: 413 past --max-body-bytes, 415 unless sent as
    application/json, 400 when not a JSON object."""
    limit = server(request).settings.max_body_bytes
    body = b""
    async for chunk in request.stream():  # a body without content-length is counted as it arrives
        body += chunk
        if len(body) > limit:
            raise P.ApiError(413, f"request body is over the limit of {limit} bytes; send less", code="body_too_large")
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media != "application/json":
        # As vLLM: a browser sends a form or text/plain POST from any page without asking first (no CORS preflight),
        # so a body read as JSON whatever its type would let any web page run requests (load adapters) on a local server.
        raise P.ApiError(415, f"the body is sent as {media or 'no Content-Type'!r}; send it as JSON with the header "
                         "Content-Type: application/json", code="unsupported_media_type")
    try:
        if nested_too_deep(body):  # told before the parser recurses to the interpreter's limit (see nested_too_deep)
            raise RecursionError("nested too deep")
        # A number keeps its written text (as data files and predict --input read it, core.text): a task input's
        # {"text": 2.50} is the prompt "2.50" there, and str() of the parsed float would make it "2.5" here.
        data = json.loads(body, parse_float=WrittenFloat)
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, an integer of over 4,300 digits, brackets nested past the recursion limit
        # Python's own words for the last two name a word cut at 60 characters ('a JSON objec') or a server-side fix
        # (sys.set_int_max_str_digits), not what the client sent: said in the client's terms
        why = (exc.msg if isinstance(exc, json.JSONDecodeError)
               else "arrays or objects nested too deep; nest a few levels, not thousands" if isinstance(exc, RecursionError)
               else "a number of over 4,300 digits; send a shorter one" if "integer string conversion" in str(exc)
               else f"{type(exc).__name__}: {str(exc)[:60]}")
        raise P.ApiError(400, f"request body is not valid JSON ({why}); send a JSON object", code="invalid_json") from None
    if not isinstance(data, dict):
        raise P.ApiError(400, f"request body is a JSON {type(data).__name__}; send a JSON object", code="invalid_json")
    if _SURROGATE_ESCAPE.search(body):  # only an escape can put a surrogate in a string (UTF-8 bytes cannot hold one)
        where = lone_surrogate(data)
        if where is not None:
            shown = where.encode("utf-8", "backslashreplace").decode()  # a key may hold it too; the answer's JSON must encode
            raise P.ApiError(400, f"`{shown}` holds a lone UTF-16 surrogate (a \\uD800-\\uDFFF escape without its pair), which is "
                             "no character and no tokenizer reads; send the character itself or both halves of its pair",
                             code="invalid_value", param=shown)
    return data


# \uD800-\uDFFF written as a JSON escape (a valid pair matches too; lone_surrogate tells them apart)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def lone_surrogate(data) -> str | None:
    """Where the parsed body holds a string with a lone UTF-16 surrogate, as a path (`messages[0].content`, a key's own
    path for a key), or None. JSON lets a string escape one half of a pair alone (json.loads keeps it), but that is no text:
    the tokenizer raises a TypeError on it (which would be a 500), and the answer's UTF-8 cannot hold it. vLLM's pydantic
    parser refuses such a body with a 400 too."""
    stack = [("", data)]
    while stack:  # a loop, not recursion: json.loads read bodies nested nearly as deep as the recursion limit
        path, value = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    return path or "the body"
        elif isinstance(value, dict):
            for key, item in value.items():
                at = f"{path}.{key}" if path else key
                stack.append((at, key))
                stack.append((at, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
    return None


def runtime_allowed(request: Request) -> None:
    """Refuse (403) loading or unloading adapters at run time unless the server was started with --allow-runtime-loading."""
    if not server(request).settings.allow_runtime_loading:
        raise P.ApiError(403, "loading adapters at run time is off; start the server with --allow-runtime-loading", "permission_error", "runtime_loading_off")

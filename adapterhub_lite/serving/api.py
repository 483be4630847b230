"""The HTTP server: OpenAI-compatible routes over the engine (FastAPI + uvicorn, as vLLM).

    adapterhub-lite serve --registry adapters/ --port 8000

Every adapter is a `model`: `sst2` (its latest version), `sst2@1.0.0`, `base` (the backbone alone)
or `auto` (picked by content). Requests to one server share its batches (serve/engine.py); what
each route does with a request is serve/handlers.py, which fields exist serve/params.py; the routes
themselves are APIRouters in serving/routes/ (OpenAI, tokenizer, admin), included here.

Around every route, in this order from the outside: CORS (only with --allowed-origins), the access
log (one line per request), then the API key and the body-size limit (plain ASGI middleware).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import os
import time

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from starlette._utils import get_route_path  # the path routing matches (after root_path); FastAPI's routing imports it alike
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.routing import Match

from adapterhub_lite.core import __version__
from adapterhub_lite.model.backbone import default_device
from adapterhub_lite.serving import protocol as P
from adapterhub_lite.serving.answers import ClientGone
from adapterhub_lite.serving.engine import Engine
from adapterhub_lite.serving.handlers import Handlers, Settings
from adapterhub_lite.serving.params import IGNORED_HEADER, ROUTING_HEADER
from adapterhub_lite.serving.router import Router
from adapterhub_lite.serving.routes import admin, openai, tokenizer
from adapterhub_lite.serving.routes.common import ServerState, error_response
from adapterhub_lite.serving.runtime import Catalogue
from adapterhub_lite.serving.scheduler import Budgets

access_log = logging.getLogger("adapterhub_lite.serve.access")
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
# uvicorn's HTTP parser, named rather than left to its "auto", which takes httptools wherever it is importable (uvicorn[standard],
# which vLLM and ray[serve] pull in) and h11 elsewhere: the two answer some requests differently before the app sees them
# (httptools a bare 400 to a method outside HTTP's own, BREW; h11 hands it to the app: a 404 in the error shape, counted in
# /metrics). h11 is what our dependency (plain uvicorn) installs, so every install answers alike. It costs more per streamed
# chunk: 14-17k SSE chunks/s against httptools' 22-24k (8 streams x 20k chunks, client in-process, 2 shared CPU cores), while
# 64 tiny-model streams x 64 tokens took 4.2 s under either (3.7-4.5 s, noise). Should HTTP show on a GPU's token rate, name
# "httptools" here and add it to the dependencies: still one parser, whatever is installed.
HTTP_PARSER = "h11"


def refusal(settings: Settings, scope) -> P.ApiError | None:
    """What a request is refused for before any body is read or any work done (None: nothing): a missing or wrong API key
    on /v1/*, then a content-length past the body limit. The Guard answers it; a Ray replica (serving/scale.py) checks it
    before loading the request's adapter, so a client without the key makes it do nothing, as here."""
    headers = Headers(scope=scope)
    if settings.api_key and get_route_path(scope).startswith("/v1/"):  # the route's path: after a proxy's root_path (serving/scale.py)
        given = headers.get("authorization", "")
        token = given[7:] if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), settings.api_key.encode()):  # constant time: no key guessing by timing
            return P.ApiError(401, "missing or wrong API key; send Authorization: Bearer <key>", "authentication_error", "invalid_api_key")
    length = headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
        return P.ApiError(413, f"request body of {length} bytes is over the limit of {settings.max_body_bytes} bytes; send less",
                          code="body_too_large")
    return None


class Guard:
    """The API key (on /v1/*) and the body-size limit, checked before any body is read (`refusal`)."""

    def __init__(self, app, settings: Settings, refuse):
        self.app, self.settings, self.refuse = app, settings, refuse

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            problem = refusal(self.settings, scope)
            if problem is not None:
                return await self.refuse(problem)(scope, receive, send)
        await self.app(scope, receive, send)


class AccessLog:
    """One line per request, written when its last byte is sent (or the client leaves): id, route, status, model,
    the adapter that answered, tokens, latency. The routes fill scope["state"]["access"]; a request's ignored
    fields go out in the IGNORED_HEADER response header, how `auto` chose its adapters in the ROUTING_HEADER one."""

    def __init__(self, app, count=None, routes=()):
        self.app, self.count, self.routes = app, count, routes  # count(handler, method, status): ServeMetrics.responded

    def handler(self, scope) -> str:
        """The route's template (a model id in /v1/models/{model_id} would make a series per name); a request refused
        before routing (401, 413) is matched here, so it counts under its route too; 'unmatched' for no route."""
        route = scope.get("route") or next((r for r in self.routes if r.matches(scope)[0] != Match.NONE), None)
        return getattr(route, "path", "unmatched")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, logged = time.monotonic(), [None], [False]
        access = scope.setdefault("state", {})["access"] = {}

        def log():
            if not logged[0]:
                logged[0] = True
                access_log.info("%s %s %s status=%s model=%s adapter=%s prompt_tokens=%s completion_tokens=%s latency_ms=%.0f%s",
                                access.get("id", "-"), scope["method"], scope["path"], access.get("status", status[0]),
                                access.get("model", "-"), access.get("adapter", "-"), access.get("prompt_tokens", "-"),
                                access.get("completion_tokens", "-"), 1000 * (time.monotonic() - start),
                                "".join(f" {k}={access[k]}" for k in ("user", "safety_identifier") if k in access))
                if self.count is not None:
                    # the status as logged: what was sent, or the route's 499 / 504 where a stream's 200 went out before its end
                    # a method outside HTTP's own is 'other': a client choosing it must not add series to /metrics
                    method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
                    self.count(self.handler(scope), method, access.get("status", status[0] or 499))

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                for header, key in ((IGNORED_HEADER, "ignored"), (ROUTING_HEADER, "routing")):
                    if access.get(key):
                        message = {**message, "headers": [*message.get("headers", []), (header.encode(), ",".join(access[key]).encode())]}
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                log()  # before the last byte goes: a client that has its answer finds its line written
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception:
            status[0] = status[0] or 500  # answered 500 by the app's outermost handler, after this middleware: logged so
            raise
        finally:
            log()  # a request that ended without a last body (the client left, an error)


def token_budget(requested: int | None, max_rows: int, device) -> int:
    """`--max-num-batched-tokens`: as given, or by default 2048 on a CPU and 8192 on a GPU, never below `max_rows`.

    A step's prefill is bounded by default, as vLLM bounds it. Measured on 2 CPU cores, 64 clients: prompts of ~64
    tokens (aiperf) unbounded 2.3 requests/s, median TTFT 13-21 s (every newcomer prefilled in one step while the
    decoding rows stalled); 2048: 3.5 requests/s, 7.1 s; 512: 3.9-4.1, 3.3 s. Prompts of ~15 tokens (bench_serve):
    unbounded 13.6, 2048 13.9, 512 11.7 requests/s, so 2048 loses nothing there. The GPU figure is vLLM's online
    default, not measured here.
    """
    if requested is not None:
        return requested
    return max(max_rows, 8192 if str(device).startswith("cuda") else 2048)


def build_app(options) -> tuple[FastAPI, Engine, Catalogue]:
    """The server of `adapterhub-lite serve` from its options (the parsed flags, or any object with those attributes):
    the router over the registry, the engine under its budgets, and the app; used by the CLI and by each Ray Serve
    replica (serving/scale.py), so both serve one app."""
    o = options
    key = o.api_key or os.environ.get("ADAPTERHUB_API_KEY") or None
    tokens = token_budget(o.max_num_batched_tokens, o.max_batch_rows, o.device or default_device())
    budgets = Budgets(max_rows=o.max_batch_rows, max_num_batched_tokens=tokens, max_loras=o.max_loras)  # checked before the backbone loads
    router = Router.from_registry(o.registry, quantization=o.quantization, device=o.device, dtype=o.dtype,
                                  memory_budget_mb=o.memory_budget_mb, allow_base_mismatch=o.allow_base_mismatch,
                                  max_model_len=o.max_model_len, max_cpu_loras=o.max_cpu_loras,
                                  max_lora_rank=o.max_lora_rank, max_loras=o.max_loras, route_threshold=o.route_threshold)
    if o.kv_cache_mb is not None:  # in cache positions of this backbone
        budgets = dataclasses.replace(budgets, max_kv_tokens=int(o.kv_cache_mb * 2**20 // router.bank.kv_bytes_per_token()))
    engine = Engine(router, max_queue=o.max_queue, budgets=budgets, static_decode=o.decode_cache == "static", cuda_graphs=o.cuda_graphs)
    settings = Settings(max_input_tokens=o.max_input_tokens, max_tokens=o.max_tokens, request_timeout=o.request_timeout,
                        max_body_bytes=o.max_body_bytes, api_key=key, allow_runtime_loading=o.allow_runtime_loading,
                        allowed_origins=tuple(o.allowed_origins or ()))
    catalogue = Catalogue(engine, max_merges=o.max_merges)
    return create_app(engine, settings, catalogue), engine, catalogue


def create_app(engine: Engine, settings: Settings, catalogue: Catalogue) -> FastAPI:
    """The FastAPI app serving `engine`; the engine's thread starts and stops with the app."""

    async def lifespan(app):
        engine.start()
        yield
        # uvicorn has stopped accepting and waited for open requests; finish what is queued, then stop.
        # The merges' scratch folder goes here: uvicorn re-raises SIGTERM afterwards, so no finalizer would run.
        await asyncio.to_thread(engine.stop)
        engine.router.close()

    app = FastAPI(title="adapterhub-lite", version=__version__, lifespan=lifespan)
    app.state.server = ServerState(engine, settings, catalogue, Handlers(engine, settings, catalogue))  # what the routes reach

    @app.exception_handler(P.ApiError)
    async def _api_error(request, exc):
        return error_response(exc)

    @app.exception_handler(ClientGone)
    async def _client_gone(request, exc):
        return Response(status_code=499)  # nobody reads it: the client closed the connection

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc):
        # An unknown route (404) or method (405) is answered in the error shape every other answer has (OpenAI's and
        # vLLM's), not Starlette's {"detail": ...}, which clients reading error.message cannot read.
        fix = {404: "see GET /v1/models and the README's serving section for the routes",
               405: f"use {exc.headers.get('Allow', 'another method')}" if exc.headers else "use another method"}.get(exc.status_code, "")
        message = f"{request.method} {request.url.path}: {exc.detail}" + (f"; {fix}" if fix else "")
        code = {404: "route_not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(P.ApiError(exc.status_code, message, code=code, headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _internal(request, exc):
        # a bug, not the request: Starlette still logs its stack (it re-raises after this answer) but answered a plain-text
        # 'Internal Server Error' that clients reading error.message cannot read; vLLM answers its own failures in its shape
        return error_response(P.ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error", "internal_error", headers=P.NO_RETRY))

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc):
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request"}
        return error_response(P.ApiError(400, f"invalid request body: {first.get('msg')} at {'.'.join(map(str, first.get('loc', ())))}"))

    # Plain ASGI middleware (not @app.middleware, whose wrapped receive hides a client's disconnect from the routes,
    # so a request whose client left would run on to max_tokens), added innermost first.
    app.add_middleware(Guard, settings=settings, refuse=error_response)
    routers = (admin.router, openai.router, tokenizer.router, admin.runtime_router)
    app.add_middleware(AccessLog, count=engine.metrics.responded, routes=[route for router in routers for route in router.routes])
    if settings.allowed_origins:  # outermost, so a preflight (which carries no API key) is answered here
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.allowed_origins), allow_methods=["*"], allow_headers=["*"],
                           expose_headers=[IGNORED_HEADER, ROUTING_HEADER])

    # In the order the routes were always declared (health first, runtime loading last), so /openapi.json is unchanged.
    for router in routers:
        app.include_router(router)
    return app

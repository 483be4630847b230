"""The HTTP server: OpenAI-compatible routes over the engine (FastAPI + uvicorn, as vLLM).

    adapterhub-lite serve --registry adapters/ --port 8000

Every adapter is a `model`: `sst2` (its latest version), `sst2@1.0.0`, `base` (the backbone alone)
or `auto` (picked by content). Requests to one server share its batches (serve/engine.py).

How a request becomes a prompt:
- `input` (the task's columns, or one string) renders the adapter's own prompt template, exactly
  as `adapterhub-lite infer`, and the answer is the task's answer (first line, stripped).
- `prompt` is used as given (raw continuation; `stop` and `max_tokens` apply). `auto` always
  treats its text as the task's input, since the adapter it picks brings its template.
- chat: a task adapter reads the last user message as its input; `base` applies the tokenizer's
  chat template to the whole conversation.
- A classification adapter is scored over its labels, never generated: the completion's text is
  the label, and /v1/classify also returns every label's probability.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from ..errors import AdapterHubError, AdapterLoadError
from ..router.routing import BASE
from . import protocol as P
from .engine import Engine, Job, QueueFull, RequestTimeout, ShuttingDown
from .runtime import Catalogue


@dataclass
class Settings:
    """The server's limits and switches (see `adapterhub-lite serve --help`)."""

    max_input_tokens: int = 1024
    max_tokens: int = 512
    request_timeout: float = 120.0
    max_body_bytes: int = 1 << 20
    api_key: str | None = None
    allow_runtime_loading: bool = False


def create_app(engine: Engine, settings: Settings, catalogue: Catalogue) -> FastAPI:
    """The FastAPI app serving `engine`; the engine's thread starts and stops with the app."""

    async def lifespan(app):
        engine.start()
        yield
        # uvicorn has stopped accepting and waited for open requests; finish what is queued, then stop
        await asyncio.to_thread(engine.stop)

    app = FastAPI(title="adapterhub-lite", lifespan=lifespan)
    tokenizer = engine.router.backbone.tokenizer

    # -- errors in OpenAI's shape --------------------------------------------------------------
    def error_response(err: P.ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    def as_api_error(exc: Exception) -> P.ApiError:
        if isinstance(exc, P.ApiError):
            return exc
        if isinstance(exc, QueueFull):
            return P.ApiError(429, str(exc), "rate_limit_exceeded", "queue_full", headers={"Retry-After": "1"})
        if isinstance(exc, ShuttingDown):
            return P.ApiError(503, str(exc), "server_error", "shutting_down")
        if isinstance(exc, RequestTimeout):
            return P.ApiError(504, str(exc), "timeout", "request_timeout")
        if isinstance(exc, AdapterLoadError) and "unknown adapter" in str(exc):
            return P.ApiError(404, str(exc), "invalid_request_error", "model_not_found")
        if isinstance(exc, AdapterHubError):
            return P.ApiError(400, str(exc), "invalid_request_error", type(exc).__name__)
        return P.ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error", "internal_error")

    @app.exception_handler(P.ApiError)
    async def _api_error(request, exc):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc):
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request"}
        return error_response(P.ApiError(400, f"invalid request body: {first.get('msg')} at {'.'.join(map(str, first.get('loc', ())))}"))

    # -- API key and body size: one ASGI middleware, before any body is read ---------------------
    @app.middleware("http")
    async def _guard(request: Request, call_next):
        if settings.api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), settings.api_key.encode()):  # constant time: no key guessing by timing
                return error_response(P.ApiError(401, "missing or wrong API key; send Authorization: Bearer <key>", "authentication_error", "invalid_api_key"))
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            return error_response(P.ApiError(413, f"request body of {length} bytes is over the limit of {settings.max_body_bytes} bytes; send less",
                                             code="body_too_large"))
        return await call_next(request)

    async def read_json(request: Request) -> dict:
        body = b""
        async for chunk in request.stream():  # a body without content-length is counted as it arrives
            body += chunk
            if len(body) > settings.max_body_bytes:
                raise P.ApiError(413, f"request body is over the limit of {settings.max_body_bytes} bytes; send less", code="body_too_large")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise P.ApiError(400, f"request body is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc}); send a JSON object", code="invalid_json") from None
        if not isinstance(data, dict):
            raise P.ApiError(400, f"request body is a JSON {type(data).__name__}; send a JSON object", code="invalid_json")
        return data

    # -- running jobs ----------------------------------------------------------------------------
    def make_job(body: dict, model: str, request: dict, answer_mode: bool, default_max: int | None) -> tuple[Job, asyncio.Queue]:
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        max_tokens = P.number(body, "max_completion_tokens", None, 1, settings.max_tokens, int)
        max_tokens = P.number(body, "max_tokens", max_tokens, 1, settings.max_tokens, int) if body.get("max_tokens") is not None else max_tokens
        logprobs = body.get("logprobs")
        if body.get("top_logprobs") is not None or isinstance(logprobs, bool):  # chat: logprobs=true, top_logprobs=k
            logprobs = P.number(body, "top_logprobs", 0, 0, 20, int) if logprobs else None
        elif logprobs is not None:
            logprobs = P.number(body, "logprobs", None, 0, 20, int)
        job = Job({"adapter": model, **request}, lambda ev, payload: loop.call_soon_threadsafe(events.put_nowait, (ev, payload)),
                  max_tokens=max_tokens if max_tokens is not None else default_max, stop=P.stop_strings(body),
                  temperature=P.number(body, "temperature", 0.0, 0.0, 2.0), top_p=P.number(body, "top_p", 1.0, 0.0, 1.0),
                  logprobs=logprobs, answer_mode=answer_mode, max_input_tokens=settings.max_input_tokens,
                  deadline=time.monotonic() + settings.request_timeout, seed=P.number(body, "seed", None, 0, 2**63 - 1, int))
        return job, events

    async def outcome(job: Job, events: asyncio.Queue):
        """Await a job's end: (Result, [(token, logprob info)]); raises its error."""
        steps = []
        try:
            async with asyncio.timeout(settings.request_timeout + 5):  # the engine times out first; this guards a dead engine
                while True:
                    ev, payload = await events.get()
                    if ev == "token":
                        if payload[2] is not None:
                            steps.append((payload[0], payload[2]))
                    elif ev == "done":
                        return payload, steps
                    else:
                        raise as_api_error(payload)
        except TimeoutError:
            raise as_api_error(RequestTimeout("no answer within the request timeout")) from None
        finally:
            job.cancel()  # a no-op when it finished; frees the row when the client went away

    def submit(job: Job) -> None:
        try:
            engine.submit(job)
        except AdapterHubError as exc:
            raise as_api_error(exc) from None

    async def resolve_model(body: dict) -> str:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise P.bad("model", model, "name an adapter (see GET /v1/models), 'base' or 'auto'")
        merged = body.get("merged_adapters")
        if merged is not None:
            return await catalogue.merged(merged, model)
        return await catalogue.ensure_known(model)

    # -- routes ----------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if not engine.alive:
            return error_response(P.ApiError(503, "the engine is not running", "server_error", "unhealthy"))
        backbone = engine.router.backbone
        return {"status": "ok", "queue_depth": engine.queue_depth, "base": backbone.name, "device": str(backbone.device),
                "dtype": str(backbone.dtype).removeprefix("torch."), "quantization": backbone.fingerprint["quantization"]}

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": catalogue.models()}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request)
        P.check_unsupported(body)
        model = await resolve_model(body)
        if "input" in body:
            inputs, answer = [P.task_input(x, model) for x in (body["input"] if isinstance(body["input"], list) else [body["input"]])], True
        else:
            prompt = body.get("prompt")
            prompts = prompt if isinstance(prompt, list) else [prompt]
            if not prompts or not all(isinstance(p, str) for p in prompts):
                raise P.bad("prompt", prompt, "give a string or a list of strings (or the task's columns as `input`)")
            inputs, answer = ([{"text": p} for p in prompts], True) if model == "auto" else ([{"prompt": p} for p in prompts], False)
        # raw prompts default to 16 new tokens (OpenAI's default); task inputs to the task's own budget
        jobs = [make_job(body, model, x, answer, None if answer else 16) for x in inputs]
        return await answer_jobs(body, model, jobs, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_json(request)
        P.check_unsupported(body)
        model = await resolve_model(body)
        messages = P.check_messages(body.get("messages"))
        if model == BASE or not catalogue.has_task(model):
            if not getattr(tokenizer, "chat_template", None):
                raise P.ApiError(400, f"model {model!r} has no task and the backbone's tokenizer has no chat template; use /v1/completions with a prompt")
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            job = make_job(body, model, {"prompt": text}, False, settings.max_tokens)
        else:
            users = [m["content"] for m in messages if m["role"] == "user"]
            if not users:
                raise P.bad("messages", body.get("messages"), f"a task adapter ({model}) reads the last user message as its input; add one")
            job = make_job(body, model, {"text": users[-1]}, True, None)
        return await answer_jobs(body, model, [job], chat=True)

    @app.post("/v1/classify")
    async def classify(request: Request):
        body = await read_json(request)
        model = await resolve_model(body)
        if not catalogue.is_classifier(model):
            raise P.bad("model", model, "/v1/classify takes a classification adapter (see GET /v1/models); use /v1/completions for others")
        raw = body.get("input")
        inputs = [P.task_input(x, model) for x in (raw if isinstance(raw, list) and raw else [raw])]
        jobs = [make_job(body, model, x, True, None) for x in inputs]
        for job, _ in jobs:
            submit(job)
        results = await asyncio.gather(*(outcome(job, ev) for job, ev in jobs))
        return {"object": "list", "model": model, "usage": P.usage([r for r, _ in results]),
                "data": [{"index": i, "label": r.label, "adapter": r.adapter, "probabilities": {k: round(v, 6) for k, v in r.probabilities.items()}}
                         for i, (r, _) in enumerate(results)]}

    async def answer_jobs(body: dict, model: str, jobs: list, chat: bool):
        rid = P.new_id("chatcmpl" if chat else "cmpl")
        if body.get("stream"):
            if len(jobs) != 1:
                raise P.bad("prompt", body.get("prompt"), "streaming takes one prompt per request")
            submit(jobs[0][0])
            return StreamingResponse(stream(rid, model, *jobs[0], chat, body), media_type="text/event-stream")
        for job, _ in jobs:
            submit(job)
        results = await asyncio.gather(*(outcome(job, ev) for job, ev in jobs))
        lp = P.chat_logprobs if chat else P.completion_logprobs
        choices = []
        for i, ((result, steps), (job, _)) in enumerate(zip(results, jobs)):
            logprobs = lp(tokenizer, steps) if job.logprobs is not None else None
            if chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": result.text}, "finish_reason": result.finish_reason,
                                "logprobs": logprobs, "adapter": result.adapter})
            else:
                choices.append({"index": i, "text": result.text, "finish_reason": result.finish_reason, "logprobs": logprobs,
                                "adapter": result.adapter})
        make = P.chat_body if chat else P.completion_body
        return make(rid, model, choices, [r for r, _ in results])

    async def stream(rid: str, model: str, job: Job, events: asyncio.Queue, chat: bool, body: dict) -> AsyncIterator[str]:
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None, logprobs=None, usage=None, first: bool = False) -> str:
            if chat:
                said = {"role": "assistant", "content": ""} if first else {} if delta is None else {"content": delta}
                choice = {"index": 0, "delta": said, "finish_reason": finish, "logprobs": logprobs}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": logprobs}
            out = {"id": rid, "object": kind, "created": created, "model": model, "choices": [] if usage else [choice]}
            if usage:
                out["usage"] = usage
            return f"data: {json.dumps(out)}\n\n"

        try:
            if chat:
                yield chunk(None, None, first=True)  # OpenAI's first chat chunk names the role
            async with asyncio.timeout(settings.request_timeout + 5):
                while True:
                    ev, payload = await events.get()
                    if ev == "token":
                        tok, delta, info = payload
                        if delta or info is not None:
                            lp = None
                            if info is not None:
                                lp = (P.chat_logprobs if chat else P.completion_logprobs)(tokenizer, [(tok, info)])
                            yield chunk(delta, None, lp)
                    elif ev == "done":
                        if payload.label is not None:  # a classification adapter's answer comes whole
                            yield chunk(payload.text, None)
                        yield chunk(None if chat else "", payload.finish_reason)
                        if (body.get("stream_options") or {}).get("include_usage"):
                            yield chunk(None, None, usage=P.usage([payload]))
                        break
                    else:
                        yield f"data: {json.dumps(as_api_error(payload).body())}\n\n"
                        break
        except TimeoutError:
            yield f"data: {json.dumps(as_api_error(RequestTimeout('no answer within the request timeout')).body())}\n\n"
        finally:
            job.cancel()  # the client went away mid-stream: the engine drops the row at its next step
        yield "data: [DONE]\n\n"

    # -- adapters at run time --------------------------------------------------------------------
    def runtime_allowed():
        if not settings.allow_runtime_loading:
            raise P.ApiError(403, "loading adapters at run time is off; start the server with --allow-runtime-loading", "permission_error", "runtime_loading_off")

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(request: Request):
        runtime_allowed()
        body = await read_json(request)
        name = await catalogue.load(body.get("lora_name"), body.get("lora_path"))
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(request: Request):
        runtime_allowed()
        body = await read_json(request)
        name = await catalogue.unload(body.get("lora_name"))
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    @app.post("/v1/reload")
    async def reload():
        return await catalogue.reload()

    return app

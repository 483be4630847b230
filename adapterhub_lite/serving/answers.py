"""How a request's answer is written: its choices' events gathered into one response (`results`, `answer`,
`choice`) or streamed as server-sent events (`accepted`, `stream`), failures as the HTTP errors a client
receives (`as_api_error`), and the tokens read and generated put in the access line (`note`).

The answering side of the route handlers (a mixin of Handlers, serving/handlers.py, which reads each request into
its jobs and owns the state these methods use: `settings`, `tokenizer`, `submit`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from itertools import zip_longest

from fastapi.responses import StreamingResponse

from adapterhub_lite.core.errors import AdapterHubError, AdapterLoadError, ContextLengthError
from adapterhub_lite.serving import protocol as P
from adapterhub_lite.serving.jobs import Job, QueueFull, RequestTimeout, Result, ShuttingDown
from adapterhub_lite.serving.manager import AdapterUnavailable
from adapterhub_lite.serving.params import SamplingParams, flag


def as_api_error(exc: Exception) -> P.ApiError:
    """Any failure as the HTTP error a client receives."""
    if isinstance(exc, P.ApiError):
        return exc
    if isinstance(exc, QueueFull):
        return P.ApiError(429, str(exc), "rate_limit_exceeded", "queue_full", headers=P.RETRY_SOON)
    if isinstance(exc, ShuttingDown):
        return P.ApiError(503, str(exc), "server_error", "shutting_down", headers=P.RETRY_SOON)
    if isinstance(exc, RequestTimeout):
        return P.ApiError(504, str(exc), "timeout", "request_timeout", headers=P.NO_RETRY)
    if isinstance(exc, AdapterUnavailable):
        return P.unavailable(str(exc))
    if isinstance(exc, AdapterLoadError) and "unknown adapter" in str(exc):
        return P.ApiError(404, str(exc), "invalid_request_error", "model_not_found")
    if isinstance(exc, ContextLengthError):  # OpenAI's code for it, which clients (and vLLM's users) test for
        return P.ApiError(400, str(exc), "invalid_request_error", "context_length_exceeded")
    if isinstance(exc, AdapterHubError):
        return P.ApiError(400, str(exc), "invalid_request_error", P.error_code(exc))
    return P.ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error", "internal_error", headers=P.NO_RETRY)


class ClientGone(Exception):
    """The client closed the connection before its answer: nothing is sent (its rows are dropped)."""


async def client_left(http) -> None:
    """Return once the client has closed its connection (ASGI's http.disconnect), as vLLM's listen_for_disconnect.
    receive() is awaited from the start: uvicorn reads the socket only while the app waits on it (it stops reading
    after a request's body), so a client's close was seen only at the next check."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


@dataclass
class Request:
    """One completions or chat request made ready: its jobs (n per prompt), their events, and how to answer."""

    rid: str
    model: str
    body: dict
    params: SamplingParams
    jobs: list[Job]
    events: asyncio.Queue  # (choice index, event, payload) from the engine thread
    chat: bool
    n: int = 1  # choices per prompt: jobs are n per prompt, in prompt order
    getter: asyncio.Future | None = None  # the pending events.get(), kept across waits (cancelling one just given an event loses it)
    left: asyncio.Future | None = None  # client_left(), while nothing else watches the connection


class Answers:
    """Gathering or streaming a request's choices into its answer (a mixin of Handlers, which holds the state)."""

    async def event(self, req: Request, http) -> tuple:
        """The request's next (choice index, event, payload); ClientGone as soon as its client closes the connection
        (its jobs are cancelled then: they hold no place in the queue and leave the engine at its next step)."""
        req.getter = req.getter or asyncio.ensure_future(req.events.get())
        if http is not None and req.left is None:
            req.left = asyncio.ensure_future(client_left(http))
        await asyncio.wait({req.getter, req.left} - {None}, return_when=asyncio.FIRST_COMPLETED)
        if req.left is not None and req.left.done():
            self.engine.cancel(req.jobs)
            http.state.access["status"] = 499  # nginx's "client closed request"
            raise ClientGone()
        item, req.getter = req.getter.result(), None
        return item

    def unwatch(self, req: Request) -> None:
        """Stop waiting for the request's events and its client's close."""
        for task in (req.getter, req.left):
            if task is not None:
                task.cancel()
        req.getter = req.left = None

    async def results(self, req: Request, http=None) -> list:
        """Every job's Result, in choice order; raises the first error (and drops the other choices). A client that
        closes its connection has its jobs dropped at once (ClientGone)."""
        out = [None] * len(req.jobs)
        left = len(req.jobs)
        try:
            async with asyncio.timeout(self.settings.request_timeout + 5):  # the engine times out first; this guards a dead engine
                while left:
                    index, ev, payload = await self.event(req, http)
                    if ev == "done":
                        out[index], left = payload, left - 1
                    elif ev == "error":
                        raise as_api_error(payload)
        except TimeoutError:
            raise as_api_error(RequestTimeout("no answer within the request timeout")) from None
        except BaseException:  # the client left, or a choice failed: the access line says what the choices had read and made
            if http is not None and any(j.prepared is not None for j in req.jobs):
                self.note(http.state.access, out, req.n, req.jobs)
            raise
        finally:
            self.unwatch(req)
            self.engine.cancel(req.jobs)  # a no-op for finished jobs; frees the rows of the others
        return out

    def note(self, access: dict, results: list, n: int = 1, jobs: list[Job] = ()) -> None:
        """Record for the access log which adapters answered and the tokens read and generated; a choice of `jobs` that
        did not finish (a stream cut by its client or a timeout) counts the tokens it had read and generated."""
        results = [r if r is not None or j is None or j.prepared is None
                   else Result(j.prepared.adapter, "", None, len(j.prepared.ids), len(j.tokens)) for r, j in zip_longest(results, jobs)]
        access["adapter"] = ",".join(dict.fromkeys(r.adapter for r in results if r is not None))
        usage = P.usage(results, n)
        access["prompt_tokens"], access["completion_tokens"] = usage["prompt_tokens"], usage["completion_tokens"]

    @staticmethod
    def note_routing(access: dict, req: Request) -> None:
        """Put how `auto` chose each choice's adapter (Routing.header, in choice order) in the access record, which the
        app's middleware sends as the ROUTING_HEADER response header: a client reads it without parsing the body,
        and before a stream's first chunk."""
        if any(j.routing is not None for j in req.jobs):
            access["routing"] = [j.routing.header() if j.routing is not None else "-" for j in req.jobs]

    # -- answering -------------------------------------------------------------------------------
    async def answer(self, req: Request, http):
        """Submit a request's jobs; stream their events, or wait for every choice and write the response."""
        access = http.state.access
        self.submit(req)
        if flag(req.body, "stream", False):
            early = await self.accepted(req, http)
            self.note_routing(access, req)  # every choice is routed once accepted: the header goes out before the first chunk
            return StreamingResponse(self.stream(req, access, early), media_type="text/event-stream")
        results = await self.results(req, http)
        self.note(access, results, req.n)
        self.note_routing(access, req)
        choices = [self.choice(req, i, r) for i, r in enumerate(results)]
        if req.chat:
            body = P.chat_body(req.rid, req.model, choices, results, req.n)
            if req.params.prompt_logprobs is not None and results[0].prompt is not None:  # vLLM: one list per response
                body["prompt_logprobs"] = P.prompt_logprobs(self.tokenizer, results[0].prompt.scores, req.params.prompt_logprobs)
            if flag(req.body, "return_token_ids", False):
                body["prompt_token_ids"] = results[0].prompt_ids
            return body
        return P.completion_body(req.rid, req.model, choices, results, req.n)

    async def accepted(self, req: Request, http=None) -> list:
        """Wait until the engine has read every choice of a streamed request (routed, tokenized, measured against
        the context). A request refused while being read (a missing task column, a prompt over the context, a field
        its adapter cannot honour) is then answered with its own status (400 …), as vLLM does, not with a 200
        stream that carries the error. Returns the events of accepted choices that came in the meantime.
        A client that closes its connection meanwhile (its request queued, the response not begun, so Starlette does not
        watch the connection yet) has its jobs dropped at once."""
        waiting, early = set(range(len(req.jobs))), []
        try:
            async with asyncio.timeout(self.settings.request_timeout + 5):  # the engine times out first; this guards a dead engine
                while waiting:
                    index, ev, payload = await self.event(req, http)
                    if ev == "accepted":
                        waiting.discard(index)
                    elif ev == "error":
                        raise as_api_error(payload)
                    else:
                        early.append((index, ev, payload))
        except TimeoutError:
            raise as_api_error(RequestTimeout("no answer within the request timeout")) from None
        except BaseException:  # refused, timed out, or the client left: the other choices' rows are dropped too
            self.engine.cancel(req.jobs)
            raise
        finally:
            self.unwatch(req)  # once the response begins, Starlette's own listener watches the connection
        return early

    def choice(self, req: Request, index: int, result) -> dict:
        """One choice of a whole (not streamed) response, in the completions or chat shape."""
        p, tok = req.params, self.tokenizer
        as_ids = flag(req.body, "return_tokens_as_token_ids", False)  # vLLM's: tokens named "token_id:<id>" in the log-probs
        if req.chat:
            out = {"index": index, "message": {"role": "assistant", "content": result.text}, "finish_reason": result.finish_reason,
                   "stop_reason": result.stop_reason, "logprobs": None if p.logprobs is None else P.chat_logprobs(tok, result.entries or [], as_ids),
                   "adapter": result.adapter}
        else:
            prompt = result.prompt if p.echo else None
            text = (prompt.text if prompt else "") + result.text
            logprobs = None
            if p.logprobs is not None:
                logprobs = P.completion_logprobs(tok, (prompt.entries if prompt else []) + (result.entries or []), p.logprobs, as_ids=as_ids)
            out = {"index": index, "text": text, "finish_reason": result.finish_reason, "stop_reason": result.stop_reason, "logprobs": logprobs,
                   "adapter": result.adapter}
            if p.prompt_logprobs is not None:
                out["prompt_logprobs"] = P.prompt_logprobs(tok, result.prompt.scores, p.prompt_logprobs)
        if result.routing is not None:  # an `auto` choice: how its adapter was chosen (an extra field, as `adapter`)
            out["routing"] = result.routing.as_dict()
        if flag(req.body, "return_token_ids", False):
            out["token_ids"] = result.token_ids
            if not req.chat:
                out["prompt_token_ids"] = result.prompt_ids
        return out

    async def stream(self, req: Request, access: dict, early: list = ()) -> AsyncIterator[str]:
        """Server-sent events: per choice, the role (chat), the echoed prompt, text as it becomes final with its
        tokens' log-probs (text_offset running over the whole choice), the finish reason; then usage if asked.
        `early`: events that came while the request was being accepted, sent first.

        A chat choice's role chunk goes with its first event (a token, or its whole label), not when the request was
        accepted: vLLM sends it with the first output, and load testers time the first token by the first chunk
        (vLLM's bench), so a role chunk sent before the prefill read as a first token that had not come.
        With `stream_options` `{"include_usage": true, "continuous_usage_stats": true}` (vLLM's; guidellm asks it of
        every request) every chunk also carries its choice's usage so far: its prompt's tokens and the tokens whose
        text it has streamed (all of them from the finishing chunk on)."""
        early = list(early)
        created, p, tok = int(time.time()), req.params, self.tokenizer
        kind = "chat.completion.chunk" if req.chat else "text_completion"
        as_ids = flag(req.body, "return_tokens_as_token_ids", False)
        # vLLM's streamed return_token_ids: each chunk carries the ids of the tokens whose text it holds (they join to
        # the whole answer's token_ids), and a choice's first chunk its prompt's (chat: the role chunk, beside choices)
        ids = flag(req.body, "return_token_ids", False)
        prompt_ids_due = [ids] * len(req.jobs)
        offsets = [0] * len(req.jobs)  # per choice: where its next log-prob entry starts in its text
        results = [None] * len(req.jobs)
        opts = req.body.get("stream_options") or {}
        running = bool(opts.get("include_usage") and opts.get("continuous_usage_stats"))  # vLLM reads the second only with the first
        streamed = [0] * len(req.jobs)  # per choice: generated tokens whose text was streamed (continuous usage)
        role_due = [req.chat] * len(req.jobs)  # per chat choice: its role chunk, sent with its first event

        def chunk(index: int, delta: str | None, finish: str | None = None, entries=None, first: bool = False, stop_reason=None,
                  made=(), routing=None, adapter=None, **extra) -> str:  # made: the entries of generated tokens whose text this chunk holds
            lp = None
            if entries is not None and p.logprobs is not None:
                if req.chat:
                    lp = P.chat_logprobs(tok, entries, as_ids)
                else:
                    lp = P.completion_logprobs(tok, entries, p.logprobs, offsets[index], as_ids)
                    offsets[index] += sum(len(e.text) for e in entries)
            top = {}
            if req.chat:
                said = {"role": "assistant", "content": ""} if first else {} if delta is None else {"content": delta}
                choice = {"index": index, "delta": said, "finish_reason": finish, "logprobs": lp}
            else:
                choice = {"index": index, "text": delta or "", "finish_reason": finish, "logprobs": lp, **extra}
            if finish is not None or not req.chat:  # vLLM's completions chunks carry it on every chunk (null until the end), its chat chunks at the end
                choice["stop_reason"] = stop_reason
            if adapter is not None:  # a choice's finishing chunk: the adapter that answered, as each choice of a whole response says
                choice["adapter"] = adapter
            if routing is not None:  # an `auto` choice's finishing chunk: how its adapter was chosen, as the whole response says it
                choice["routing"] = routing.as_dict()
            if ids:
                choice["token_ids"] = [e.token for e in made]
                if prompt_ids_due[index]:
                    prompt_ids_due[index] = False
                    (top if req.chat else choice)["prompt_token_ids"] = req.jobs[index].prepared.ids
            if running:
                top["usage"] = P.usage_so_far(len(req.jobs[index].prepared.ids), streamed[index])
            return f"data: {json.dumps({'id': req.rid, 'object': kind, 'created': created, 'model': req.model, 'choices': [choice], **top})}\n\n"

        try:
            left = len(req.jobs)
            async with asyncio.timeout(self.settings.request_timeout + 5):
                while left:
                    index, ev, payload = early.pop(0) if early else await req.events.get()
                    if role_due[index] and ev != "error":
                        role_due[index] = False
                        yield chunk(index, None, first=True)  # OpenAI's first chat chunk names the role
                    if ev == "prompt":
                        extra = {}
                        if p.prompt_logprobs is not None and not req.chat:
                            extra["prompt_logprobs"] = P.prompt_logprobs(tok, payload.scores, p.prompt_logprobs)
                        if p.echo or extra:
                            yield chunk(index, payload.text if p.echo else "", entries=payload.entries if p.echo else None, **extra)
                    elif ev == "token":
                        text, entries = payload
                        streamed[index] += len(entries)
                        yield chunk(index, text, entries=entries if entries else None, made=entries)
                    elif ev == "done":
                        results[index], left = payload, left - 1
                        streamed[index] = payload.completion_tokens
                        if payload.label is not None:  # a classification adapter's answer comes whole
                            yield chunk(index, payload.text)
                        yield chunk(index, None if req.chat else "", payload.finish_reason, stop_reason=payload.stop_reason, routing=payload.routing,
                                    adapter=payload.adapter)
                    elif ev == "error":
                        yield f"data: {json.dumps(as_api_error(payload).body())}\n\n"
                        access["status"] = as_api_error(payload).status
                        break
            if not left and (req.body.get("stream_options") or {}).get("include_usage"):
                yield f"data: {json.dumps({'id': req.rid, 'object': kind, 'created': created, 'model': req.model, 'choices': [], 'usage': P.usage(results, req.n)})}\n\n"
        except TimeoutError:
            access["status"] = 504
            yield f"data: {json.dumps(as_api_error(RequestTimeout('no answer within the request timeout')).body())}\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            access["status"] = 499  # the client left mid-stream (nginx's "client closed request"), as for a whole response
            raise
        finally:
            self.engine.cancel(req.jobs)  # the client went away mid-stream: the engine drops the rows at its next step
            self.note(access, results, req.n, req.jobs)
        yield "data: [DONE]\n\n"

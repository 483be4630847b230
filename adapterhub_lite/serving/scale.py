"""Serve past one machine on Ray Serve: engine replicas behind one ingress, each request sent to a replica that
already holds its adapter (Ray Serve's model multiplexing). Ray is an optional extra: `pip install adapterhub-lite[ray]`.

    adapterhub-lite serve --registry adapters/ --ray --replicas 2
    serve run adapterhub_lite.cli.serve:ray_app registry=adapters/ replicas=2     # or a config file: README, "Scale out"

Each replica (`EngineReplica`) is the single-process server: its own backbone, engine and the FastAPI app of
serving/api.py, so the routes, request shapes, limits and API key are that app's and nothing here re-implements
them. The ingress reads only what it needs to pick a replica — a JSON body's `model`, or its `merged_adapters`
recipe — and forwards the request as it came (method, path, query, headers, body) with that adapter as the
*multiplexed model id*. Ray Serve then sends it to a replica that holds the adapter, loads it on a less busy one
when those are busy, and forgets adapters per replica by LRU past `max_adapters_per_replica`. The replica's answer
streams back as it is produced (SSE chunks included), with its status and headers.

- `base`, `auto` and requests without a model go to any replica. `auto` is routed by content *in the replica*
  (which holds the routing classifier), so it gets no adapter affinity; a replica's own LRU keeps what it serves.
- A merged recipe's id is a hash of the recipe: requests with one recipe go where it was built.
- Ray's own refusals come back in the server's shape: 429 when every replica's queue is full
  (`max_queued_requests`), 503 when a replica died under a request (Ray starts another; the client retries); a
  stream it was sending ends with the server's error event and [DONE], not as if it were whole.
  A client that leaves cancels its request in the replica, as on one server.
- Replicas read one registry (a shared folder or hf://) with the integrity checks of one server. An adapter
  published after start-up is found on its first request: a replica that does not know a name re-reads the
  registry index once before answering 404.
- `GET /metrics` is refused (501, `metrics_per_replica`): one scrape would read one replica's counters, another
  replica's the next time. /health answers for the replica that took it, named in `x-adapterhub-replica`.
- Each answer names its replica (`x-adapterhub-replica`) and whether that replica already held the adapter
  (`x-adapterhub-adapter-held: 1|0`, from the replica's own count; absent when the request names no adapter: base,
  auto, GET routes), from which the affinity figure is read.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from types import SimpleNamespace

from adapterhub_lite.core.text import nested_too_deep

log = logging.getLogger("adapterhub_lite.serve")

REPLICA_HEADER = "x-adapterhub-replica"
HELD_HEADER = "x-adapterhub-adapter-held"
_ANY = ""  # no multiplexed id: any replica
# Ray sends each request to one replica and offers no call to every replica, so a scrape of /metrics through the ingress
# got whichever replica Ray picked: after 6 requests on two replicas, adapterhub_requests_total read 4, 2, 2, 4, 2, 2, 4, 2
# over 8 scrapes (summed over adapter and status), and rate() over it is noise. Our metrics live in each replica's own
# registry, which Ray does not export; its own ray_serve_* series, labelled by replica, it does.
METRICS_REFUSED = (
    "GET /metrics through the Ray Serve ingress would answer with one replica's counters, a different replica each scrape, so "
    "they would not add up or rise; scrape Ray's own per-replica metrics (ray_serve_*, at each node's `ray start "
    "--metrics-export-port`) instead, or serve without --ray for the adapterhub_* metrics"
)


def app_path(path: str, root_path: str) -> str:
    """The path as the app's routes see it. Under an application's `route_prefix` (e.g. /adapters) Ray keeps the whole
    path and sets `root_path`; the routes start after the prefix, as behind any reverse proxy that strips it. Only whole
    segments are stripped: /busy is not a prefix of /busyness."""
    root = root_path.rstrip("/")
    if root and (path == root or path.startswith(root + "/")):
        return path[len(root):] or "/"
    return path


def model_id(path: str, body: bytes) -> str:
    """The multiplexed model id of a request: its adapter for a JSON body naming one (`sst2`, `sst2@1.0.0`), a
    hash of its `merged_adapters` recipe, else "" (any replica: base, auto, GET routes, bodies that do not parse,
    which the replica then refuses as one server would)."""
    if not path.startswith("/v1/") or not body:
        return _ANY
    try:
        data = json.loads(body) if not nested_too_deep(body) else None  # see nested_too_deep: no parse to the recursion limit
    except (ValueError, RecursionError):
        return _ANY
    if not isinstance(data, dict):
        return _ANY
    recipe = data.get("merged_adapters")
    if recipe is not None:
        return "merged:" + hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]
    model = data.get("model")
    if not isinstance(model, str) or model in ("", "base", "auto"):
        return _ANY
    return model


class _Held:
    """What the multiplexed loader returns for one adapter: Ray keeps it while the replica holds the adapter and
    drops it (LRU past max_adapters_per_replica), which takes the name out of the replica's held set."""

    def __init__(self, held: set, name: str):
        self.held, self.name = held, name
        held.add(name)

    def __del__(self):
        self.held.discard(self.name)


class _Replica:
    """One engine replica: the single-process app of serving/api.py, called in process for each forwarded request."""

    def __init__(self, options: dict):
        import torch

        from adapterhub_lite.serving.api import build_app

        threads = options.pop("torch_threads", None)
        if threads:
            torch.set_num_threads(int(threads))
        self.app, self.engine, self.catalogue = build_app(SimpleNamespace(**options))
        self.engine.start()  # the app's lifespan would start it; in process there is no lifespan
        self.held: set[str] = set()
        from ray import serve

        ctx = serve.get_replica_context()
        self.name = getattr(ctx, "replica_tag", None) or str(getattr(ctx, "replica_id", os.getpid()))

    async def known(self, name: str) -> bool:
        """Whether the replica serves `name` as the app would resolve it (a pinned `name@version` is registered here, as
        on first use; a merge recipe always counts: the app builds it), the registry index re-read once for a name it
        does not know (published after start-up?). A name it cannot serve is not loaded, so it takes no place in Ray's
        multiplexed LRU: Ray evicts the least recently used adapter before it calls the loader, and each made-up name
        a client sent evicted one others were using. The app answers such a request (404, or 503 for a damaged one)."""
        from adapterhub_lite.serving.protocol import ApiError

        if name.startswith("merged:"):
            return True
        for attempt in range(2):
            try:
                await self.catalogue.ensure_known(name)
                return True
            except ApiError as exc:
                if exc.status != 404 or attempt:
                    return False
            try:
                await self.catalogue.reload()
            except Exception as exc:  # noqa: BLE001 - the request then gets the app's own answer
                log.warning("re-reading the registry for %r failed: %s", name, exc)
                return False
        return False

    async def load(self, name: str) -> _Held:
        """Ray's multiplexed loader for a known name (see known()): read and checked into host memory off the event loop."""
        if name in self.engine.router.folders:  # not a merge recipe (the app builds it), nor `name@latest` (its name is)
            try:
                await asyncio.to_thread(self.engine.router.fetch, name)
            except Exception as exc:  # noqa: BLE001 - a damaged adapter: the app answers 503 naming why
                log.warning("reading adapter %r failed: %s", name, exc)
        return _Held(self.held, name)

    async def forward(self, method: str, path: str, query: bytes, headers: list, body: bytes, root_path: str = ""):
        """Run one HTTP request through the app; yields (status, headers) first, then the body's chunks as sent. `path`
        is the app's (after the application's route_prefix, `root_path`); the app gets both, as ASGI has them behind a
        proxy, so the URLs it builds (a redirect's Location) keep the prefix."""
        from adapterhub_lite.serving.api import refusal

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
                 "path": root_path + path, "raw_path": (root_path + path).encode(), "query_string": query, "root_path": root_path,
                 "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
                 "client": ("127.0.0.1", 0), "server": ("ray-serve", 0)}
        # The adapter is read from the request itself, not from the id Ray routed by: what this replica held is its
        # own count, whatever the ingress sent it (a balancer that ignores adapters shows here as misses).
        name = model_id(path, body)
        held = None  # base, auto, GET routes: no adapter, so no held header (it said 1 for them)
        if name:
            held = name in self.held
            # A request the app refuses unread (no API key) loads nothing: one keyless client could otherwise re-read the
            # registry index for each made-up name and evict, by LRU, the adapters keyed clients are using.
            if refusal(self.app.state.server.settings, scope) is None and await self.known(name):
                await self.load(name)
        sent: asyncio.Queue = asyncio.Queue()
        gone = asyncio.Event()
        delivered = False

        async def receive():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            await sent.put(message)

        task = asyncio.ensure_future(self.app(scope, receive, send))
        try:
            while True:
                getter = asyncio.ensure_future(sent.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    task.result()  # the app ended without a response: raise what it raised
                    return
                message = getter.result()
                if message["type"] == "http.response.start":
                    extra = [(REPLICA_HEADER, self.name)] + ([(HELD_HEADER, str(int(held)))] if held is not None else [])
                    yield (message["status"], [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])] + extra)
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield message["body"]
                    if not message.get("more_body"):
                        return
        finally:  # the ingress cancelled (its client left) or the answer is complete: the app sees a disconnect
            gone.set()
            if not task.done():
                try:
                    await asyncio.wait_for(asyncio.shield(task), 5)
                except Exception:  # noqa: BLE001 - a timeout, or what the app raised: a cancelled request ends on its own; do not wait for ever
                    task.cancel()

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop(timeout=5)


class _Ingress:
    """The HTTP entry: picks the multiplexed id of each request and streams the chosen replica's answer back."""

    def __init__(self, replicas, max_body_bytes: int | None = None):
        from adapterhub_lite.serving.handlers import Settings

        self.replicas, self.max_body_bytes = replicas, max_body_bytes or Settings.max_body_bytes

    async def read_body(self, request) -> bytes:
        """The body as far as the replica reads it: one server refuses a body past --max-body-bytes by its content-length
        before reading it, or as it counts a chunked one, and the ingress must not hold more (a 300 MiB body took its
        memory from 469 to 1783 MB before the replica's 413)."""
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return b""  # the replica's guard refuses it by that header, before any body (after the API key), as one server
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                break  # past the limit: the replica's own read refuses it, as one server's; the rest is never read
        return bytes(body)

    async def __call__(self, request):
        from ray.serve.exceptions import BackPressureError
        from starlette.responses import Response, StreamingResponse

        from adapterhub_lite.serving.protocol import NO_RETRY, ApiError
        from adapterhub_lite.serving.routes.common import error_response

        root = request.scope.get("root_path", "").rstrip("/")
        path = app_path(request.url.path, root)
        if path == "/metrics" and request.method in ("GET", "HEAD"):
            return error_response(ApiError(501, METRICS_REFUSED, "invalid_request_error", "metrics_per_replica", headers=NO_RETRY))
        body = await self.read_body(request)
        mid = model_id(path, body)
        headers = request.headers.items()  # Host included: the app builds URLs (a redirect's Location) from it, as one server
        call = self.replicas.options(stream=True, multiplexed_model_id=mid)
        stream = call.forward.remote(request.method, path, request.url.query.encode(), headers, body, root if path != request.url.path else "")
        try:
            status, head = await stream.__anext__()
        except BackPressureError as exc:
            return error_response(ApiError(429, f"every replica's queue is full ({exc}); retry shortly", "server_error", "server_busy",
                                           headers={"retry-after": "1"}))
        except Exception as exc:  # noqa: BLE001 - a replica that died (Ray starts another) or failed before answering
            log.warning("replica failed before answering %s %s: %s", request.method, request.url.path, exc)
            return error_response(_replica_failed(exc))
        sse = any(k.lower() == "content-type" and v.startswith("text/event-stream") for k, v in head)
        drop = {"content-length", "transfer-encoding"}
        if not sse:  # a whole answer, made whole by the replica before it sent it: held, and sent with its length (one
            # server's), or as the replica's failure; passed on chunked, a replica that died part-way left a 200 with a cut body
            try:
                body = b"".join([chunk async for chunk in stream])
            except Exception as exc:  # noqa: BLE001 - the replica died after its status line
                log.warning("replica failed while answering %s %s: %s", request.method, request.url.path, exc)
                return error_response(_replica_failed(exc))
            finally:
                stream.cancel()
            return Response(body, status_code=status, headers={k: v for k, v in head if k.lower() not in drop})

        async def chunks():
            try:
                async for chunk in stream:
                    yield chunk
            except Exception as exc:  # noqa: BLE001 - the replica died mid-stream, after its 200 went out
                log.warning("replica failed while streaming %s: %s", request.url.path, exc)
                # an SSE stream that just ended reads as a whole answer (the openai client stops without an error): end it
                # as the server ends a stream that fails mid-way (answers.py), with its error event and [DONE]
                yield f"data: {json.dumps(_replica_failed(exc, 'mid-stream').body())}\n\ndata: [DONE]\n\n".encode()
            finally:
                stream.cancel()  # the client left (or the answer ended): the replica's request is cancelled

        return StreamingResponse(chunks(), status_code=status, headers={k: v for k, v in head if k.lower() not in drop})


def check_autoscaling(config) -> dict:
    """Ray Serve's autoscaling_config as the user gave it (--autoscaling, a config file's `autoscaling`), checked by Ray's
    own model before anything starts: Ray drops a key it does not know (`max_replica` for max_replicas served on one
    replica, silently) and reports a bad value only once its cluster is up, as a pydantic traceback. Returns it unchanged;
    raises AdapterHubError (one line) otherwise."""
    from ray.serve.config import AutoscalingConfig

    from adapterhub_lite.core.errors import AdapterHubError

    if not isinstance(config, dict):
        raise AdapterHubError(f"{json.dumps(config)} is not a JSON object; give Ray Serve's autoscaling_config, e.g. "
                              '{"min_replicas": 1, "max_replicas": 4}')
    known = AutoscalingConfig.model_fields
    unknown = [k for k in config if k not in known]
    if unknown:
        raise AdapterHubError(f"key(s) {', '.join(map(repr, unknown))} are not Ray Serve's autoscaling_config; use {', '.join(known)}")
    try:
        AutoscalingConfig(**config)
    except ValueError as exc:  # pydantic's ValidationError: the first problem, in one line
        first = exc.errors()[0] if hasattr(exc, "errors") else {"loc": (), "msg": str(exc)}
        where = ".".join(map(str, first["loc"]))
        raise AdapterHubError(f"{json.dumps(config)}: {where + ' ' if where else ''}{first['msg'].removeprefix('Value error, ')}") from None
    return config


def _replica_failed(exc: Exception, when: str = ""):
    """The 503 for a request whose replica died (Ray starts another) or failed: the client may retry at once."""
    from adapterhub_lite.serving.protocol import RETRY_SOON, ApiError

    return ApiError(503, f"the replica serving this request failed{' ' + when if when else ''} ({type(exc).__name__}); retry",
                    "server_error", "replica_failed", headers=RETRY_SOON)


def application(options: dict, *, replicas: int | None = 1, autoscaling: dict | None = None, max_ongoing_requests: int = 64,
                max_queued_requests: int = 256, max_adapters_per_replica: int = 8, num_gpus: float = 0, num_cpus: float = 1):
    """The Ray Serve application: `replicas` engine replicas (or `autoscaling`, Ray Serve's autoscaling_config), each
    with `num_gpus` / `num_cpus`, behind one ingress. `options`: the server's settings as `adapterhub-lite serve` takes
    them, by attribute name (registry, quantization, budgets, API key …, see serving/api.build_app)."""
    from ray import serve

    options = dict(options)
    if not num_gpus:  # a CPU replica computes with the CPUs it reserves, not every core of the machine
        options["torch_threads"] = max(1, int(num_cpus))
    replica_cls = type("EngineReplica", (_Replica,), {})
    # multiplexed per application (its size is a setting); under the same name, which Ray Serve looks up to bind self
    replica_cls.load = serve.multiplexed(max_num_models_per_replica=max_adapters_per_replica)(_Replica.load)
    scaling = {"autoscaling_config": autoscaling} if autoscaling is not None else {"num_replicas": replicas}
    replica = serve.deployment(replica_cls, name="EngineReplica", max_ongoing_requests=max_ongoing_requests,
                               max_queued_requests=max_queued_requests, ray_actor_options={"num_gpus": num_gpus, "num_cpus": num_cpus},
                               **scaling)
    ingress = serve.deployment(type("Ingress", (_Ingress,), {}), name="Ingress", max_ongoing_requests=max(1024, 4 * max_ongoing_requests),
                               ray_actor_options={"num_cpus": 0})
    return ingress.bind(replica.bind(options), options.get("max_body_bytes"))

"""Serving on Ray Serve (serving/scale.py): two engine replicas of the tiny backbone on a local Ray cluster behind one
ingress. The same answers as one server, adapter affinity from the replicas' own counts, streaming, and a replica
killed under load. Marker `ray` (CI runs it; ~2 minutes): `bash scripts/test.sh -m ray`."""

import concurrent.futures
import json
import time

import httpx
import pytest

from adapterhub_lite.serving.scale import HELD_HEADER, REPLICA_HEADER, app_path, model_id

from .serving import KEY, Served, free_port

GEN = ["gen_a", "gen_b", "gen_prefix", "gen_prompt"]
EIGHT = ["cls_a", "cls_b", "cls_prefix", "cls_prompt", "cls_ia3", "gen_a", "gen_b", "gen_prefix"]
MERGE = {"ids": ["gen_a", "gen_b"], "weights": [0.5, 0.5], "merge_strategy": "cat"}  # ranks 8 and 16: an exact method that takes both


def test_the_multiplexed_id_is_the_adapter_or_the_recipe():
    body = lambda **kw: json.dumps(kw).encode()  # noqa: E731
    assert model_id("/v1/completions", body(model="gen_a", prompt="x")) == "gen_a"
    assert model_id("/v1/completions", body(model="gen_a@1.0.0")) == "gen_a@1.0.0"
    for anywhere in (body(model="base"), body(model="auto"), body(prompt="x"), b"{not json", b"[1]", b""):
        assert model_id("/v1/completions", anywhere) == ""
    assert model_id("/health", body(model="gen_a")) == ""
    one = model_id("/v1/completions", body(model="gen_a", merged_adapters=MERGE))
    assert one.startswith("merged:") and one == model_id("/v1/chat/completions", body(merged_adapters=dict(reversed(MERGE.items()))))
    assert one != model_id("/v1/completions", body(merged_adapters={**MERGE, "weights": [0.3, 0.7]}))


def test_the_route_prefix_is_stripped_by_whole_segments():
    assert app_path("/busy/v1/completions", "/busy") == "/v1/completions"
    assert app_path("/busy", "/busy") == "/" and app_path("/busy/", "/busy/") == "/"
    assert app_path("/busyness/v1/models", "/busy") == "/busyness/v1/models"  # not a prefix: left whole
    assert app_path("/v1/models", "") == app_path("/v1/models", "/") == "/v1/models"


class _Answer:
    """What Ray's handle gives the ingress for one forwarded request: its (status, headers), then the body's chunks
    (`dies`: the replica dies after them)."""

    def __init__(self, *chunks: bytes, status: int = 413, head=(("content-type", "application/json"),), dies: bool = False):
        async def answer():
            yield status, list(head)
            for chunk in chunks:
                yield chunk
            if dies:
                raise RuntimeError("the replica's actor died")

        self.answer = answer()

    def __aiter__(self):
        return self

    async def __anext__(self):
        return await self.answer.__anext__()

    def cancel(self):
        pass


@pytest.mark.ray  # needs the ray extra: the default run has none (importorskip would skip it), the ray set runs it
@pytest.mark.parametrize("length", [None, str(10 << 20)])
def test_the_ingress_reads_no_more_of_a_body_than_one_server_would(length):
    """One server refuses a body past --max-body-bytes (default 1 MiB) by its content-length before reading it, or as it
    counts a chunked one; the ingress read every byte first: a 300 MiB chunked body took its memory from 469 to 1783 MB
    (and 7.7 s) before the replica's same 413. It now reads no more than the replica would, and forwards what the
    replica needs to give one server's answer (the headers; the body read past the limit)."""
    pytest.importorskip("ray")
    import asyncio

    from starlette.requests import Request

    from adapterhub_lite.serving.scale import _Ingress

    pulled, forwarded = [], []

    async def receive():  # 10 MiB in 64 KiB pieces
        pulled.append(1)
        return {"type": "http.request", "body": b"a" * (64 << 10), "more_body": len(pulled) < 160}

    class Replicas:  # Ray's deployment handle, as the ingress calls it
        def options(self, **_):
            return self

        @property
        def forward(self):
            return self

        def remote(self, method, path, query, headers, body, *_):
            forwarded.append((headers, body))
            return _Answer(b"{}")

    headers = [(b"content-type", b"application/json")] + ([(b"content-length", length.encode())] if length else [])
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "query_string": b"", "root_path": "", "headers": headers}
    response = asyncio.run(_Ingress(Replicas())(Request(scope, receive)))
    assert response.status_code == 413
    (sent_headers, body), = forwarded
    if length:  # the replica's guard refuses it by this header before any body, after the API key, as one server does
        assert pulled == [] and body == b"" and ("content-length", length) in sent_headers
    else:  # read just past the limit: the replica's own read refuses it
        assert 1 << 20 < len(body) <= (1 << 20) + (64 << 10) and len(pulled) == 17, (len(body), len(pulled))


@pytest.mark.ray  # needs the ray extra: the default run has none (importorskip would skip it), the ray set runs it
@pytest.mark.parametrize("dies", [False, True])
def test_a_whole_answer_comes_with_its_length_or_as_the_replica_failure(dies):
    """A non-streamed answer went through the ingress chunked, without the Content-Length one server sends, and a replica
    that died after its status line left the client a 200 with a cut body (half a JSON document). The replica makes a
    whole answer before it sends it, so the ingress holds it whole: sent with its length, or the 503 `replica_failed`."""
    pytest.importorskip("ray")
    import asyncio

    from starlette.requests import Request

    from adapterhub_lite.serving.scale import _Ingress

    class Replicas:
        def options(self, **_):
            return self

        @property
        def forward(self):
            return self

        def remote(self, *_):
            return _Answer(b'{"choices": ', b"[]}", status=200, head=[("content-type", "application/json"), ("content-length", "15")], dies=dies)

    async def receive():
        return {"type": "http.request", "body": b'{"model": "gen_a", "prompt": "ab"}', "more_body": False}

    async def answered():
        # ASGI 2.4: a response that streams does not also wait for the client's disconnect (this receive never sends one)
        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "query_string": b"", "root_path": "", "headers": [],
                 "asgi": {"spec_version": "2.4"}}
        response, sent = await _Ingress(Replicas())(Request(scope, receive)), []

        async def send(message):
            sent.append(message)

        await response(scope, receive, send)
        return sent[0]["status"], dict((k.decode(), v.decode()) for k, v in sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:])

    status, headers, body = asyncio.run(answered())
    if dies:
        assert status == 503 and json.loads(body)["error"]["code"] == "replica_failed", (status, body)
    else:
        assert status == 200 and body == b'{"choices": []}' and headers.get("content-length") == "15", (status, headers, body)
        assert "transfer-encoding" not in headers


@pytest.mark.ray  # needs the ray extra: the default run has none (importorskip would skip it), the ray set runs it
@pytest.mark.parametrize("root, path", [("", "/metrics"), ("/adapters", "/adapters/metrics")])
def test_metrics_through_the_ingress_are_refused_not_forwarded_to_one_replica(root, path):
    """Ray sends a request to one replica: a scrape of /metrics through the ingress read whichever replica Ray picked, so
    each counter jumped between the replicas' values. It is refused in the server's error shape, naming what to scrape."""
    pytest.importorskip("ray")
    import asyncio

    from starlette.requests import Request

    from adapterhub_lite.serving.scale import _Ingress

    class Replicas:  # Ray's deployment handle: nothing may reach it
        def options(self, **_):
            raise AssertionError("GET /metrics was forwarded to one replica")

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    scope = {"type": "http", "method": "GET", "path": path, "query_string": b"", "root_path": root, "headers": []}
    response = asyncio.run(_Ingress(Replicas())(Request(scope, receive)))
    assert response.status_code == 501
    error = json.loads(response.body)["error"]
    assert error["code"] == "metrics_per_replica" and "ray_serve_" in error["message"] and "--metrics-export-port" in error["message"]


@pytest.mark.ray  # needs the ray extra: the default run has none (importorskip would skip it), the ray set runs it
@pytest.mark.parametrize("argv, needle", [
    # Ray ignores a key it does not know: max_replica (for max_replicas) served on 1 replica, silently
    (["--autoscaling", '{"min_replicas": 1, "max_replica": 8}'], "argument --autoscaling: key(s) 'max_replica' are not Ray Serve's autoscaling_config"),
    # these were pydantic tracebacks (exit 1) once a Ray cluster had started
    (["--autoscaling", "[1]"], "argument --autoscaling: [1] is not a JSON object"),
    (["--autoscaling", '{"min_replicas": 3, "max_replicas": 2}'], "max_replicas (2) must be greater than or equal to min_replicas (3)"),
    (["--gpus-per-replica", "-1"], "argument --gpus-per-replica: -1 must be ≥ 0"),
    # --replicas was unread next to --autoscaling
    (["--replicas", "2", "--autoscaling", '{"max_replicas": 4}'], "--replicas 2 and --autoscaling both set how many replicas run"),
])
def test_bad_ray_settings_are_refused_in_one_line_before_ray_starts(capsys, tmp_path, monkeypatch, argv, needle):
    ray = pytest.importorskip("ray")
    from .test_bad_inputs import refused

    def started(*a, **kw):
        raise AssertionError("a Ray cluster was started for settings that cannot work")

    monkeypatch.setattr(ray, "init", started)
    refused(capsys, tmp_path, ["serve", "--registry", str(tmp_path), "--ray", *argv], needle)


@pytest.mark.ray  # needs the ray extra: the default run has none (importorskip would skip it), the ray set runs it
@pytest.mark.parametrize("key, value, needle", [
    ("bogus", 1, "ray_app key 'bogus' is not a serve flag"),  # was argparse's usage text and SystemExit(2) inside Ray's app builder
    ("port", 9000, "ray_app key 'port' is Ray Serve's to set"),  # was accepted and unread: Ray's proxy listens where Ray says
    ("ray_address", "auto", "ray_app key 'ray_address' is Ray Serve's to set"),
    ("replicas", 0, "ray_app: argument --replicas: 0 must be ≥ 1"),  # was usage text and SystemExit(2)
])
def test_ray_app_keys_that_are_not_its_settings_are_refused_in_one_line(tmp_path, key, value, needle):
    pytest.importorskip("ray")
    from adapterhub_lite.cli.serve import ray_app
    from adapterhub_lite.core.errors import AdapterHubError

    with pytest.raises(AdapterHubError) as refused:
        ray_app({"registry": str(tmp_path), key: value})
    assert needle in str(refused.value) and "\n" not in str(refused.value), refused.value


@pytest.fixture(scope="module")
def cluster(serve_registry):
    ray = pytest.importorskip("ray")
    from ray import serve

    from adapterhub_lite.cli.serve import ray_app

    ray.init(num_cpus=4, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = ray_app({"registry": str(serve_registry), "quantization": "none", "dtype": "fp32", "api_key": KEY, "replicas": 2,
                   "max_adapters_per_replica": 4, "cpus_per_replica": 1})
    serve.run(app, name="adapterhub", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def post(url, body, **kw):
    return httpx.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120, **kw)


def requests_of_every_kind():
    raw = lambda m, p: {"model": m, "prompt": p, "max_tokens": 4, "temperature": 0}  # noqa: E731
    return [raw("gen_a", "ab"), raw("cls_ia3", "cd ef"), raw("gen_prefix", "gh"), raw("gen_prompt", "ab cd"), raw("base", "hello"),
            {"model": "auto", "input": "ef", "max_tokens": 4, "temperature": 0}, {**raw("gen_a", "cd"), "merged_adapters": MERGE}]


@pytest.mark.ray
def test_answers_through_ray_equal_one_server(cluster, serve_registry):
    one = Served(serve_registry)
    try:
        for body in requests_of_every_kind():
            want, got = post(one.url, body), post(cluster, body)
            assert got.status_code == want.status_code == 200, (body, got.text)
            w, g = want.json(), got.json()
            assert [c["text"] for c in g["choices"]] == [c["text"] for c in w["choices"]], body
            assert g["usage"] == w["usage"] and g["model"] == w["model"], body
            assert got.headers[REPLICA_HEADER] and got.headers["content-length"] == str(len(got.content))  # as one server sends it
        bad = post(cluster, {"model": "nope", "prompt": "x"})  # the replica's own answers, as one server's
        assert bad.status_code == 404 and bad.json()["error"]["code"] == "model_not_found"
        assert httpx.post(cluster + "/v1/completions", json={"model": "gen_a", "prompt": "x"}).status_code == 401  # the API key
    finally:
        one.close()


@pytest.mark.ray
def test_a_request_without_the_api_key_loads_nothing_in_a_replica(cluster):
    """One server refuses a request without the key before any work; a replica loaded its adapter first (a name it did
    not know: re-read the registry index) and held it, evicting one a keyed client was using: 20 keyless requests with
    made-up names took gen_a out of the replica that held it."""
    for _ in range(3):  # Ray sends an id to the replica that holds it: the second would find it held
        r = httpx.post(cluster + "/v1/completions", json={"model": "cls_a@1.0.0", "prompt": "x"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers[HELD_HEADER] == "0", "a request without the key loaded its adapter"


@pytest.mark.ray
def test_made_up_names_from_a_keyed_client_take_no_adapter_slot(cluster):
    """Ray evicts a replica's least recently used adapter before it calls the loader, and the loader held any name: each
    made-up name a keyed client sent took a slot (max_adapters_per_replica 4), evicting adapters others were using. A
    name the replica cannot serve (the registry re-read first) is now answered 404 without being held."""
    def ask(model):
        return post(cluster, {"model": model, "prompt": "ab", "max_tokens": 1})

    assert ask("gen_a").status_code == 200
    for i in range(10):
        for _ in range(2):  # Ray sends the second to the replica holding the first
            r = ask(f"made-up-{i}")
            assert r.status_code == 404 and r.headers[HELD_HEADER] == "0", (r.status_code, r.headers.get(HELD_HEADER))
    r = ask("gen_a")
    assert r.status_code == 200 and r.headers[HELD_HEADER] == "1"


@pytest.mark.ray
def test_a_redirect_names_the_host_the_client_called(cluster):
    """The ingress dropped the Host header, so the app built URLs from its in-process scope: a trailing slash's 307 sent
    the client to http://ray-serve:0/v1/completions (one server: its own host and port)."""
    r = httpx.post(cluster + "/v1/completions/", json={"model": "base", "prompt": "x"}, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 307 and r.headers["location"] == cluster + "/v1/completions", r.headers
    assert r.headers[REPLICA_HEADER] and HELD_HEADER not in r.headers, "a request naming no adapter said it was held"


@pytest.mark.ray
def test_requests_go_to_the_replica_that_holds_their_adapter(cluster):
    shares, replicas = [], {}
    # A second warm-up and measure when the first left stale placements: Ray's router can still be sending requests by
    # counts it had before the replicas' last push (0.375 seen once in a clean-clone CI run, 1.0 when run again alone).
    for attempt in range(2):
        held = []
        for round_ in range(6):
            for name in EIGHT:
                if round_ < 2:
                    # Warm-up at a pace Ray's router can follow: it learns which adapters a replica holds from a push every
                    # 0.1 s and a long poll, so placements made faster than that see stale counts, can put 5 adapters on one
                    # replica of 4 and leave it evicting what the router still sends it (0.75 seen once without the pause).
                    time.sleep(0.5)
                r = post(cluster, {"model": name, "prompt": "ab", "max_tokens": 1})
                assert r.status_code == 200, r.text
                replicas.setdefault(name, set()).add(r.headers[REPLICA_HEADER])
                if round_ >= 2:  # after warm-up
                    held.append(r.headers[HELD_HEADER] == "1")
        shares.append(sum(held) / len(held))
        print(f"adapter affinity after warm-up {attempt + 1}: {shares[-1]:.3f} of {len(held)} requests on a replica that held their adapter")
        if shares[-1] >= 0.9:
            break
    assert shares[-1] >= 0.9, shares
    assert len(set().union(*replicas.values())) == 2  # both replicas serve


@pytest.mark.ray
def test_streaming_through_ray(cluster):
    body = {"model": "gen_b", "prompt": "ab", "max_tokens": 5, "temperature": 0}
    whole = post(cluster, body).json()["choices"][0]["text"]
    chunks = []
    with httpx.stream("POST", cluster + "/v1/completions", json={**body, "stream": True}, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    assert len(chunks) >= 2 and "".join(c["choices"][0]["text"] for c in chunks) == whole


@pytest.mark.ray
def test_a_replica_killed_under_load(cluster):
    """A replica killed under 16 requests and a stream: each request is answered 200 or 5xx, none hangs; the stream, whose
    200 went out before the kill, ends with the server's error event (the openai client raises), not a clean end that
    reads as a whole answer; requests succeed again once Ray has started another replica."""
    import openai
    import ray

    names = [n for n in ray.util.list_named_actors(all_namespaces=True) if "EngineReplica" in n["name"]]
    assert len(names) == 2
    client = openai.OpenAI(base_url=cluster + "/v1", api_key=KEY, max_retries=0)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(post, cluster, {"model": GEN[i % 4], "prompt": "ab cd", "max_tokens": 16}) for i in range(16)]
        time.sleep(1.0)
        raw = client.completions.with_raw_response.create(model="gen_a", prompt="ab", max_tokens=400, stream=True,
                                                          extra_body={"ignore_eos": True})
        chunks = iter(raw.parse())
        next(chunks)  # the stream has begun: its 200 is sent
        victim = next(n for n in names if n["name"].endswith(raw.headers[REPLICA_HEADER]))  # the stream's own replica
        ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=False)
        with pytest.raises(openai.APIError) as failed:
            for _ in chunks:
                pass
        assert failed.value.code == "replica_failed", failed.value
        statuses = [f.result(timeout=180).status_code for f in futures]  # nothing hangs
    assert all(s == 200 or 500 <= s < 600 for s in statuses), statuses
    deadline, ok = time.monotonic() + 180, 0
    while time.monotonic() < deadline and ok < 8:  # Ray starts another replica; later requests succeed
        ok = ok + 1 if post(cluster, {"model": GEN[ok % 4], "prompt": "ab", "max_tokens": 2}).status_code == 200 else 0
        time.sleep(0.2)
    assert ok == 8


@pytest.mark.ray
def test_a_saturated_replica_answers_429_a_route_prefix_is_served_and_a_client_that_leaves_cancels(cluster, serve_registry):
    """One replica that runs one request and queues one more (max_ongoing_requests=1, max_queued_requests=1): of 12
    requests sent at once, those Ray refuses get the server's 429 (OpenAI error shape, Retry-After), the others the
    answer one server gives. The application sits under a route prefix: its routes start after it."""
    from ray import serve

    from adapterhub_lite.cli.serve import ray_app

    app = ray_app({"registry": str(serve_registry), "quantization": "none", "dtype": "fp32", "api_key": KEY, "replicas": 1,
                   "max_ongoing_requests": 1, "max_queued_requests": 1, "cpus_per_replica": 1})
    serve.run(app, name="busy", route_prefix="/busy")
    body = {"model": "gen_a", "prompt": "ab cd", "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    one = Served(serve_registry)
    try:
        want = post(one.url, body).json()["choices"][0]["text"]
        assert post(cluster + "/busy", {**body, "max_tokens": 2}).status_code == 200  # the replica is up (and the prefix stripped)
        # a URL the app builds keeps the prefix (a 307 sent the client to /v1/completions, outside the application), and
        # the API key is checked under it
        moved = httpx.post(cluster + "/busy/v1/completions/", json=body, headers={"Authorization": f"Bearer {KEY}"})
        assert moved.status_code == 307 and moved.headers["location"] == cluster + "/busy/v1/completions", moved.headers
        assert httpx.post(cluster + "/busy/v1/completions", json=body).status_code == 401
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            got = list(pool.map(lambda _: post(cluster + "/busy", body), range(12)))
        codes = sorted(r.status_code for r in got)
        print(f"12 requests at once, 1 running + 1 queued allowed: {codes}")
        assert set(codes) == {200, 429} and codes.count(200) >= 2, codes
        for r in got:
            if r.status_code == 429:
                err = r.json()["error"]
                assert err["code"] == "server_busy" and "queue is full" in err["message"] and r.headers["retry-after"] == "1"
            else:
                assert r.json()["choices"][0]["text"] == want
        assert post(cluster + "/busy", body).json()["choices"][0]["text"] == want  # free again once they ended
        # a streaming client that leaves after its first chunk: the replica's engine drops the row (counted cancelled)
        before = _cancelled("busy")
        with httpx.stream("POST", cluster + "/busy/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=120,
                          json={"model": "gen_a", "prompt": "leave", "max_tokens": 500, "ignore_eos": True, "stream": True}) as r:
            assert r.status_code == 200
            next(line for line in r.iter_lines() if line.startswith("data: "))
        deadline = time.monotonic() + 30
        while _cancelled("busy") == before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _cancelled("busy") == before + 1
    finally:
        one.close()
        serve.delete("busy")


@pytest.mark.ray
def test_metrics_through_the_ingress_are_refused(cluster):
    """Two replicas behind one ingress: /metrics was answered by whichever one Ray picked (a scraper saw each counter jump
    between their values). It is refused, naming what to scrape; /health names the replica that answered it."""
    r = httpx.get(cluster + "/metrics")
    assert r.status_code == 501, (r.status_code, r.headers.get(REPLICA_HEADER), r.text[:80])
    assert r.json()["error"]["code"] == "metrics_per_replica" and r.headers["x-should-retry"] == "false"
    health = httpx.get(cluster + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok" and health.headers[REPLICA_HEADER]


def _cancelled(app: str) -> float:
    """The count of requests for gen_a that ended cancelled in the one replica of `app` (its /metrics, asked through Ray's
    deployment handle: the ingress refuses /metrics)."""
    from ray import serve

    answer = serve.get_deployment_handle("EngineReplica", app_name=app).options(stream=True).forward.remote("GET", "/metrics", b"", [], b"")
    status, _ = next(answer)
    assert status == 200
    text = b"".join(answer).decode()
    lines = [x for x in text.splitlines() if x.startswith('adapterhub_requests_total{adapter="gen_a",status="cancelled"}')]
    return float(lines[0].split()[-1]) if lines else 0.0

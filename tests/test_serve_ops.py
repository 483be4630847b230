"""The server as operators meet it: /metrics read by Prometheus' own parser, clients that leave, shutdown."""

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .serving import KEY, Served, damaged_registry, free_port, slowed


def scrape(served) -> dict:
    """/metrics through prometheus_client's parser (as Prometheus reads it): family name → family."""
    return {f.name: f for f in text_string_to_metric_families(httpx.get(served.url + "/metrics").text)}


def value(families: dict, sample: str, **labels) -> float:
    family = families[sample.removesuffix("_total")]
    return sum(s.value for s in family.samples if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))


def long_stream(served):
    """A streamed completion of base that runs for 400 tokens unless its client leaves."""
    return httpx.stream("POST", served.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                        json={"model": "base", "prompt": "run", "max_tokens": 400, "ignore_eos": True, "stream": True})


def first_token(r):
    """Read a stream up to its first data line; returns the line iterator, which the caller keeps while it stays.
    (`next(line for line in r.iter_lines() ...)` alone drops the iterator at once, and httpx closes the connection with
    it: the client had left before the test scraped, and the engine's next step dropped the row under it.)"""
    lines = r.iter_lines()
    next(line for line in lines if line.startswith("data: "))
    return lines


def running_after_the_client(served) -> float:
    """adapterhub_num_requests_running once it has had 10 s to come back to 0 (a request ends a step after its client)."""
    deadline = time.monotonic() + 10
    while value(scrape(served), "adapterhub_num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.05)
    return value(scrape(served), "adapterhub_num_requests_running")


def test_metrics_parse_follow_the_naming_conventions_and_count_what_was_sent(served):
    before = scrape(served)
    sent = [{"model": "base", "prompt": "a b c", "max_tokens": 7}, {"model": "gen_a", "input": "ab"},
            {"model": "base", "prompt": "x y", "max_tokens": 3, "echo": True}, {"model": "cls_a", "input": "pos 1"}]
    usage = [served.post("/v1/completions", body).json()["usage"] for body in sent]
    after = scrape(served)
    for name, family in after.items():
        assert name.startswith("adapterhub_"), name
        if family.type == "counter":  # Prometheus: a counter's samples end in _total (the parser strips it from the family)
            assert all(s.name in (f"{name}_total", f"{name}_created") for s in family.samples), family
    # a count since start is a counter, not a gauge (rate() and restarts need the type)
    assert after["adapterhub_evictions"].type == "counter"
    assert value(after, "adapterhub_evictions_total") == served.router.evictions
    assert value(after, "adapterhub_requests_total", status="ok") - value(before, "adapterhub_requests_total", status="ok") == len(sent)
    for sample, field in (("adapterhub_prompt_tokens_total", "prompt_tokens"), ("adapterhub_generated_tokens_total", "completion_tokens")):
        assert value(after, sample) - value(before, sample) == sum(u[field] for u in usage), sample


def test_running_requests_are_a_gauge_that_a_leaving_client_brings_back_to_zero(served, monkeypatch):
    """vLLM's num_requests_running: seen from outside, a stream is running while read, and not once its client left."""
    slowed(served, monkeypatch)
    with long_stream(served) as r:
        lines = first_token(r)  # noqa: F841 - held: the client stays until the with ends
        assert value(scrape(served), "adapterhub_num_requests_running") == 1
    assert running_after_the_client(served) == 0 and not served.engine._rows


def held_after_a_step(served, monkeypatch, when):
    """The engine's bank.step patched to stop after a step for which when(rows that left) holds, as a slow decode
    step's forward would (the rest of the engine's step, where it set the gauges, comes after it): set `go` to let
    it on. Returns (held, go)."""
    step, held, go = served.router.bank.step, threading.Event(), threading.Event()

    def stepping(dec, tokens, decide):
        left = []

        def deciding(j, key, tok):
            keep = decide(j, key, tok)
            if not keep:
                left.append(key)
            return keep

        out = step(dec, tokens, deciding)
        if not held.is_set() and when(left):
            held.set()
            go.wait(30)
        return out

    monkeypatch.setattr(served.router.bank, "step", stepping)
    return held, go


def test_a_stream_is_running_once_its_client_has_its_first_token(served, monkeypatch):
    """The gauges were set at the end of the engine's step, after the step's tokens had gone out: a client that read its
    first token and scraped /metrics before that end found nothing running and its own request waiting (running 0,
    queue 1): the window the test above races, held open here."""
    held, go = held_after_a_step(served, monkeypatch, lambda left: True)
    try:
        with long_stream(served) as r:
            lines = first_token(r)  # noqa: F841 - held: the client stays until the with ends
            assert held.wait(10)  # the engine is still in the step that sent the token
            families = scrape(served)
            assert (value(families, "adapterhub_num_requests_running"), value(families, "adapterhub_queue_depth")) == (1, 0)
            assert httpx.get(served.url + "/health").json()["queue_depth"] == 0
            go.set()
    finally:
        go.set()
    assert running_after_the_client(served) == 0


def test_an_answered_request_is_no_longer_running(served, monkeypatch):
    """The other end of the same lag: a client holding its whole answer found its request still running on /metrics
    until the engine's step ended."""
    held, go = held_after_a_step(served, monkeypatch, lambda left: bool(left))  # the step in which the row left
    try:
        r = served.post("/v1/completions", {"model": "base", "prompt": "run", "max_tokens": 3, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        assert held.wait(10)
        families = scrape(served)
        assert (value(families, "adapterhub_num_requests_running"), value(families, "adapterhub_queue_depth")) == (0, 0)
    finally:
        go.set()


def test_a_stream_whose_prompt_is_being_prefilled_is_running_not_waiting(served, monkeypatch):
    """A stream's headers go out once the engine has read its request; the same step admits it and prefills its
    prompt. A client that scraped during that prefill found it waiting (queue 1, running 0), though it had left the
    queue: what vLLM counts running from its first scheduled chunk."""
    start, prefilling, go = served.router.bank.start, threading.Event(), threading.Event()

    def starting(*args, **kwargs):
        prefilling.set()
        go.wait(30)
        return start(*args, **kwargs)

    monkeypatch.setattr(served.router.bank, "start", starting)
    try:
        with long_stream(served) as r:
            assert r.status_code == 200 and prefilling.wait(10)
            families = scrape(served)
            assert (value(families, "adapterhub_num_requests_running"), value(families, "adapterhub_queue_depth")) == (1, 0)
            go.set()
            next(line for line in r.iter_lines() if line.startswith("data: "))
    finally:
        go.set()
    assert running_after_the_client(served) == 0


# `adapterhub-lite serve` with every engine step 50 ms slower, so a stream is surely still open when the signals come
# (and at exit it says whether the engine's thread still runs)
SLOW_SERVE = """import atexit, sys, threading, time
atexit.register(lambda: print("engine thread at exit:", any(t.name == "adapterhub-engine" and t.is_alive() for t in threading.enumerate()),
                              file=sys.stderr, flush=True))
from adapterhub_lite.serving.engine import Engine
once = Engine._serve_once
Engine._serve_once = lambda self: (time.sleep(0.05), once(self))[1]
from adapterhub_lite.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_forced_quit_drops_the_running_rows_and_removes_the_scratch_folder(serve_registry, tmp_path):
    """Ctrl-C twice is uvicorn's force quit, which skips the app's shutdown (where the engine stops): the engine's thread
    still ran while the interpreter exited under it, and the process died of a C++ abort (exit -6) in 2 runs of 3."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    port, log = free_port(), tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SERVE, "serve", "--registry", str(serve_registry), "--port", str(port),
                             "--quantization", "none", "--dtype", "fp32"], stdout=subprocess.DEVNULL, stderr=log.open("wb"),
                            env={**os.environ, "TMPDIR": str(scratch)})  # a file, not a pipe: nothing blocks on a full pipe
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
                if proc.poll() is not None:
                    break
        else:
            proc.kill()
        if proc.poll() is not None:
            pytest.fail(f"server did not start: {log.read_text()[-800:]}")
        assert list(scratch.glob("adapterhub-router-*"))  # the merges' scratch folder, made at start
        with httpx.stream("POST", url + "/v1/completions", timeout=60,
                          json={"model": "base", "prompt": "ab", "max_tokens": 400, "ignore_eos": True, "stream": True}) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))  # the stream runs
            proc.send_signal(signal.SIGINT)  # graceful: waits for the stream
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)  # force quit
            with pytest.raises(httpx.RemoteProtocolError):  # cut, as uvicorn cuts it: the client is told, not left waiting
                for _ in lines:
                    pass
        assert proc.wait(30) == 130  # the CLI's code for an interrupt, not a signal's death
        assert "engine thread at exit: False" in log.read_text()  # stopped, not left running under the exit
        assert not list(scratch.glob("adapterhub-router-*")), list(scratch.iterdir())
    finally:
        proc.kill()
        proc.wait(10)


def test_a_stream_its_client_left_is_logged_as_499_with_the_tokens_it_had(served, monkeypatch, caplog):
    """A whole response whose client left is logged 499; a stream was logged 200 with 0 tokens, though its tokens went out."""
    slowed(served, monkeypatch)
    with caplog.at_level(logging.INFO, logger="adapterhub_lite.serve.access"):
        with httpx.stream("POST", served.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                          json={"model": "base", "prompt": "log me", "max_tokens": 400, "ignore_eos": True, "stream": True}) as r:
            lines = r.iter_lines()
            got = [next(line for line in lines if line.startswith("data: ")) for _ in range(3)]  # three tokens, then leave
        deadline = time.monotonic() + 10
        while not [x for x in caplog.records if "POST /v1/completions" in x.getMessage()] and time.monotonic() < deadline:
            time.sleep(0.05)
    line = next(x.getMessage() for x in caplog.records if "POST /v1/completions" in x.getMessage())
    fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
    assert len(got) == 3 and fields["status"] == "499" and fields["adapter"] == "base", line
    assert fields["prompt_tokens"] != "0" and int(fields["completion_tokens"]) >= 3, line


def test_health_and_models_name_the_same_unavailable_adapters(serve_registry, tmp_path):
    """A version whose weights fail their sha256: /v1/models listed `gen_b` and `gen_b@1.0.0` as unavailable from the
    start, /health only `gen_b` until a client had asked for `gen_b@1.0.0` (so what it said changed with the traffic)."""
    reg = damaged_registry(serve_registry, tmp_path)
    with pytest.warns(UserWarning, match="gen_b.*unavailable"):
        s = Served(reg)
    try:
        models = {m["id"]: m for m in httpx.get(s.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]}
        listed = {i: m["unavailable_reason"] for i, m in models.items() if m.get("available") is False}
        health = httpx.get(s.url + "/health").json()["unavailable_adapters"]
        assert set(listed) == set(health) == {"gen_b", "gen_b@1.0.0"} and "integrity check failed" in health["gen_b@1.0.0"], (listed, health)
        assert "available" not in models["gen_b@0.9.0"]  # the older, intact version is served
    finally:
        s.close()

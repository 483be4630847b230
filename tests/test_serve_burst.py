"""A burst its clients abandon: requests whose clients left must leave the queue at once (no place in --max-queue, gone
at the engine's next step with whatever they held), and a request sent after them is admitted ahead of every dead one.
The engine is stepped by the test (steps are counted, never seconds)."""

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest

from adapterhub_lite.serving.engine import Engine
from adapterhub_lite.serving.jobs import Job, QueueFull, ShuttingDown
from adapterhub_lite.serving.params import SamplingParams
from adapterhub_lite.serving.router import Router
from adapterhub_lite.serving.scheduler import Budgets

from .serving import KEY, Served, gauge


def job(prompt=(5, 9, 14), new=8) -> Job:
    return Job({"adapter": "base", "prompt_ids": list(prompt)}, lambda ev, p: None, SamplingParams(max_tokens=new, ignore_eos=True))


def counted(engine, status: str) -> float:
    return engine.metrics.requests.labels(adapter="base", status=status)._value.get()


def test_cancelled_requests_take_no_place_in_the_queue_and_leave_in_one_step(serve_registry):
    """One row runs; --max-queue 4 holds 4 queued requests whose clients then leave. A fresh request is accepted at once
    (it was a 429 while the dead still counted), and after one engine step the dead are gone and only it waits."""
    engine = Engine(Router.from_registry(serve_registry, quantization="none", dtype="fp32"), max_queue=4, budgets=Budgets(max_rows=1))
    busy = job(new=500)
    engine.submit(busy)
    while not engine._rows:
        engine._serve_once()
    dead = [job() for _ in range(4)]
    engine.submit(*dead)
    engine._serve_once()
    assert len(engine.scheduler.waiting) == 4 and engine.queue_depth == 4
    engine.cancel(dead)
    assert engine.queue_depth == 0
    fresh = job()
    engine.submit(fresh)  # QueueFull before: the 4 dead still counted against --max-queue
    engine._serve_once()
    assert [t.key for t in engine.scheduler.waiting] == [id(fresh)] and set(engine._jobs) == {id(busy), id(fresh)}
    assert counted(engine, "cancelled") == 4
    engine._gauges()
    assert gauge(engine.metrics.queue_depth) == 1
    engine.cancel([busy])
    engine._serve_once()  # the running row leaves in its decode step
    engine._serve_once()
    assert set(engine._rows) == {id(fresh)}  # admitted once the row is free


def test_the_queue_bound_holds_while_the_engine_reads_arrivals(serve_registry, monkeypatch):
    """--max-queue 2, two arrivals: while the engine thread reads them (tokenizes, routes) they are neither in the
    arrivals queue nor the scheduler's, and a request submitted then was taken: the bound was passed (a burst of 240
    showed 271 queued under --max-queue 256). It is refused."""
    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32")
    engine = Engine(router, max_queue=2)
    engine.submit(job(), job())
    prepare, seen = router.prepare, []

    def reading(*args, **kwargs):
        if not seen:  # a client's submit from the event loop, while the engine reads the first arrival
            try:
                engine.submit(job())
                seen.append("taken")
            except QueueFull:
                seen.append("refused")
        return prepare(*args, **kwargs)

    monkeypatch.setattr(router, "prepare", reading)
    engine._intake()
    assert seen == ["refused"] and len(engine.scheduler.waiting) == 2 and engine._waiting.empty()


class Gate:
    """The served engine's steps, one at a time on the test's word (free: as usual)."""

    def __init__(self, engine, monkeypatch):
        self.once, self.free = engine._serve_once, True
        self.go, self.ran = threading.Semaphore(0), threading.Semaphore(0)
        monkeypatch.setattr(engine, "_serve_once", self._step)

    def _step(self):
        if self.free:
            return self.once()
        self.go.acquire()
        try:
            return self.once()
        finally:
            self.ran.release()

    def hold(self):
        self.free = False
        self.go.release()  # the step under way ends; the next waits
        assert self.ran.acquire(timeout=30)

    def step(self):
        self.go.release()
        assert self.ran.acquire(timeout=30)

    def open(self):
        self.free = True
        self.go.release()


def send_and_close(port: int, bodies: list[dict]) -> list[socket.socket]:
    """Raw connections, each sending one whole request and reading nothing (closed by the caller)."""
    out = []
    for body in bodies:
        data = json.dumps(body).encode()
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: Bearer " + KEY.encode()
                  + b"\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
        out.append(s)
    return out


@pytest.mark.parametrize("stream", [False, True])
def test_clients_that_close_while_queued_leave_before_the_next_step(serve_registry, monkeypatch, stream):
    """The engine is held while 3 requests (one with n=2) arrive and their clients close their sockets, sending nothing
    more. The server must see the closes before the engine's next step: a stream not yet accepted was watched by
    nobody (its response not begun), and a whole response was looked at every quarter second, both while uvicorn did
    not read the socket. That step then reads none of them, and a request sent after them is admitted first."""
    s = Served(serve_registry, max_batch_rows=1)
    gate = Gate(s.engine, monkeypatch)
    try:
        gate.hold()
        body = {"model": "base", "prompt": "gone", "max_tokens": 50, "ignore_eos": True, "stream": stream}
        socks = send_and_close(s.port, [body, {**body, "n": 2}, body])
        for _ in range(3000):  # until the handlers have queued the 4 choices
            if s.engine._waiting.qsize() == 4:
                break
            threading.Event().wait(0.01)
        dead = list(s.engine._waiting.queue)
        for sock in socks:
            sock.close()
        for _ in range(5):  # a few round trips through the server's event loop: it has handled the closes by then
            httpx.get(s.url + "/health")
            if all(j.cancelled for j in dead):
                break
        assert all(j.cancelled for j in dead), "the server has not seen its clients leave"
        assert s.engine.queue_depth == 0
        fresh = job()
        s.engine.submit(fresh)
        gate.step()
        assert set(s.engine._jobs) == {id(fresh)} and id(fresh) in s.engine._rows
        assert counted(s.engine, "cancelled") == 4
    finally:
        gate.open()
        s.close()


def test_a_request_refused_for_a_full_queue_queues_none_of_its_choices(serve_registry, monkeypatch):
    """--max-queue 4 holds one queued request; one with n=4 is refused (429) whole: none of its choices was queued
    for nobody (three were, then cancelled), and the refusal is counted, one per choice as every ending is."""
    s = Served(serve_registry, max_batch_rows=1, max_queue=4)
    gate = Gate(s.engine, monkeypatch)
    try:
        gate.hold()

        async def go():
            async with httpx.AsyncClient(base_url=s.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as h:
                first = asyncio.ensure_future(h.post("/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 4}))
                while s.engine._waiting.qsize() < 1:
                    await asyncio.sleep(0.01)
                refused = await h.post("/v1/completions", json={"model": "base", "prompt": "y", "max_tokens": 4, "n": 4})
                queued = s.engine._waiting.qsize()
                gate.open()
                return refused, queued, (await first).status_code

        refused, queued, first = asyncio.run(go())
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1" and refused.json()["error"]["code"] == "queue_full"
        assert queued == 1 and first == 200
        assert counted(s.engine, "QueueFull") == 4 and counted(s.engine, "cancelled") == 0
    finally:
        gate.open()
        s.close()


def test_a_request_of_more_rows_than_the_queue_holds_is_a_400_not_a_429_forever(served, monkeypatch):
    """n=5 (or 3 prompts × n=2) on an idle server with --max-queue 4: an empty queue could not take it either, yet it
    was a 429 'retry shortly' (Retry-After: 1), so a client retried forever. It is a 400 naming both numbers and
    counted once per row as every refusal; a request of exactly 4 rows is served."""
    monkeypatch.setattr(served.engine, "max_queue", 4)
    before = served.engine.metrics.requests.labels(adapter="base", status="BudgetError")._value.get()
    for extra in ({"n": 5}, {"prompt": ["x", "y", "z"], "n": 2}):
        r = served.post("/v1/completions", {"model": "base", "prompt": "x", "max_tokens": 2, **extra})
        assert r.status_code == 400, r.text
        message = r.json()["error"]["message"]
        assert "--max-queue" in message and "4" in message and ("5 rows" in message or "6 rows" in message), message
    assert served.engine.metrics.requests.labels(adapter="base", status="BudgetError")._value.get() == before + 11
    r = served.post("/v1/completions", {"model": "base", "prompt": ["x", "y"], "max_tokens": 2, "n": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 4


def test_a_request_refused_while_stopping_is_counted(serve_registry):
    """A request that reaches a stopping engine gets ShuttingDown (a 503 to its client) and, as every ending, is counted
    in /metrics, one per choice: before, those refusals showed nowhere."""
    engine = Engine(Router.from_registry(serve_registry, quantization="none", dtype="fp32"))
    engine.stop()
    with pytest.raises(ShuttingDown):
        engine.submit(job(), job())
    assert counted(engine, "ShuttingDown") == 2 and engine.queue_depth == 0


@pytest.mark.parametrize("first", ["held", "refused"])
def test_a_submit_while_the_engine_reads_counts_each_live_arrival_once(serve_registry, monkeypatch, first):
    """--max-queue 2, two arrivals; a client submits while the engine reads the second. The first is by then either
    queued for a budget (it counts once, not also as being read: the submit was refused with room left) or refused
    for its own fault (its client has its answer: it counts no more). Either way one place is left, and the submit is taken."""
    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32")
    engine = Engine(router, max_queue=3 if first == "held" else 2)
    ahead = job(new=10**6) if first == "refused" else job()  # past the context: refused as it is read
    second = job()
    engine.submit(ahead, second)
    prepare, seen = router.prepare, []

    def reading(request, *args, **kwargs):
        if request is second.request:
            try:
                engine.submit(job())
                seen.append("taken")
            except QueueFull:
                seen.append("refused")
        return prepare(request, *args, **kwargs)

    monkeypatch.setattr(router, "prepare", reading)
    engine._intake()
    assert ahead.finished == (first == "refused") and seen == ["taken"]
    assert engine.queue_depth == (3 if first == "held" else 2)


def test_the_queue_gauge_counts_a_request_as_it_is_submitted(serve_registry):
    """/metrics' queue depth right after a submit (before any engine step) counts its choices, once."""
    engine = Engine(Router.from_registry(serve_registry, quantization="none", dtype="fp32"), max_queue=4)
    engine.submit(job(), job())
    assert gauge(engine.metrics.queue_depth) == 2
    engine.submit(job())
    assert gauge(engine.metrics.queue_depth) == 3


def test_a_submit_while_the_engine_takes_arrivals_in_waits_and_finds_the_queue_full(serve_registry, monkeypatch):
    """--max-queue 2, two arrivals. A client's submit made while the engine moves them from the arrivals queue to
    those it reads (between the two) must not find one of them in neither place and pass the bound: it waits for the
    move and is refused."""
    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32")
    engine = Engine(router, max_queue=2)
    engine.submit(job(), job())
    gone, seen, threads = engine._gone, [], []

    def submit():
        try:
            engine.submit(job())
            seen.append("taken")
        except QueueFull:
            seen.append("refused")

    def moving(j):  # called for each arrival as it is taken from the arrivals queue
        if not threads:
            threads.append(threading.Thread(target=submit))
            threads[0].start()
            threads[0].join(0.5)  # the submit runs now, or waits for the engine's move to end
        return gone(j)

    monkeypatch.setattr(engine, "_gone", moving)
    engine._intake()
    threads[0].join(30)
    assert seen == ["refused"] and len(engine.scheduler.waiting) == 2


def test_router_run_reads_requests_as_the_queue_bound_leaves_room(serve_registry, monkeypatch):
    """Engine.run on 7 requests under --max-queue 3: no step finds more than 3 requests queued (arrived or waiting for
    a budget), so a file of 100,000 requests is not read and held all at once; every request is answered."""
    engine = Engine(Router.from_registry(serve_registry, quantization="none", dtype="fp32"), max_queue=3, budgets=Budgets(max_rows=1))
    once, depths = engine._serve_once, []

    def step():
        depths.append(engine._waiting.qsize() + len(engine.scheduler.waiting))
        return once()

    monkeypatch.setattr(engine, "_serve_once", step)
    out = engine.run([{"adapter": "base", "prompt": f"p{i}"} for i in range(7)], max_new_tokens=2)
    assert len(out) == 7 and all(o is not None for o in out)
    assert max(depths) == 3, depths


def test_a_refusal_is_counted_under_the_adapter_its_request_named(serve_registry):
    """A 429 (queue full) or a 503 (stopping) for a request naming gen_a is counted under adapter="gen_a", as its other
    endings are, not under another adapter's series."""
    engine = Engine(Router.from_registry(serve_registry, quantization="none", dtype="fp32"), max_queue=1)
    named = Job({"adapter": "gen_a", "prompt_ids": [5, 9]}, lambda ev, p: None, SamplingParams(max_tokens=2))
    engine.submit(job())
    with pytest.raises(QueueFull):
        engine.submit(named)
    engine.stop()
    with pytest.raises(ShuttingDown):
        engine.submit(named)
    for status in ("QueueFull", "ShuttingDown"):
        assert engine.metrics.requests.labels(adapter="gen_a", status=status)._value.get() == 1
        assert counted(engine, status) == 0


@pytest.mark.parametrize("stream", [True, False])
def test_a_request_refused_for_one_prompt_drops_the_choices_already_accepted(serve_registry, monkeypatch, stream):
    """A request of two prompts, the second over the context: it is answered 400 (a stream before it begins, so no
    stream's clean-up runs); the first prompt's choice, accepted meanwhile, must be dropped with it, not decoded to
    its max_tokens for nobody."""
    s = Served(serve_registry)
    submit, jobs = s.engine.submit, []

    def recording(*js):
        jobs.extend(js)
        return submit(*js)

    monkeypatch.setattr(s.engine, "submit", recording)
    try:
        context = s.router.max_model_len
        r = s.post("/v1/completions", {"model": "base", "prompt": [[5, 9], [5] * context], "max_tokens": context - 4,
                                       "ignore_eos": True, "stream": stream})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
        assert len(jobs) == 2 and jobs[0].prepared is not None and all(j.cancelled for j in jobs)
    finally:
        s.close()


def test_the_queue_count_finds_an_arrival_that_the_engine_is_taking_in(serve_registry, monkeypatch):
    """/health's and /metrics' queue depth read while the engine moves an arrival from the arrivals queue to those it
    reads: the count found it in neither place and said 0 for a request its client still waited on. It waits for the move."""
    engine = Engine(Router.from_registry(serve_registry, quantization="none", dtype="fp32"))
    engine.submit(job())
    gone, counts, threads = engine._gone, [], []

    def moving(j):  # called for each arrival as it is taken from the arrivals queue
        if not threads:
            threads.append(threading.Thread(target=lambda: counts.append((engine.queue_depth, gauge(engine.metrics.queue_depth)))))
            threads[0].start()
            threads[0].join(0.5)  # the count runs now, or waits for the move to end
        return gone(j)

    monkeypatch.setattr(engine, "_gone", moving)
    engine._intake()
    threads[0].join(30)
    assert counts == [(1, 1)] and engine.queue_depth == 1


def test_the_queue_count_finds_a_read_arrival_once_as_it_joins_the_scheduler(serve_registry, monkeypatch):
    """The count read those being read (not yet in the engine's jobs), then the scheduler's queue (those in its jobs):
    an arrival that entered the jobs between the two reads was counted in both, 2 for one request. Its entry waits for
    the count."""
    engine = Engine(Router.from_registry(serve_registry, quantization="none", dtype="fp32"))
    arrival = job()
    engine.submit(arrival)
    queued, counting = threading.Event(), threading.Event()
    add = engine.scheduler.add

    def adding(ticket):  # the engine has queued the ticket; the job enters _jobs next, once the count has begun
        add(ticket)
        queued.set()
        counting.wait(30)

    class Jobs(dict):
        def __contains__(self, key):  # the count asks whether one being read is held yet: let the engine go on meanwhile
            held = dict.__contains__(self, key)
            if key == id(arrival) and not held and not counting.is_set():
                counting.set()
                deadline = time.monotonic() + 0.5
                while not dict.__contains__(self, key) and time.monotonic() < deadline:  # it enters now, or waits for the count
                    time.sleep(0.01)
            return held

    monkeypatch.setattr(engine.scheduler, "add", adding)
    engine._jobs = Jobs()
    reading = threading.Thread(target=engine._intake)
    reading.start()
    assert queued.wait(30)
    assert engine.queue_depth == 1 and counting.is_set()
    reading.join(30)
    assert engine.queue_depth == 1 and list(engine._jobs) == [id(arrival)]

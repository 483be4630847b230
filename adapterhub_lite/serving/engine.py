"""The engine: one thread owns the backbone and serves every request with continuous batching.

Requests arrive from any thread (the HTTP server's event loop) into a bounded queue. The engine
thread loops over *steps*; at each step it

1. runs the calls that change the catalogue (load, unload, reload, registering a merge) between two
   steps, so they never race a batch;
2. reads the arrivals (serving/admission.py, as step 4): routes `auto` rows by content, tokenizes and checks each request against the
   context, and hands the scheduler a Ticket (serving/scheduler.py). A bad request fails alone;
3. asks the scheduler which requests run now under the budgets (rows, tokens per step, cache
   positions, adapters per batch); the others wait, first come first served;
4. admits them: makes their adapters resident (never evicting one a running row uses), scores
   classification rows in one forward pass, prefills generation prompts in one pass (a long prompt
   in pieces over several steps, chunked prefill), and lets them *join* the running batch
   (serving/decoding.py: each row keeps its cache columns and positions). When a
   pass fails (an out-of-memory, one bad row), its requests are retried in halves, so the failure
   stays with the rows that cause it and the running rows go on; every failure is logged;
5. picks one token for every running row with the row's own settings (serving/sampling.py),
   streams what can no longer change to the row's listener (serving/output.py), lets rows that
   stopped (EOS, a stop token or string, max_tokens, a cancelled or timed-out request) leave, and
   runs one decode step for the rest. The running rows decode over preallocated buffers
   (serving/static.py: a fixed KV cache, device-side row state, CUDA graphs on a GPU) where the model's
   cache allows; prefill runs per admission with its own shapes and hands its rows over.

So a request that arrives while a batch runs starts at the next step instead of waiting for the
batch to end, and each row still decodes exactly as it would alone (same adapter, positions and
cache). The host reads the chosen tokens once per step; that read is what decides who stops.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from adapterhub_lite.core.errors import AdapterHubError
from adapterhub_lite.core.names import RESERVED
from adapterhub_lite.serving.admission import Admission
from adapterhub_lite.serving.jobs import Job, QueueFull, RequestTimeout, Result, ShuttingDown
from adapterhub_lite.serving.manager import AdapterManager
from adapterhub_lite.serving.metrics import ServeMetrics, adapter_label
from adapterhub_lite.serving.offline import OfflineRun
from adapterhub_lite.serving.sampling import choose, model_logprobs
from adapterhub_lite.serving.scheduler import BudgetError, Budgets, Scheduler, Ticket
from adapterhub_lite.serving.static import StaticBatch

log = logging.getLogger("adapterhub_lite.serve")  # the logger's name predates the serving package: users configure it


class Engine(Admission, OfflineRun):
    """Serves Jobs with continuous batching over an AdapterManager's backbone: on a background thread (`start`,
    `submit`: the server), or to the end on the calling thread (`run`: Router.run, `infer`).

    What runs at each step is the Scheduler's decision (serving/scheduler.py: rows, tokens per step,
    cache positions and adapters per batch); the AdapterBank runs it. Every entry point goes through
    the same steps, so what the server answers, `infer` and `Router.run` answer too."""

    def __init__(self, router: AdapterManager, *, max_batch_rows: int = 32, max_queue: int = 256, metrics: ServeMetrics | None = None,
                 budgets: Budgets | None = None, static_decode: bool = True, cuda_graphs: str = "auto"):
        self.router = router
        self.budgets = budgets or Budgets(max_rows=max_batch_rows)
        self.max_batch_rows = self.budgets.max_rows
        self.scheduler = Scheduler(self.budgets)
        self.metrics = metrics or ServeMetrics(router.max_model_len)
        # read when /metrics is scraped, not at every step: summing it walks every per-row layer (~0.2 ms on 120)
        self.metrics.row_bytes.set_function(router.bank.row_bytes)
        # arrivals, from any thread; unbounded as a queue.Queue: --max-queue bounds the requests whose clients still wait
        # (queue_depth), and the jobs of clients that left sit here until the next step drops them
        self._waiting: queue.Queue[Job] = queue.Queue()
        self.max_queue = max_queue
        # a submit's check and puts, the step's move of arrivals to _reading and each read one's entry into _jobs, and the
        # queue's count (queue_depth), one at a time: a request moving meanwhile is counted once, not twice nor not at all.
        # Reentrant: a listener called during the move (an arrival failed as it is taken) may count the queue
        self._admitting = threading.RLock()
        self._reading: list[Job] = []  # arrivals this step reads (routes, tokenizes) before the scheduler holds them
        self._calls: queue.Queue[tuple[Callable, Future]] = queue.Queue()
        self._unused: dict[str, Callable] = {}  # adapter → fn(router) to run once no request the engine holds names it
        self._stopping = threading.Event()
        self._aborting = False  # abort(): drop what is held instead of finishing it
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="adapterhub-engine", daemon=True)
        self._dec = None  # the running batch: a StaticBatch, or a Decoding where static buffers cannot serve (None when idle)
        # The static batch outlives idle spells: its buffers (and CUDA graphs) are reused by the next rows.
        self.static_decode = static_decode
        if cuda_graphs not in ("auto", "on", "off"):
            raise AdapterHubError(f"cuda_graphs={cuda_graphs!r}: give auto, on or off (--cuda-graphs)")
        # auto: on a GPU, unquantized backbones only: whether bitsandbytes' 8-bit kernels capture is unmeasured, and a
        # capture that fails is caught but is not free (`on` tries it; the batch falls back to eager with a warning)
        quantized = router.backbone.fingerprint.get("quantization", "none") != "none"
        self.cuda_graphs = router.backbone.device.type == "cuda" and (cuda_graphs == "on" or (cuda_graphs == "auto" and not quantized))
        self._static: StaticBatch | None = None
        self._memory_waits: list[Ticket] = []  # requests whose admission ran out of memory: tried again once a row leaves
        self._no_room: tuple | None = None  # (adapter, adapters kept, resident) of the last hold that found no room (admission)
        self._rows: dict[int, Job] = {}  # id(job) → job, for the running rows
        self._jobs: dict[int, Job] = {}  # id(job) → job, for every job the scheduler holds (waiting, prefilling, running)
        # Adapters not in host memory are read (and their sha256 checked) on a loader thread, never on this one: decoding
        # goes on meanwhile, and the requests that need them wait in the queue (Ticket.ready).
        self._loader = ThreadPoolExecutor(max_workers=2, thread_name_prefix="adapterhub-loader")
        self._fetching: dict[str, Future] = {}
        self._evictions_counted = router.evictions  # what the evictions Counter holds (it can only be increased)
        # The request gauges are read as /metrics is scraped, as /health's queue_depth is, not set at the end of a step: a step
        # tells its clients (a stream's headers, its first token, an answer) before it ends, and a client that scraped then
        # found its request waiting while it read tokens, or running once it had its answer. The engine changes what they
        # count before it tells anyone, so what a client has been told is what /metrics says.
        self.metrics.running.set_function(lambda: self.scheduler.admitted)
        self.metrics.queue_depth.set_function(lambda: self.queue_depth)

    # -- the outside -----------------------------------------------------------------------------
    def start(self) -> Engine:
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    def submit(self, *jobs: Job) -> None:
        """Queue a request's jobs (its choices), all or none: QueueFull when they would take the queue past its bound,
        BudgetError when they are more than it holds at all, ShuttingDown while stopping (each refused job counted in
        /metrics with that status, as every ending is)."""
        if self._stopping.is_set():
            self._refuse(jobs, ShuttingDown("the server is shutting down and takes no new requests; retry on another replica"))
        if len(jobs) > self.max_queue:  # an empty queue could not take them either: a 429's retry would never pass
            self._refuse(jobs, BudgetError(f"the request makes {len(jobs)} rows (prompts × n) but the server queues {self.max_queue} at "
                                           "most (--max-queue), so it could never be queued; send fewer prompts or a smaller n"))
        with self._admitting:
            if self._depth() + len(jobs) > self.max_queue:
                self._refuse(jobs, QueueFull(f"the request queue is full ({self.max_queue} waiting); retry shortly"))
            for job in jobs:
                self._waiting.put_nowait(job)
        self._wake.set()

    def _refuse(self, jobs, exc: Exception):
        for job in jobs:
            self.metrics.requests.labels(adapter=self._label(job), status=type(exc).__name__).inc()
        raise exc

    def cancel(self, jobs) -> None:
        """Clients gone: the jobs stop counting against --max-queue at once, and leave the engine (row, cache reservation,
        adapter) at its next step, which starts at once where the engine idles."""
        for job in jobs:
            job.cancel()
        self._wake.set()

    def call(self, fn: Callable[[AdapterManager], object]) -> Future:
        """Run fn(router) on the engine thread between two steps (catalogue changes never race a batch)."""
        fut: Future = Future()
        if self._stopping.is_set():
            fut.set_exception(ShuttingDown("the server is shutting down"))
            return fut
        self._calls.put((fn, fut))
        self._wake.set()
        return fut

    def stop(self, timeout: float = 30.0) -> None:
        """Take no new requests, finish the queued and running ones (up to `timeout` s), then stop."""
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():  # an engine that only run() drove has no thread
            self._thread.join(timeout)
        self._loader.shutdown(wait=False, cancel_futures=True)

    def abort(self, timeout: float = 5.0) -> None:
        """Stop now: every queued and running request is dropped (counted as cancelled; nobody reads their answers
        any more, as after a forced quit), then the thread stops. A no-op once `stop` has ended the thread."""
        self._aborting = True
        self.stop(timeout)

    def in_use(self) -> set[str]:
        """Adapters the running and prefilling rows use (call on the engine thread, e.g. inside `call`)."""
        held = (*self.scheduler.running.values(), *self.scheduler.prefilling.values())
        return {self._jobs[t.key].prepared.adapter for t in held if t.key in self._jobs}

    def when_unused(self, name: str, fn: Callable[[AdapterManager], object]) -> None:
        """Run fn(router) on the engine thread, after a step, once no request the engine holds names adapter `name`
        (call on the engine thread, e.g. inside `call`): an unload's freeing waits for the requests accepted before it."""
        self._unused[name] = fn

    def _release(self) -> None:
        if self._unused:
            wanted = self.wanted()
            for name in [n for n in self._unused if n not in wanted]:
                self._unused.pop(name)(self.router)

    def wanted(self) -> set[str]:
        """Adapters any request the engine holds names: in_use() and those of requests waiting for a budget or just
        arrived (call on the engine thread). A merge a queued request was accepted for is not forgotten under it."""
        waiting = {self._jobs[t.key].prepared.adapter for t in self.scheduler.waiting if t.key in self._jobs}
        return self.in_use() | waiting | {job.request.get("adapter") for job in list(self._waiting.queue)}

    @property
    def queue_depth(self) -> int:
        """Requests not yet running whose client still waits: arrived, being read, or waiting for a budget (any thread;
        /health's and /metrics' count). A cancelled one is left out at once, though the next step drops it: a burst its
        clients abandoned takes no place in --max-queue (no 429 for nothing) and shows in no gauge."""
        with self._admitting:
            return self._depth()

    def _depth(self) -> int:
        """queue_depth, under _admitting (held by the caller): the arrivals' move to _reading and a read one's entry into
        _jobs wait for the count, so no request is found in two places or none. Each list is copied whole under the GIL."""
        held = self._jobs
        reading = [j for j in list(self._reading) if id(j) not in held]  # once held, counted from the scheduler's queue
        jobs = [*list(self._waiting.queue), *reading, *(held.get(t.key) for t in list(self.scheduler.waiting))]
        return sum(1 for j in jobs if j is not None and not j.cancelled and not j.finished)

    # -- the loop (run(), the offline driver of the same steps: serving/offline.py) ---------------
    def _loop(self) -> None:
        while not self._serve_once():
            pass

    def _serve_once(self) -> bool:
        """One step of the loop: catalogue calls, arrivals, the scheduler's plan, admission, a decode step; sleeps
        briefly when there was nothing to run. Returns True once stopping and nothing is left."""
        if self._aborting:
            with self.router.lock:
                self._drop_all()
            return True
        try:
            with self.router.lock:  # a caller of the Router API on another thread waits for the end of this step
                self._run_calls()
                self._intake()
                self._sweep()
                plan = self.scheduler.schedule(can_join=(self.router.bank if self._dec is None else self._dec).joinable)
                if plan.blocked:
                    self.metrics.waits.labels(budget=plan.blocked).inc()
                if plan.prefill:
                    self._admit(plan)
                if self._dec is not None:
                    self._step()
                if self._dec is None and not self.scheduler.prefilling:  # no row runs: the last batch's gathered factors go
                    self.router.bank.drop_rows()
                self._release()  # adapters unloaded under requests: freed once the last of them has left
                self._gauges()  # the cache and adapter gauges, after the step (the request gauges are read as scraped)
            if self._dec is None and not plan.prefill:
                if self._stopping.is_set() and self._waiting.empty() and not len(self.scheduler):
                    return True
                self._wake.wait(0.05)  # idle (or every waiting request waits for a budget or an adapter read): sleep until something arrives
                self._wake.clear()
        except Exception as exc:  # noqa: BLE001 - a fault of the engine itself (not of one request): fail what it holds, keep serving
            held = list(self._jobs.values())
            log.exception("engine fault (%s: %s); failing its %d request(s)", type(exc).__name__, exc, len(held))
            self._dec = self._static = None  # buffers a fault may have left half-written are not reused
            self._fail(held, exc)
        return False

    def _run_calls(self) -> None:
        while True:
            try:
                fn, fut = self._calls.get_nowait()
            except queue.Empty:
                return
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(self.router))
                except Exception as exc:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(exc)

    def _gauges(self) -> None:
        s = self.scheduler
        self.metrics.kv_reserved.set(s.kv_reserved())
        self.metrics.resident.set(len(self.router.resident))
        self.metrics.evictions.inc(self.router.evictions - self._evictions_counted)  # the router counts; the Counter follows
        self._evictions_counted = self.router.evictions
        self.metrics.kv_cache_bytes.set(self._static.nbytes if self._static is not None else 0)

    def decode_info(self) -> dict:
        """How the running rows decode, for /health: static buffers (their bytes and size) or not, and CUDA graphs."""
        st = self._static
        return {"static": self.static_decode, "cuda_graphs": self.cuda_graphs and (st is None or st.graphs),
                "graphs_captured": 0 if st is None else st.captured, "kv_cache_bytes": 0 if st is None else st.nbytes,
                "kv_cache_rows": 0 if st is None else st._rows, "kv_cache_width": 0 if st is None else st._width}

    # -- decoding --------------------------------------------------------------------------------------
    def _step(self) -> None:
        """One token for every running row; rows that stop leave; the rest take one decode step. A failing
        step fails the running rows (their shared cache is gone), logged with its stack; waiting ones go on."""
        try:
            self._decode()
        except Exception as exc:  # noqa: BLE001 - e.g. an out-of-memory in the step: these rows fail, the server goes on
            failed = list(self._rows.values())
            log.exception("decode step failed (%s: %s); failing its %d running request(s)", type(exc).__name__, exc, len(failed))
            self._dec = self._static = None
            self._fail(failed, exc)
            if self.router.backbone.device.type == "cuda":
                torch.cuda.empty_cache()

    def _decode(self) -> None:
        dec = self._dec
        jobs = [self._rows[k] for k in dec.keys]
        tokens = choose(dec.logits, jobs, self.router.backbone.tokenizer.eos_token_id)
        infos = model_logprobs(dec.logits, tokens, jobs)
        now = None  # one clock read per step, at its first token: after bank.step read them (the sync on their forward), as vLLM stamps
        emitted = []  # (adapter, times, gap) of the rows that took a token, stamped as they take it: the metrics count the step at once

        def emit(j: int, key: int, tok: int) -> bool:  # row j's token: to its client; does it keep running?
            nonlocal now
            now = now or time.monotonic()
            job = self._rows[key]
            if job.cancelled or self._expired(job):
                self._forget(job)
                return False
            emitted.append((job.prepared.adapter, job.times, job.times.token_at(now)))  # stamped before _finish reads it
            reason = job.state.add(tok, infos.get(j))
            text, entries = job.state.take()
            if text or entries:
                job.listener("token", (text, entries))
            if reason:
                self._finish(job, reason)
            return not reason

        try:
            if not self.router.bank.step(dec, tokens, emit):  # the bank's step: one host sync, finished rows leave
                self._dec = None
        finally:
            self.metrics.step_tokens(emitted, now)  # none emitted: nothing read of `now`

    # -- endings ---------------------------------------------------------------------------------
    def _gone(self, job: Job) -> bool:
        """A queued job nobody waits for (cancelled: its client left, or a sibling choice was refused) or past its deadline."""
        if job.cancelled:
            if not job.finished:
                job.finished = True
                self.metrics.requests.labels(adapter=self._label(job), status="cancelled").inc()
            return True
        return self._expired(job)

    def _expired(self, job: Job) -> bool:
        if job.deadline is not None and time.monotonic() > job.deadline:
            self._fail([job], RequestTimeout("the request ran past the server's request timeout (--request-timeout); send fewer tokens (a lower max_tokens), or raise the timeout"))
            return True
        return False

    def _label(self, job: Job) -> str:
        """The adapter label of a request in metrics: only names the server knows (bounded cardinality)."""
        if job.prepared is not None:
            return adapter_label(job.prepared.adapter)
        name = job.request.get("adapter")
        return adapter_label(name) if name in RESERVED or name in self.router.folders else "unknown"

    def _forget(self, job: Job) -> None:
        """The job leaves the engine: its row, its budgets, its prefill state."""
        if self._rows.pop(id(job), None) is not None and self._memory_waits:  # a row left: those waiting for memory try again
            for ticket in self._memory_waits:
                ticket.ready = True
            self._memory_waits.clear()
        self._jobs.pop(id(job), None)
        self.scheduler.finish(id(job))
        job.filling = None
        if job.cancelled and not job.finished:
            job.finished = True
            self.metrics.requests.labels(adapter=self._label(job), status="cancelled").inc()

    def _drop_all(self) -> None:
        """abort(): every job leaves as cancelled, without a word to its listener (whose event loop may be gone)."""
        held = list(self._jobs.values())
        while True:
            try:
                held.append(self._waiting.get_nowait())
            except queue.Empty:
                break
        for job in held:
            job.cancel()
            self._forget(job)
        self._dec = None

    def _fail(self, jobs: list[Job], exc: Exception) -> None:
        for job in jobs:
            self._forget(job)
            if job.finished:
                continue
            job.finished = True
            self.metrics.requests.labels(adapter=self._label(job), status=type(exc).__name__).inc()
            job.listener("error", exc)

    def _finish(self, job: Job, reason: str, text: str | None = None, **extra) -> None:
        self._forget(job)
        job.finished = True
        p, state = job.prepared, job.state
        entries = state.entries() if state is not None and job.params.logprobs is not None else None
        result = Result(p.adapter, state.text if text is None else text, reason, len(p.ids), len(job.tokens), entries=entries,
                        prompt=job.prompt, prompt_ids=p.ids, token_ids=list(job.tokens),
                        stop_reason=state.stop_reason if state is not None and reason == "stop" else None, routing=job.routing, **extra)
        self.metrics.requests.labels(adapter=self._label(job), status="ok").inc()
        self.metrics.answered(job.times, result.prompt_tokens, result.completion_tokens, time.monotonic(), reason)
        job.listener("done", result)

"""The scheduler: one thread owns the backbone and serves every request with continuous batching.

Requests arrive from any thread (the HTTP server's event loop) into a bounded queue. The engine
thread loops over *steps*; at each step it

1. runs the calls that change the catalogue (load, unload, merge, reload) between two steps, so
   they never race a batch;
2. admits newcomers up to `max_batch_rows`: routes `auto` rows by content, makes their adapters
   resident (never evicting one a running row uses), scores classification rows in one forward
   pass, and prefills generation rows in one pass that then *joins* the running batch
   (AdapterBank.join: caches padded with masked columns, each row keeps its positions);
3. picks one token for every running row (greedy, or sampled at the row's temperature), streams
   it to the row's listener, and lets rows that stopped (EOS, a stop string, max_tokens, a
   cancelled or timed-out request) leave;
4. runs one decode step for the rest.

So a request that arrives while a batch runs starts at the next step instead of waiting for the
batch to end, and each row still decodes exactly as it would alone (same adapter, positions and
cache). The host reads the chosen tokens once per step; that read is what decides who stops.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from ..data import label_words
from ..errors import AdapterHubError
from ..router.router import Prepared, Router
from .metrics import ServeMetrics


class QueueFull(AdapterHubError):
    """The waiting queue is at its bound; the client should retry later (HTTP 429)."""


class ShuttingDown(AdapterHubError):
    """The server is stopping and takes no new requests (HTTP 503)."""


class RequestTimeout(AdapterHubError):
    """The request ran past the server's request timeout (HTTP 504)."""


@dataclass
class Job:
    """One request in flight. `listener(event, payload)` is called from the engine thread with
    ("token", (token_id, text_delta, logprob_info)), then ("done", Result) or ("error", exception)."""

    request: dict  # the router request: {"adapter", "prompt" | "text" | task columns}
    listener: Callable[[str, object], None]
    max_tokens: int | None = None  # None: the task's own budget (as `infer`)
    stop: tuple[str, ...] = ()
    temperature: float = 0.0
    top_p: float = 1.0
    logprobs: int | None = None  # top-k alternatives to report per token (0: only the chosen token's)
    answer_mode: bool = False  # task-aware input: report the task's answer (first line, stripped), as infer does
    max_input_tokens: int | None = None  # longer prompts are refused (the server's limit)
    deadline: float | None = None  # time.monotonic() after which the request times out
    seed: int | None = None
    # filled by the engine
    submitted: float = field(default_factory=time.monotonic)
    prepared: Prepared | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # decoded so far (stop strings cut it)
    sent: int = 0  # characters of `text` already streamed
    cancelled: bool = False
    finished: bool = False  # answered (done or error): nothing more is sent
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        """Ask the engine to drop this row at its next step (client gone)."""
        self.cancelled = True


@dataclass
class Result:
    adapter: str
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    label: str | None = None  # classification
    probabilities: dict[str, float] | None = None


class Engine:
    """Owns a Router and serves Jobs with continuous batching on one background thread."""

    def __init__(self, router: Router, *, max_batch_rows: int = 32, max_queue: int = 256, metrics: ServeMetrics | None = None):
        self.router = router
        self.max_batch_rows = max_batch_rows
        self.metrics = metrics or ServeMetrics()
        self._waiting: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self._calls: queue.Queue[tuple[Callable, Future]] = queue.Queue()
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="adapterhub-engine", daemon=True)
        self._dec = None  # the running batch's Decoding (None when idle)
        self._rows: dict[int, Job] = {}  # id(job) → job, for the running rows
        self._admitting: list[Job] = []  # taken from the queue, not yet running or answered

    # -- the outside -----------------------------------------------------------------------------
    def start(self) -> Engine:
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    def submit(self, job: Job) -> None:
        """Queue a job; raises QueueFull when the queue is at its bound, ShuttingDown while stopping."""
        if self._stopping.is_set():
            raise ShuttingDown("the server is shutting down and takes no new requests; retry on another replica")
        try:
            self._waiting.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"the request queue is full ({self._waiting.maxsize} waiting); retry shortly") from None
        self.metrics.queue_depth.set(self._waiting.qsize())
        self._wake.set()

    def call(self, fn: Callable[[Router], object]) -> Future:
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
        self._thread.join(timeout)

    def in_use(self) -> set[str]:
        """Adapters the running rows use (call on the engine thread, e.g. inside `call`)."""
        return {j.prepared.adapter for j in self._rows.values()}

    @property
    def queue_depth(self) -> int:
        return self._waiting.qsize()

    # -- the loop --------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            try:
                self._run_calls()
                self._admit()
                if self._dec is None:
                    if self._stopping.is_set() and self._waiting.empty():
                        return
                    self._wake.wait(0.05)  # idle: sleep until a request or call arrives
                    self._wake.clear()
                    continue
                self._step()
            except Exception as exc:  # noqa: BLE001 - a failed batch (e.g. out of memory) fails its requests, not the server
                self._fail(list(self._rows.values()) + self._admitting, exc)
                self._dec, self._admitting = None, []
                if self.router.backbone.device.type == "cuda":
                    torch.cuda.empty_cache()

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

    def _drain(self, limit: int | None = None) -> list[Job]:
        jobs = []
        while limit is None or len(jobs) < limit:
            try:
                jobs.append(self._waiting.get_nowait())
            except queue.Empty:
                break
        self.metrics.queue_depth.set(self._waiting.qsize())
        return jobs

    def _admit(self) -> None:
        """Bring waiting jobs into the batch: route, hold adapters, classify, prefill and join."""
        room = self.max_batch_rows - len(self._rows)
        if room <= 0 or self._waiting.empty():
            return
        if self._dec is not None and not self.router.bank.joinable(self._dec):
            return  # this model's cache cannot take rows mid-way: newcomers wait for the batch to end
        self._admitting = [j for j in self._drain(room) if not self._expired(j)]
        if self._admitting:
            self._admit_jobs(self._admitting)
        self._admitting = []

    def _admit_jobs(self, jobs: list[Job]) -> None:
        router = self.router
        try:
            names = router.route([j.request for j in jobs])
        except AdapterHubError as exc:
            return self._fail(jobs, exc)
        running = frozenset(j.prepared.adapter for j in self._rows.values())
        ready: list[Job] = []
        for job, name in zip(jobs, names):
            try:
                router.hold([name], keep=running | {j.prepared.adapter for j in ready})
                job.prepared = router.prepare(job.request, name, job.max_tokens, job.max_input_tokens)
            except AdapterHubError as exc:  # this request alone is bad (unknown adapter, missing column, …)
                self._fail([job], exc)
                continue
            ready.append(job)
        self.metrics.resident.set(len(router.resident))
        self.metrics.evictions.set(router.evictions)
        cls = [j for j in ready if j.prepared.classify]
        gen = [j for j in ready if not j.prepared.classify and j.prepared.max_new_tokens > 0]
        for job in ready:
            if not job.prepared.classify and job.prepared.max_new_tokens <= 0:
                self._finish(job, "length")
        if cls:
            try:
                scored = router.classify([j.prepared for j in cls])
            except AdapterHubError as exc:
                return self._fail(cls + gen, exc)
            for job, (best, probs) in zip(cls, scored):
                words = label_words(job.prepared.spec)
                job.text = words[best]
                self._finish(job, "stop", label=words[best], probabilities=dict(zip(words, probs)))
        if gen:
            for job in gen:
                if job.temperature > 0:
                    job.generator = torch.Generator(device=router.bank.device)
                    job.generator.manual_seed(job.seed if job.seed is not None else torch.seed())
            new = router.bank.start([j.prepared.ids for j in gen], [j.prepared.bank_name for j in gen], keys=[id(j) for j in gen])
            self._rows.update((id(j), j) for j in gen)
            if self._dec is None:
                self._dec = new
            else:
                router.bank.join(self._dec, new)
            self.metrics.batch_rows.observe(len(self._rows))

    def _step(self) -> None:
        """One token for every running row; rows that stop leave; the rest take one decode step."""
        dec, bank = self._dec, self.router.bank
        jobs = [self._rows[k] for k in dec.keys]
        tokens = self._choose(dec.logits, jobs)
        want_lp = any(j.logprobs is not None for j in jobs)
        logp = dec.logits.float().log_softmax(-1) if want_lp else None
        chosen = tokens.tolist()  # the step's one host sync: it decides who stops
        eos = self.router.backbone.tokenizer.eos_token_id
        keep = []
        for j, (job, tok) in enumerate(zip(jobs, chosen)):
            if job.cancelled or self._expired(job):
                self._drop(job)
                continue
            info = None
            if job.logprobs is not None:
                top = logp[j].topk(max(job.logprobs, 1)) if job.logprobs else None
                info = (float(logp[j, tok]), [] if top is None else list(zip(top.indices.tolist(), top.values.tolist())))
            reason = self._accept(job, tok, eos, info)
            if reason:
                self._finish(job, reason)
            else:
                keep.append(j)
        if not keep:
            self._dec = None
            return
        if len(keep) < len(jobs):
            bank.keep(dec, keep)
            tokens = tokens[torch.tensor(keep, device=tokens.device)]
        bank.advance(dec, tokens)

    def _choose(self, logits: torch.Tensor, jobs: list[Job]) -> torch.Tensor:
        """Greedy for temperature-0 rows; for the others a draw from softmax(logits / T) within top_p."""
        greedy = logits.argmax(-1)
        sampled = [j for j, job in enumerate(jobs) if job.temperature > 0]
        for j in sampled:  # sampling rows are few and each has its own generator (seeded requests repeat)
            job = jobs[j]
            probs = (logits[j].float() / job.temperature).softmax(-1)
            if job.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                cut = sorted_p.cumsum(-1) - sorted_p > job.top_p  # keep the smallest set reaching top_p
                probs = probs.scatter(0, order[cut], 0.0)
            greedy[j] = torch.multinomial(probs, 1, generator=job.generator)[0]
        return greedy

    def _accept(self, job: Job, tok: int, eos: int, info) -> str | None:
        """Record a row's new token, stream its text, and say why it stops (None: it goes on)."""
        if not job.tokens:
            self.metrics.ttft.observe(time.monotonic() - job.submitted)
        job.tokens.append(tok)
        reason = "stop" if tok == eos else None
        text = self.router.backbone.tokenizer.decode(job.tokens, skip_special_tokens=True)
        if job.answer_mode:  # the task's answer is its first non-empty line, stripped (Router.answer)
            text = text.lstrip()
            if "\n" in text:
                text, reason = text.split("\n", 1)[0], "stop"
        for s in job.stop:
            at = text.find(s)
            if at >= 0:
                text, reason = text[:at], "stop"
        if reason is None and len(job.tokens) >= job.prepared.max_new_tokens:
            reason = "length"
        if reason and job.answer_mode:
            text = text.strip()
        job.text = text
        # Stream only what cannot change any more: not a partial multi-byte character, not what may
        # be the start of a stop string, and (answer mode) not trailing spaces the final strip removes.
        safe = text
        if not reason:
            hold = max([len(s) - 1 for s in job.stop] + [0])
            safe = safe[: len(safe) - hold].rstrip("\ufffd")
            if job.answer_mode:
                safe = safe.rstrip()
        delta = safe[job.sent:]
        job.sent = max(job.sent, len(safe))
        job.listener("token", (tok, delta, info))
        return reason

    # -- endings ---------------------------------------------------------------------------------
    def _expired(self, job: Job) -> bool:
        if job.deadline is not None and time.monotonic() > job.deadline:
            self._fail([job], RequestTimeout("the request ran past the server's request timeout (--request-timeout); send fewer tokens or retry"))
            return True
        return False

    def _label(self, job: Job) -> str:
        """The adapter label of a request in metrics: only names the server knows (bounded cardinality)."""
        if job.prepared is not None:
            return job.prepared.adapter
        name = job.request.get("adapter")
        return name if name in ("base", "auto") or name in self.router.folders else "unknown"

    def _drop(self, job: Job) -> None:
        self._rows.pop(id(job), None)
        if job.cancelled:
            self.metrics.requests.labels(adapter=self._label(job), status="cancelled").inc()

    def _fail(self, jobs: list[Job], exc: Exception) -> None:
        for job in jobs:
            self._rows.pop(id(job), None)
            if job.finished:
                continue
            job.finished = True
            self.metrics.requests.labels(adapter=self._label(job), status=type(exc).__name__).inc()
            job.listener("error", exc)

    def _finish(self, job: Job, reason: str, **extra) -> None:
        self._rows.pop(id(job), None)
        job.finished = True
        p = job.prepared
        result = Result(p.adapter, job.text, reason, len(p.ids), len(job.tokens), **extra)
        self.metrics.requests.labels(adapter=self._label(job), status="ok").inc()
        self.metrics.prompt_tokens.inc(result.prompt_tokens)
        self.metrics.generated_tokens.inc(result.completion_tokens)
        job.listener("done", result)

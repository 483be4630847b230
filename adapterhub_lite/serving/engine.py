"""The scheduler: one thread owns the backbone and serves every request with continuous batching.

Requests arrive from any thread (the HTTP server's event loop) into a bounded queue. The engine
thread loops over *steps*; at each step it

1. runs the calls that change the catalogue (load, unload, merge, reload) between two steps, so
   they never race a batch;
2. admits newcomers up to `max_batch_rows`: routes `auto` rows by content, makes their adapters
   resident (never evicting one a running row uses), scores classification rows in one forward
   pass, and prefills generation rows in one pass (which also scores the prompts of rows that
   asked for their log-probs) that then *joins* the running batch (AdapterBank.join: caches
   padded with masked columns, each row keeps its positions);
3. picks one token for every running row with the row's own settings (serve/sampling.py),
   streams what can no longer change to the row's listener (serve/output.py), and lets rows that
   stopped (EOS, a stop token or string, max_tokens, a cancelled or timed-out request) leave;
4. runs one decode step for the rest.

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
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from adapterhub_lite.core.data import label_words
from adapterhub_lite.core.errors import AdapterHubError, DataError
from adapterhub_lite.core.names import RESERVED
from adapterhub_lite.serving.bank import PromptScores
from adapterhub_lite.serving.metrics import ServeMetrics
from adapterhub_lite.serving.output import Entry, TextState, prompt_pieces
from adapterhub_lite.serving.params import SamplingParams
from adapterhub_lite.serving.router import Prepared, Router
from adapterhub_lite.serving.sampling import choose

log = logging.getLogger("adapterhub_lite.serve")  # the logger's name predates the serving package: users configure it


class QueueFull(AdapterHubError):
    """The waiting queue is at its bound; the client should retry later (HTTP 429)."""


class ShuttingDown(AdapterHubError):
    """The server is stopping and takes no new requests (HTTP 503)."""


class RequestTimeout(AdapterHubError):
    """The request ran past the server's request timeout (HTTP 504)."""


@dataclass
class Job:
    """One choice in flight. `listener(event, payload)` is called from the engine thread with
    ("prompt", PromptPart) for an echoed or scored prompt, ("token", (text, [Entry])) as the choice
    grows, then ("done", Result) or ("error", exception)."""

    request: dict  # the router request: {"adapter", "prompt" | "prompt_ids" | "text" | task columns}
    listener: Callable[[str, object], None]
    params: SamplingParams = field(default_factory=SamplingParams)
    answer_mode: bool = False  # task-aware input: report the task's answer (first line, stripped), as infer does
    default_max_tokens: int = 16  # a raw prompt's budget when params.max_tokens is None (OpenAI's default)
    fill_context: bool = False  # …and fewer when the context holds fewer (chat on `base`, as OpenAI)
    max_input_tokens: int | None = None  # longer prompts are refused (the server's limit)
    add_special_tokens: bool = True  # tokenize a text prompt with the tokenizer's special tokens
    truncate_prompt_tokens: int | None = None  # the client asked to keep only the prompt's last k tokens
    deadline: float | None = None  # time.monotonic() after which the request times out
    # filled by the engine
    submitted: float = field(default_factory=time.monotonic)
    prepared: Prepared | None = None
    state: TextState | None = None
    prompt: PromptPart | None = None
    cancelled: bool = False
    finished: bool = False  # answered (done or error): nothing more is sent
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        """Ask the engine to drop this row at its next step (client gone)."""
        self.cancelled = True

    @property
    def tokens(self) -> list[int]:
        return self.state.tokens if self.state else []

    @property
    def prompt_ids(self) -> list[int]:
        return self.prepared.ids


@dataclass
class PromptPart:
    """A prompt as read, with its tokens' entries (echo: log-probs of each token given the ones before)
    and vLLM's prompt_logprobs; each is None unless asked for."""

    text: str
    entries: list[Entry] | None = None
    scores: PromptScores | None = None


@dataclass
class Result:
    adapter: str
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    label: str | None = None  # classification
    probabilities: dict[str, float] | None = None
    entries: list[Entry] | None = None  # per generated token, when logprobs were asked for
    prompt: PromptPart | None = None
    prompt_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)


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
                failed = list(self._rows.values()) + self._admitting
                log.exception("engine step failed (%s: %s); failing its %d request(s)", type(exc).__name__, exc, len(failed))
                self._fail(failed, exc)
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
        self._admitting = [j for j in self._drain(room) if not self._gone(j)]
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
                job.prepared = router.prepare(job.request, name, job.params.max_tokens, default_new_tokens=job.default_max_tokens,
                                              fill_context=job.fill_context, max_input_tokens=job.max_input_tokens,
                                              add_special_tokens=job.add_special_tokens, truncate_prompt_tokens=job.truncate_prompt_tokens)
                if job.prepared.classify and (job.params.logprobs is not None or job.params.prompt_logprobs is not None):
                    raise DataError(f"adapter {name!r} answers its task input by scoring its labels, so there are no token log-probs; "
                                    "drop logprobs/prompt_logprobs, ask /v1/classify for every label's probability, "
                                    "or send the rendered prompt as `prompt` for the language model's log-probs")
            except AdapterHubError as exc:  # this request alone is bad (unknown adapter, missing column, too long, …)
                self._fail([job], exc)
                continue
            except Exception as exc:  # noqa: BLE001 - an adapter that fails to load fails its own request, not the batch
                log.exception("admitting a request for %r failed (%s); failing it alone", name, type(exc).__name__)
                self._fail([job], exc)
                continue
            ready.append(job)
        self.metrics.resident.set(len(router.resident))
        self.metrics.evictions.set(router.evictions)
        cls = [j for j in ready if j.prepared.classify]
        gen = [j for j in ready if not j.prepared.classify]
        if cls:
            try:
                scored = router.classify([j.prepared for j in cls])
            except AdapterHubError as exc:
                return self._fail(cls + gen, exc)
            for job, (best, probs) in zip(cls, scored):
                words = label_words(job.prepared.spec)
                self._finish(job, "stop", text=words[best], label=words[best], probabilities=dict(zip(words, probs)))
        if gen:
            self._start(gen)

    def _start(self, jobs: list[Job]) -> None:
        """Prefill generation rows (scoring the prompts that asked), answer the ones that want no new
        token, and join the rest to the running batch."""
        router, tok = self.router, self.router.backbone.tokenizer
        for job in jobs:
            p = job.params
            job.state = TextState(tok, p, answer_mode=job.answer_mode, max_new_tokens=job.prepared.max_new_tokens)
            if not p.greedy:
                job.generator = torch.Generator(device=router.bank.device)
                job.generator.manual_seed(p.seed if p.seed is not None else torch.seed())
        scoring = {id(j): max(j.params.logprobs or 0, j.params.prompt_logprobs or 0) for j in jobs if j.params.wants_prompt_logprobs}
        new = router.bank.start([j.prepared.ids for j in jobs], [j.prepared.bank_name for j in jobs], keys=[id(j) for j in jobs],
                                score_prompt=scoring)
        for job in jobs:
            if job.params.echo or id(job) in scoring:
                job.prompt = self._prompt_part(job, new.prompt_scores.get(id(job)))
                job.listener("prompt", job.prompt)
        keep = [i for i, j in enumerate(jobs) if j.prepared.max_new_tokens > 0]
        for job in jobs:
            if job.prepared.max_new_tokens == 0:  # the prompt's scores were all it asked for
                self._finish(job, "length")
        if not keep:
            return
        if len(keep) < len(jobs):
            router.bank.keep(new, keep)
        self._rows.update((id(jobs[i]), jobs[i]) for i in keep)
        if self._dec is None:
            self._dec = new
        else:
            router.bank.join(self._dec, new)
        self.metrics.batch_rows.observe(len(self._rows))

    def _prompt_part(self, job: Job, scores: PromptScores | None) -> PromptPart:
        ids, p = job.prepared.ids, job.params
        part = PromptPart(job.prepared.prompt)
        if scores is not None and p.echo and p.logprobs is not None:
            k = p.logprobs
            part.entries = [Entry(piece, t, lp, None if top is None else top[:k])
                            for piece, t, lp, top in zip(prompt_pieces(self.router.backbone.tokenizer, ids), ids, scores.logprobs, scores.top)]
        if p.prompt_logprobs is not None:
            part.scores = scores
        return part

    def _step(self) -> None:
        """One token for every running row; rows that stop leave; the rest take one decode step."""
        dec = self._dec
        jobs = [self._rows[k] for k in dec.keys]
        tokens = choose(dec.logits, jobs, self.router.backbone.tokenizer.eos_token_id)
        infos = self._logprobs(dec.logits, tokens, jobs)

        def emit(j: int, key: int, tok: int) -> bool:  # row j's token: to its client; does it keep running?
            job = self._rows[key]
            if job.cancelled or self._expired(job):
                self._drop(job)
                return False
            if not job.tokens:
                self.metrics.ttft.observe(time.monotonic() - job.submitted)
            reason = job.state.add(tok, infos.get(j))
            text, entries = job.state.take()
            if text or entries:
                job.listener("token", (text, entries))
            if reason:
                self._finish(job, reason)
            return not reason

        if not self.router.bank.step(dec, tokens, emit):  # the bank's step: one host sync, finished rows leave
            self._dec = None

    @staticmethod
    def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, jobs: list[Job]) -> dict[int, tuple]:
        """{row: (log-prob of its token, [(id, log-prob)] of the top k)} for the rows that asked: the model's own
        distribution, before any sampling setting (one read for the whole step)."""
        rows = [j for j, job in enumerate(jobs) if job.params.logprobs is not None]
        if not rows:
            return {}
        at = torch.tensor(rows, device=logits.device)
        logp = logits[at].float().log_softmax(-1)
        chosen = logp.gather(1, tokens[at][:, None]).squeeze(1).tolist()
        k = max(jobs[j].params.logprobs for j in rows)
        values, indices = logp.topk(k) if k else (logp[:, :0], at[:, None][:, :0])
        values, indices = values.tolist(), indices.tolist()
        return {j: (chosen[i], list(zip(indices[i], values[i]))[: jobs[j].params.logprobs]) for i, j in enumerate(rows)}

    # -- endings ---------------------------------------------------------------------------------
    def _gone(self, job: Job) -> bool:
        """A queued job nobody waits for (cancelled: its client left, or a sibling choice was refused) or past its deadline."""
        if job.cancelled:
            job.finished = True
            self.metrics.requests.labels(adapter=self._label(job), status="cancelled").inc()
            return True
        return self._expired(job)

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
        return name if name in RESERVED or name in self.router.folders else "unknown"

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

    def _finish(self, job: Job, reason: str, text: str | None = None, **extra) -> None:
        self._rows.pop(id(job), None)
        job.finished = True
        p, state = job.prepared, job.state
        entries = state.entries() if state is not None and job.params.logprobs is not None else None
        result = Result(p.adapter, state.text if text is None else text, reason, len(p.ids), len(job.tokens), entries=entries,
                        prompt=job.prompt, prompt_ids=p.ids, token_ids=list(job.tokens), **extra)
        self.metrics.requests.labels(adapter=self._label(job), status="ok").inc()
        self.metrics.prompt_tokens.inc(result.prompt_tokens)
        self.metrics.generated_tokens.inc(result.completion_tokens)
        job.listener("done", result)

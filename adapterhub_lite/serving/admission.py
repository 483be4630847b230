"""From arrival to a running row: the engine's first half (serving/engine.py runs the loop, the decode step
and the endings).

On the engine thread, at each step:

- arrivals are routed (`auto` rows by content, one embedding pass), tokenized and checked against the context,
  and handed to the scheduler as Tickets; a request whose adapter is neither resident nor in host memory waits
  (not ready) while a loader thread reads it and checks its sha256, so registry I/O never stalls decoding;
- the scheduler's plan is admitted: each newcomer's adapter is made resident (never evicting one a running row
  uses), classification rows are scored in one pass, whole prompts are prefilled in one pass and long ones a
  piece per step (chunked prefill), and the rows that want new tokens join the running batch;
- a pass that raises is retried in halves, so an out-of-memory or one bad row fails only the rows that cause
  it; one request that runs out of memory beside running rows waits for a row to leave instead of failing, and on
  a cache that takes no rows mid-way (sliding window) the halves after the first wait for its batch to end;
- a pass (prefill, a prompt's piece, classification) whose clients have all left (or whose deadlines passed) stops at the next decoder
  layer (AdapterBank.abandon_when) rather than running to its end for nobody.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from concurrent.futures import Future

import torch

from adapterhub_lite.core.data import label_words
from adapterhub_lite.core.errors import AdapterHubError
from adapterhub_lite.core.names import BASE
from adapterhub_lite.model.backbone import end_ids
from adapterhub_lite.serving.bank import PassAbandoned
from adapterhub_lite.serving.decoding import PromptScores
from adapterhub_lite.serving.jobs import Job, PromptPart
from adapterhub_lite.serving.manager import ResidencyFull
from adapterhub_lite.serving.output import Entry, TextState, prompt_pieces
from adapterhub_lite.serving.params import check_a_token_is_left, check_label_answer, check_min_tokens_fit, with_model_eos
from adapterhub_lite.serving.scheduler import Ticket

log = logging.getLogger("adapterhub_lite.serve")


class Admission:
    """The engine's arrivals and admission (a mixin of `Engine`, which owns the state these methods read: `router`,
    `scheduler`, `metrics`, the arrivals queue (`_waiting`, its lock `_admitting`, those being read `_reading`), the jobs it holds (`_jobs`, `_rows`), the running batch (`_dec`, `_static`), the loader
    (`_loader`, `_fetching`, `_wake`) and the endings (`_fail`, `_finish`, `_forget`, `_gone`))."""

    # -- arrivals: route, read and queue for a budget ------------------------------------------------
    def _intake(self) -> None:
        jobs = []
        with self._admitting:  # a submit counting the queue meanwhile finds each arrival in one place: else --max-queue was passed
            while True:
                try:
                    job = self._waiting.get_nowait()
                except queue.Empty:
                    break
                if not self._gone(job):
                    jobs.append(job)
            self._reading = jobs
        try:
            if jobs:
                self._parts(jobs, self._enqueue, "routing")
        finally:
            self._reading = []

    def _enqueue(self, jobs: list[Job]) -> None:
        routed = self.router.routed([j.request for j in jobs])  # `auto` rows: one embedding pass for all of them
        for job, how in zip(jobs, routed):
            job.routing, name = how, job.request.get("adapter", BASE) if how is None else how.adapter
            try:
                job.prepared = self.router.prepare(
                    job.request, name, job.params.max_tokens, default_new_tokens=job.default_max_tokens, fill_context=job.fill_context,
                    max_input_tokens=job.max_input_tokens, add_special_tokens=job.add_special_tokens, truncate_prompt_tokens=job.truncate_prompt_tokens)
                self.scheduler.add(self._ticket(job))
                job.times.queued = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - this request alone is bad (unknown adapter, missing column, too long, over a budget)
                if not isinstance(exc, AdapterHubError):
                    log.exception("reading a request for %r failed (%s); failing it alone", name, type(exc).__name__)
                self._fail([job], exc)
                continue
            with self._admitting:  # from _reading to the scheduler's queue at once for queue_depth (see Engine._depth)
                self._jobs[id(job)] = job
            job.listener("accepted", None)  # a stream's HTTP status waits for this or the error above (handlers.accepted)

    def _ticket(self, job: Job) -> Ticket:
        p, router = job.prepared, self.router
        if p.classify:
            check_label_answer(p.adapter, job.params)
        else:  # after the label check, which would read them as the client's stop_token_ids
            job.params = with_model_eos(job.params, self._model_eos())
        check_a_token_is_left(job.params, router.backbone.tokenizer.eos_token_id)
        check_min_tokens_fit(job.params, p.max_new_tokens)
        kind, virtual = router.virtual_tokens(p.adapter)
        ran = virtual if kind == "PROMPT_TUNING" else 0  # prompt-tuning tokens run through the model; prefix ones sit in the cache
        prefix = virtual - ran
        if p.classify:  # scored in one pass: padding after a row's tokens is harmless there, a prefix shorter than another's is not
            longest, sequences = router.label_shape(p.adapter)
            width = len(p.ids) + ran + longest  # positions each sequence runs; its cache holds a prefix's virtual tokens too
            return self._when_read(Ticket(id(job), p.bank_name, width * sequences, width + prefix, chunkable=False, layout=(prefix, None),
                                          sequences=sequences, prefix=prefix))
        ticket = Ticket(id(job), p.bank_name, len(p.ids) + ran, len(p.ids) + virtual + p.max_new_tokens,
                        chunkable=not job.params.wants_prompt_logprobs, first_chunk=ran + 1, layout=(prefix, len(p.ids) + ran), prefix=prefix)
        return self._when_read(ticket)

    def _model_eos(self) -> list[int]:
        """The backbone's end-of-sequence ids besides the tokenizer's EOS (which every row checks itself)."""
        return end_ids(self.router.backbone.model, self.router.backbone.tokenizer)[1:]

    def _when_read(self, ticket: Ticket) -> Ticket:
        """Mark a ticket whose adapter is neither resident nor in host memory as not ready, and read it on a loader thread."""
        name = ticket.adapter
        if name is None or self.router.in_host(name):
            return ticket
        ticket.ready = False
        fut = self._fetching.get(name)
        if fut is None:
            fut = self._fetching[name] = self._loader.submit(self.router.fetch, name)

        def done(f: Future) -> None:  # on the loader thread: a flag the engine reads at its next step
            ticket.ready = True
            self._wake.set()
        fut.add_done_callback(done)
        return ticket

    def _sweep(self) -> None:
        """Requests nobody waits for any more (cancelled, past their deadline) leave, whether they wait or are part-way
        through a long prompt's pieces (their rows, cache reservation and adapter are free at once, as vLLM frees an
        aborted request in any state); waiting ones whose adapter could not be read fail with why."""
        failed = {}
        for name, fut in list(self._fetching.items()):
            if fut.done():
                del self._fetching[name]
                if fut.exception() is not None:
                    failed[name] = fut.exception()
                    if not isinstance(failed[name], AdapterHubError):
                        log.error("reading adapter %r failed", name, exc_info=failed[name])
        # a chunked prefill's pieces would otherwise run to the prompt's end for nobody, holding its budgets meanwhile
        for t in [*self.scheduler.waiting, *self.scheduler.prefilling.values()]:
            job = self._jobs.get(t.key)
            if job is None:
                continue
            if t.adapter in failed and not t.prefilled:  # a prefilling row's adapter is resident already
                self._fail([job], failed[t.adapter])
            elif self._gone(job):
                self._forget(job)

    # -- failures: isolated by halving, or waiting for memory ----------------------------------------
    def _parts(self, jobs: list[Job], fn: Callable[[list[Job]], None], what: str) -> None:
        """Run fn(jobs); when it raises, run it on each half, so that an out-of-memory or one bad row fails only
        the part that causes it; a job that fails alone gets the error. fn leaves no trace when it raises."""
        try:
            return fn(jobs)
        except PassAbandoned:  # nobody waits for these jobs any more (see _nobody_waits): they leave, as at a step's sweep
            for job in jobs:
                if self._gone(job):  # counted as cancelled, or failed with the timeout
                    self._forget(job)
            return None
        except Exception as exc:  # noqa: BLE001 - isolated below; every one is logged
            if len(jobs) == 1:
                if self._wait_for_memory(jobs[0], exc, what):
                    return None
                if not isinstance(exc, AdapterHubError):  # a bad request is the client's; anything else is ours: the stack goes to the log
                    log.exception("%s failed for one request (%s: %s); failing it alone", what, type(exc).__name__, exc)
                return self._fail(jobs, exc)
            log.warning("%s of %d requests failed (%s: %s); retrying them in halves", what, len(jobs), type(exc).__name__, exc,
                        exc_info=not isinstance(exc, AdapterHubError))
            if self.router.backbone.device.type == "cuda":
                torch.cuda.empty_cache()
        half = len(jobs) // 2
        self._parts(jobs[:half], fn, what)
        self._parts(jobs[half:], fn, what)

    def _wait_for_memory(self, job: Job, exc: Exception, what: str) -> bool:
        """An out-of-memory admitting one request while rows run: the request goes back to the head of the queue and
        is not tried again until a running row has left and freed its memory (it waits, as for a budget). With no
        row running there is nothing to wait for, and it fails."""
        ticket = self.scheduler.prefilling.get(id(job))
        if not isinstance(exc, torch.OutOfMemoryError) or not self._rows or ticket is None:
            return False
        log.warning("%s of one request ran out of memory beside %d running rows; it waits for rows to leave", what, len(self._rows))
        job.filling = None
        ticket.ready = False  # made ready again in _forget, when a running row leaves
        self.scheduler.requeue(ticket)
        self._memory_waits.append(ticket)
        self.metrics.waits.labels(budget="memory").inc()
        if self.router.backbone.device.type == "cuda":
            torch.cuda.empty_cache()
        return True

    # -- admission: adapters resident, classification scored, prompts prefilled -----------------------
    def _admit(self, plan) -> None:
        router, first, pieces, back = self.router, [], [], []
        # adapters the batch already holds: running rows and every prompt part-way through its pieces, whether or not
        # this plan gives it one (evicting its adapter would run its next piece through another's slot); not this step's
        # newcomers, which hold nothing until their adapter is resident
        newcomers = {t.key for t, n in plan.prefill if t.prefilled == n}
        busy = {self._jobs[k].prepared.adapter for k in self.scheduler.running} | \
               {self._jobs[k].prepared.adapter for k in self.scheduler.prefilling if k not in newcomers}
        for t, n in plan.prefill:
            job = self._jobs[t.key]
            if t.prefilled == n and back:  # behind a request that waits for memory: first come, first served
                back.append(t)
                continue
            if t.prefilled == n and not router.in_host(job.prepared.adapter):
                # read for it, but since dropped from host memory by later reads (--max-cpu-loras) while it waited: holding
                # it would read its files and hash them here, stalling every running row; read again on a loader thread
                self.scheduler.requeue(t)
                self._when_read(t)
                continue
            if t.prefilled == n:  # its first piece: its adapter must be resident (never evicting one the batch uses)
                keep = frozenset(busy | {j.prepared.adapter for j in first}) - {job.prepared.adapter}
                # Found no room beside these adapters already: it waits without a try. Each try copies the adapter to the
                # device and back (and a changed slot table drops every captured CUDA graph), at every step until a row left.
                tried = (job.prepared.adapter, keep, frozenset(router.resident))
                if tried == self._no_room:
                    back.append(t)
                    continue
                try:
                    router.hold([job.prepared.adapter], keep=keep)
                except ResidencyFull as exc:
                    if keep:  # rows that run now will free room: it waits at the head
                        self._no_room = tried
                        back.append(t)
                        continue
                    self._fail([job], exc)
                    continue
                except Exception as exc:  # noqa: BLE001 - an adapter that fails to load fails its own requests, not the batch
                    if not isinstance(exc, AdapterHubError):
                        log.exception("loading adapter %r failed (%s); failing its request", job.prepared.adapter, type(exc).__name__)
                    self._fail([job], exc)
                    continue
                first.append(job)
                if job.times.scheduled is None:  # a request sent back to wait for memory keeps its first admission, as vLLM ignores preemptions
                    job.times.scheduled = time.monotonic()
            pieces.append((job, t, n))
        for t in reversed(back):  # to the head of the queue, in their order: tried again at the next step
            self.scheduler.requeue(t)
        if back:
            self.metrics.waits.labels(budget="memory").inc()
        cls = [j for j in first if j.prepared.classify]
        firsts = {id(j) for j in first}
        whole = [j for j, t, n in pieces if id(j) in firsts and not j.prepared.classify and t.prefilled == t.prompt_tokens]
        if cls:
            self._parts(cls, self._classify, "classification")
        if whole:
            later: list[Job] = []
            self._parts(whole, lambda js: self._start(js, later), "prefill")
            for job in reversed(later):  # to the head of the queue, in their order, behind nobody: they start the next batch
                self.scheduler.requeue(self.scheduler.prefilling[id(job)])
        done = {id(j) for j in cls + whole}
        for job, t, n in pieces:
            if id(job) in done or job.finished:
                continue
            self._parts([job], lambda js, t=t, n=n: self._piece(js[0], t, n), "chunked prefill")
        self.metrics.batch_rows.observe(len(self._rows))

    @staticmethod
    def _nobody_waits(jobs: list[Job]) -> Callable[[], bool]:
        """For a pass's abandon_when: whether every job's client has left or its deadline has passed. (Read, not acted
        on: a job that ends this way leaves through _gone once the pass has stopped.)"""
        def gone() -> bool:
            now = time.monotonic()
            return all(j.cancelled or (j.deadline is not None and now > j.deadline) for j in jobs)
        return gone

    def _classify(self, jobs: list[Job]) -> None:
        with self.router.bank.abandon_when(self._nobody_waits(jobs)):  # as a prefill's: a pass for nobody stops
            scored = self.router.classify([j.prepared for j in jobs])
        for job, (best, probs) in zip(jobs, scored):
            words = label_words(job.prepared.spec)
            self.metrics.prefilled(job.prepared.adapter, len(job.prepared.ids))
            self._finish(job, "stop", text=words[best], label=words[best], probabilities=dict(zip(words, probs)))

    def _begin(self, job: Job) -> None:
        """A generation row's text state and random generator, made once when its prefill begins."""
        p = job.params
        job.state = TextState(self.router.backbone.tokenizer, p, answer_mode=job.answer_mode, max_new_tokens=job.prepared.max_new_tokens,
                              prompt_ids=job.prepared.ids)
        if not p.greedy:
            job.generator = torch.Generator(device=self.router.bank.device)
            if p.seed is not None:
                job.generator.manual_seed(p.seed)
            else:  # a fresh seed of its own: torch.seed() would reseed the process's global RNG (and CUDA's) too
                job.generator.seed()

    def _start(self, jobs: list[Job], later: list[Job]) -> None:
        """Prefill whole prompts in one pass (scoring those that asked), then let the rows run. The pass stops between
        two layers once every one of its clients has left or its deadline has passed (PassAbandoned).

        Rows that want new tokens while a batch that takes no rows mid-way runs (a sliding-window cache: one that an
        earlier part of this plan's pass started, when the pass was retried in halves, _parts) are not run: they go to
        `later`, to wait for that batch to end as the scheduler has such newcomers wait (can_join False), not fail."""
        if self._dec is not None and not self._dec.joinable:
            known = {id(j) for j in later}  # a half retried after its scoring-only rows raised comes here again
            wait = [j for j in jobs if j.prepared.max_new_tokens > 0 and id(j) not in known]
            if wait:
                log.info("%d request(s) wait for the running batch to end: this model's cache takes no rows mid-way", len(wait))
            later.extend(wait)
            jobs = [j for j in jobs if j.prepared.max_new_tokens == 0]  # prompt scores alone join nothing
            if not jobs:
                return
        scoring = {id(j): max(j.params.logprobs or 0, j.params.prompt_logprobs or 0) for j in jobs if j.params.wants_prompt_logprobs}
        bank = self.router.bank
        with bank.abandon_when(self._nobody_waits(jobs)):
            new = bank.start([j.prepared.ids for j in jobs], [j.prepared.bank_name for j in jobs], keys=[id(j) for j in jobs],
                             score_prompt=scoring)
        self._enter(jobs, new)

    def _piece(self, job: Job, ticket: Ticket, n: int) -> None:
        """Run the next `n` positions of a long prompt (chunked prefill); after its last piece the row runs."""
        bank, ran = self.router.bank, ticket.first_chunk - 1  # a prompt-tuning adapter's virtual tokens run in the first piece
        done, ids = ticket.prefilled - n, job.prepared.ids  # positions run before this piece
        with bank.abandon_when(self._nobody_waits([job])):  # a piece half-run is dropped with the job (job.filling)
            if done == 0:
                job.filling = bank.start([ids[: n - ran]], [job.prepared.bank_name], keys=[id(job)])
            else:
                job.filling.extend([ids[done - ran : ticket.prefilled - ran]])
        if ticket.prefilled >= ticket.prompt_tokens:
            new, job.filling = job.filling, None
            self._enter([job], new)

    def _enter(self, jobs: list[Job], new) -> None:
        """Rows whose prompt has run: join those that want new tokens to the running batch, then send echoed or
        scored prompts and answer those that want no new token. The join comes first: when it fails (e.g. out of
        memory growing the cache) the batch is as it was and nothing was sent, so the requests can be retried. What else
        can raise (a row's text state, an echoed prompt's pieces) runs before the join: a row in the batch without its
        job would fail the next decode step, and every running request with it."""
        keep = [i for i, j in enumerate(jobs) if j.prepared.max_new_tokens > 0]
        scores = new.prompt_scores
        for job in jobs:
            self._begin(job)
            if job.params.echo or id(job) in scores:
                job.prompt = self._prompt_part(job, scores.get(id(job)))
        if keep:
            if len(keep) < len(jobs):
                new.keep(keep)
            if self._dec is None:
                self._dec = self._running(new)
            else:
                self._dec.join(new)
        for job in jobs:
            if job.params.echo or id(job) in scores:
                job.listener("prompt", job.prompt)
            if job.prepared.max_new_tokens == 0:  # the prompt's scores were all it asked for
                self._finish(job, "length")
        for i in keep:
            self._rows[id(jobs[i])] = jobs[i]
            self.scheduler.started(id(jobs[i]))
        for job in jobs:  # counted once their prompts ran and nothing above raised (a pass that raises is retried)
            self.metrics.prefilled(job.prepared.adapter, len(job.prepared.ids))

    def _running(self, new):
        """The running batch for rows just prefilled into `new` when none runs: the engine's static batch (kept
        across idle spells, with its buffers and graphs), or `new` itself where static buffers cannot serve."""
        bank = self.router.bank
        if not (self.static_decode and bank.static_ok(new)):
            return new
        empty = self._static if self._static is not None and not len(self._static) else None
        self._static = bank.batch(new, self.max_batch_rows, self.router.max_model_len, self.cuda_graphs, into=empty,
                                  max_positions=self.budgets.max_kv_tokens)
        return self._static

    def _prompt_part(self, job: Job, scores: PromptScores | None) -> PromptPart:
        ids, p = job.prepared.ids, job.params
        part = PromptPart(job.prepared.prompt)
        if scores is not None and p.echo and p.logprobs is not None:
            k = p.logprobs
            part.entries = [Entry(piece, t, lp, None if top is None else top[:k])
                            for piece, t, lp, top in zip(prompt_pieces(self.router.backbone.tokenizer, ids, part.text), ids, scores.logprobs, scores.top)]
        if p.prompt_logprobs is not None:
            part.scores = scores
        return part

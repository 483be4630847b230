"""Prometheus metrics of the server (prometheus_client), kept in a registry of their own so that
several servers in one process (tests) do not collide.

The latency histograms and token counters mean what vLLM's do (vllm/v1/metrics: a `vllm:` name is ours with
`adapterhub_`), so a dashboard built for vLLM reads them. The engine marks each request's times (RequestTimes):
arrival, entering the scheduler's queue, first admitted (scheduled), each token, the end."""

from __future__ import annotations

import bisect
import itertools
import math
import threading
import time
from collections import Counter as Tally
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import HistogramMetricFamily
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from adapterhub_lite.core.names import is_request_merge

# vLLM's bucket bounds, so quantiles read from either server compare
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0,
                640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


def adapter_label(name: str) -> str:
    """An adapter's value of the `adapter` label: its name, but one `merged` for every per-request merge. Each recipe a
    client sends is a new name (a hash), and a label value is a series kept for the server's life: per recipe, clients
    could grow /metrics without bound, where the adapters an operator registers are few (and keep their names, even
    one called merged-sst2)."""
    return "merged" if is_request_merge(name) else name


def buckets_1_2_5(top: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, … up to `top` (the context): vLLM's bounds for tokens per request."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > top:
                return out
            out.append(m * scale)
        scale *= 10


class StepHistogram:
    """A Prometheus histogram that takes a decode step's observations at once, as (value, count) pairs.

    prometheus_client's Histogram takes one value per call, each with its lock and bucket search (~2 µs): one
    inter-token gap per row and step on the engine thread was ~170 µs a 64-row step with the token counter, 5% of a
    3 ms GPU step. The rows that ran the step before share one gap, so a step is a handful of pairs here. Exposed
    through the library's HistogramMetricFamily: the same text as a Histogram (buckets le, _count, _sum, _created)."""

    def __init__(self, name: str, documentation: str, buckets, registry: CollectorRegistry):
        self.name, self.documentation = name, documentation
        self.bounds = [float(b) for b in buckets] + [math.inf]
        self.counts, self.sum, self.created = [0] * len(self.bounds), 0.0, time.time()
        self._lock = threading.Lock()
        registry.register(self)

    def observe(self, value: float, count: int = 1) -> None:
        """`count` observations of `value` (a bucket holds the values ≤ its bound, as Prometheus' `le`)."""
        i = bisect.bisect_left(self.bounds, value)
        with self._lock:
            self.counts[i] += count
            self.sum += value * count

    def collect(self):
        """The histogram as one metric family (prometheus_client's collector protocol: read when /metrics is scraped)."""
        with self._lock:
            counts, total = list(self.counts), self.sum
        family = HistogramMetricFamily(self.name, self.documentation,
                                       buckets=[(floatToGoString(b), c) for b, c in zip(self.bounds, itertools.accumulate(counts))],
                                       sum_value=total)
        family.samples.append(Sample(f"{self.name}_created", {}, self.created))  # as Histogram writes it
        yield family

    def describe(self):
        """The family's name and type without its samples (what the registry checks for name clashes at register)."""
        return [HistogramMetricFamily(self.name, self.documentation)]


@dataclass
class RequestTimes:
    """When one request (one choice) reached each point, in time.monotonic() seconds."""

    arrived: float = field(default_factory=time.monotonic)  # the route made its job
    queued: float | None = None  # read (routed, tokenized, checked) and handed to the scheduler
    scheduled: float | None = None  # first admitted (adapter resident, prefill begun); a later requeue does not move it, as in vLLM
    first_token: float | None = None
    last_token: float | None = None

    def token_at(self, now: float) -> float | None:
        """Stamp a generated token at `now`; the gap since the one before, or None for the first (its time to first
        token is `now - arrived`)."""
        gap = None if self.first_token is None else now - self.last_token
        if self.first_token is None:
            self.first_token = now
        self.last_token = now
        return gap


class ServeMetrics:
    """Requests by adapter and status, queue depth, running requests, batch rows, tokens, latencies, resident adapters
    and evictions.

    Requests and tokens are counted per choice, as vLLM counts its engine requests: a request with n choices (or
    a list of prompts) moves adapterhub_requests_total by n, and a prompt continued by n choices counts its tokens n
    times (vLLM's prompt_tokens_total does so too), where the response's usage counts each prompt once.

    Token counters count as the engine works, whatever the request's end (vLLM's meaning): a prompt when its
    prefill has run, each token as it is generated; so a cancelled stream's tokens are counted. Time to first token
    and inter-token latency are observed as tokens come; the per-request histograms (e2e, queue, prefill, decode,
    inference, prompt and generation tokens) once a request is answered, as vLLM observes them for requests that
    finish (stop or length), not for aborted ones. Histograms carry no adapter label (each would be ~20 series per
    adapter); the token counters do."""

    def __init__(self, max_model_len: int = 8192):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("adapterhub_requests", "Requests (one per choice) that ended, by adapter and status: ok, cancelled or the error's type", ["adapter", "status"], registry=r)
        self.queue_depth = Gauge("adapterhub_queue_depth", "Requests waiting to join the batch", registry=r)
        self.batch_rows = Histogram("adapterhub_batch_rows", "Rows in the running batch after admitting newcomers",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.prompt_tokens = Counter("adapterhub_prompt_tokens", "Prompt tokens prefilled, by adapter, once per choice, whatever the "
                                     "request's end (vLLM's prompt_tokens_total)", ["adapter"], registry=r)
        self.generated_tokens = Counter("adapterhub_generated_tokens", "Tokens generated, by adapter, whatever the request's end "
                                        "(vLLM's generation_tokens_total)", ["adapter"], registry=r)
        self.ttft = Histogram("adapterhub_time_to_first_token_seconds", "From arrival to the first generated token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = StepHistogram("adapterhub_inter_token_latency_seconds", "Between two generated tokens of a request (vLLM's "
                                 "inter_token_latency_seconds, formerly time_per_output_token_seconds)", ITL_BUCKETS, r)
        self.e2e = Histogram("adapterhub_e2e_request_latency_seconds", "From arrival to the answer, for answered requests",
                             buckets=REQUEST_BUCKETS, registry=r)
        self.queue_time = Histogram("adapterhub_request_queue_time_seconds", "From entering the scheduler's queue to first admitted "
                                    "(waiting phase)", buckets=REQUEST_BUCKETS, registry=r)
        self.prefill_time = Histogram("adapterhub_request_prefill_time_seconds", "From first admitted to the first token (prefill phase; "
                                      "a classification answer or a max_tokens 0 prompt: to its answer)", buckets=REQUEST_BUCKETS, registry=r)
        self.decode_time = Histogram("adapterhub_request_decode_time_seconds", "From the first token to the last (decode phase)",
                                     buckets=REQUEST_BUCKETS, registry=r)
        self.inference_time = Histogram("adapterhub_request_inference_time_seconds", "From first admitted to the last token "
                                        "(running phase: prefill + decode)", buckets=REQUEST_BUCKETS, registry=r)
        tokens = buckets_1_2_5(max_model_len)
        self.request_prompt_tokens = Histogram("adapterhub_request_prompt_tokens", "Prompt tokens of each answered request",
                                               buckets=tokens, registry=r)
        self.request_generation_tokens = Histogram("adapterhub_request_generation_tokens", "Tokens generated for each answered request",
                                                   buckets=tokens, registry=r)
        self.resident = Gauge("adapterhub_resident_adapters", "Adapters resident on the backbone", registry=r)
        self.waits = Counter("adapterhub_scheduler_waits", "Steps in which the first waiting request waited, by the budget it waited for "
                             "(rows, tokens, kv_cache, adapters, batch)", ["budget"], registry=r)
        self.kv_reserved = Gauge("adapterhub_kv_cache_reserved_tokens", "Cache positions the admitted rows reserve: rows × (longest prefix + longest rest), an upper bound of what their passes hold", registry=r)
        self.kv_cache_bytes = Gauge("adapterhub_kv_cache_bytes", "Bytes of the preallocated decode cache (serving/static.py) on the device", registry=r)
        self.row_bytes = Gauge("adapterhub_batch_row_factor_bytes", "Bytes of the running batch's per-row LoRA factors and IA3 vectors "
                               "gathered from the slot pools (outside --memory-budget-mb)", registry=r)
        # a count since start is a Counter (exposed as _total, typed counter) so rate() and resets work on it; it was a Gauge
        self.evictions = Counter("adapterhub_evictions", "Adapters evicted to stay within the memory budget", registry=r)
        self.running = Gauge("adapterhub_num_requests_running", "Requests in the running batch, decoding or prefilling "
                             "(vLLM's num_requests_running; waiting ones are adapterhub_queue_depth)", registry=r)
        # why answered requests ended (vLLM's request_success_total): a rising share of "length" is answers cut by max_tokens
        self.success = Counter("adapterhub_request_success", "Requests (one per choice) answered, by finished_reason: stop (EOS, a "
                               "stop string or id, a classification's label) or length (max_tokens or the context)", ["finished_reason"], registry=r)
        # every HTTP answer, those refused at the door too (401, 404, 400 before the engine, 429): the engine's counters see
        # only what reached it, so requests sent = this counter's sum can be checked from /metrics (vLLM exposes
        # http_requests_total through prometheus-fastapi-instrumentator; its status is the exact code here, 499 a client gone)
        self.http = Counter("adapterhub_http_requests", "HTTP requests answered, by route (its template; 'unmatched' for no "
                            "route), method and status code (499: the client left first)", ["handler", "method", "status"], registry=r)

    def responded(self, handler: str, method: str, status) -> None:
        """One HTTP request ended with `status` (the code sent, 499 when the client left before it)."""
        self.http.labels(handler=handler, method=method, status=str(status)).inc()

    def prefilled(self, adapter: str, tokens: int) -> None:
        """A prompt of `tokens` tokens has run through the model for `adapter`."""
        self.prompt_tokens.labels(adapter=adapter_label(adapter)).inc(tokens)

    def step_tokens(self, rows, now: float) -> None:
        """One decode step's generated tokens, each row's (adapter, RequestTimes, gap) as RequestTimes.token_at stamped
        them at `now` (one clock read per step, as vLLM stamps a step's outputs): counted by adapter; a first token
        (gap None) observes the time to first token, each later one its gap. Added per adapter and per distinct gap, not
        per row (the engine thread's cost stays flat in the batch's rows)."""
        adapters, gaps = Tally(), Tally()
        for adapter, times, gap in rows:
            adapters[adapter] += 1
            if gap is None:
                self.ttft.observe(now - times.arrived)
            else:
                gaps[gap] += 1
        for adapter, n in adapters.items():
            self.generated_tokens.labels(adapter=adapter_label(adapter)).inc(n)
        for gap, n in gaps.items():
            self.itl.observe(gap, n)

    def answered(self, times: RequestTimes, prompt_tokens: int, generated: int, now: float, finish_reason: str) -> None:
        """A request answered at `now` (ended by `finish_reason`): its per-request histograms. One that generated nothing
        (a classification answer, a max_tokens 0 prompt) has its answer as its first and last output."""
        self.success.labels(finished_reason=finish_reason).inc()
        scheduled = times.scheduled if times.scheduled is not None else now
        queued = times.queued if times.queued is not None else scheduled
        first = times.first_token if times.first_token is not None else now
        last = times.last_token if times.last_token is not None else now
        self.e2e.observe(now - times.arrived)
        self.queue_time.observe(scheduled - queued)
        self.prefill_time.observe(first - scheduled)
        self.decode_time.observe(last - first)
        self.inference_time.observe(last - scheduled)
        self.request_prompt_tokens.observe(prompt_tokens)
        self.request_generation_tokens.observe(generated)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

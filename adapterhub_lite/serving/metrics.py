"""Prometheus metrics of the server (prometheus_client), kept in a registry of their own so that
several servers in one process (tests) do not collide."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class ServeMetrics:
    """Requests by adapter and status, queue depth, running requests, batch rows, tokens, time to first token,
    resident adapters and evictions.

    Requests and tokens are counted per choice, as vLLM counts its engine requests: a request with n choices (or
    a list of prompts) moves adapterhub_requests_total by n, and a prompt continued by n choices counts its tokens n
    times (vLLM's prompt_tokens_total does so too), where the response's usage counts each prompt once."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("adapterhub_requests", "Requests (one per choice) that ended, by adapter and status: ok, cancelled or the error's type", ["adapter", "status"], registry=r)
        self.queue_depth = Gauge("adapterhub_queue_depth", "Requests waiting to join the batch", registry=r)
        self.batch_rows = Histogram("adapterhub_batch_rows", "Rows in the running batch after admitting newcomers",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.prompt_tokens = Counter("adapterhub_prompt_tokens", "Prompt tokens of requests answered ok, once per choice (as vLLM's prompt_tokens_total)", registry=r)
        self.generated_tokens = Counter("adapterhub_generated_tokens", "Tokens generated for requests answered ok", registry=r)
        self.ttft = Histogram("adapterhub_time_to_first_token_seconds", "From arrival to the first generated token",
                              buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        self.resident = Gauge("adapterhub_resident_adapters", "Adapters resident on the backbone", registry=r)
        self.waits = Counter("adapterhub_scheduler_waits", "Steps in which the first waiting request waited, by the budget it waited for "
                             "(rows, tokens, kv_cache, adapters, batch)", ["budget"], registry=r)
        self.kv_reserved = Gauge("adapterhub_kv_cache_reserved_tokens", "Cache positions the admitted rows reserve (rows × the widest row)", registry=r)
        self.kv_cache_bytes = Gauge("adapterhub_kv_cache_bytes", "Bytes of the preallocated decode cache (serving/static.py) on the device", registry=r)
        self.row_bytes = Gauge("adapterhub_batch_row_factor_bytes", "Bytes of the running batch's per-row LoRA factors and IA3 vectors "
                               "gathered from the slot pools (outside --memory-budget-mb)", registry=r)
        # a count since start is a Counter (exposed as _total, typed counter) so rate() and resets work on it; it was a Gauge
        self.evictions = Counter("adapterhub_evictions", "Adapters evicted to stay within the memory budget", registry=r)
        self.running = Gauge("adapterhub_num_requests_running", "Requests in the running batch, decoding or prefilling "
                             "(vLLM's num_requests_running; waiting ones are adapterhub_queue_depth)", registry=r)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

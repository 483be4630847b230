"""Requests that end before their answer is done (a client that leaves, a deadline, a reload or unload while they wait,
a merge nobody waits for any more) leave nothing behind: budgets, rows, host cache and catalogue return to their idle
values, and what is served afterwards is what a fresh server serves."""

import pytest

from adapterhub_lite.serving.engine import Engine
from adapterhub_lite.serving.jobs import Job, RequestTimeout
from adapterhub_lite.serving.params import SamplingParams
from adapterhub_lite.serving.router import Router
from adapterhub_lite.serving.scheduler import Budgets


def _chunked(serve_registry):
    """An engine driven step by step whose long prompts run 4 positions a step (chunked prefill)."""
    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32")
    return Engine(router, budgets=Budgets(max_rows=4, max_num_batched_tokens=4))


@pytest.mark.parametrize("end", ["cancelled", "timed out"])
def test_a_request_that_ends_during_its_chunked_prefill_frees_its_budgets_at_once(serve_registry, end):
    """A 40-token prompt runs in 10 pieces; its client leaves (or its deadline passes) after the first. At the next step
    it holds no row, no cache reservation and no prefill state, and the engine holds no job: it does not run its other
    9 pieces for nobody (vLLM frees an aborted request whatever its state)."""
    engine = _chunked(serve_registry)
    heard = []
    job = Job({"adapter": "gen_a", "prompt_ids": list(range(5, 45))}, lambda ev, p: heard.append((ev, p)),
              SamplingParams(max_tokens=8, ignore_eos=True))
    engine._waiting.put_nowait(job)
    for _ in range(200):  # gen_a is read on the loader thread first; then its first piece runs
        engine._serve_once()
        if job.filling is not None:
            break
    assert id(job) in engine.scheduler.prefilling and engine.scheduler.kv_reserved() > 0 and job.filling is not None
    if end == "cancelled":
        job.cancel()
    else:
        job.deadline = 0.0  # long past
    engine._serve_once()
    s = engine.scheduler
    assert not s.prefilling and not s.running and not s.waiting and s.kv_reserved() == 0
    assert not engine._jobs and not engine._rows and engine._dec is None and job.filling is None
    status = "cancelled" if end == "cancelled" else "RequestTimeout"
    assert engine.metrics.requests.labels(adapter="gen_a", status=status)._value.get() == 1
    if end == "timed out":
        assert heard[-1][0] == "error" and isinstance(heard[-1][1], RequestTimeout)
    engine._gauges()
    assert engine.metrics.running._value.get() == 0 and engine.metrics.kv_reserved._value.get() == 0

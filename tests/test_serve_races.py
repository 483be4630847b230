"""Catalogue changes that land between a request's arrival and its next engine step. The engine thread runs catalogue
calls (load, unload, reload, merges) before it takes in the requests that arrived since its last step, so a request
a client was already told is accepted may sit, for one step, only in the arrival queue: what it names must be kept
for it there too."""

import asyncio

from adapterhub_lite.serving.engine import Engine
from adapterhub_lite.serving.jobs import Job
from adapterhub_lite.serving.params import SamplingParams
from adapterhub_lite.serving.router import Router
from adapterhub_lite.serving.runtime import Catalogue


async def _on_engine_steps(engine: Engine, coro):
    """Await `coro` (a catalogue call) while this thread drives the (not started) engine step by step."""
    task = asyncio.ensure_future(coro)
    while not task.done():
        await asyncio.sleep(0)  # the call reaches the engine's queue; then one step runs it
        engine._serve_once()
    return await task


def test_an_unload_keeps_an_adapter_a_request_that_just_arrived_names(serve_registry):
    """A request for a run-time adapter is accepted (in the engine's arrival queue, not yet taken in) when an unload of
    that adapter reaches the engine: the unload is answered at once (vLLM's), and the request is answered on the adapter,
    as queued and running ones are, instead of failing as an unknown adapter once taken in; the adapter goes after it."""
    from adapterhub_lite.serving import protocol as P

    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32")
    engine = Engine(router)
    catalogue = Catalogue(engine)
    ended = []

    async def go():
        await _on_engine_steps(engine, catalogue.load("rt", str(router.registry.path("gen_a@1.0.0"))))
        engine.submit(Job({"adapter": "rt", "prompt_ids": [5, 9, 14]}, lambda ev, p: ended.append(ev),
                          SamplingParams(max_tokens=2, ignore_eos=True)))
        try:
            await _on_engine_steps(engine, catalogue.unload("rt"))
        except P.ApiError as exc:
            return exc
        return None

    refused = asyncio.run(asyncio.wait_for(go(), 60))
    for _ in range(400):
        if "done" in ended or "error" in ended:
            break
        engine._serve_once()
    assert refused is None, refused
    assert ended[-1] == "done" and "error" not in ended, ended
    assert "rt" not in router.folders and "rt" not in catalogue.runtime and "rt" not in router.leaving


def test_a_request_naming_a_merge_that_leaves_before_it_is_taken_in_counts_under_merged(serve_registry):
    """A client names a built per-request merge directly (its merged-<hash> name) and leaves while the request is
    still in the arrival queue: its cancellation counts under adapter="merged" as every merge's requests do, not
    under a label of its own (one per recipe would grow /metrics without bound)."""
    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32")
    engine = Engine(router)
    catalogue = Catalogue(engine)
    recipe = {"ids": ["gen_a", "gen_b"], "weights": [0.5, 0.5], "merge_strategy": "delta_linear"}
    name = asyncio.run(asyncio.wait_for(_on_engine_steps(engine, catalogue.merged(recipe, "gen_a")), 60))
    job = Job({"adapter": name, "prompt_ids": [5, 9, 14]}, lambda ev, p: None, SamplingParams(max_tokens=2))
    engine.submit(job)
    job.cancel()
    engine._serve_once()
    assert not engine._jobs and engine._waiting.empty()
    counted = {s.labels["adapter"]: s.value for m in engine.metrics.requests.collect() for s in m.samples
               if s.name.endswith("_total") and s.labels.get("status") == "cancelled"}
    assert counted == {"merged": 1.0}, counted

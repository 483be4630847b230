"""A request that fails while its prompt's rows join the running batch fails alone: the rows already running go on."""

import time

from adapterhub_lite.serving import admission
from adapterhub_lite.serving.engine import Engine
from adapterhub_lite.serving.jobs import Job
from adapterhub_lite.serving.params import SamplingParams
from adapterhub_lite.serving.router import Router
from adapterhub_lite.serving.scheduler import Budgets


def test_a_request_failing_as_its_rows_join_the_batch_fails_alone(serve_registry, monkeypatch):
    """Admission's contract: what fails admitting a request leaves no trace, so it fails alone (or is retried in halves).
    Making an echoed prompt's pieces came after the row had joined the running batch: when it raised, the row stayed in
    the batch without its job, and the next decode step's KeyError failed every running request."""
    router = Router.from_registry(serve_registry, quantization="none", dtype="fp32")
    engine = Engine(router, budgets=Budgets(max_rows=4))
    once = engine._serve_once
    engine._serve_once = lambda: time.sleep(0.01) or once()  # the running row outlasts the newcomer's admission
    ended, tokens = {}, {"running": 0}

    def hear(name):
        def listener(event, payload):
            if event == "token":
                tokens[name] = tokens.get(name, 0) + 1
            if event in ("done", "error"):
                ended[name] = (event, payload)
        return listener

    real = admission.prompt_pieces

    def broken(tokenizer, ids, text=None):
        if ids == [7, 8, 9]:
            raise RuntimeError("a tokenizer that cannot read this prompt back")
        return real(tokenizer, ids, text)

    monkeypatch.setattr(admission, "prompt_pieces", broken)
    engine.start()
    try:
        engine.submit(Job({"adapter": "gen_a", "prompt_ids": [5, 9, 14]}, hear("running"),
                          SamplingParams(max_tokens=40, ignore_eos=True), answer_mode=False))
        deadline = time.monotonic() + 60
        while tokens["running"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert tokens["running"] >= 2, "the first request never ran"
        engine.submit(Job({"adapter": "gen_a", "prompt_ids": [7, 8, 9]}, hear("echoed"),
                          SamplingParams(max_tokens=5, echo=True, logprobs=1, ignore_eos=True), answer_mode=False))
        while len(ended) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        engine.stop()
    assert ended["echoed"][0] == "error" and "cannot read this prompt back" in str(ended["echoed"][1])
    assert ended["running"][0] == "done", ended["running"]
    assert ended["running"][1].completion_tokens == 40
    assert not engine._rows and not engine._jobs

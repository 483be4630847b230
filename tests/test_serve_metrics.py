"""/metrics as vLLM's users read it: latency histograms measured at vLLM's points, token counters that count what the
engine processed whatever the request's end, and the access line of a request whose client left."""

import logging
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .serving import KEY, free_port, slowed

HISTOGRAMS = ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds", "request_prefill_time_seconds",
              "request_decode_time_seconds", "request_inference_time_seconds", "request_prompt_tokens", "request_generation_tokens")


def scrape(served) -> dict:
    """sample name (with its labels summed over) → value, through prometheus_client's parser."""
    out: dict = {}
    for family in text_string_to_metric_families(httpx.get(served.url + "/metrics").text):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def moved(before: dict, after: dict, name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def prompt_length(served, prompt: str) -> int:
    return served.post("/tokenize", {"model": "base", "prompt": prompt}).json()["count"]


def wait_until(check, seconds=10):
    deadline = time.monotonic() + seconds
    while not check() and time.monotonic() < deadline:
        time.sleep(0.05)
    return check()


def test_latency_histograms_move_by_the_requests_answered(served):
    """vLLM's histograms: one observation per answered request, inter-token gaps = generated tokens - 1 per request."""
    before = scrape(served)
    sent = [{"model": "base", "prompt": "a b c", "max_tokens": 6, "ignore_eos": True},
            {"model": "gen_a", "prompt": "In: ab\nOut:", "max_tokens": 3, "ignore_eos": True},
            {"model": "base", "prompt": "x", "max_tokens": 1}]
    usage = [served.post("/v1/completions", body).json()["usage"] for body in sent]
    after = scrape(served)
    assert [u["completion_tokens"] for u in usage] == [6, 3, 1]
    for name in HISTOGRAMS:
        assert moved(before, after, f"adapterhub_{name}_count") == len(sent), name
    assert moved(before, after, "adapterhub_inter_token_latency_seconds_count") == sum(u["completion_tokens"] - 1 for u in usage)
    assert moved(before, after, "adapterhub_request_prompt_tokens_sum") == sum(u["prompt_tokens"] for u in usage)
    assert moved(before, after, "adapterhub_request_generation_tokens_sum") == sum(u["completion_tokens"] for u in usage)
    e2e, ttft = moved(before, after, "adapterhub_e2e_request_latency_seconds_sum"), moved(before, after, "adapterhub_time_to_first_token_seconds_sum")
    queue, inference = moved(before, after, "adapterhub_request_queue_time_seconds_sum"), moved(before, after, "adapterhub_request_inference_time_seconds_sum")
    prefill, decode = moved(before, after, "adapterhub_request_prefill_time_seconds_sum"), moved(before, after, "adapterhub_request_decode_time_seconds_sum")
    assert e2e >= ttft > 0 and e2e >= queue + inference  # vLLM's intervals nest: queue, then prefill + decode, within e2e
    assert inference == pytest.approx(prefill + decode)  # true by construction (the same stamps); the check below is not
    # decode is first → last token, so it spans every inter-token gap of the request (the last one included)
    assert decode == pytest.approx(moved(before, after, "adapterhub_inter_token_latency_seconds_sum"), rel=1e-6)


def test_rows_sharing_decode_steps_each_count_their_tokens_and_gaps(served, monkeypatch):
    """Rows in one batch take each step's token at one stamp, so they share gaps: the engine adds a step's gaps as
    (value, count) pairs, and each row's gaps must still count (4 rows × 5 tokens: 16 gaps, 20 tokens)."""
    from concurrent.futures import ThreadPoolExecutor

    slowed(served, monkeypatch)  # the four arrive while the first is still prefilling: they share steps
    before = scrape(served)
    body = {"model": "base", "prompt": "a b", "max_tokens": 5, "ignore_eos": True}
    with ThreadPoolExecutor(4) as pool:
        usage = [r.json()["usage"] for r in pool.map(lambda _: served.post("/v1/completions", body), range(4))]
    after = scrape(served)
    assert [u["completion_tokens"] for u in usage] == [5] * 4
    assert moved(before, after, "adapterhub_inter_token_latency_seconds_count") == 16
    assert moved(before, after, "adapterhub_generated_tokens_total") == 20
    assert moved(before, after, "adapterhub_time_to_first_token_seconds_count") == 4


def test_a_classification_answer_is_one_request_without_tokens(served):
    before = scrape(served)
    served.post("/v1/completions", {"model": "cls_a", "input": "pos 1"}).raise_for_status()
    after = scrape(served)
    assert moved(before, after, "adapterhub_e2e_request_latency_seconds_count") == 1
    assert moved(before, after, "adapterhub_request_generation_tokens_count") == 1
    assert moved(before, after, "adapterhub_request_generation_tokens_sum") == 0
    assert moved(before, after, "adapterhub_time_to_first_token_seconds_count") == 0  # no token generated
    assert moved(before, after, "adapterhub_prompt_tokens_total") > 0


def test_a_cancelled_stream_counts_the_tokens_it_processed(served, monkeypatch):
    """vLLM's prompt_tokens_total and generation_tokens_total count what the engine processed, whatever the end; ours
    counted the tokens of requests answered ok only, so a stream its client left added nothing."""
    slowed(served, monkeypatch)
    prompt = "count me please"
    before = scrape(served)
    with httpx.stream("POST", served.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                      json={"model": "base", "prompt": prompt, "max_tokens": 400, "ignore_eos": True, "stream": True}) as r:
        lines = r.iter_lines()
        got = [next(line for line in lines if line.startswith("data: ")) for _ in range(3)]  # three tokens, then leave
    assert wait_until(lambda: not served.engine._rows and not served.engine._jobs)
    monkeypatch.undo()
    after = scrape(served)
    assert len(got) == 3 and moved(before, after, "adapterhub_requests_total") == 1  # the stream ended cancelled
    assert moved(before, after, "adapterhub_prompt_tokens_total") == prompt_length(served, prompt)
    generated = moved(before, after, "adapterhub_generated_tokens_total")
    assert 3 <= generated < 400
    assert moved(before, after, "adapterhub_inter_token_latency_seconds_count") == generated - 1
    assert moved(before, after, "adapterhub_e2e_request_latency_seconds_count") == 0  # not answered: as vLLM, for aborted requests


def test_a_whole_response_its_client_left_logs_the_tokens_it_read(served, monkeypatch, caplog):
    """A non-streaming request whose client left was logged 499 with prompt_tokens=- (a stream's line had its tokens)."""
    slowed(served, monkeypatch)
    prompt = "leave me be"
    with caplog.at_level(logging.INFO, logger="adapterhub_lite.serve.access"):
        with pytest.raises(httpx.TimeoutException):
            httpx.post(served.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=0.6,
                       json={"model": "base", "prompt": prompt, "max_tokens": 400, "ignore_eos": True})
        assert wait_until(lambda: [x for x in caplog.records if "POST /v1/completions" in x.getMessage()])
    monkeypatch.undo()
    line = next(x.getMessage() for x in caplog.records if "POST /v1/completions" in x.getMessage())
    fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
    assert fields["status"] == "499" and fields["adapter"] == "base", line
    assert fields["prompt_tokens"] == str(prompt_length(served, prompt)) and fields["completion_tokens"].isdigit(), line


def test_a_step_histogram_writes_what_prometheus_clients_histogram_writes():
    """The inter-token histogram takes a decode step's gaps as (value, count) pairs (serving/metrics.py StepHistogram):
    its exposition must be prometheus_client's own Histogram fed the same values one by one."""
    import random
    import re

    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from adapterhub_lite.serving.metrics import ITL_BUCKETS, StepHistogram

    ours, theirs = CollectorRegistry(), CollectorRegistry()
    step, plain = StepHistogram("g_seconds", "gaps", ITL_BUCKETS, ours), Histogram("g_seconds", "gaps", buckets=ITL_BUCKETS, registry=theirs)
    rng, total = random.Random(0), 0
    for _ in range(300):  # bounds themselves (le is ≤), below the first, past the last, and repeats
        value, count = rng.choice([*ITL_BUCKETS, 0.0, 1e-4, 0.03, 0.125, 99.0]), rng.randint(1, 4)
        step.observe(value, count)
        total += count
        for _ in range(count):
            plain.observe(value)
    text = [re.sub(r"(_created|_sum) (\S+)", lambda m: f"{m[1]} {float(m[2]):.6g}" if m[1] == "_sum" else f"{m[1]} X", generate_latest(r).decode())
            for r in (ours, theirs)]
    assert text[0] == text[1]
    assert f"g_seconds_count {float(total)}" in text[0]


def test_decode_time_spans_the_requests_inter_token_gaps(served, monkeypatch):
    """vLLM's decode time is first token → last token, so over one request it is the sum of its inter-token gaps. The
    engine observed a request's histograms before stamping its last token (the step's stamps came after the answer),
    so decode and inference time left out the last gap."""
    slowed(served, monkeypatch, seconds=0.01)
    before = scrape(served)
    usage = served.post("/v1/completions", {"model": "base", "prompt": "a b", "max_tokens": 4, "ignore_eos": True}).json()["usage"]
    after = scrape(served)
    assert usage["completion_tokens"] == 4
    assert moved(before, after, "adapterhub_inter_token_latency_seconds_count") == 3
    gaps = moved(before, after, "adapterhub_inter_token_latency_seconds_sum")
    decode = moved(before, after, "adapterhub_request_decode_time_seconds_sum")
    assert gaps > 0 and decode == pytest.approx(gaps, rel=1e-6)


def test_a_steps_tokens_are_stamped_after_they_are_read(served, monkeypatch):
    """Time to first token and the inter-token gaps end when a step's tokens reach the host: bank.step's read of them is
    the step's one sync, and on a GPU the forward that made them (a long prefill, for the first token) runs until then.
    vLLM stamps a step's outputs once they are out; the engine read its clock before bank.step, leaving that out."""
    events = []
    bank, metrics = served.engine.router.bank, served.engine.metrics
    step, step_tokens = bank.step, metrics.step_tokens

    def reading(dec, tokens, decide):
        events.append(("read", time.monotonic()))  # what bank.step does first: tokens.tolist(), the sync
        return step(dec, tokens, decide)

    def stamping(rows, now):
        events.append(("stamp", now))
        return step_tokens(rows, now)

    monkeypatch.setattr(bank, "step", reading)
    monkeypatch.setattr(metrics, "step_tokens", stamping)
    served.post("/v1/completions", {"model": "base", "prompt": "a b", "max_tokens": 3, "ignore_eos": True}).raise_for_status()
    monkeypatch.undo()
    reads = [t for kind, t in events if kind == "read"]
    assert len(reads) >= 3
    last_read = None
    for kind, t in events:
        if kind == "read":
            last_read = t
        else:
            assert last_read is not None and t >= last_read, events


def test_only_names_of_a_merges_exact_shape_share_the_merged_label():
    """A per-request merge is served as merged-<12 hex digits of its recipe's hash>, and only such names count under
    adapter="merged": an operator's adapter whose name merely starts like one (longer, upper case, another suffix)
    keeps its own series."""
    from adapterhub_lite.serving.metrics import adapter_label

    assert adapter_label("merged-0123456789ab") == "merged"
    for own in ("merged-0123456789abc", "merged-0123456789ab-v2", "merged-0123456789AB", "merged-sst2", "xmerged-0123456789ab"):
        assert adapter_label(own) == own


def http_counts(served) -> dict:
    """(handler, method, status) → adapterhub_http_requests_total."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(served.url + "/metrics").text):
        for s in family.samples:
            if s.name == "adapterhub_http_requests_total":
                out[s.labels["handler"], s.labels["method"], s.labels["status"]] = s.value
    return out


def test_every_http_answer_is_counted_by_route_template_and_status_those_refused_at_the_door_too(served, monkeypatch):
    """adapterhub_requests_total counts what reached the engine; the HTTP counter counts every answer (a 401, 404, 400
    before the engine), by the route's template (not the model id in the path) and the status logged (499: left)."""
    before = http_counts(served)
    sent = [served.post("/v1/completions", {"model": "base", "prompt": "a b", "max_tokens": 2}),
            served.post("/v1/completions", {"model": "base", "prompt": "a b", "max_tokens": 2}, key="wrong"),
            served.post("/v1/completions", {"model": "no-such-adapter", "prompt": "a b", "max_tokens": 2}),
            served.post("/v1/completions", {"model": "base", "prompt": "a b", "max_tokens": -1}),
            httpx.get(served.url + "/v1/models/gen_a", headers={"Authorization": f"Bearer {KEY}"}),
            httpx.get(served.url + "/v1/models/base", headers={"Authorization": f"Bearer {KEY}"}),
            httpx.get(served.url + "/v1/nowhere", headers={"Authorization": f"Bearer {KEY}"}),
            httpx.request("BREW", served.url + "/v1/nowhere", headers={"Authorization": f"Bearer {KEY}"})]
    assert [r.status_code for r in sent] == [200, 401, 404, 400, 200, 200, 404, 404]
    slowed(served, monkeypatch)
    with pytest.raises(httpx.TimeoutException):  # a client that leaves before its answer: 499, as the access log says
        httpx.post(served.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=0.6,
                   json={"model": "base", "prompt": "leave", "max_tokens": 400, "ignore_eos": True})
    want = {("/v1/completions", "POST", "200"): 1, ("/v1/completions", "POST", "401"): 1, ("/v1/completions", "POST", "404"): 1,
            ("/v1/completions", "POST", "400"): 1, ("/v1/models/{model_id:path}", "GET", "200"): 2, ("unmatched", "GET", "404"): 1,
            ("unmatched", "other", "404"): 1, ("/v1/completions", "POST", "499"): 1}
    assert wait_until(lambda: http_counts(served).get(("/v1/completions", "POST", "499"), 0) > before.get(("/v1/completions", "POST", "499"), 0))
    monkeypatch.undo()
    after = http_counts(served)
    moved_ = {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}
    moved_.pop(("/metrics", "GET", "200"), None)  # the scrapes themselves (the first one's count lands after its answer)
    assert moved_ == want


def test_answered_requests_count_by_the_finish_reason_their_choices_carry(served):
    """adapterhub_request_success_total{finished_reason} (vLLM's request_success_total) moves as the answers' own
    finish_reason say: cut by max_tokens (length), ended by a stop string (stop), a classification's label (stop)."""
    def success():
        out = {}
        for family in text_string_to_metric_families(httpx.get(served.url + "/metrics").text):
            out.update({s.labels["finished_reason"]: s.value for s in family.samples if s.name == "adapterhub_request_success_total"})
        return out

    before = success()
    base = served.post("/v1/completions", {"model": "base", "prompt": "a b c", "max_tokens": 5, "ignore_eos": True, "n": 2}).json()
    stopped = served.post("/v1/completions", {"model": "base", "prompt": "a b c", "max_tokens": 8, "ignore_eos": True,
                                              "stop": [base["choices"][0]["text"][:1]] if base["choices"][0]["text"] else None}).json()
    label = served.post("/v1/completions", {"model": "cls_a", "input": "pos 1"}).json()
    reasons = [c["finish_reason"] for answer in (base, stopped, label) for c in answer["choices"]]
    after = success()
    assert reasons.count("length") == 2 and reasons[-1] == "stop", reasons
    assert {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)} == \
        {r: float(reasons.count(r)) for r in set(reasons)}


def test_serve_names_its_http_parser_so_an_unknown_method_is_a_404_on_every_install(serve_registry, monkeypatch):
    """uvicorn's "auto" parser is httptools where it is importable (uvicorn[standard]) and h11 elsewhere; httptools answered
    BREW with a bare 400 before the app, so the 404 above (in the error shape, counted) held or not by what was installed.
    `serve` names h11, whichever is importable, and the test servers run the one it names."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from adapterhub_lite.cli.main import main

    seen = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: seen.append(self.config))
    assert main(["serve", "--registry", str(serve_registry), "--port", str(free_port()), "--quantization", "none", "--dtype", "fp32"]) == 0
    config = seen[0]
    config.load()
    assert config.http == "h11" and config.http_protocol_class is H11Protocol, (config.http, config.http_protocol_class)

"""scripts/bench_serve.py's pure parts: the report figures, the goal ratios, and the SSE reading of one answer (on a mock transport)."""

import asyncio
import importlib.util
import itertools
import json
from pathlib import Path

import httpx
import pytest

_spec = importlib.util.spec_from_file_location("bench_serve", Path(__file__).resolve().parents[1] / "scripts" / "bench_serve.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def ok(latency, ttft, tokens, chunks=0):
    return {"outcome": "ok", "latency": latency, "ttft": ttft, "tokens": tokens, "chunks": chunks}


def test_summarize_counts_outcomes_tokens_and_percentiles():
    results = [ok(1.0, 0.1, 10), ok(2.0, 0.2, None, chunks=4), ok(3.0, None, 6),
               {"outcome": "failed", "error": "HTTP 500: boom"}, {"outcome": "lost", "error": "no answer within 5 s"}]
    s = bench.summarize(results, sent=7, elapsed=2.0)  # 2 sent requests have no result: cancelled in flight, so lost
    assert (s["sent"], s["ok"], s["failed"], s["lost"]) == (7, 3, 1, 3)
    assert s["requests_per_s"] == 1.5  # only answered requests count
    assert s["tokens_per_s"] == 10.0  # (10 + 4 chunks + 6) / 2 s
    assert s["tokens_from_chunks"] == 1
    assert s["latency_s"] == {"p50": 2.0, "p95": 2.9, "p99": 2.98}
    assert s["ttft_s"]["p50"] == pytest.approx(0.15)  # the answer without a text chunk has no TTFT
    assert s["errors"] == {"HTTP 500: boom": 1, "no answer within 5 s": 1}


def test_percentiles_of_nothing_are_none():
    assert bench.percentiles([]) == {"p50": None, "p95": None, "p99": None}


def test_ratios_compare_requests_per_second_against_the_goals():
    scen = {"batching_1": {"requests_per_s": 8.0}, "batching_many": {"requests_per_s": 7.0}, "one_at_a_time": {"requests_per_s": 2.5}}
    r = bench.ratios(scen)
    assert r["batching_vs_one_at_a_time"] == {"value": 3.2, "goal": 4.0, "met": False}
    assert r["many_vs_one_adapter"] == {"value": 0.875, "goal": 0.9, "met": False}
    scen["batching_1"]["requests_per_s"] = 7.5
    assert bench.ratios(scen)["many_vs_one_adapter"]["met"] is True
    assert bench.ratios({"batching_1": {"requests_per_s": 8.0}, "one_at_a_time": {"error": "died"}}) == {}  # unmeasured: no ratio


def test_prompts_fall_back_to_fixed_examples(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "DATA", tmp_path)
    assert bench.load_prompts("date_iso") == bench.FALLBACK_PROMPTS["date_iso"]
    (tmp_path / "date_iso").mkdir()
    (tmp_path / "date_iso" / "dev.jsonl").write_text('{"text": "May 1, 2020", "target": "2020-05-01"}\n')
    assert bench.load_prompts("date_iso") == ["May 1, 2020"]
    with pytest.raises(SystemExit, match="no prompts for task 'other'"):
        bench.load_prompts("other")


def sse(*chunks) -> bytes:
    return "".join(f"data: {c if isinstance(c, str) else json.dumps(c)}\n\n" for c in chunks).encode()


def answer(handler) -> dict:
    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await bench.one_request(client, "http://test", {"model": "m", "stream": True})
    return asyncio.run(go())


def test_one_request_reads_ttft_and_usage_from_the_stream():
    body = sse({"choices": [{"text": "", "finish_reason": None}]}, {"choices": [{"text": "20", "finish_reason": None}]},
               {"choices": [{"text": "20", "finish_reason": "stop"}]}, {"choices": [], "usage": {"completion_tokens": 2}}, "[DONE]")
    r = answer(lambda req: httpx.Response(200, content=body, headers={"content-type": "text/event-stream"}))
    assert r["outcome"] == "ok" and r["tokens"] == 2 and r["chunks"] == 2
    assert 0 <= r["ttft"] <= r["latency"]


def test_one_request_fails_a_cut_stream_and_an_error_status():
    cut = sse({"choices": [{"text": "20", "finish_reason": None}]})  # no finish_reason, no [DONE]
    r = answer(lambda req: httpx.Response(200, content=cut, headers={"content-type": "text/event-stream"}))
    assert r == {"outcome": "failed", "error": "stream ended without a finish_reason or [DONE]", "tag": None}
    r = answer(lambda req: httpx.Response(429, json={"error": {"message": "queue full", "type": "overloaded", "code": 429}}))
    assert r == {"outcome": "failed", "error": "HTTP 429: queue full", "tag": None}


def test_a_moving_working_set_tags_first_uses_cold_and_the_damaged_adapter_broken(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "DATA", tmp_path)  # the fixed prompts
    targets = [(f"date_iso_{i:02d}", "date_iso") for i in range(12)] + [(bench.BROKEN, "date_iso")]
    seen = set()
    first = list(itertools.islice(bench.make_payloads(targets, 4, {}, window=4, seen=seen), 16))
    names = [p["model"] for p in first]
    assert names[:4] == ["date_iso_00", "date_iso_01", "date_iso_02", "date_iso_03"]  # the first window, round robin
    assert names[4:8] == ["date_iso_01", "date_iso_02", "date_iso_03", "date_iso_04"]  # slid by a quarter of the window
    assert [p["_tag"] for p in first[:6]] == ["cold"] * 4 + ["warm", "warm"]
    assert first[7]["_tag"] == "cold"  # date_iso_04's first request
    later = list(itertools.islice(bench.make_payloads(targets, 4, {}, window=4, seen=seen), 60))
    assert {p["_tag"] for p in later if p["model"] == bench.BROKEN} == {"broken"}
    assert all(p["_tag"] == "warm" for p in later[:16])  # the same adapters again: seen carries over from the warm-up
    one_pass = [p["model"] for p in itertools.islice(bench.make_payloads(targets, 4, {}, window=4, slide=4), 2 * len(targets))]
    assert sorted(one_pass[: len(targets)]) == sorted(n for n, _ in targets) and one_pass[len(targets):] == one_pass[: len(targets)]


def test_by_tag_and_the_cold_ttft_and_memory_ratios():
    results = [ok(1.0, 0.1, 4) | {"tag": "warm"}, ok(1.0, 0.2, 4) | {"tag": "warm"}, ok(1.0, 0.5, 4) | {"tag": "cold"},
               {"outcome": "failed", "error": "HTTP 503: unavailable", "tag": "broken"}]
    s = bench.summarize(results, sent=4, elapsed=1.0)
    assert s["by_tag"]["broken"] == {"results": 1, "ok": 0, "failed": 1, "ttft_s": bench.percentiles([])}
    assert s["by_tag"]["cold"]["ttft_s"]["p99"] == 0.5 and s["by_tag"]["warm"]["ok"] == 2
    scen = {"adapters_1000": {**s, "memory": {"rss_after_warmup_mb": 1000.0, "rss_end_mb": 1050.0}}}
    r = bench.ratios(scen)
    assert r["p99_ttft_cold_vs_warm"]["value"] == round(0.5 / 0.199, 3) and r["p99_ttft_cold_vs_warm"]["met"] is False
    assert r["memory_growth_after_warmup"] == {"value": 1.05, "goal": 1.1, "met": True, "lower_is_better": True}


def test_the_first_pass_warms_up_until_the_host_cache_is_full(monkeypatch):
    """adapters_1000's goal is memory flat *after the first pass*: the warm-up goes on until /health says the host
    cache holds its bound (or --warmup-limit is spent), and says which."""
    filled = iter([10, 40, 64, 64])
    runs = []

    async def fake_load(url, payloads, clients, duration, timeout):
        runs.append(duration)
        return {}

    def fake_info(url):
        return {"health": {"memory": {"host_cached_adapters": next(filled), "max_cpu_loras": 64}}}

    monkeypatch.setattr(bench, "run_load", fake_load)
    monkeypatch.setattr(bench, "server_info", fake_info)
    args = type("Args", (), {"warmup": 5.0, "warmup_limit": 300.0, "clients": 4, "request_timeout": 30.0})()
    warm = bench.warm_up("http://x", iter(()), args, first_pass=True)
    assert runs == [5.0, 5.0, 5.0] and warm["seconds"] == 15.0 and warm["host_cache_full"] is True
    assert warm["memory"]["host_cached_adapters"] == 64

    filled, runs[:] = iter([1, 2, 3, 4]), []
    args.warmup_limit = 10.0
    warm = bench.warm_up("http://x", iter(()), args, first_pass=True)  # the limit ends it before the cache is full
    assert runs == [5.0, 5.0] and warm["host_cache_full"] is False
    r = bench.ratios({"adapters_1000": {"memory": {"rss_after_warmup_mb": 1000.0, "rss_end_mb": 1200.0, "host_cache_full_after_warmup": False}}})
    assert r["memory_growth_after_warmup"]["met"] is False and "still filling" in r["memory_growth_after_warmup"]["caveat"]

    filled, runs[:] = iter([1, 2]), []
    assert bench.warm_up("http://x", iter(()), args)["host_cache_full"] is False and runs == [5.0]  # other scenarios: --warmup once


def test_rounds_report_the_median_round_and_never_hide_a_failure():
    runs = [{"requests_per_s": 5.0, "ok": 50}, {"requests_per_s": 7.0, "ok": 70}, {"requests_per_s": 6.0, "ok": 60}]
    assert bench.median_run(runs) == {"requests_per_s": 6.0, "ok": 60, "rounds_requests_per_s": [5.0, 7.0, 6.0]}
    assert bench.median_run(runs[:2])["requests_per_s"] == 5.0  # an even count: the lower middle
    assert bench.median_run(runs[:1]) is runs[0]  # one round: as it is
    failed = bench.median_run([runs[0], {"error": "server died"}, runs[1]])
    assert failed["error"] == "server died" and failed["rounds_requests_per_s"] == [5.0, None, 7.0]

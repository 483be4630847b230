"""scripts/bench_serve.py's pure parts: the report figures, the goal ratios, and the SSE reading of one answer (on a mock transport)."""

import asyncio
import importlib.util
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
    assert r == {"outcome": "failed", "error": "stream ended without a finish_reason or [DONE]"}
    r = answer(lambda req: httpx.Response(429, json={"error": {"message": "queue full", "type": "overloaded", "code": 429}}))
    assert r == {"outcome": "failed", "error": "HTTP 429: queue full"}

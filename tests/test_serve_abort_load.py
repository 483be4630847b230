"""A minute of load in which one client in four leaves at a random point (in the queue, in a long prompt's pieces,
mid-decode, mid-stream), beside run-time loads, unloads, reloads and per-request merges: every answer that is read
is the greedy answer a fresh server gives, and afterwards the server is exactly as idle as before and still answers
as a fresh one does.

    .venv/bin/python -m pytest -q -s -m bench tests/test_serve_abort_load.py      # ABORT_LOAD_SECONDS (60), ABORT_LOAD_CLIENTS (48)

Marked `bench` (a minute of load: CI runs it, the default run does not). It prints one JSON line of what it counted."""

import asyncio
import json
import os
import random
import time

import httpx
import pytest

from adapterhub_lite.serving.scheduler import Budgets

from .serving import KEY, Served

SECONDS = float(os.environ.get("ABORT_LOAD_SECONDS", 60))
CLIENTS = int(os.environ.get("ABORT_LOAD_CLIENTS", 48))
LONG = "ab cd ef gh " * 10  # ~120 byte-level tokens: 8 pieces at 16 tokens a step
PROMPTS = ["ab cd", "ef gh ab", LONG]
GENERATE = ["base", "gen_a", "gen_b", "gen_prefix", "gen_prompt"]  # raw prompts continued (LoRA ×2, prefix, prompt, none)
CLASSIFY = ["cls_a", "cls_ia3", "cls_prefix", "cls_prompt"]  # task inputs scored over their labels
CASES = [(m, p, n) for m in GENERATE for p in PROMPTS for n in (4, 24)] + [(m, x, 0) for m in CLASSIFY for x in ("ab", "gh ef")]
GAUGES = ("adapterhub_num_requests_running", "adapterhub_queue_depth", "adapterhub_kv_cache_reserved_tokens", "adapterhub_batch_row_factor_bytes")


def body(model, text, new, stream=False, n=1):
    if not new:  # a classification adapter: its task input
        return {"model": model, "prompt": "", "input": text, "stream": stream, "n": n}
    return {"model": model, "prompt": text, "max_tokens": new, "ignore_eos": True, "temperature": 0, "stream": stream, "n": n}


def greedy(s, case) -> str:
    r = s.post("/v1/completions", body(*case))
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def idle(s) -> dict:
    """What a server holds for requests, read on its engine's lock (so between two steps), and its gauges."""
    e = s.engine
    with s.router.lock:
        sch = e.scheduler
        held = {"arrivals": e._waiting.qsize(), "waiting": len(sch.waiting), "prefilling": len(sch.prefilling), "running": len(sch.running),
                "kv_reserved": sch.kv_reserved(), "jobs": len(e._jobs), "rows": len(e._rows), "batch": e._dec is not None,
                "static_rows": len(e._static) if e._static is not None else 0, "memory_waits": len(e._memory_waits),
                "fetching": len(e._fetching), "merge_builds": len(s.catalogue._pending), "runtime": sorted(s.catalogue.runtime)}
    text = httpx.get(s.url + "/metrics").text
    for g in GAUGES:
        held[g] = float(next(line for line in text.splitlines() if line.startswith(g + " ")).split()[-1])
    health = httpx.get(s.url + "/health").json()
    held["health_queue_depth"], held["batch_row_bytes"] = health["queue_depth"], health["memory"]["batch_row_bytes"]
    return held


async def client(h, refs, stats, until, rng):
    while time.monotonic() < until:
        case = rng.choice(CASES)
        stream, n, leave = rng.random() < 0.5, rng.choice((1, 1, 2)), rng.random() < 0.25
        try:
            if stream:
                timeout = rng.uniform(0.01, 1.5) if leave and rng.random() < 0.5 else 120  # half of them leave before the first byte
                async with h.stream("POST", "/v1/completions", json=body(*case, stream=True, n=n), timeout=timeout) as r:
                    if r.status_code != 200:
                        stats["errors"].append((r.status_code, (await r.aread())[:200].decode()))
                        continue
                    texts, stop = [""] * n, rng.randint(0, 30) if timeout == 120 else 1 << 30
                    async for i, line in aenumerate(r.aiter_lines()):
                        if leave and i >= stop:
                            break  # the client leaves mid-stream: the connection is closed
                        if line.startswith("data: {"):
                            chunk = json.loads(line[6:])
                            if "error" in chunk:
                                stats["errors"].append(("stream", chunk["error"]["message"]))
                            for c in chunk.get("choices", []):
                                texts[c["index"]] += c["text"]
                    else:
                        stats["answered"] += 1
                        stats["wrong"] += sum(t != refs[case] for t in texts)
                        continue
                    stats["left"] += 1
            else:
                timeout = rng.uniform(0.01, 1.5) if leave else 120  # the client gives up at a random point: queue, pieces, decode
                r = await h.post("/v1/completions", json=body(*case, n=n), timeout=timeout)
                if r.status_code != 200:
                    stats["errors"].append((r.status_code, r.text[:200]))
                    continue
                stats["answered"] += 1
                stats["wrong"] += sum(c["text"] != refs[case] for c in r.json()["choices"])
        except httpx.TimeoutException:
            stats["left"] += 1


async def aenumerate(it):
    i = 0
    async for x in it:
        yield i, x
        i += 1


async def catalogue_churn(h, s, refs, stats, until, rng):
    """Run-time load / unload of a copy of gen_a, registry reloads and per-request merges, some abandoned."""
    folder = str(s.router.registry.path("gen_a@1.0.0"))
    while time.monotonic() < until:
        r = await h.post("/v1/load_lora_adapter", json={"lora_name": "rt", "lora_path": folder})
        stats["loads"] += r.status_code == 200
        case = ("gen_a", rng.choice(PROMPTS), 4)
        r = await h.post("/v1/completions", json=body("rt", *case[1:]))
        stats["wrong"] += r.status_code != 200 or r.json()["choices"][0]["text"] != refs[case]
        while (r := await h.post("/v1/unload_lora_adapter", json={"lora_name": "rt"})).status_code == 409:  # in use: retry
            await asyncio.sleep(0.05)
        stats["unloads"] += r.status_code == 200
        r = await h.post("/v1/reload", json={})
        stats["reloads"] += r.status_code == 200
        w = rng.choice((0.3, 0.5, 0.7))
        merged = {**body("gen_a", "ab", 4), "merged_adapters": {"ids": ["gen_a", "gen_b"], "weights": [w, 1 - w], "merge_strategy": "delta_linear"}}
        try:
            r = await h.post("/v1/completions", json=merged, timeout=rng.choice((0.05, 120)))
            stats["merges"] += r.status_code == 200
        except httpx.TimeoutException:
            stats["left"] += 1
        await asyncio.sleep(1)


@pytest.mark.bench
def test_a_minute_of_clients_that_leave_leaves_the_server_idle_and_exact(serve_registry):
    fresh = Served(serve_registry)
    try:
        refs = {case: greedy(fresh, case) for case in CASES}
    finally:
        fresh.close()
    # small budgets, so requests wait (rows, cache, adapters), long prompts run in pieces and LoRA adapters share 2 slots
    s = Served(serve_registry, budgets=Budgets(max_rows=8, max_num_batched_tokens=16, max_kv_tokens=600, max_loras=2), max_loras=2)
    try:
        assert {case: greedy(s, case) for case in CASES} == refs  # warm: every adapter read once
        before = idle(s)
        stats = {"answered": 0, "left": 0, "wrong": 0, "errors": [], "loads": 0, "unloads": 0, "reloads": 0, "merges": 0}

        async def load():
            rng, until = random.Random(0), time.monotonic() + SECONDS
            limits = httpx.Limits(max_connections=CLIENTS + 8)
            async with httpx.AsyncClient(base_url=s.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120, limits=limits) as h:
                await asyncio.gather(*(client(h, refs, stats, until, random.Random(rng.random())) for _ in range(CLIENTS)),
                                     catalogue_churn(h, s, refs, stats, until, random.Random(rng.random())))

        start = time.monotonic()
        asyncio.run(load())
        elapsed = time.monotonic() - start
        deadline = time.monotonic() + 30
        while idle(s) != before and time.monotonic() < deadline:  # the last cancellations land at the engine's next step
            time.sleep(0.1)
        after = idle(s)
        again = {case: greedy(s, case) for case in CASES}
        health = httpx.get(s.url + "/health").json()
        mem, decode = health["memory"], health["decode"]
        waits = {line.split('"')[1]: float(line.split()[-1]) for line in httpx.get(s.url + "/metrics").text.splitlines()
                 if line.startswith("adapterhub_scheduler_waits_total{")}
        print(json.dumps({"seconds": round(elapsed, 1), "clients": CLIENTS, **{k: v for k, v in stats.items() if k != "errors"},
                          "errors": len(stats["errors"]), "answered_per_s": round(stats["answered"] / elapsed, 2),
                          "idle_before": before, "idle_after": after, "host_cached": mem["host_cached_adapters"], "budget_waits": waits, "decode": {k: decode[k] for k in ("kv_cache_rows", "kv_cache_width")},
                          "same_greedy_after": again == refs}))
        assert not stats["errors"], stats["errors"][:5]
        assert stats["wrong"] == 0 and stats["left"] > 0 and stats["answered"] > 0
        assert after == before
        assert again == refs
        assert s.router.bank.slots_held() <= 2 and mem["host_cached_adapters"] <= s.router.max_cpu_loras
    finally:
        s.close()

"""Serving load benchmark: closed-loop clients against `adapterhub-lite serve`, one JSON line on stdout.

    python scripts/bench_serve.py [--clients 16] [--duration 20] [--warmup 5] [--max-tokens 16] [--registry adapters]
                                  [--adapters 32] [--sources date_iso] [--scenarios batching_1 batching_many one_at_a_time]
                                  [--server-args "--quantization none --dtype fp32"] [--base-url http://127.0.0.1:8000] [--rounds 3]

It builds a temporary registry of --adapters distinct names (copies of the latest version of each --sources generation
adapter of --registry, round-robin, published as date_iso_00, date_iso_01, ...). By default they copy one source
(date_iso), so batching_many sends the very requests batching_1 sends and differs only in the adapters they name:
mixing tasks (`--sources date_iso person_json`) changes prompt and answer lengths too, and with them requests/s.
Then, for each scenario, it starts the server on a free
127.0.0.1 port, waits for /health, runs --warmup seconds of unrecorded load, then --duration seconds of recorded load,
and stops the server (SIGTERM, then SIGKILL after a grace period; always, also on error). Scenarios:

- batching_1:     continuous batching (the server's defaults), every request to one adapter;
- batching_many:  continuous batching, requests spread over all --adapters adapters;
- one_at_a_time:  `--max-batch-rows 1`, one adapter;
and, when named in --scenarios:
- base:           every request to the plain backbone (`model: base`);
- broken_1_in_20: the --adapters adapters plus one whose weights fail their sha256 check; one request in 20 names it
                  (only those may fail: `by_tag.broken` against the rest);
- kv_half:        `--kv-cache-mb` set to half of what the clients ask for at once (clients × (longest prompt + max
                  tokens) × the cache's bytes per token, from an earlier scenario): requests must wait, not fail;
- dynamic_many:   batching_many with `--decode-cache dynamic`: the decode path before static shapes (caches that grow
                  and are re-padded every step), for old vs new in one run;
- adapters_1000:  --thousand registered copies, `--memory-budget-mb 64`, a working set of --window adapters that moves
                  through them; its warm-up is the first pass: it goes on until the server's host cache holds its bound
                  (--warmup-limit at most); reports the server's memory (RSS and /health) after the warm-up and at the end,
                  and TTFT of requests whose adapter is used for the first time (cold: neither resident nor in host memory)
                  against the rest (warm).

On a machine whose cores other work shares, one run of a scenario can be several percent off the next: `--rounds N`
runs the scenario list N times, alternating, and reports each scenario's median round (with every round's requests/s)
and each ratio's value per round beside the ratio of the medians.

Goals, as ratios measured in the same run: requests/s batching_1 / one_at_a_time >= 4, batching_many / batching_1 >= 0.9,
batching_1 / base >= 0.9, batching_many / dynamic_many >= 1 (static decode no slower); adapters_1000: p99 TTFT cold / warm <= 2 and RSS end / after warm-up <= 1.1.

Each client sends streaming completions (`"stream": true`, task-aware `input`, greedy, --max-tokens) back to back until
--duration is over; the run then waits for in-flight requests up to a hard deadline (duration + request timeout + 10 s).
Per scenario: requests/s and generated tokens/s (usage.completion_tokens) over the time from the first send to the last
answer, p50/p95/p99 latency, time to first token (the first SSE `data:` chunk carrying text) and inter-token latency
(each answer's mean gap between text chunks); `failed` counts
non-2xx answers, exceptions and streams cut before their end; `lost` counts requests sent but never answered (request
timeout, or still in flight at the hard deadline). With --base-url the script benches a server already running
(one scenario, named `external`), spreading requests over the served generation adapters that --registry lists.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"  # see ../shared/data/README.md; read in place, never copied
SCENARIOS = {"base": ("base", []), "batching_1": ("one", []), "batching_many": ("all", []), "one_at_a_time": ("one", ["--max-batch-rows", "1"]),
             "broken_1_in_20": ("broken", []), "kv_half": ("all", []), "adapters_1000": ("thousand", ["--memory-budget-mb", "64"]),
             "dynamic_many": ("all", ["--decode-cache", "dynamic"])}
DEFAULT_SCENARIOS = ["batching_1", "batching_many", "one_at_a_time"]
GOALS = {"batching_vs_one_at_a_time": ("batching_1", "one_at_a_time", 4.0), "many_vs_one_adapter": ("batching_many", "batching_1", 0.9),
         "one_adapter_vs_base": ("batching_1", "base", 0.9), "static_vs_dynamic_decode": ("batching_many", "dynamic_many", 1.0)}
BROKEN = "broken_00"  # the damaged adapter of broken_1_in_20: its weights fail their sha256 check
FALLBACK_PROMPTS = {  # used when ../shared/data is absent
    "date_iso": ["June 16, 2034", "Jun. 20 1965", "24.12.2008 (European style)", "the 3rd of March, 2021"],
    "person_json": ["Lima resident Dara Okafor, aged 50, works as a farmer.", "Mateo Schmidt is a 79-year-old librarian from Zurich."],
}


class ScenarioError(RuntimeError):
    """A scenario could not be measured (server died, never got healthy, refused the probe); `log` is the server's log tail."""

    def __init__(self, message: str, log: str = ""):
        super().__init__(message)
        self.log = log


def percentiles(values: list[float], qs=(50, 95, 99)) -> dict:
    """{'p50': .., 'p95': .., 'p99': ..} in seconds (rounded to 0.1 ms); None each when there are no values."""
    if not values:
        return {f"p{q}": None for q in qs}
    return {f"p{q}": round(float(v), 4) for q, v in zip(qs, np.percentile(values, qs))}


def summarize(results: list[dict], sent: int, elapsed: float) -> dict:
    """One scenario's figures from its per-request results ({'outcome': ok|failed|lost, 'latency', 'ttft', 'tokens', 'error'})."""
    ok = [r for r in results if r["outcome"] == "ok"]
    errors: dict[str, int] = {}
    for r in results:
        if r.get("error"):
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    # usage.completion_tokens; a stream without usage counts its text chunks (one token each on OpenAI-style servers)
    tokens = sum(r["tokens"] if r["tokens"] is not None else r.get("chunks", 0) for r in ok)
    return {
        "sent": sent, "ok": len(ok), "failed": sum(r["outcome"] == "failed" for r in results),
        # a request with no result at all was cancelled in flight at the hard deadline: lost too
        "lost": sum(r["outcome"] == "lost" for r in results) + sent - len(results),
        "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(len(ok) / elapsed, 3) if elapsed > 0 else None,
        "tokens_per_s": round(tokens / elapsed, 2) if elapsed > 0 else None,
        "tokens_per_request": round(tokens / len(ok), 2) if ok else None,  # differs between scenarios: their workloads differ
        "tokens_from_chunks": sum(r["tokens"] is None for r in ok),  # answers without usage, whose tokens are their chunks
        "latency_s": percentiles([r["latency"] for r in ok]),
        "ttft_s": percentiles([r["ttft"] for r in ok if r["ttft"] is not None]),
        "itl_s": percentiles([r["itl"] for r in ok if r.get("itl") is not None]),
        "prompt_tokens_max": max((r["prompt_tokens"] for r in ok if r.get("prompt_tokens")), default=None),
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),  # the commonest few, for diagnosis
        **({"by_tag": by_tag(results)} if any(r.get("tag") for r in results) else {}),
    }


def by_tag(results: list[dict]) -> dict:
    """Per bench label (cold: the adapter's first request of the run, so not resident; warm; broken): sent, ok, failed, TTFT."""
    out = {}
    for tag in sorted({r.get("tag") for r in results if r.get("tag")}):
        rs = [r for r in results if r.get("tag") == tag]
        ok = [r for r in rs if r["outcome"] == "ok"]
        out[tag] = {"results": len(rs), "ok": len(ok), "failed": sum(r["outcome"] != "ok" for r in rs),
                    "ttft_s": percentiles([r["ttft"] for r in ok if r["ttft"] is not None])}
    return out


def ratios(scenarios: dict) -> dict:
    """The goal ratios that the measured scenarios allow: value, goal and whether it is met."""
    out = {}
    for key, (num, den, goal) in GOALS.items():
        a, b = scenarios.get(num, {}).get("requests_per_s"), scenarios.get(den, {}).get("requests_per_s")
        if a is not None and b:
            out[key] = {"value": round(a / b, 3), "goal": goal, "met": a / b >= goal}
    tags = scenarios.get("adapters_1000", {}).get("by_tag", {})
    cold, warm = (tags.get(t, {}).get("ttft_s", {}).get("p99") for t in ("cold", "warm"))
    if cold is not None and warm:  # a request whose adapter is not resident, against one whose adapter is
        out["p99_ttft_cold_vs_warm"] = {"value": round(cold / warm, 3), "goal": 2.0, "met": cold / warm <= 2.0, "lower_is_better": True}
    mem = scenarios.get("adapters_1000", {}).get("memory", {})
    if mem.get("rss_after_warmup_mb") and mem.get("rss_end_mb"):
        growth = mem["rss_end_mb"] / mem["rss_after_warmup_mb"]
        out["memory_growth_after_warmup"] = {"value": round(growth, 3), "goal": 1.1, "met": growth <= 1.1, "lower_is_better": True}
        if mem.get("host_cache_full_after_warmup") is False:  # the first pass did not end: part of the growth is the cache filling
            out["memory_growth_after_warmup"]["caveat"] = "the host cache was still filling when the warm-up ended; raise --warmup-limit"
    return out


def median_run(runs: list[dict]) -> dict:
    """A scenario over its rounds: the round whose requests/s is the median (the lower middle of an even count),
    with every round's requests/s beside it; one round is returned as it is. Failed rounds count as failures: the
    first failure is returned with the others' figures beside it, so a failure is never hidden by a median."""
    if len(runs) == 1:
        return runs[0]
    rates = [r.get("requests_per_s") for r in runs]
    failed = [r for r in runs if "error" in r]
    pick = failed[0] if failed else sorted(runs, key=lambda r: r["requests_per_s"])[(len(runs) - 1) // 2]
    return {**pick, "rounds_requests_per_s": rates}


def load_prompts(task: str, limit: int = 64) -> list[str]:
    """Input texts of a task: the first rows of ../shared/data/<task>/dev.jsonl, else fixed examples."""
    path = DATA / task / "dev.jsonl"
    if path.is_file():
        with open(path) as fh:
            texts = [json.loads(line)["text"] for line in itertools.islice(fh, limit) if line.strip()]
        if texts:
            return texts
    if task not in FALLBACK_PROMPTS:
        raise SystemExit(f"no prompts for task {task!r}: {path} is missing and no fixed examples exist; restore ../shared/data/{task}")
    return FALLBACK_PROMPTS[task]


def build_registry(source: str, n: int, dest: Path, pick: list[str] | None) -> tuple[list[tuple[str, str]], dict]:
    """Publish n distinct names (round-robin copies of `pick`, default the first generation adapter of source, latest versions)
    into dest; [(name, task)] and what they were copied from."""
    from adapterhub_lite.artifacts.registries import open_registry

    src = open_registry(source)
    latest = {r["name"]: r for r in src.rows() if r["type"] == "generation"}  # rows are sorted by version: the last is the latest
    if not latest:
        raise SystemExit(f"registry {source!r} holds no generation adapter; pass --registry with date_iso/person_json-like adapters")
    unknown = sorted(set(pick or []) - set(latest))
    if unknown:
        raise SystemExit(f"--sources {' '.join(unknown)}: not generation adapters of {source!r} (those are: {' '.join(sorted(latest))})")
    gens, out, names = [latest[k] for k in (pick or sorted(latest)[:1])], open_registry(dest), []
    folders = {r["name"]: src.path(f"{r['name']}@{r['version']}") for r in gens}  # verified once, copied n times
    for i in range(n):
        r = gens[i % len(gens)]
        name = f"{r['name']}_{i:02d}"
        out.publish(folders[r["name"]], "1.0.0", name)  # publish copies the sidecar too, so the fingerprint still checks
        names.append((name, r["task"]))
    return names, {"base": gens[0]["base"], "quantization": gens[0]["quantization"], "sources": [f"{r['name']}@{r['version']}" for r in gens]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def headers() -> dict:
    key = os.environ.get("ADAPTERHUB_API_KEY")  # the server reads the same variable
    return {"Authorization": f"Bearer {key}"} if key else {}


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> None:
    """Poll GET /health until 200; exit non-zero with the server's log tail if it dies or the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ScenarioError(f"the server exited with code {proc.returncode} before /health answered", tail(log))
        try:
            if httpx.get(f"{url}/health", timeout=2, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.5)
    raise ScenarioError(f"the server gave no healthy /health within {timeout:.0f} s (raise --startup-timeout)", tail(log))


def tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.is_file() else "(no log)"


def stop(proc: subprocess.Popen, grace: float = 15) -> None:
    """SIGTERM, then SIGKILL once the grace period is over."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def server_info(url: str) -> dict:
    """What the server says about itself: /health's body and the backbone that /v1/models names."""
    info: dict = {}
    try:
        info["health"] = httpx.get(f"{url}/health", timeout=5, trust_env=False).json()
        models = httpx.get(f"{url}/v1/models", headers=headers(), timeout=5, trust_env=False).json()["data"]
        info["base"] = next((m.get("root") for m in models if m["id"] == "base"), None)  # the backbone's weights
        info["models"] = [m["id"] for m in models]  # for --base-url; the report keeps only their number
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        info["error"] = f"{type(exc).__name__}: {exc}"
    return info


async def one_request(client: httpx.AsyncClient, url: str, payload: dict) -> dict:
    """Send one streaming completion; time the whole answer and the first chunk that carries text."""
    tag = payload.pop("_tag", None)  # the bench's own label (cold, warm, broken), not sent
    t0 = time.perf_counter()
    ttft = tokens = prompt_tokens = last = None
    done, chunks, gaps = False, 0, []
    async with client.stream("POST", f"{url}/v1/completions", json=payload) as resp:
        if resp.status_code != 200:
            body = (await resp.aread()).decode(errors="replace")
            try:
                body = json.loads(body)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
            return {"outcome": "failed", "error": f"HTTP {resp.status_code}: {str(body)[:160]}", "tag": tag}
        if not resp.headers.get("content-type", "").startswith("text/event-stream"):  # a server that ignored "stream": one JSON answer
            usage = json.loads(await resp.aread()).get("usage") or {}
            return {"outcome": "ok", "latency": time.perf_counter() - t0, "ttft": None, "tokens": usage.get("completion_tokens"), "tag": tag}
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if any(c.get("text") for c in chunk.get("choices") or []):
                chunks += 1
                now = time.perf_counter() - t0
                ttft = ttft if ttft is not None else now
                if last is not None:
                    gaps.append(now - last)  # inter-token latency: the gaps between text chunks after the first
                last = now
            if chunk.get("usage"):
                tokens, prompt_tokens = chunk["usage"]["completion_tokens"], chunk["usage"].get("prompt_tokens")
            done = done or any(c.get("finish_reason") for c in chunk.get("choices") or [])
    if not done:
        return {"outcome": "failed", "error": "stream ended without a finish_reason or [DONE]", "tag": tag}
    return {"outcome": "ok", "latency": time.perf_counter() - t0, "ttft": ttft, "tokens": tokens, "chunks": chunks, "tag": tag,
            "itl": sum(gaps) / len(gaps) if gaps else None, "prompt_tokens": prompt_tokens}


async def run_load(url: str, payloads, clients: int, duration: float, timeout: float) -> dict:
    """Closed loop: `clients` tasks send back to back until `duration` is over, bounded by a hard deadline."""
    results: list[dict] = []
    sent = 0
    stop_at = time.monotonic() + duration

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal sent
        while time.monotonic() < stop_at:
            sent += 1
            try:
                results.append(await asyncio.wait_for(one_request(client, url, next(payloads)), timeout))
            except TimeoutError:
                results.append({"outcome": "lost", "error": f"no answer within {timeout:.0f} s"})
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                results.append({"outcome": "failed", "error": f"{type(exc).__name__}: {str(exc)[:120]}"})

    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    async with httpx.AsyncClient(headers=headers(), limits=limits, timeout=timeout, trust_env=False) as client:
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(client_loop(client)) for _ in range(clients)]
        _, pending = await asyncio.wait(tasks, timeout=duration + timeout + 10)  # the hard deadline
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        elapsed = time.perf_counter() - t0
    return summarize(results, sent, elapsed)


def make_payloads(targets: list[tuple[str, str]], max_tokens: int, extra: dict, window: int | None = None, seen: set | None = None,
                  slide: int | None = None):
    """An endless round-robin of requests over the adapters (so concurrent batches mix them) and each task's prompts.

    `window`: a working set that moves: requests go round-robin over `window` adapters, and the window slides by
    `slide` adapters (default a quarter of itself) every `window` requests, through all targets; with slide = window
    each adapter gets one request per pass over the targets. Each request is tagged cold (its adapter's first
    request in `seen`, so neither resident nor in host memory) or warm; requests to the damaged adapter are tagged broken."""
    prompts = {task: load_prompts(task) for task in {t for _, t in targets}}
    seen = set() if seen is None else seen
    for i in itertools.count():
        if window:
            start = (i // window) * (slide or max(window // 4, 1))
            name, task = targets[(start + i % window) % len(targets)]
        else:
            name, task = targets[i % len(targets)]
        text = prompts[task][(i // len(targets)) % len(prompts[task])]
        tag = "broken" if name == BROKEN else "warm" if name in seen else "cold"
        seen.add(name)
        yield {"model": name, "input": text, "max_tokens": max_tokens, "temperature": 0, "stream": True, "_tag": tag, **extra}


def probe(url: str, payload: dict, timeout: float) -> dict:
    """One request before the load: ask for usage in the stream (OpenAI's stream_options); drop it if refused."""
    for extra in ({"stream_options": {"include_usage": True}}, {}):
        result = asyncio.run(_probe(url, {**payload, **extra}, timeout))
        if result["outcome"] == "ok":
            return extra
    raise ScenarioError(f"the probe request to {payload['model']} failed ({result.get('error')}); fix the server before benchmarking")


async def _probe(url: str, payload: dict, timeout: float) -> dict:
    async with httpx.AsyncClient(headers=headers(), timeout=timeout, trust_env=False) as client:
        return await asyncio.wait_for(one_request(client, url, payload), timeout)


def batch_rows(url: str) -> tuple[float, float]:
    """(sum, count) of the server's adapterhub_batch_rows histogram; (0, 0) when /metrics lacks it."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(f"{url}/metrics", headers=headers(), timeout=5, trust_env=False).text
        samples = {s.name: s.value for f in text_string_to_metric_families(text) if f.name == "adapterhub_batch_rows" for s in f.samples}
    except (httpx.HTTPError, ValueError):
        return 0.0, 0.0
    return samples.get("adapterhub_batch_rows_sum", 0.0), samples.get("adapterhub_batch_rows_count", 0.0)


def rss_mb(pid: int | None) -> float | None:
    """A process's resident memory in MB (Linux /proc), None elsewhere."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, TypeError):
        pass
    return None


def scheduler_waits(url: str) -> dict:
    """{budget: steps} of the server's adapterhub_scheduler_waits counter (steps in which the first waiting request waited for it)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(f"{url}/metrics", headers=headers(), timeout=5, trust_env=False).text
        return {s.labels["budget"]: s.value for f in text_string_to_metric_families(text) if f.name == "adapterhub_scheduler_waits"
                for s in f.samples if s.name.endswith("_total")}
    except (httpx.HTTPError, ValueError, KeyError):
        return {}


def host_cache_full(memory: dict | None) -> bool | None:
    """Whether the server's host cache of adapters holds its bound (/health's memory); None when it does not say."""
    if not memory or memory.get("max_cpu_loras") is None:
        return None
    return memory.get("host_cached_adapters", 0) >= memory["max_cpu_loras"]


def warm_up(url: str, payloads, args, first_pass: bool = False) -> dict:
    """Unrecorded load before the measured window: --warmup seconds.

    `first_pass` (a moving working set, adapters_1000): the goal is memory flat *after the first pass*, so the
    warm-up goes on, --warmup seconds at a time, until the server's host cache holds its bound of adapters
    (--max-cpu-loras, read from /health) — growth while that cache fills is the cache doing its job, not a leak —
    or --warmup-limit seconds have passed (then `host_cache_full` says False and the growth figure carries a caveat).
    Returns the seconds spent, /health's memory at the end, and whether the host cache was full."""
    spent = 0.0
    while True:
        if args.warmup > 0:
            asyncio.run(run_load(url, payloads, args.clients, args.warmup, args.request_timeout))
            spent += args.warmup
        memory = server_info(url).get("health", {}).get("memory")
        full = host_cache_full(memory)
        if not first_pass or full is not False or args.warmup <= 0 or spent >= args.warmup_limit:
            return {"seconds": spent, "memory": memory, "host_cache_full": full}


def bench(url: str, targets: list[tuple[str, str]], args, window: int | None = None, pid: int | None = None) -> dict:
    """Probe, warm up (unrecorded), then measure one scenario against a healthy server. With `window`, the working
    set moves (make_payloads) and the server's memory is sampled after the warm-up and at the end."""
    seen: set = set()
    extra = probe(url, next(make_payloads(targets, args.max_tokens, {})), args.request_timeout)
    # one stream of requests for the warm-up and the measured window: a moving working set goes on moving where the
    # warm-up left it, so the measured window's cold requests are first uses, not the warm-up's adapters again
    payloads = make_payloads(targets, args.max_tokens, extra, window, seen, args.slide)
    warm = warm_up(url, payloads, args, first_pass=bool(window))
    memory = {"rss_after_warmup_mb": rss_mb(pid), "health_after_warmup": warm["memory"], "adapters_used_in_warmup": len(seen),
              "warmup_s": warm["seconds"], "host_cache_full_after_warmup": warm["host_cache_full"]}
    rows0 = batch_rows(url)
    stats = asyncio.run(run_load(url, payloads, args.clients, args.duration, args.request_timeout))
    rows1 = batch_rows(url)
    memory.update(rss_end_mb=rss_mb(pid), health_end=server_info(url).get("health", {}).get("memory"), adapters_used=len(seen))
    steps = rows1[1] - rows0[1]  # the server's own view of the measured window: how full its batches ran
    return {"adapters": len(targets), "usage_in_stream": bool(extra), **stats,
            "server_mean_batch_rows": round((rows1[0] - rows0[0]) / steps, 2) if steps > 0 else None,
            "server_scheduler_waits": scheduler_waits(url),  # over the whole run, warm-up included
            **({"memory": memory} if window else {})}


def setup(server_args: str, quantization: str) -> dict:
    """Device, dtype and quantization the server will use: its flags, else its documented defaults (see cli/args.py add_device_args)."""
    import torch

    from adapterhub_lite.model.backbone import default_device, dtype_name, resolve_dtype

    p = argparse.ArgumentParser(add_help=False)
    for flag in ("--device", "--dtype", "--quantization"):
        p.add_argument(flag)
    flags, _ = p.parse_known_args(shlex.split(server_args))
    device = flags.device or default_device()
    gpu = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") and torch.cuda.is_available() else None
    return {"device": device, "gpu": gpu, "dtype": dtype_name(resolve_dtype(flags.dtype or "auto", device)),
            "quantization": flags.quantization or quantization}


def run_scenario(name: str, targets, registry: Path, args, extra_flags: list[str] = ()) -> dict:
    """Start a server with the scenario's flags, bench it, and stop it whatever happens."""
    flags = SCENARIOS[name][1] + list(extra_flags) + shlex.split(args.server_args)
    port = free_port()
    cmd = [*shlex.split(args.server_cmd), "--registry", str(registry), "--port", str(port), *flags]
    url = f"http://127.0.0.1:{port}"
    print(f"[{name}] starting: {shlex.join(cmd)}", file=sys.stderr)
    with tempfile.NamedTemporaryFile(prefix=f"bench_serve_{name}_", suffix=".log", delete=False) as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)  # a file, not a pipe: a full pipe would stall the server
    try:
        t0 = time.monotonic()
        wait_healthy(proc, url, Path(log.name), args.startup_timeout)
        startup = round(time.monotonic() - t0, 1)
        info = server_info(url)
        info["models_served"] = len(info.pop("models", []))
        window = args.window if SCENARIOS[name][0] == "thousand" else None
        result = {"flags": flags, "startup_s": startup, "server": info, **bench(url, targets, args, window, proc.pid)}
        print(f"[{name}] {result['requests_per_s']} req/s, {result['tokens_per_s']} tok/s, failed {result['failed']}, lost {result['lost']}",
              file=sys.stderr)
        return result
    finally:
        stop(proc)
        Path(log.name).unlink(missing_ok=True)


def run_kind(name: str, names, registry: Path, args, done: dict) -> dict:
    """One scenario: its registry (the shared one, or one with a damaged adapter, or --thousand copies), targets and flags."""
    kind = SCENARIOS[name][0]
    if kind == "base":
        return run_scenario(name, [("base", names[0][1])], registry, args)
    if kind == "one":
        return run_scenario(name, names[:1], registry, args)
    if kind == "broken":  # the shared adapters, and one more whose weights no longer match their sha256
        with tempfile.TemporaryDirectory(prefix="bench_serve_broken_") as tmp:
            shutil.copytree(registry, Path(tmp) / "r")
            from adapterhub_lite.artifacts.registries import open_registry

            reg = open_registry(Path(tmp) / "r")
            reg.publish(reg.path(names[0][0]), "1.0.0", BROKEN)
            weights = reg.root / BROKEN / "1.0.0" / "adapter_model.safetensors"
            data = bytearray(weights.read_bytes())
            data[-1] ^= 0xFF
            weights.write_bytes(bytes(data))
            targets = [names[i % len(names)] if i % 20 != 19 else (BROKEN, names[0][1]) for i in range(20 * max(len(names), 1))]
            return run_scenario(name, targets, Path(tmp) / "r", args)
    if kind == "thousand":
        with tempfile.TemporaryDirectory(prefix="bench_serve_1000_") as tmp:
            print(f"[{name}] publishing {args.thousand} copies", file=sys.stderr)
            many, _ = build_registry(args.registry, args.thousand, Path(tmp), args.sources)
            return run_scenario(name, many, Path(tmp), args)
    flags = []
    if name == "kv_half":  # half the cache positions the clients ask for at once: they must wait, none may fail
        measured = [v for v in done.values() if v.get("prompt_tokens_max") and (v.get("server", {}).get("health") or {}).get("kv_bytes_per_token")]
        if not measured:
            raise ScenarioError("kv_half needs the prompts' length and the cache's bytes per token: run it after batching_many (or batching_1)")
        per_token = measured[0]["server"]["health"]["kv_bytes_per_token"]
        need = args.clients * (measured[0]["prompt_tokens_max"] + args.max_tokens) * per_token  # (binds only above --max-batch-rows / 2 clients)
        flags = ["--kv-cache-mb", f"{need / 2 / 2**20:.3f}"]
    return run_scenario(name, names, registry, args, flags)


def main(argv=None) -> int:
    from adapterhub_lite.core.errors import AdapterHubError

    # SIGTERM would end the script without its `finally` blocks and orphan the server: turn it into SystemExit
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return _main(argv)
    except AdapterHubError as exc:  # a bad --registry and the like: its one line, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=16, help="concurrent closed-loop clients")
    p.add_argument("--duration", type=float, default=20, help="seconds of recorded load per scenario")
    p.add_argument("--warmup", type=float, default=5, help="seconds of unrecorded load before it")
    p.add_argument("--warmup-limit", type=float, default=300, help="adapters_1000: the warm-up (its first pass) goes on, --warmup "
                   "seconds at a time, until the server's host cache is full, for at most this many seconds")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--registry", default="adapters", help="where the generation adapters to copy come from")
    p.add_argument("--adapters", type=int, default=32, help="distinct adapter names in batching_many")
    p.add_argument("--sources", nargs="+", help="generation adapters of --registry to copy, round-robin (default: the first, e.g. date_iso)")
    p.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=DEFAULT_SCENARIOS,
                   help="base: every request to the plain backbone; broken_1_in_20: one request in 20 names a damaged adapter; "
                        "kv_half: --kv-cache-mb half of what the clients ask for at once (after a scenario that measured the prompts); "
                        "adapters_1000: --thousand registered copies, a working set of --window that moves")
    p.add_argument("--thousand", type=int, default=1000, help="registered adapters in adapters_1000")
    p.add_argument("--window", type=int, default=64, help="adapters_1000's moving working set")
    p.add_argument("--slide", type=int, default=None, help="adapters the window moves by every --window requests (default: a quarter "
                   "of it; --slide equal to --window gives each adapter one request per pass, so a warm-up of one pass touches them all)")
    p.add_argument("--server-args", default="", help='extra server flags, e.g. "--quantization none --dtype fp32" (one flag: --server-args=--flag)')
    p.add_argument("--server-cmd", default=f"{shlex.quote(sys.executable)} -m adapterhub_lite.cli serve", help="command that starts the server")
    p.add_argument("--base-url", help="bench this running server instead (one scenario)")
    p.add_argument("--ray", type=int, metavar="N", help="bench `serve --ray` with 1 and with N engine replicas (scenarios ray_1 and ray_N, "
                   "requests spread over all --adapters adapters); on a 2-core machine this is a correctness run, not a speed claim")
    p.add_argument("--request-timeout", type=float, default=60, help="seconds before a request counts as lost")
    p.add_argument("--startup-timeout", type=float, default=300, help="seconds to wait for /health")
    p.add_argument("--rounds", type=int, default=1, help="run the scenarios this many times, alternating; each scenario reports "
                   "its median round (requests/s) and every round's figure, each ratio every round's value")
    args = p.parse_args(argv)
    for flag in ("clients", "adapters", "max_tokens", "rounds"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.ray:
        if args.ray < 2:
            p.error(f"--ray {args.ray}: give 2 or more replicas to compare with one")
        for n in (1, args.ray):
            SCENARIOS[f"ray_{n}"] = ("all", ["--ray", "--replicas", str(n)])
        GOALS[f"ray_{args.ray}_vs_1"] = (f"ray_{args.ray}", "ray_1", 0.0)  # reported, no goal on a CPU
        args.scenarios = ["ray_1", f"ray_{args.ray}"]
    if args.duration <= 0 or args.warmup < 0 or args.request_timeout <= 0:
        p.error(f"--duration and --request-timeout must be > 0 and --warmup >= 0, got {args.duration}, {args.request_timeout}, {args.warmup}")

    report = {"bench": "serve", "clients": args.clients, "duration_s": args.duration, "warmup_s": args.warmup,
              "max_tokens": args.max_tokens, "registry": args.registry, "server_args": args.server_args}
    if args.base_url:
        from adapterhub_lite.artifacts.registries import open_registry

        url = args.base_url.rstrip("/")
        gens = {r["name"]: r["task"] for r in open_registry(args.registry).rows() if r["type"] == "generation"}
        info = server_info(url)
        targets = [(m, gens[m]) for m in info.get("models", []) if m in gens][: args.adapters]
        if not targets:
            sys.exit(f"{url} serves no generation adapter of registry {args.registry!r} ({info}); pass the --registry it serves")
        info["models_served"] = len(info.pop("models", []))
        try:
            report["scenarios"] = {"external": {"server": info, **bench(url, targets, args)}}
        except ScenarioError as exc:
            report["scenarios"] = {"external": {"error": str(exc)}}
    else:
        load_start = round(os.getloadavg()[0], 2)  # other work on the cores moves every figure: the load says how much
        with tempfile.TemporaryDirectory(prefix="bench_serve_registry_") as tmp:
            names, meta = build_registry(args.registry, args.adapters, Path(tmp), args.sources)
            report.update(adapters=args.adapters, base=meta["base"], adapter_sources=meta["sources"], **setup(args.server_args, meta["quantization"]))
            rounds = []
            for _ in range(args.rounds):  # the scenarios alternate, so slow minutes of a shared machine fall on each
                done: dict = {}
                for s in args.scenarios:  # a broken scenario is reported and the others still run: one JSON line either way
                    try:
                        done[s] = run_kind(s, names, Path(tmp), args, done)
                    except ScenarioError as exc:
                        print(f"[{s}] {exc}" + (f"; the server's log ends:\n{exc.log}" if exc.log else ""), file=sys.stderr)
                        done[s] = {"error": str(exc)}
                rounds.append(done)
        report["load_avg_1m"] = {"start": load_start, "end": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
        report["scenarios"] = {s: median_run([done[s] for done in rounds]) for s in args.scenarios}
        report["ratios"] = ratios(report["scenarios"])
        if args.rounds > 1:
            for key, value in report["ratios"].items():  # each round's own ratio beside the ratio of the medians
                value["rounds"] = [ratios(done).get(key, {}).get("value") for done in rounds]
    print(json.dumps(report))
    return 1 if any("error" in v for v in report["scenarios"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())

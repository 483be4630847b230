"""lm-evaluation-harness through `adapterhub-lite serve`, beside `adapterhub-lite eval`, on the same rows.

    python scripts/bench_lm_eval.py --registry adapters --adapters sst2 date_iso --limit 50

For each adapter (its registry's latest version): writes its lm-eval task (scripts/lm_eval_task.py),
runs `lm_eval --model local-completions` with default arguments against one server on the registry,
and scores the same rows with what `adapterhub-lite eval --limit N` runs (evaluate_split). Prints one
JSON line: per adapter lm-eval's score, eval's score and the rows whose answers differ. The servers'
and lm-eval's own output goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from lm_eval_task import write_task  # noqa: E402 - the sibling script

from adapterhub_lite.artifacts.loading import load_adapter  # noqa: E402
from adapterhub_lite.artifacts.registries import open_registry  # noqa: E402
from adapterhub_lite.core.data import load_split, to_split  # noqa: E402
from adapterhub_lite.core.errors import AdapterHubError  # noqa: E402
from adapterhub_lite.model.evaluate import evaluate_split  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(registry: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "adapterhub_lite.cli", "serve", "--registry", registry, "--port", str(port), "--log-level", "warning"],
                            stdout=sys.stderr, stderr=sys.stderr)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(1)
    proc.kill()
    raise SystemExit("the server did not start")


def lm_eval(port: int, model: str, task: str, include: Path, out: Path) -> tuple[list[dict], float]:
    cmd = [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--tasks", task, "--include_path", str(include),
           "--model_args", f"model={model},base_url=http://127.0.0.1:{port}/v1/completions", "--log_samples", "--output_path", str(out)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=sys.stderr, stderr=sys.stderr)
    seconds = time.perf_counter() - start
    path = sorted(out.rglob(f"samples_{task}_*.jsonl"))[-1]
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"]), seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--registry", default="adapters")
    p.add_argument("--adapters", nargs="+", default=["sst2", "date_iso"])
    p.add_argument("--limit", type=int, default=50)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-lm-eval-"))
    # Every task is written before the server starts (a minute on the real backbone): an adapter not in the registry,
    # or a spec's data path that does not resolve from here (it is relative to the working directory), is one line now.
    try:
        reg = open_registry(args.registry)
        folders = {name: reg.path(name) for name in args.adapters}
        tasks = {name: write_task(folder, work / "tasks", limit=args.limit).stem for name, folder in folders.items()}
    except AdapterHubError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    port = free_port()
    server = serve(args.registry, port)
    out = {"limit": args.limit, "adapters": {}}
    try:
        for name, folder in folders.items():
            task = tasks[name]
            samples, seconds = lm_eval(port, name, task, work / "tasks", work / "out")
            model, backbone, spec, _ = load_adapter(folder)
            ds, sha = load_split(spec.data.dev)
            metrics, preds, _ = evaluate_split(model, backbone.tokenizer, spec, to_split(spec, ds, spec.data.dev, sha), limit=args.limit)
            if spec.type == "classification":
                theirs = [max(range(len(s["filtered_resps"])), key=lambda k: float(s["filtered_resps"][k][0])) for s in samples]
                score, ours, metric = sum(s["acc"] for s in samples) / len(samples), metrics["accuracy"], "accuracy"
            else:
                theirs = [s["filtered_resps"][0].strip() for s in samples]
                score, ours, metric = sum(s["exact_match"] for s in samples) / len(samples), metrics["exact_match"], "exact_match"
            differ = [i for i, (a, b) in enumerate(zip(theirs, preds)) if a != b]
            out["adapters"][name] = {"version": str(folder.name), "metric": metric, "rows": len(samples), "lm_eval": round(score, 4),
                                     "eval": round(ours, 4), "rows_that_differ": differ, "lm_eval_seconds": round(seconds, 1)}
    finally:
        server.terminate()
        server.wait(60)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

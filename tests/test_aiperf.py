"""NVIDIA aiperf, the load tester users point at OpenAI-compatible servers, against ours: its figures must be
right, not only its requests answered.

aiperf fixes output lengths with `ignore_eos` + `max_tokens` and reads each response's `usage`; a server
that ignores the field, or answers a refused request with a 200 stream carrying the error, gives it wrong
lengths or empty "successes" (seen with aiperf 0.13 before the server refused such requests). aiperf lives
in its own venv (scripts/setup_aiperf.sh: it needs transformers 5), made on first use.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest

from .serving import Served

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.harness  # ~2 minutes (aiperf's install on first use, about 1; its start-up): CI runs it after the default set


@pytest.fixture(scope="module")
def aiperf():
    run = subprocess.run(["bash", str(ROOT / "scripts" / "setup_aiperf.sh")], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"scripts/setup_aiperf.sh failed: {run.stderr[-2000:]}"
    return ROOT / ".venv-aiperf" / "bin" / "aiperf"


@pytest.fixture(scope="module")
def served(serve_registry, tmp_path_factory):
    s = Served(serve_registry)
    tok = tmp_path_factory.mktemp("tok")
    s.router.backbone.tokenizer.save_pretrained(tok)  # aiperf builds its prompts with the server's tokenizer
    s.router.backbone.model.config.save_pretrained(tok)  # …and reads a local folder as one only beside a config.json
    s.tokenizer_dir = tok
    yield s
    s.close()


def profile(aiperf, served, out: Path, models: list[str], endpoint: str, *extra: str) -> list[dict]:
    """One `aiperf profile` run, streamed, 8 concurrent; returns its per-request records."""
    cmd = [str(aiperf), "profile", "--model", ",".join(models), "--model-selection-strategy", "round_robin", "--url", served.url,
           "--endpoint-type", endpoint, "--streaming", "--tokenizer", str(served.tokenizer_dir), "--synthetic-input-tokens-mean", "24",
           "--synthetic-input-tokens-stddev", "4", "--concurrency", "8", "--request-count", "24", "--use-server-token-count",
           "--artifact-dir", str(out), "--ui-type", "none", "--random-seed", "0", "--header", "Authorization:Bearer test-key", *extra]
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}  # aiperf 0.13 offline reads only the hub cache
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=out.parent, env=env)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return [json.loads(line) for line in (out / "profile_export.jsonl").read_text().splitlines()]


def metric(records: list[dict], name: str) -> list:
    return [r["metrics"].get(name, {}).get("value") for r in records]


def test_fixed_output_lengths_are_exact_for_every_adapter_kind(aiperf, served, tmp_path):
    """Raw prompts (continued through each adapter) with ignore_eos and 6 new tokens, EOS biased to come first:
    every request of every kind (LoRA, prefix, prompt tuning, IA3, base) streams exactly 6 tokens, and none fails."""
    models = ["base", "cls_a", "gen_a", "cls_prefix", "gen_prompt", "cls_ia3"]
    records = profile(aiperf, served, tmp_path / "fixed", models, "completions", "--output-tokens-mean", "6",
                               "--output-tokens-stddev", "0",
                               # EOS made the likeliest token (id 2 in the tiny tokenizer), so only ignore_eos keeps a choice going;
                               # special tokens shown, so no choice is empty text
                               "--extra-inputs", json.dumps({"ignore_eos": True, "logit_bias": {"2": 100}, "skip_special_tokens": False}))
    assert len(records) == 24 and not [r["error"] for r in records if r.get("error")]
    assert metric(records, "output_sequence_length") == [6] * 24
    assert metric(records, "usage_completion_tokens") == [6] * 24
    assert all(isinstance(v, int) and v > 0 for v in metric(records, "usage_prompt_tokens"))


def test_chat_streams_every_label_answer_as_content(aiperf, served, tmp_path):
    """Chat streams to classification adapters (the last user message is the task's input; LoRA, prefix and IA3):
    each label arrives as streamed content, so no request is an empty "success"; `max_completion_tokens` is
    accepted (a label asks for no new token: usage 0). (A generation adapter's task answer is its first line,
    which a random tiny model may leave empty: its lengths are checked through raw prompts above.)"""
    records = profile(aiperf, served, tmp_path / "chat", ["cls_a", "cls_prefix", "cls_ia3"], "chat", "--output-tokens-mean", "4")
    assert len(records) == 24 and not [r["error"] for r in records if r.get("error")]
    assert all(v is not None and v > 0 for v in metric(records, "time_to_first_token"))
    assert metric(records, "usage_completion_tokens") == [0] * 24

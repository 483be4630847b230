"""scripts/bench_train.py: its plain peft + transformers baselines run beside ours on the tiny backbone and count
what they really feed the model (checked against a count made here from the data file)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from adapterhub_lite.core.data import load_task_data
from adapterhub_lite.core.spec import load_spec
from adapterhub_lite.model.weights import resolve

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"
_spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

PROMPT = "Text: {text}\nLabel:"
LABELS = {"pos": "x", "neg": "zz"}  # on the tiny byte tokenizer: 2 and 3 tokens, so ours runs one sequence per (row, label)
MAX_LENGTH = 40


def _rows():
    # lengths vary (padding to count), and some prompts are longer than max_length (truncation to count)
    return [{"text": f"{w} " + "q" * (1 + i * 5 % 23), "label": lab} for i in range(24) for w, lab in (("aaaa", "pos"), ("bbbb", "neg"))]


@pytest.fixture
def bench_task(cls_task):
    """cls_task's toy spec with rows of varied length, 48 rows: 6 steps of 8 read every row exactly once."""
    rows = _rows()
    (cls_task / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = yaml.safe_load((cls_task / "toy.yaml").read_text())
    spec["prompt"], spec["labels"] = PROMPT, LABELS
    spec["train"].update(batch_size=8, max_length=MAX_LENGTH, warmup_steps=1)
    (cls_task / "toy.yaml").write_text(yaml.safe_dump(spec))
    return cls_task


def _tokenizer():
    return AutoTokenizer.from_pretrained(resolve("tiny-random-llama")[0])


@pytest.mark.bench
def test_baselines_run_beside_ours_and_count_what_they_feed(bench_task):
    cmd = [sys.executable, str(SCRIPT), "toy.yaml", "--base", "tiny-random-llama", "--dtypes", "fp32", "--quantizations", "none",
           "--steps", "6", "--warmup-steps", "2", "--dev-rows", "4"]
    proc = subprocess.run(cmd, cwd=bench_task, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(SCRIPT.parents[1])})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout  # one JSON line
    out = json.loads(lines[0])
    assert not [k for k in out if k.endswith("_error")], out
    assert set(out["load_avg_1m"]) == {"start", "end"}, out  # how busy the cores were: a shared machine moves every ratio

    # An independent count from the data file: every row once (6 steps × 8 rows = 48 rows), as prompt ids + the gold
    # label's ids, the prompt cut from its start to fit max_length; ours reads each row once per label, and feeds each
    # label but its last token (scored, never an input: heads.continuation_plan).
    tok = _tokenizer()
    words = {lab: tok(" " + w, add_special_tokens=False).input_ids for lab, w in LABELS.items()}
    prompts = [tok(PROMPT.format(text=r["text"]), add_special_tokens=True).input_ids for r in _rows()]
    assert max(len(p) for p in prompts) > MAX_LENGTH  # truncation is exercised
    plain = sum(min(len(p), MAX_LENGTH - len(words[r["label"]])) + len(words[r["label"]]) for p, r in zip(prompts, _rows()))
    longest = max(len(w) for w in words.values())
    ours = sum(min(len(p), MAX_LENGTH - longest) + len(w) - 1 for p in prompts for w in words.values())

    assert out["fp32_none_tokens"] == ours
    assert out["ours_sequences_per_step"] == 8 * len(LABELS)
    for name in ("plain_loop", "plain_same_rows", "hf_trainer"):
        assert out[f"{name}_tokens"] == plain, name  # non-padding tokens fed, padding and the -100 labels' rows as they are
        assert out[f"{name}_steps"] == 6
        assert out[f"{name}_sequences_per_step"] == 8
        for key in ("tokens_per_s", "steady_tokens_per_s", "steady_ms_per_step", "peak_memory_mb"):
            assert out[f"{name}_{key}"] > 0, (name, key)
        for key in ("tokens_per_s", "ms_per_step", "peak_memory"):
            assert out[f"ours_over_{name}_{key}"] > 0, (name, key)
        # each ratio is ours ÷ theirs, from the figures printed beside it
        assert out[f"ours_over_{name}_tokens_per_s"] == round(out["fp32_none_tokens_per_s"] / out[f"{name}_tokens_per_s"], 3), name
        assert out[f"ours_over_{name}_ms_per_step"] == round(out["fp32_none_steady_ms_per_step"] / out[f"{name}_steady_ms_per_step"], 3), name
        assert out[f"ours_over_{name}_peak_memory"] == round(out["fp32_none_peak_memory_mb"] / out[f"{name}_peak_memory_mb"], 3), name
        assert 0 <= out[f"{name}_pad_fraction"] < 1
    # our length-bucketed order pads less than a shuffled one (the whole epoch is one pool, sorted by length)
    assert out["plain_same_rows_pad_fraction"] < out["plain_loop_pad_fraction"]


def test_plain_examples_mask_the_prompt_and_padding(gen_task):
    """Generation: prompt + target + EOS, labels -100 on the prompt; the collator pads ids and masks labels."""
    spec = load_spec("copy.yaml", ["base=tiny-random-llama", "train.max_length=8"])
    tok = _tokenizer()
    split = load_task_data(spec, ("train",))["train"]
    examples, lengths = bench.plain_examples(spec, split, tok)
    assert len(examples) == len(split) == len(lengths)
    for ex, prompt, target in zip(examples, split.prompts, split.answers):
        answer = tok(" " + target, add_special_tokens=False).input_ids + [tok.eos_token_id]
        full = tok(prompt, add_special_tokens=True).input_ids
        kept = full[len(full) - (8 - len(answer)):]
        assert ex["input_ids"] == kept + answer  # the prompt's end, the whole answer
        assert ex["labels"] == [-100] * len(kept) + answer
    batch = bench.pad_collator(tok.pad_token_id)([examples[0], {"input_ids": [5, 6], "labels": [-100, 6]}])
    assert batch["input_ids"][1].tolist() == [5, 6] + [tok.pad_token_id] * 6
    assert batch["attention_mask"][1].tolist() == [1, 1] + [0] * 6
    assert batch["labels"][1].tolist() == [-100, 6] + [-100] * 6
    assert batch["labels"][0].tolist() == examples[0]["labels"]


def test_rounds_report_each_figures_median_and_never_hide_a_failure():
    one = {"first": "auto_8bit", "auto_8bit_steady_ms_per_step": 700.0, "plain_loop_steady_ms_per_step": 2100.0,
           "ours_over_plain_loop_tokens_per_s": 2.4, "auto_8bit_dtype_seen": "fp32", "auto_8bit_steps": 30}
    two = {**one, "auto_8bit_steady_ms_per_step": 900.0, "ours_over_plain_loop_tokens_per_s": 2.6}
    three = {**one, "auto_8bit_steady_ms_per_step": 800.0, "ours_over_plain_loop_tokens_per_s": 2.2}
    out = bench.median_rounds([one, two, three])
    assert out["auto_8bit_steady_ms_per_step"] == 800.0 and out["ours_over_plain_loop_tokens_per_s"] == 2.4
    assert out["ours_over_plain_loop_tokens_per_s_rounds"] == [2.4, 2.6, 2.2]  # every round's own ratio
    assert out["first"] == "auto_8bit" and out["auto_8bit_dtype_seen"] == "fp32" and out["auto_8bit_steps"] == 30
    assert bench.median_rounds([one, two])["ours_over_plain_loop_tokens_per_s"] == 2.4  # even: the lower middle, a measured one
    # a round whose baseline failed: its error is kept with its round, its ratio listed as missing
    failed = {k: v for k, v in two.items() if not k.startswith(("plain_loop", "ours_over"))} | {"plain_loop_error": "killed"}
    out = bench.median_rounds([one, failed, three])
    assert out["plain_loop_error"] == "round 2: killed"
    assert out["ours_over_plain_loop_tokens_per_s_rounds"] == [2.4, None, 2.2] and out["ours_over_plain_loop_tokens_per_s"] == 2.2


def test_a_bench_shorter_than_the_spec_s_warm_up_trains_without_one(bench_task, tmp_path):
    """train refuses a warm-up as long as the run (a7448a9), so `bench_train.py scripts/tasks/sst2.yaml` (warmup_steps 30,
    --steps 30 by default) and gpu_check's quick bench (--steps 4) were refused on every side. Speed does not depend on
    the rate: such a bench runs with no warm-up; a shorter warm-up is kept."""
    import argparse

    args = argparse.Namespace(spec="toy.yaml", overrides=["train.warmup_steps=10"], base="tiny-random-llama", steps=6, dev_rows=4)
    assert bench.bench_spec(args, "fp32", "none", tmp_path).train.warmup_steps == 0
    args.overrides = ["train.warmup_steps=2"]
    assert bench.bench_spec(args, "fp32", "none", tmp_path).train.warmup_steps == 2

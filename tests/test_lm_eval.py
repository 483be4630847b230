"""lm-evaluation-harness, pointed at the server with its defaults (token-id requests, its tokenizer read from
/tokenizer_info and /tokenize, max_gen_toks 256), scores every row as `adapterhub-lite eval` does.

A multiple-choice task (lm-eval's loglikelihood: echo + logprobs) on a classification adapter and a
generate_until task on a generation adapter, over local files written by scripts/lm_eval_task.py.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from adapterhub_lite.artifacts.loading import load_adapter
from adapterhub_lite.artifacts.registries import open_registry
from adapterhub_lite.cli import main as cli_main
from adapterhub_lite.core.data import load_split, to_split
from adapterhub_lite.model.evaluate import predict
from adapterhub_lite.model.weights import resolve

from .conftest import train_tiny
from .serving import GEN, KEY, Served

ROOT = Path(__file__).parents[1]
# lm-eval is in the dev extra, which scripts/test.sh installs: missing, it fails here rather than skip
assert importlib.util.find_spec("lm_eval"), "lm-eval is not installed: run bash scripts/test.sh (it installs the dev extra)"


pytestmark = pytest.mark.harness  # ~3.5 minutes (lm-eval's start-up and its runs): CI runs it after the default set


@pytest.fixture(scope="module")
def served(serve_registry, tmp_path_factory):
    """The test server, with two adapters trained until they answer their rows (loaded at run time, vLLM's route):
    `lm_cls` tells the two labels apart, `lm_gen` copies its input upper-cased and then emits EOS."""
    d = tmp_path_factory.mktemp("lm_eval")
    data = d / "copy.jsonl"
    data.write_text("".join(json.dumps({"text": t, "target": t.upper()}) + "\n" for t in ["ab", "cd", "ef", "gh"]))
    folders = {"lm_cls": train_tiny(d, "lm_cls", method_args={"init_lora_weights": False}, train={"max_steps": 30, "lr": 5e-2, "eval_every": 30}),
               "lm_gen": train_tiny(d, "lm_gen", **GEN, data={"train": str(data), "dev": str(data)}, method_args={"r": 8},
                                    train={"max_new_tokens": 5, "max_steps": 300, "lr": 1e-2, "eval_every": 300})}
    s = Served(serve_registry)
    for name, folder in folders.items():
        assert s.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(folder)}).status_code == 200
    yield s
    s.close()


def run_lm_eval(served, model: str, task: str, include: Path, out: Path, peft: Path | None = None) -> list[dict]:
    """Run the lm_eval command with default arguments; return its per-row samples. With `peft`, lm-eval's own `hf`
    model instead of the server: transformers on the tiny backbone's folder with peft loading that adapter, in fp32."""
    if peft is None:
        backend = ["local-completions", "--model_args", f"model={model},base_url={served.url}/v1/completions"]
    else:
        backbone = resolve("tiny-random-llama")[0]
        backend = ["hf", "--model_args", f"pretrained={backbone},peft={peft},dtype=float32", "--device", "cpu"]
    cmd = [sys.executable, "-m", "lm_eval", "--model", *backend, "--tasks", task, "--include_path", str(include),
           "--log_samples", "--output_path", str(out)]
    env = {**os.environ, "OPENAI_API_KEY": KEY, "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    if peft is None:  # it found /tokenizer_info
        assert "Using remote tokenizer" in run.stderr or "remote tokenizer" in run.stderr.lower(), run.stderr[-2000:]
    samples = sorted(out.rglob(f"samples_{task}_*.jsonl"))
    assert samples, list(out.rglob("*"))
    return sorted((json.loads(line) for line in samples[-1].read_text().splitlines()), key=lambda s: s["doc_id"])


def eval_cli(folder, capsys) -> dict:
    assert cli_main(["eval", str(folder), "--json", "--no-progress", "--dtype", "fp32"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def rows_and_predictions(folder):
    """What `eval` predicts for each row of the adapter's dev split (the same code path, row by row)."""
    model, backbone, spec, _ = load_adapter(folder, dtype="fp32")
    ds, sha = load_split(spec.data.dev)
    split = to_split(spec, ds, spec.data.dev, sha)
    return split, predict(model, backbone.tokenizer, spec, split.prompts, prompt_ids=split.prompt_ids(backbone.tokenizer))


def write_task(folder, out) -> str:
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "lm_eval_task.py"), str(folder), "--output", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return Path(run.stdout.strip()).stem


def test_multiple_choice_scores_what_eval_scores(served, tmp_path, capsys):
    folder = served.router.folders["lm_cls"]
    task = write_task(folder, tmp_path / "tasks")
    samples = run_lm_eval(served, "lm_cls", task, tmp_path / "tasks", tmp_path / "out")
    split, preds = rows_and_predictions(folder)
    assert len(samples) == len(split) == 16
    chosen = [max(range(len(s["filtered_resps"])), key=lambda k: float(s["filtered_resps"][k][0])) for s in samples]  # logged as strings
    assert chosen == preds  # row by row, the label lm-eval picks is the one eval picks
    assert len(set(chosen)) == 2  # both labels occur: a constant answer would not test much
    accuracy = sum(s["acc"] for s in samples) / len(samples)
    assert accuracy == pytest.approx(eval_cli(folder, capsys)["accuracy"], abs=1e-4)


def test_generate_until_scores_what_eval_scores(served, tmp_path, capsys):
    folder = served.router.folders["lm_gen"]
    task = write_task(folder, tmp_path / "tasks")
    samples = run_lm_eval(served, "lm_gen", task, tmp_path / "tasks", tmp_path / "out")
    split, preds = rows_and_predictions(folder)
    assert len(samples) == len(split) == 4
    generated = [s["filtered_resps"][0].strip() for s in samples]
    assert generated == preds == ["AB", "CD", "EF", "GH"]  # the same answer text, row by row (the default 256 new tokens cut no prompt)
    exact = sum(s["exact_match"] for s in samples) / len(samples)
    assert exact == pytest.approx(eval_cli(folder, capsys)["exact_match"], abs=1e-4)


def test_task_rows_reach_lm_eval_as_written(served, tmp_path):
    """Targets that read like dates stay the text they are (JSON or CSV through `datasets` would turn a column of
    them into timestamps, "2021-03-03 00:00:00", which no answer matches: lm-eval scored date_iso 0.00 so)."""
    from lm_eval.tasks import TaskManager, get_task_dict

    folder = tmp_path / "dates"
    shutil.copytree(served.router.folders["lm_gen"], folder)
    rows = [{"text": "march 3rd", "target": "2021-03-03"}, {"text": "new year", "target": "2000-01-01"}, {"text": "x", "target": "1999-12-31"}]
    (tmp_path / "dates.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    meta = json.loads((folder / "adapterhub.json").read_text())
    meta["task"]["data"]["dev"] = str(tmp_path / "dates.jsonl")
    (folder / "adapterhub.json").write_text(json.dumps(meta))
    task = write_task(folder, tmp_path / "tasks")
    loaded = get_task_dict([task], TaskManager(include_path=str(tmp_path / "tasks")))[task]
    docs = list(loaded.test_docs())
    assert [loaded.doc_to_target(d) for d in docs] == ["2021-03-03", "2000-01-01", "1999-12-31"]
    assert [loaded.doc_to_text(d) for d in docs] == ["In: march 3rd\nOut:", "In: new year\nOut:", "In: x\nOut:"]


@pytest.mark.parametrize("name", ["lm_cls", "cls_prefix", "cls_ia3", "lm_gen"])
def test_server_scores_what_lm_eval_hf_peft_scores(served, name, tmp_path):
    """lm-eval's own `hf` model with `peft=` (transformers and peft, no server: the reference users trust) and lm-eval
    through the server score the same task row by row: the same log-likelihood of every choice (float tolerance) and
    the same greedy flag, or the same generated text. LoRA, prefix and IA3 adapters (each places its weights
    differently: a prefix's virtual tokens must stay out of the positions lm-eval scores)."""
    folder = served.router.folders[name]
    task = write_task(folder, tmp_path / "tasks")
    ours = run_lm_eval(served, name, task, tmp_path / "tasks", tmp_path / "served")
    ref = run_lm_eval(served, name, task, tmp_path / "tasks", tmp_path / "hf", peft=folder)
    assert [s["arguments"] for s in ours] == [s["arguments"] for s in ref]  # the same requests: prompts and choices
    assert len(ours) >= 4
    if "acc" in ref[0]:
        got = [(float(ll), greedy) for s in ours for ll, greedy in s["filtered_resps"]]  # every choice of every row, logged as strings
        want = [(float(ll), greedy) for s in ref for ll, greedy in s["filtered_resps"]]
        assert [g for _, g in got] == [g for _, g in want]
        assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in want], abs=1e-4)
        assert len({ll for ll, _ in want}) > 1  # choices told apart: equal constants would test nothing
        assert [s["acc"] for s in ours] == [s["acc"] for s in ref]
    else:
        assert [s["filtered_resps"] for s in ours] == [s["filtered_resps"] for s in ref]
        assert [s["exact_match"] for s in ours] == [s["exact_match"] for s in ref]


def test_task_files_work_from_any_directory(tmp_path, monkeypatch):
    """The script run from one directory with relative paths writes a task that lm-eval, run from another, loads with
    every row: the YAML holds absolute paths only (lm-eval reads data_files relative to its own working directory).
    Run from a directory where the spec's data path (relative, as `eval` reads it) does not resolve, the script and
    scripts/bench_lm_eval.py refuse in one line naming it, before writing a task or starting a server."""
    from lm_eval.tasks import TaskManager, get_task_dict

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    folder = train_tiny(work, "cwd_cls", data={"train": "toy.jsonl", "dev": "toy.jsonl"})  # the spec's paths, relative to work/
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "lm_eval_task.py"), "cwd_cls", "--limit", "5", "--output", "tasks"],
                         capture_output=True, text=True, timeout=120, cwd=work)
    assert run.returncode == 0, run.stderr
    config = yaml.safe_load((work / "tasks" / "adapterhub_cwd_cls.yaml").read_text())
    paths = [config["dataset_kwargs"]["data_files"]["test"], config["metadata"]["adapter"], config["metadata"]["split"]]
    assert paths == [str(work / "tasks" / "adapterhub_cwd_cls.parquet"), str(folder), str(work / "toy.jsonl")]
    monkeypatch.chdir(elsewhere)
    task = get_task_dict(["adapterhub_cwd_cls"], TaskManager(include_path=str(work / "tasks")))["adapterhub_cwd_cls"]
    assert [task.doc_to_text(d) for d in task.test_docs()] == ["T: pos 0\nL:", "T: neg 0\nL:", "T: pos 1\nL:", "T: neg 1\nL:", "T: pos 2\nL:"]

    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "lm_eval_task.py"), str(folder), "--output", "tasks"],
                         capture_output=True, text=True, timeout=120, cwd=elsewhere)
    assert (run.returncode, run.stderr.splitlines()) == (2, [f"error: data file 'toy.jsonl' does not exist (paths are relative to {elsewhere}); "
                                                             "fix data.train / data.dev in the spec"])
    assert not (elsewhere / "tasks").exists()
    registry = tmp_path / "registry"
    registry.mkdir()
    (registry / "index.json").write_text(json.dumps({"format": "adapterhub_lite.registry/1", "adapters": {}}))
    open_registry(registry).publish(folder, "1.0.0", name="cwd_cls")
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_lm_eval.py"), "--registry", str(registry), "--adapters", "cwd_cls"],
                         capture_output=True, text=True, timeout=300, cwd=elsewhere)
    assert (run.returncode, run.stderr.splitlines()) == (2, [f"error: data file 'toy.jsonl' does not exist (paths are relative to {elsewhere}); "
                                                             "fix data.train / data.dev in the spec"])

"""Write an lm-evaluation-harness task for an adapter's own task, so lm-eval scores through the server
exactly what `adapterhub-lite eval` scores.

    python scripts/lm_eval_task.py adapters/sst2/1.1.0 --limit 50 --output runs/lm_eval_tasks
    adapterhub-lite serve --registry adapters/ &
    lm_eval --model local-completions --tasks adapterhub_sst2 --include_path runs/lm_eval_tasks \
        --model_args model=sst2,base_url=http://127.0.0.1:8000/v1/completions

The task reads a Parquet file of the split's rows, each with the prompt already rendered by the
adapter's template (`prompt`), so lm-eval sends what the adapter was trained on. (Parquet, with
every column typed as written: `datasets` reading JSON or CSV infers types, and would turn the
target "2021-03-03" into the timestamp "2021-03-03 00:00:00", which no answer then matches.)
- classification: `multiple_choice` over the label words, each scored as it follows the prompt
  after one space (the tokens `eval` scores), accuracy;
- generation: `generate_until` the first newline (the task's answer is its first line), exact
  match after stripping whitespace at both ends (as `eval`).

Everything else is lm-eval's default (token-id requests, its tokenizer read from the server's
/tokenizer_info and /tokenize, max_gen_toks 256). Files are written atomically. The YAML names its rows
and the adapter by absolute paths, so lm_eval may run from any directory; the spec's data paths are, as
for `eval`, relative to the directory this script runs from (a missing one is refused naming it).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import yaml
from datasets import Dataset, Features, Sequence, Value

from adapterhub_lite.artifacts.folder import read_sidecar
from adapterhub_lite.core.data import label_words, load_split, to_split
from adapterhub_lite.core.errors import AdapterHubError
from adapterhub_lite.core.spec import spec_from_dict


def _write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _write_rows(path: Path, rows: list[dict], features: Features) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    Dataset.from_list(rows, features=features).to_parquet(tmp)
    os.replace(tmp, path)


def write_task(folder: str | Path, output: str | Path, split: str = "dev", limit: int | None = None, name: str | None = None) -> Path:
    """Write <output>/<task>.yaml and <task>.parquet for the adapter in `folder`; returns the YAML's path."""
    meta = read_sidecar(Path(folder))
    if not meta.get("task"):
        raise AdapterHubError(f"{folder} holds no task (a component adapter); lm-eval needs the task's prompt and answers")
    spec = spec_from_dict(meta["task"])
    source = getattr(spec.data, split) if split in ("train", "dev") else split
    ds, sha = load_split(source)
    rows = to_split(spec, ds, source, sha)
    n = min(len(rows), limit or len(rows))
    task = name or f"adapterhub_{spec.name}"
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    data = output / f"{task}.parquet"
    # Every path the YAML holds is absolute: lm-eval reads data_files relative to its own working directory, and its
    # results copy the metadata, which a path relative to where this script ran would leave unplaceable.
    where = source if source.startswith("hf:") else str(Path(source).resolve())
    config = {"task": task, "dataset_path": "parquet", "dataset_kwargs": {"data_files": {"test": str(data.resolve())}}, "test_split": "test",
              "doc_to_text": "{{prompt}}", "metadata": {"version": 1, "adapter": str(Path(folder).resolve()), "split": where, "rows": n, "split_sha256": sha}}
    if spec.type == "classification":
        words = label_words(spec)
        lines = [{"prompt": p, "choices": [str(w) for w in words], "label": a} for p, a in zip(rows.prompts[:n], rows.answers[:n])]
        features = Features({"prompt": Value("string"), "choices": Sequence(Value("string")), "label": Value("int64")})
        # " word": the label as training and `eval` score it, one space after the prompt (heads.answer_ids)
        config.update(output_type="multiple_choice", doc_to_choice="choices", doc_to_target="label", target_delimiter=" ",
                      metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}])
    else:
        lines = [{"prompt": p, "target": a} for p, a in zip(rows.prompts[:n], rows.answers[:n])]
        features = Features({"prompt": Value("string"), "target": Value("string")})
        config.update(output_type="generate_until", doc_to_target="{{target}}", target_delimiter=" ",
                      generation_kwargs={"until": ["\n"], "do_sample": False},
                      metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                                    "regexes_to_ignore": ["^\\s+", "\\s+$"]}])
    _write_rows(data, lines, features)
    path = output / f"{task}.yaml"
    _write(path, yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("adapter", help="an adapter folder (e.g. adapters/sst2/1.1.0)")
    p.add_argument("--output", required=True, help="folder for the task's YAML and Parquet rows (lm_eval --include_path)")
    p.add_argument("--split", default="dev", help="dev, train, or a data file")
    p.add_argument("--limit", type=int, help="the first N rows only (as `adapterhub-lite eval --limit N`)")
    p.add_argument("--name", help="lm-eval task name (default adapterhub_<task>)")
    args = p.parse_args(argv)
    try:
        print(write_task(args.adapter, args.output, args.split, args.limit, args.name))
    except AdapterHubError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

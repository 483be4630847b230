"""Data: read a task's splits through `datasets`, check them against the spec, render prompts.

A split is a local csv / tsv / jsonl / json / parquet file (relative to the current directory) or
`hf:<dataset>[:<config>]:<split>`. Each row becomes a prompt string plus an answer: a label index
for classification, a target string for generation. Answers are continuations of the prompt
separated by one space, so "Sentiment:" is followed by " positive".
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from .errors import DataError
from .spec import TaskSpec

_BUILDERS = {
    ".csv": ("csv", {"keep_default_na": False}),
    ".tsv": ("csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE, "keep_default_na": False}),
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".parquet": ("parquet", {}),
}


@dataclass
class Split:
    """One split as the trainer sees it: prompts plus answers (label indices or target strings)."""

    prompts: list[str]
    answers: list
    source: str
    sha256: str
    _tokens: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.prompts)

    def prompt_ids(self, tokenizer) -> list[list[int]]:
        """Every prompt's token ids (special tokens added, not truncated), tokenized once per tokenizer.

        Training reads these every step; tokenizing the whole split in one batched call up front
        takes the tokenizer out of the loop (heads.*_ids take ids; they truncate as encode_prompt does).
        """
        return self._cached(tokenizer, "prompts", lambda: tokenizer(self.prompts, add_special_tokens=True).input_ids)

    def answer_ids(self, tokenizer) -> list[list[int]]:
        """Generation: every target's token ids as a continuation after one space (heads.answer_ids), tokenized once."""
        return self._cached(tokenizer, "answers", lambda: tokenizer([" " + a for a in self.answers], add_special_tokens=False).input_ids)

    def _cached(self, tokenizer, what: str, make) -> list[list[int]]:
        # Keyed by what determines the ids, not by the object, so a reloaded identical tokenizer hits.
        key = (what, type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer))
        if key not in self._tokens:
            self._tokens[key] = make()
        return self._tokens[key]


def load_split(source: str) -> tuple[datasets.Dataset, str]:
    """Load one split and return it with a content hash (file sha256, or the datasets fingerprint)."""
    if source.startswith("hf:"):
        parts = source[3:].split(":")
        if len(parts) not in (2, 3) or not all(parts):
            raise DataError(f"hf source {source!r} must look like hf:<dataset>[:<config>]:<split>, e.g. hf:glue:sst2:validation")
        name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else parts
        try:
            ds = datasets.load_dataset(name, config, split=split)
        except Exception as exc:  # the hub raises many types; all mean "cannot get it"
            raise DataError(f"cannot load {source!r} through datasets ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); use a local file when offline") from None
        return ds, ds._fingerprint
    path = Path(source)
    if not path.is_file():
        raise DataError(f"data file {source!r} does not exist (paths are relative to {Path.cwd()}); fix data.train / data.dev in the spec")
    suffix = path.suffix.lower()
    if suffix not in _BUILDERS:
        raise DataError(f"data file {source!r} has unsupported type {suffix or '(none)'!r}; use one of {', '.join(_BUILDERS)}")
    if not path.read_bytes().strip():
        raise DataError(f"split {source!r} is empty; point the spec at a file with rows")
    # Columns are read as written. Type inference would turn the text "2021-03-03" into a
    # timestamp ("2021-03-03 00:00:00") and "007" into 7, silently changing targets and prompts:
    # JSON is already typed, so it is parsed as JSON; csv/tsv columns are all read as strings.
    builder, kwargs = _BUILDERS[suffix]
    try:
        if builder == "json":
            ds = datasets.Dataset.from_list(_json_rows(path))
        else:
            if builder == "csv":
                with open(path, encoding="utf-8") as fh:
                    header = next(csv.reader(fh, delimiter=kwargs.get("delimiter", ",")))
                kwargs = {**kwargs, "features": datasets.Features({c: datasets.Value("string") for c in header})}
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot parse {source!r} as {suffix[1:]} ({type(exc).__name__}); check the file format") from None
    return ds, hashlib.sha256(path.read_bytes()).hexdigest()


def _json_rows(path: Path) -> list[dict]:
    """Rows of a JSON Lines file (or a JSON array), exactly as typed in the file."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        return json.loads(text)
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise DataError(f"{path}:{n} is not valid JSON ({line[:60]!r}); write one JSON object per line") from None
    return rows


def label_words(spec: TaskSpec) -> list[str]:
    """The verbalizer words, one per class, in class-index order."""
    return list(spec.labels.values()) if isinstance(spec.labels, dict) else list(spec.labels)


def _label_index(spec: TaskSpec):
    """Map a raw label-column value to a class index (None when the value is unknown)."""
    if isinstance(spec.labels, dict):
        table = {str(k): i for i, k in enumerate(spec.labels)}
    else:
        table = {str(w): i for i, w in enumerate(spec.labels)}
        table.update({str(i): i for i in range(len(spec.labels))})
    return lambda value: table.get(str(value))


def request_row(spec: TaskSpec, request: dict) -> dict:
    """The prompt columns of a request; a lone `text` fills a prompt that reads one column."""
    fields = list(dict.fromkeys(spec.prompt_fields))
    if len(fields) == 1 and fields[0] not in request and "text" in request:
        return {**request, fields[0]: request["text"]}
    missing = [f for f in fields if f not in request]
    if missing:
        raise DataError(f"input rows lack key(s) {missing} that the prompt {spec.prompt!r} of {spec.name!r} reads; add them to every row ('text' fills a one-column prompt)")
    return request


def render(spec: TaskSpec, row: dict) -> str:
    """Fill the prompt template with one row's columns."""
    return spec.prompt.format(**{k: ("" if row[k] is None else str(row[k]).strip()) for k in spec.prompt_fields})


def to_split(spec: TaskSpec, ds: datasets.Dataset, source: str, sha256: str) -> Split:
    """Check columns and label values, then render every row."""
    if len(ds) == 0:
        raise DataError(f"split {source!r} is empty; point the spec at a file with rows")
    needed = list(spec.prompt_fields) + [spec.label if spec.type == "classification" else spec.target]
    missing = [c for c in dict.fromkeys(needed) if c not in ds.column_names]
    if missing:
        raise DataError(f"split {source!r} has no column {', '.join(map(repr, missing))} (columns: {', '.join(ds.column_names)}); fix the prompt/label/target keys")
    prompts = [render(spec, row) for row in ds]
    if spec.type == "classification":
        index = _label_index(spec)
        answers = [index(v) for v in ds[spec.label]]
        bad = sorted({str(v) for v, a in zip(ds[spec.label], answers) if a is None})
        if bad:
            valid = list(spec.labels) if isinstance(spec.labels, dict) else list(spec.labels) + list(range(len(spec.labels)))
            raise DataError(f"split {source!r} has label value(s) {', '.join(map(repr, bad[:5]))} not in labels (valid: {', '.join(map(str, valid))}); add them to 'labels'")
    else:
        answers = ["" if t is None else str(t) for t in ds[spec.target]]
    return Split(prompts, answers, source, sha256)


def load_task_data(spec: TaskSpec, splits: tuple[str, ...] = ("train", "dev")) -> dict[str, Split]:
    """Load and validate the named splits of a task."""
    out = {}
    for name in splits:
        source = getattr(spec.data, name)
        ds, sha = load_split(source)
        out[name] = to_split(spec, ds, source, sha)
    return out

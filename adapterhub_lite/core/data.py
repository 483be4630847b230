"""Data: read a task's splits through `datasets`, check them against the spec, render prompts.

A split is a local csv / tsv / jsonl / json / parquet file (relative to the current directory) or
`hf:<dataset>[:<config>]:<split>`. Each row becomes a prompt string plus an answer: a label index
for classification, a target string for generation. Answers are continuations of the prompt
separated by one space, so "Sentiment:" is followed by " positive".
"""

from __future__ import annotations

import hashlib
import json
import math
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from adapterhub_lite.core.datafiles import LINES, NESTED, csv_rows, json_dataset, json_rows, parquet_rows, where
from adapterhub_lite.core.errors import DataError
from adapterhub_lite.core.spec import TaskSpec
from adapterhub_lite.core.text import as_text

# suffix → (reader, csv.reader options). A .tsv is read with the same quoting as a .csv (a field that starts
# with '"' is quoted, '""' inside it is one quote), as pandas, `datasets` and the csv module read it: RTE's
# train.tsv quotes 504 fields that way, which were trained on with their quotes doubled when .tsv was QUOTE_NONE.
_BUILDERS = {
    ".csv": ("csv", {"delimiter": ","}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".parquet": ("parquet", {}),
}
FILE_SUFFIXES = tuple(_BUILDERS)  # the data files a split may be read from


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
        return self._cached(tokenizer, "prompts", lambda: _token_ids(tokenizer, self.prompts, True))

    def answer_ids(self, tokenizer) -> list[list[int]]:
        """Generation: every target's token ids as a continuation after one space (heads.answer_ids), tokenized once."""
        return self._cached(tokenizer, "answers", lambda: _token_ids(tokenizer, [" " + a for a in self.answers], False))

    def _cached(self, tokenizer, what: str, make) -> list[list[int]]:
        # Keyed by what determines the ids, not by the object, so a reloaded identical tokenizer hits.
        key = (what, type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer))
        if key not in self._tokens:
            self._tokens[key] = make()
        return self._tokens[key]


def _token_ids(tokenizer, texts: list[str], special: bool, chunk: int = 1024) -> list[list[int]]:
    """Token ids of many texts, tokenized `chunk` at a time without attention masks: one call over a whole split
    holds every row's encoding (offsets, masks) at once, 264 MB more at the peak for SST-2's 67k rows on
    SmolLM2's tokenizer against 52 MB this way (the ids themselves)."""
    ids: list[list[int]] = []
    for i in range(0, len(texts), chunk):
        ids += tokenizer(texts[i : i + chunk], add_special_tokens=special, return_attention_mask=False).input_ids
    return ids


def _empty(source: str, split: str | None) -> DataError:
    """An empty split, named by its spec key (data.train / data.dev) when known, and its file."""
    if split:
        return DataError(f"data.{split} {source!r} is empty (no rows); point data.{split} in the spec at a file with rows")
    return DataError(f"split {source!r} is empty; point the spec at a file with rows")


def load_split(source: str, split: str | None = None) -> tuple[datasets.Dataset, str]:
    """Load one split and return it with a content hash (file sha256, or the datasets fingerprint);
    `split` (train, dev) names it in the refusal of an empty one."""
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
    if path.is_dir():  # "does not exist" would send the user looking for a path that is there
        raise DataError(f"data file {source!r} is a directory, not a file; give the path of a {' / '.join(_BUILDERS)} file (e.g. one inside it)")
    if not path.is_file():
        raise DataError(f"data file {source!r} does not exist (paths are relative to {Path.cwd()}); fix data.train / data.dev in the spec")
    suffix = path.suffix.lower()
    if suffix not in _BUILDERS:
        packed = "; decompress it first (gunzip -k / unzip) and point the spec at the file inside" if suffix in (".gz", ".zip", ".bz2", ".xz", ".zst") else ""
        raise DataError(f"data file {source!r} has unsupported type {suffix or '(none)'!r}; use one of {', '.join(_BUILDERS)}{packed}")
    if not path.read_bytes().strip():
        raise _empty(source, split)
    # Columns are read as written. Type inference would turn the text "2021-03-03" into a
    # timestamp ("2021-03-03 00:00:00") and "007" into 7, silently changing targets and prompts:
    # JSON is parsed by json, each plain value kept as the text of what json reads; csv/tsv are read by the csv module, as strings.
    # Both are read by datafiles.py rather than by `datasets` so that a bad line is named (line number, what is wrong).
    builder, kwargs = _BUILDERS[suffix]
    try:
        if builder == "json":
            rows, lines = json_rows(path)
            ds = json_dataset(rows)
        elif builder == "csv":
            ds, lines = csv_rows(path, **kwargs)
        else:
            ds, lines = parquet_rows(path), None
    except DataError:
        raise
    except Exception as exc:
        detail = str(exc).splitlines()[0][:120] if str(exc) else ""
        raise DataError(f"cannot parse {source!r} as {suffix[1:]} ({type(exc).__name__}: {detail}); check the file format") from None
    if len(ds) == 0:  # a parquet file of no rows (a text file of none was refused above)
        raise _empty(source, split)
    if lines is not None:
        LINES[ds] = lines
    return ds, hashlib.sha256(path.read_bytes()).hexdigest()


def label_words(spec: TaskSpec) -> list[str]:
    """The verbalizer words, one per class, in class-index order."""
    return list(spec.labels.values()) if isinstance(spec.labels, dict) else list(spec.labels)


def _label_table(spec: TaskSpec) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Raw label-column value → class index, plus the values that would mean two classes (with both meanings).

    A list of words accepts each word and each class index; with digit words (labels: ["1", "2"])
    a value can be both a word and another class's index, and guessing either would shift classes.
    """
    meanings: dict[str, dict[int, str]] = {}
    if isinstance(spec.labels, dict):
        for i, (k, w) in enumerate(spec.labels.items()):
            meanings.setdefault(str(k), {}).setdefault(i, f"the key of class {i} ({w!r})")
    else:
        words = list(spec.labels)
        for i, w in enumerate(words):
            meanings.setdefault(str(w), {}).setdefault(i, f"the label word of class {i}")
        for i, w in enumerate(words):
            meanings.setdefault(str(i), {}).setdefault(i, f"the index of class {i} ({w!r})")
    table = {v: next(iter(m)) for v, m in meanings.items() if len(m) == 1}
    ambiguous = {v: list(m.values()) for v, m in meanings.items() if len(m) > 1}
    return table, ambiguous


def _valid_labels(spec: TaskSpec) -> str:
    """What a label column may hold, said as the user writes it (a list's words and indices apart, not one mixed list)."""
    if isinstance(spec.labels, dict):
        return "one of the keys of 'labels': " + ", ".join(repr(str(k)) for k in spec.labels)
    words = label_words(spec)
    return f"a label word ({', '.join(repr(str(w)) for w in words)}) or its class index (0 to {len(words) - 1})"


def _near_key(value: str, keys, spec: TaskSpec) -> str:
    """Why a label value that 'labels' lacks looks like one it has (values match as written, exactly), or ''."""
    def nfc(text: str) -> str:
        return unicodedata.normalize("NFC", text)

    if isinstance(spec.labels, dict):  # the word where the column value goes (a file labelled by what the adapter answers)
        key = next((k for k, w in spec.labels.items() if str(w) == value), None)
        if key is not None:
            return f"; {value!r} is the word of labels[{key!r}]: the column holds a mapping's keys ({str(key)!r}), the words are its answers"
    for key in keys:
        if value in ("true", "false") and key == value.capitalize():  # the spelling Python's str() gives a JSON boolean
            return (f"; {value!r} is a JSON (or parquet) boolean, read as written, not as Python's {key!r}: "
                    f"write the key {value!r} in 'labels'")
        if nfc(value) == nfc(key):  # shown alike, written with other code points (é as e + combining accent)
            return (f"; {value!r} is {key!r} in another Unicode form ({ascii(value)} in the data, {ascii(key)} in 'labels'): "
                    "save both in one form (NFC)")
        if nfc(value).strip().casefold() == nfc(key).strip().casefold():
            what = "spaces around it" if value.strip() == key else "case" if value.casefold() == key.casefold() else "case, spaces or Unicode form"
            return f"; {value!r} differs from {key!r} only by {what} (values match as written)"
        if _number(value) is not None and _number(value) == _number(key):  # 1.0 beside 1: a float column (parquet), a JSON 1.0
            return f"; {value!r} is the number {key} written otherwise (values match as written): write the column's numbers as 'labels' keys them"
    return ""


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def request_row(spec: TaskSpec, request: dict) -> dict:
    """The prompt columns of a request; a lone `text` fills a prompt that reads one column. A null column is refused."""
    fields = list(dict.fromkeys(spec.prompt_fields))
    if len(fields) == 1 and fields[0] not in request and "text" in request:
        request = {**request, fields[0]: request["text"]}
    missing = [f for f in fields if f not in request]
    if missing:
        raise DataError(f"input rows lack key(s) {missing} that the prompt {spec.prompt!r} of {spec.name!r} reads; add them to every row ('text' fills a one-column prompt)")
    null = [f for f in fields if request[f] is None]
    if null:  # scoring null as "" would answer a question nobody asked
        raise DataError(f"an input row has null for {', '.join(map(repr, null))} ({json.dumps(request)[:80]}); give every prompt column a value")
    nested = [f for f in fields if isinstance(request[f], (dict, list))]
    if nested:  # as training refuses them: str() would render Python's repr, not the JSON sent
        raise DataError(f"an input row has a JSON object or list for {', '.join(map(repr, nested))} ({json.dumps(request)[:80]}); "
                        "give every prompt column a text value")
    if all(isinstance(request[f], str) and not request[f].strip() for f in fields):  # as training refuses such rows
        what = f"an empty {fields[0]!r}" if len(fields) == 1 else f"every prompt column ({', '.join(map(repr, fields))}) empty"
        raise DataError(f"an input row has {what} ({json.dumps(request)[:80]}), so the prompt {spec.prompt!r} holds no input; give it its text")
    return request


def raw_text(request: dict) -> str:
    """The `text` a request without a template reads whole (base, auto, a task-less adapter); refused unless a string.

    One check for the engine and `infer`'s early one: the tokenizer's own error on a number or null named no request."""
    text = request.get("text")
    if not isinstance(text, str):
        raise DataError(f"the request has a 'text' that is {json.dumps(text)}, not a string; give every request its text")
    return text


def readable(spec: TaskSpec, pred) -> str:
    """A prediction as the user reads it: the label word, or the generated text."""
    return label_words(spec)[pred] if spec.type == "classification" else pred


def render(spec: TaskSpec, row: dict) -> str:
    """Fill the prompt template with one row's columns."""
    return spec.prompt.format(**{k: ("" if row[k] is None else as_text(row[k]).strip()) for k in spec.prompt_fields})


def _is_missing(value) -> bool:
    """None, or the float NaN pandas writes for a missing value (a parquet column of floats)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _refuse_missing(source: str, column: str, values: list, what: str, ds: datasets.Dataset | None = None) -> None:
    """Refuse a column whose value is missing in some rows, naming the rows (their lines in `ds`'s file when known: a
    missing value would be read as '' or 'None')."""
    rows = [i + 1 for i, v in enumerate(values) if _is_missing(v)]
    if rows:
        raise DataError(f"split {source!r} has no {column!r} value in {len(rows)} row(s) ({where(ds, rows)}); {what}, or drop those rows")


def _refuse_blank(source: str, spec: TaskSpec, ds: datasets.Dataset) -> None:
    """Refuse rows whose every prompt column is empty or spaces only: rendered, such a row is the bare template, so it
    trains (or is scored) on no input at all; it was taken without a word."""
    columns = list(dict.fromkeys(spec.prompt_fields))
    values = zip(*(ds[c] for c in columns))
    rows = [i + 1 for i, row in enumerate(values) if all(isinstance(v, str) and not v.strip() for v in row)]
    if rows:
        what = f"an empty {columns[0]!r}" if len(columns) == 1 else f"every prompt column ({', '.join(map(repr, columns))}) empty"
        raise DataError(f"split {source!r} has {what} in {len(rows)} row(s) ({where(ds, rows)}), so its prompt holds no input; "
                        "give those rows their text, or drop them")


def _label_values(spec: TaskSpec, ds: datasets.Dataset, source: str) -> list[str]:
    """The label column as text. A ClassLabel column (an hf: split, or a parquet file `datasets` wrote) holds class
    indices whose names `datasets` shows (0 = 'negative'): a mapping keyed by those names reads the names, and a list
    that names a class at another index is refused (labels [positive, negative] made every negative row 'positive')."""
    feature, raw = ds.features[spec.label], ds[spec.label]
    if not isinstance(feature, datasets.ClassLabel):
        return [as_text(v) for v in raw]  # a boolean column (parquet, hf:) as 'true' / 'false', as a JSON true is read
    names = feature.names
    _refuse_missing(source, spec.label, [None if v is None or v < 0 else v for v in raw],  # -1: datasets' "no label"
                    "a ClassLabel of -1 is no label (as in a test split); use a split with labels", ds)
    if isinstance(spec.labels, dict) and all(str(k) in names for k in spec.labels):
        return [names[v] for v in raw]
    words = [str(w) for w in label_words(spec)]
    moved = next((w for i, w in enumerate(words) if w in names and names.index(w) != i), None)
    if moved is not None:
        raise DataError(f"split {source!r} column {spec.label!r} is a ClassLabel with {moved!r} at index {names.index(moved)} "
                        f"(classes: {', '.join(names)}), but 'labels' puts it at {words.index(moved)}; list the labels in the "
                        f"column's order, or map each class name to its word (e.g. {{{names[0]!r}: …, {names[1]!r}: …}})")
    return [str(v) for v in raw]


def to_split(spec: TaskSpec, ds: datasets.Dataset, source: str, sha256: str, split: str | None = None,
             file: str | None = None, adapter: str | None = None) -> Split:
    """Check columns and label values, then render every row (`split`: as load_split). `source` names the rows in
    messages; `file` (default: `source`) is the file they were read from, whose type says how an empty field reads.
    `adapter`: the rows are scored by that trained adapter (eval), whose 'labels' no edit can extend."""
    if len(ds) == 0:
        raise _empty(source, split)
    answer = spec.label if spec.type == "classification" else spec.target
    needed = list(dict.fromkeys([*spec.prompt_fields, answer]))
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        # pandas and datasets keep a header's spaces too ("a, label" has ' label'), but shown bare they are invisible.
        spaced = {c.strip(): c for c in ds.column_names if c != c.strip()}
        hint = "".join(f"; the header has {spaced[m]!r}: remove the spaces around it" for m in missing if m in spaced)
        seps = [s for s in (",", ";", "\t", "|") if len(ds.column_names) == 1 and s in ds.column_names[0]]
        if seps:  # "text;label" as one column: the file is not separated as its suffix says
            tsv = Path(file or source).suffix.lower() == ".tsv"
            fix = "a .tsv is read tab-separated: save it so, or name it .csv if commas separate it" if tsv else \
                "a .csv is read comma-separated: save it so, or name it .tsv if tabs separate it"
            hint += f"; the header reads as one column, so the file is {seps[0]!r}-separated, but {fix}"
        elif answer in missing:  # a file of inputs alone given to eval: scoring needs the answers, predict does not
            hint += f" or add the {answer!r} column the rows are scored against (`predict --input` runs rows without answers)"
        raise DataError(f"split {source!r} has no column {', '.join(map(repr, missing))} (columns: {', '.join(map(repr, ds.column_names))}); "
                        f"fix the prompt/label/target keys{hint}")
    for column in needed:  # a JSON object or list has no one text: str() gives Python's repr (with None for absent keys)
        feature = ds.features[column]
        if not isinstance(feature, (datasets.Value, datasets.ClassLabel)):
            first = next((v for v in ds[column] if v is not None), None)
            shown = first[NESTED] if isinstance(first, dict) and list(first) == [NESTED] else json.dumps(first, default=str)  # parquet: dates
            raise DataError(f"split {source!r} column {column!r} holds JSON objects or lists (e.g. {shown[:60]}), not text; "
                            "write each value as a string (json.dumps it) or point the spec at a text column")
    # A missing prompt value would be rendered as '' and a missing label compared as 'None': both silently.
    for column in dict.fromkeys(spec.prompt_fields):
        _refuse_missing(source, column, ds[column], "give every row a value for each column the prompt reads", ds)
    _refuse_blank(source, spec, ds)
    prompts = [render(spec, row) for row in ds]
    if spec.type == "classification":
        _refuse_missing(source, spec.label, ds[spec.label], "give every row its label", ds)
        if Path(file or source).suffix.lower() in (".csv", ".tsv"):  # as a target: an empty csv/tsv field is a missing value
            _refuse_missing(source, spec.label, [None if v == "" else v for v in ds[spec.label]],
                            "an empty csv/tsv field reads as missing (as pandas and datasets read it); give every row its label", ds)
        table, ambiguous = _label_table(spec)
        values = _label_values(spec, ds, source)
        both = sorted({v for v in values if v in ambiguous})
        if both:
            example = ", ".join(f"{str(w)!r}: {str(w)!r}" for w in label_words(spec)[:2])
            raise DataError(f"split {source!r} has label value {both[0]!r}, which is both {' and '.join(ambiguous[both[0]])} "
                            f"(first at {where(ds, [values.index(both[0]) + 1])}); "
                            f"give 'labels' as a mapping column value → word (e.g. {{{example}, …}}) so each value names one class")
        answers = [table.get(v) for v in values]
        bad = sorted({v for v, a in zip(values, answers) if a is None})
        if bad:
            first = where(ds, [values.index(v) + 1 for v in bad[:5]])  # where each value first is
            near = next((hint for hint in (_near_key(v, table, spec) for v in bad) if hint), "")
            extend = f"; {adapter} was trained on these labels alone" if adapter else ", or add the value(s) to 'labels'"
            raise DataError(f"split {source!r} has label value(s) {', '.join(map(repr, bad[:5]))} not in labels (first at {first}); write {_valid_labels(spec)} "
                            f"in column {spec.label!r}{extend}{near}")
    else:
        targets = ds[spec.target]  # a row without its column reads as null too; an empty answer would train the adapter to stop at once
        _refuse_missing(source, spec.target, targets, "give every row its target", ds)
        # JSON writes "" and null apart, and "" is kept as written; a csv/tsv cannot (pandas and datasets read an
        # empty field as missing), so there an empty target is a missing one.
        if Path(file or source).suffix.lower() in (".csv", ".tsv"):
            _refuse_missing(source, spec.target, [None if t == "" else t for t in targets],
                            "an empty csv/tsv field reads as missing (as pandas and datasets read it); give every row its target", ds)
        answers = [as_text(t) for t in targets]
    return Split(prompts, answers, source, sha256)


def load_task_data(spec: TaskSpec, splits: tuple[str, ...] = ("train", "dev")) -> dict[str, Split]:
    """Load and validate the named splits of a task."""
    out = {}
    for name in splits:
        source = getattr(spec.data, name)
        ds, sha = load_split(source, name)
        out[name] = to_split(spec, ds, source, sha, name)
    return out

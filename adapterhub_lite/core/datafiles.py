"""Local data files read as written, each row's line kept for messages: csv / tsv by the csv module (every field a
string), JSON Lines or a JSON array by json (each plain value the text of what json reads), parquet by pyarrow.

Read here rather than by `datasets` so that a bad line is named (line number, what is wrong), and so that type inference
never turns the text "2021-03-03" into a timestamp or "007" into 7. data.py checks the rows against a task spec.
"""

from __future__ import annotations

import csv
import io
import json
import weakref
from pathlib import Path

import datasets
import pyarrow.parquet as pq

from adapterhub_lite.core.errors import DataError
from adapterhub_lite.core.text import DuplicateKey, as_text, loads, numbered_jsonl, read_text


def parquet_rows(path: Path) -> datasets.Dataset:
    """A parquet file as a Dataset, read by pyarrow (the features `datasets` wrote in its metadata, ClassLabel too, are
    kept). Not through load_dataset: its builder logged its own line and progress bars on stderr before a refusal, and
    read a file of no rows as "An error occurred while generating the dataset"."""
    table = pq.read_table(path)
    index = [c for c in table.column_names if c.startswith("__index_level_")]  # pandas' to_parquet index: not a column of data
    return datasets.Dataset(table.drop_columns(index) if index else table)


# A Dataset read from a csv / tsv / JSON Lines file → the line each of its rows starts on, so that a refusal names the
# line to fix (blank lines, the header and quoted newlines make a row's index and its line differ). Weak: dropped with it.
LINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def where(ds: datasets.Dataset | None, rows: list[int]) -> str:
    """Rows (1-based indices) said as the lines of the file they were read from, else as rows: "line 3, 7, …"."""
    lines = LINES.get(ds) if ds is not None else None
    marks = [lines[r - 1] for r in rows] if lines is not None else rows
    return ("line " if lines is not None else "row ") + ", ".join(map(str, marks[:5])) + (", …" if len(marks) > 5 else "")


def csv_rows(path: Path, delimiter: str) -> tuple[datasets.Dataset, list[int]]:
    """A csv/tsv file as a Dataset of string columns and each row's first line; a ragged or header-only file is refused
    naming the line."""
    sep = "tab" if delimiter == "\t" else repr(delimiter)
    # strict: a field that opens a quote but goes on after closing it ('"Hi," she said.') is refused; pandas
    # would drop its quotes silently, and a file written without quoting (GLUE style) means them literally.
    reader = csv.reader(io.StringIO(read_text(path), newline=""), delimiter=delimiter, strict=True)
    csv.field_size_limit(2**31 - 1)  # the default refuses a field over 128 KiB (a long document), which pandas reads
    header, rows, lines, start = None, [], [], 1
    try:
        for record in reader:
            first, start = start, reader.line_num + 1  # a quoted field may span lines: the row starts where the last one ended
            if not record or (len(record) == 1 and not record[0].strip()):
                continue  # a blank line, or one of spaces only: pandas and datasets skip both
            if header is None:
                header = record
                dup = sorted({c for c in header if header.count(c) > 1})
                if dup or "" in header:
                    what = f"repeats column(s) {', '.join(map(repr, dup))}" if dup else "has an empty column name"
                    index = " (pandas' to_csv writes its index under an empty name: save with index=False)" if header[0] == "" else ""
                    raise DataError(f"{path}:{reader.line_num}: the header {what}; give every column a distinct name{index}")
            elif len(record) != len(header):
                raise DataError(f"{path}:{reader.line_num} has {len(record)} fields but the header has {len(header)} ({sep}-separated); "
                                "fix that line (quote fields that hold the separator)")
            else:
                rows.append(record)
                lines.append(first)
    except csv.Error as exc:
        said = str(exc).replace("\t", "\\t")  # "'\t' expected after '\"'" would print a raw tab
        quote = ': a field that starts with " is read as quoted, so write it whole in quotes with each " inside doubled ' \
                '("Hi," she said. → """Hi,"" she said.")' if '"' in said or "end of data" in said else ""
        raise DataError(f"{path}:{reader.line_num} cannot be read as {sep}-separated values ({said}); fix that line{quote}") from None
    if header is None:  # blank lines only (after a BOM, say): no header to name
        raise DataError(f"{path} holds blank lines only (no header, no rows); point the spec at a file with rows")
    if not rows:
        raise DataError(f"{path} has a header ({', '.join(header)}) but no rows; add rows below the header")
    features = datasets.Features({c: datasets.Value("string") for c in header})
    return datasets.Dataset.from_dict({c: [r[i] for r in rows] for i, c in enumerate(header)}, features=features), lines


def json_rows(path: Path) -> tuple[list[dict], list[int] | None]:
    """Rows of a JSON Lines file (or a JSON array), exactly as typed in the file, and each one's line (None for an array)."""
    text = read_text(path)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            rows = loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno} is not valid JSON ({exc.msg}); fix that line") from None
        except DuplicateKey as exc:  # valid JSON, which json would read keeping the last of the two
            raise DataError(f"{path}: an object of the array {exc}") from None
        except ValueError as exc:
            raise DataError(f"{path} is not valid JSON ({exc}); fix the file") from None
        bad = next((n for n, r in enumerate(rows, 1) if not isinstance(r, dict)), None)
        if bad:
            raise DataError(f"{path}: item {bad} of the array is {type(rows[bad - 1]).__name__}, not an object; write one object per row")
        return rows, None
    if path.suffix.lower() == ".json" and text.lstrip().startswith("{"):
        try:
            whole = loads(text)
        except ValueError:
            whole = None  # JSON Lines (or broken): parse_jsonl names the line
        # One object over several lines, or one of lists ({"text": [...], "label": [...]}), is not a row: pandas reads
        # such columns as rows, datasets as one row of lists, and line by line it read as broken JSON.
        if isinstance(whole, dict) and (len(text.strip().splitlines()) > 1 or (whole and all(isinstance(v, list) for v in whole.values()))):
            raise DataError(f"{path} is one JSON object (keys: {', '.join(map(repr, list(whole)[:5]))}), not rows; write an array "
                            "of row objects ([{...}, {...}]) or one object per line (JSON Lines)")
    numbered = numbered_jsonl(text, path)
    return [row for _, row in numbered], [n for n, _ in numbered]


NESTED = "json"  # the field a JSON object or list is held in (see json_dataset)


def json_dataset(rows: list[dict]) -> datasets.Dataset:
    """JSON rows as a Dataset, holding what `json` reads. Every key of any row is a column (a row without it holds
    null: from_list took the first row's keys only, so a column missing there was dropped for all rows), and a
    column of plain values holds them as text, each as written (true as 'true', 2.50 as '2.50': core.text.as_text): arrow
    would make 7 beside 7.5 "7.0", and could not hold 0 beside "yes" at all (pandas and json read both)."""
    data = {}
    for column in dict.fromkeys(k for r in rows for k in r):
        values = [r.get(column) for r in rows]
        if not any(isinstance(v, (dict, list)) for v in values):
            data[column] = [v if v is None else as_text(v) for v in values]
            continue
        # A column with objects / lists: each value as its JSON text in a one-field struct. Arrow cannot hold {"a": 1}
        # beside {"a": "s"}, [1] or "x" (a metadata column pandas reads), and to_split refuses the struct where text is read.
        data[column] = [None if v is None else {NESTED: json.dumps(v, ensure_ascii=False)} for v in values]
    return datasets.Dataset.from_dict(data)

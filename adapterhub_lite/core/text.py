"""Reading what users type: UTF-8 text files, JSON Lines, and a task's answer in a generation.

Light on purpose (json only): the CLI reads --input files before it imports the model stack.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from adapterhub_lite.core.errors import DataError


def read_text(path: Path) -> str:
    """A file's text: UTF-8, with a leading byte-order mark (as Excel and Notepad write) dropped."""
    data = Path(path).read_bytes()
    if data[:2] == b"\x1f\x8b":  # gzip's magic: "not UTF-8 (byte 0x8b at offset 1)" names no cause
        raise DataError(f"{path} is gzip-compressed, not text; decompress it first (gunzip -k {path}) and pass the file inside")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line} is not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); save the file as UTF-8") from None


class WrittenFloat(float):
    """A JSON number with a fraction or an exponent that reads back as written: str() of the float gives 1.5 for 1.50
    and 1000.0 for 1e3, so a target or prompt value typed 1.50 was trained (and predicted on) as 1.5, silently.
    Arithmetic and json.dumps see the float itself."""

    def __new__(cls, text: str):
        number = super().__new__(cls, text)
        number.text = text
        return number

    def __str__(self) -> str:
        return self.text


def as_text(value) -> str:
    """A column's plain value as the text it was written as: a JSON (or parquet, arrow) boolean as JSON and arrow write
    it, true / false (not str()'s Python True, which would match no label 'true' and train the word 'True'); a JSON number
    as typed (WrittenFloat); text as it is."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _finite(text: str) -> float:
    number = WrittenFloat(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is out of a float's range")
    return number


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON; write null or a string")


class DuplicateKey(ValueError):
    """A JSON object gives one key twice."""


def _one_each(pairs: list[tuple]) -> dict:
    """An object whose keys are distinct: json keeps the last of two equal keys without a word, so
    {"text": "a", "text": "b"} was read as "b" (as the task spec's YAML reader refuses a key given twice)."""
    keys = [k for k, _ in pairs]
    twice = next((k for i, k in enumerate(keys) if k in keys[:i]), None)
    if twice is not None:
        raise DuplicateKey(f"gives the key {twice!r} twice (json keeps the last, silently); keep one")
    return dict(pairs)


def loads(text: str):
    """JSON as the standard defines it: Python's json also takes NaN, Infinity and numbers beyond a float (1e400 → inf),
    which other readers refuse, and which a row would then hold as the text 'nan' / 'inf'. A key given twice in an
    object is refused (json would keep the last silently)."""
    return json.loads(text, parse_float=_finite, parse_constant=_no_constant, object_pairs_hook=_one_each)


def parse_jsonl(text: str, where: str | Path) -> list[dict]:
    """The objects of JSON Lines text, one per non-blank line, exactly as typed; a bad line is refused by number."""
    return [row for _, row in numbered_jsonl(text, where)]


def numbered_jsonl(text: str, where: str | Path) -> list[tuple[int, dict]]:
    """parse_jsonl's objects, each with its line number (blank lines are skipped, so a row's index is not its line).

    Lines end at \n, \r\n or \r only: str.splitlines also breaks at U+2028, U+0085 and other separators, which
    a JSON string may hold unescaped, so a valid row was refused as two halves.
    """
    rows = []
    for n, line in enumerate(re.split(r"\r\n|\r|\n", text), 1):
        if line.strip():
            try:
                row = loads(line)
            except DuplicateKey as exc:
                raise DataError(f"{where}:{n} {exc} ({line[:60]!r})") from None
            except ValueError as exc:
                why = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
                raise DataError(f"{where}:{n} is not valid JSON ({why}: {line[:60]!r}); write one JSON object per line") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}:{n} is a JSON {type(row).__name__}, not an object ({line[:60]!r}); write one JSON object per line")
            rows.append((n, row))
    return rows


def first_line(text: str) -> str:
    """A task's answer in a generation: its first non-blank line, stripped (what training taught it to write)."""
    return text.strip().split("\n")[0].strip()


def nested_too_deep(body: bytes, limit: int = 256) -> bool:
    """Whether a JSON body's arrays and objects nest past `limit` levels (brackets inside strings do not count). Read
    before json.loads, which would recurse in C down to the interpreter's recursion limit and raise RecursionError
    there: a garbage collection at that depth runs other objects' finalizers with no stack left, and their errors are
    lost ("Exception ignored"). A body with fewer brackets than `limit` is answered without a scan."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    depth, in_string, escaped = 0, False, False
    for c in body:
        if in_string:
            if escaped:
                escaped = False
            elif c == 0x5C:  # backslash
                escaped = True
            elif c == 0x22:  # quote
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif c in (0x5D, 0x7D):  # ] }
            depth -= 1
    return False

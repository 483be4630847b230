"""Reading what users type: UTF-8 text files, JSON Lines, and a task's answer in a generation.

Light on purpose (json only): the CLI reads --input files before it imports the model stack.
"""

from __future__ import annotations

import json
from pathlib import Path

from adapterhub_lite.core.errors import DataError


def read_text(path: Path) -> str:
    """A file's text: UTF-8, with a leading byte-order mark (as Excel and Notepad write) dropped."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line} is not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); save the file as UTF-8") from None


def parse_jsonl(text: str, where: str | Path) -> list[dict]:
    """The objects of JSON Lines text, one per non-blank line, exactly as typed; a bad line is refused by number."""
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError:
                raise DataError(f"{where}:{n} is not valid JSON ({line[:60]!r}); write one JSON object per line") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}:{n} is a JSON {type(row).__name__}, not an object ({line[:60]!r}); write one JSON object per line")
            rows.append(row)
    return rows


def first_line(text: str) -> str:
    """A task's answer in a generation: its first non-blank line, stripped (what training taught it to write)."""
    return text.strip().split("\n")[0].strip()

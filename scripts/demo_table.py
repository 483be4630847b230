"""Print an `adapterhub-lite infer` batch as a table: each row's adapter asked for, the adapter that answered, input and answer.

    python scripts/demo_table.py requests.jsonl answers.jsonl

`infer` writes one answer per request, in order, with `adapter` replaced by the adapter that
answered (for `auto`, the router's pick), so the adapter asked for is read from the requests.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

WIDTH = 50  # input column: long texts are shortened so the table stays on one screen line


def read_jsonl(path: str) -> list[dict]:
    """The JSON objects of a JSONL file, one per non-empty line."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def shorten(text: str, width: int = WIDTH) -> str:
    """One line of at most `width` characters (an ellipsis marks a cut)."""
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def table(requests: list[dict], answers: list[dict]) -> str:
    """The batch as aligned columns: row, asked, answered by, input, answer."""
    if len(requests) != len(answers):  # a short answer file would pair requests with the wrong answers
        raise SystemExit(f"{len(requests)} requests but {len(answers)} answers; rerun `adapterhub-lite infer` on the same input")
    rows = [("row", "asked", "answered by", "input", "answer")]
    rows += [(str(n), req["adapter"], ans["adapter"], shorten(req.get("text", "")), shorten(ans["prediction"], 40))
             for n, (req, ans) in enumerate(zip(requests, answers), 1)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("requests", help="the JSONL file given to infer --input")
    parser.add_argument("answers", help="the JSONL file infer wrote (--output)")
    args = parser.parse_args()
    print(table(read_jsonl(args.requests), read_jsonl(args.answers)))


if __name__ == "__main__":
    main()

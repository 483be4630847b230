"""Argument helpers every command shares: argparse types, the device options, --input and --output files.

A leaf of the CLI: the command modules import it; it imports none of them.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from adapterhub_lite.artifacts.files import atomic_write
from adapterhub_lite.core.errors import DataError
from adapterhub_lite.core.names import DTYPES, QUANTIZATIONS
from adapterhub_lite.core.text import numbered_jsonl, read_text


def finite_float(text: str) -> float:
    """argparse type: a finite number (nan / inf would be written into adapters and metrics)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def route_threshold(text: str) -> float:
    """argparse type of --route-threshold (serve, infer): the Router's own check (serving.routing.check_probability), so the flag and
    Router(route_threshold=…) refuse the same values; a usage error (one line, exit 2) before the backbone loads."""
    # imported when the flag is given: serving.routing loads torch and scikit-learn, which --help and the light commands skip
    from adapterhub_lite.artifacts.samples import RoutingError
    from adapterhub_lite.serving.routing import check_probability

    try:
        return check_probability(finite_float(text), "the threshold")
    except RoutingError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_route_threshold(p: argparse.ArgumentParser, shown: str = "") -> None:
    """--route-threshold, as serve and infer both take it (`shown`: where the command reports the value)."""
    p.add_argument("--route-threshold", type=route_threshold, default=0.5, help="`auto`: the classifier's probability below which a "
                   f"request goes to base instead of its most probable adapter (0 to 1; default 0.5{shown})")


def positive_float(text: str) -> float:
    """argparse type: a finite number above 0 (a budget or a timeout: 0 or less could only refuse or time out everything)."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value:g} must be above 0")
    return value


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number ≥ 0 (a share of a resource: 0 takes none of it, a negative share is none at all)."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value:g} must be ≥ 0")
    return value


def nonempty(text: str) -> str:
    """argparse type: a path that is not empty ("" reads as the current folder, which is never what was meant)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is empty; give a folder path")
    return text


def count(low: int):
    """argparse type: a whole number ≥ low."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be ≥ {low}")
        return value
    parse.__name__ = f"int ≥ {low}"
    return parse


def distinct_sources(given: list[str], refs: list[tuple[str, Path]], weights: list[float] | None = None) -> dict[str, Path]:
    """{name: folder} of the sources given on the command line (adapter_ref's pairs), each name once.

    A dict of the pairs kept the last of a name alone: a source given twice, or two folders of one name (a/toy, b/toy: two
    runs of one task), left the other out, unsaid. `weights` (merge's, one per source) are named in the refusal."""
    for i, (name, folder) in enumerate(refs):
        # one folder under two names too (merge's toy and toy@1.1.0, the latest version named twice)
        j = next((j for j in range(i) if refs[j][1].resolve() == folder.resolve()), None)
        if j is not None:
            how = (f" (weights {weights[j]:g} and {weights[i]:g}); give each source once, with the summed weight {weights[j] + weights[i]:g}"
                   if weights else "; give each source once")
            raise DataError(f"{given[i]!r} is given twice{how}")
        j = next((j for j in range(i) if refs[j][0] == name), None)
        if j is not None:
            raise DataError(f"{given[j]!r} and {given[i]!r} are both named {name!r} (a folder's name, or the adapter's registry name), and "
                            "the sources are named apart; copy one to a folder of another name, or publish them under two names")
    return dict(refs)


def output_file_problem(path: str | Path, example: str) -> str | None:
    """Why an --output file path cannot be written (a folder; its folder missing, or a file), or None."""
    p = Path(path)
    if p.is_dir():
        return f"--output {str(path)!r} is a folder; name a file to write, e.g. {str(p / example)!r}"
    parent = next((q for q in p.parents if q.exists()), None)  # under a file: 'does not exist' would send the user to create it
    if parent is not None and not parent.is_dir():
        return f"--output {str(path)!r}: {str(parent)!r} is a file, not a folder; name a path under a folder"
    if not p.parent.is_dir():
        return f"--output {str(path)!r}: folder {str(p.parent)!r} does not exist; create it first"
    return None


def check_output_file(path: str | None) -> None:
    """Refuse an --output file path that is a folder or whose folder does not exist, before any work."""
    problem = None if path is None else output_file_problem(path, "predictions.jsonl")
    if problem:
        raise DataError(problem)


def write_output(path: str | None, text: str) -> None:
    """Write the answers to `path` atomically (complete or absent), else to stdout."""
    if not path:
        sys.stdout.write(text)
        return
    try:
        atomic_write(Path(path), text)
    except OSError as exc:
        raise DataError(f"cannot write --output {path!r} ({exc.strerror or type(exc).__name__}); nothing was written") from None


def read_jsonl(path: str) -> list[dict]:
    """The rows of a JSONL --input file (one object per line); a missing, empty or malformed file is refused."""
    return [row for _, row in numbered_input(path)]


def numbered_input(path: str) -> list[tuple[int, dict]]:
    """read_jsonl's rows, each with its line number in the file (for messages: blank lines make index and line differ)."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"input file {path!r} is a directory, not a file; pass a JSONL file with one object per line")
    if not p.is_file():
        raise DataError(f"input file {path!r} does not exist; pass a JSONL file with one object per line")
    rows = numbered_jsonl(read_text(p), path)
    if not rows:
        raise DataError(f"input file {path!r} has no rows")
    return rows


def add_device_args(p: argparse.ArgumentParser, adapters: bool = False) -> None:
    """--device, --dtype, --quantization and --no-progress on every command that loads a backbone; with `adapters`
    (commands that load adapters onto it) also --allow-base-mismatch, which the fingerprint error tells users to pass."""
    # On every such command, not a chosen few: each one loads weights, so each shows transformers' bar at least
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars on stderr: ours (training steps; rows, from a few hundred) and the libraries' (loading weights, downloads)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: $ADAPTERHUB_DEVICE, else cuda when available, else cpu)")
    auto = "auto = bf16 on CUDA, fp16 on a GPU without bf16, fp32 on the CPU"
    # adapters are run in the dtype asked for, not the one they trained in (the dtype is no part of their fingerprint)
    p.add_argument("--dtype", choices=DTYPES, help=f"compute dtype (default: {auto}, whatever the adapters trained in)" if adapters else
                   f"compute dtype (default: the spec's `dtype`, else {auto})")
    p.add_argument("--quantization", choices=QUANTIZATIONS, help="backbone quantization (default: the spec's or the adapters' own)")
    if adapters:
        p.add_argument("--allow-base-mismatch", action="store_true", help="load adapters even if their backbone fingerprint differs")

"""README.md against the program: what a new user copies from it must exist.

Cheap checks (no model): every Python block's imports import, every `adapterhub-lite <command>` line names a
command that exists and only flags that command takes, and every `python scripts/….py` it shows is a file.
"""

import argparse
import ast
import re
import shlex
from pathlib import Path

import pytest

from adapterhub_lite.cli import build_parser

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README, flags=re.M | re.S)


def _commands() -> list[str]:
    """Each shell command line of the README's bash blocks, continuation lines joined, comments dropped."""
    lines = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("block", _blocks("python"), ids=lambda b: b.splitlines()[0][:40])
def test_python_blocks_import(block):
    """The imports of every Python snippet run (a snippet that raises ImportError on its first lines is a README bug)."""
    tree = ast.parse(block)
    imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert imports or "openai" not in block
    for node in imports:
        if isinstance(node, ast.ImportFrom) and node.module == "openai":
            continue  # the client of the serve section: not this package's dependency
        exec(compile(ast.Module(body=[node], type_ignores=[]), "README.md", "exec"), {})


def test_cli_lines_name_real_commands_and_flags():
    subs = _subparsers()
    problems, seen = [], 0
    for line in _commands():
        words = shlex.split(line.replace("{", "").replace("}", "").replace("…", ""), comments=False)
        for i, word in enumerate(words):
            if word == "adapterhub-lite" or (word == "adapterhub_lite.cli" and i and words[i - 1] == "-m"):
                break
        else:
            continue
        rest = [w for w in words[i + 1:] if w not in ("&", "|")]
        if not rest or rest[0].startswith("-"):
            continue
        command, seen = rest[0], seen + 1
        if command not in subs:
            problems.append(f"{line}: no command {command!r}")
            continue
        known = {opt for a in subs[command]._actions for opt in a.option_strings}
        for flag in (w.split("=")[0] for w in rest[1:] if w.startswith("--")):
            if flag not in known:
                problems.append(f"{line}: {command} takes no {flag}")
    assert seen > 30
    assert not problems, "\n".join(problems)


def test_scripts_the_readme_runs_exist():
    scripts = {m for line in _commands() for m in re.findall(r"\bscripts/[\w/.-]+\.(?:py|sh)\b", line)}
    assert scripts
    assert [s for s in sorted(scripts) if not (ROOT / s).is_file()] == []


def _help(command: str, flag: str) -> str:
    return next(a.help for a in _subparsers()[command]._actions if flag in a.option_strings)


def test_help_texts_say_what_the_readme_and_the_code_do():
    """`adapterhub-lite <cmd> --help` beside the README: merge --method listed 6 of its 12 methods (not
    delta_linear, the *_svd ones or magnitude_prune, which the README's Merge paragraph describes); --device left out
    mps, which the README and the device check accept; --dtype's auto left out fp16 on a GPU without bf16."""
    from adapterhub_lite.ops.merge import MERGE_METHODS

    listed = set(re.findall(r"[a-z_]+", _help("merge", "--method")))
    assert set(MERGE_METHODS) <= listed
    assert "mps" in _help("train", "--device") and "cpu, cuda, cuda:N or mps" in README
    assert "fp16" in _help("eval", "--dtype")
    assert "multitask/cli.py" not in build_parser().description


def test_source_files_the_readme_names_exist():
    """Every `folder/file.py` the README points at (a module, a test, a script) is in the repository."""
    named = set(re.findall(r"`((?:[\w.]+/)+[\w]+\.py)", README))
    assert len(named) > 20
    missing = [p for p in sorted(named) if not any((base / p).is_file() for base in (ROOT, ROOT / "adapterhub_lite"))]
    assert missing == []


def test_the_task_spec_table_names_every_spec_key():
    """The README's Task spec table lists every key a spec may hold, and no key the spec refuses."""
    import dataclasses

    from adapterhub_lite.core.spec import DataSpec, TaskSpec, TrainConfig

    section = README.split("## Task spec", 1)[1].split("\n### ", 1)[0]
    rows = {line.split("|")[1] for line in section.splitlines() if line.startswith("| `")}
    table_keys = set(re.findall(r"`([\w.]+)`", " ".join(rows)))
    train_row = next(line for line in section.splitlines() if line.startswith("| `train` |"))
    spec_keys = {f.name for f in dataclasses.fields(TaskSpec) if not f.metadata.get("internal")} | {f"data.{f.name}" for f in dataclasses.fields(DataSpec)}
    assert spec_keys - {"data"} <= table_keys, spec_keys - table_keys
    assert table_keys <= spec_keys, table_keys - spec_keys
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    assert {k for k in train_keys if f"`{k}`" not in train_row} == set()

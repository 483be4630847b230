"""Registry commands of `adapterhub-lite`: publish, list, info, pull, verify, reindex, convert, and the check of
--registry that main.py runs before any command that takes one."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from adapterhub_lite.cli.args import nonempty
from adapterhub_lite.core.errors import DataError

REGISTRY_HELP = "a local folder (default: adapters) or hf://org/repo"


def _publish(args) -> int:
    from adapterhub_lite.artifacts.registries import open_registry

    name, version, entry = open_registry(args.registry).publish(args.adapter, args.version, args.name, args.allow_base_change)
    print(json.dumps({"published": f"{name}@{version}", "registry": str(args.registry), "files": len(entry["files"])}))
    return 0


def _list(args) -> int:
    from adapterhub_lite.artifacts.registries import open_registry

    rows = open_registry(args.registry).rows()
    if args.json:
        print(json.dumps(rows))
        return 0
    table = [("name", "version", "task", "method", "rank", "base", "quant", "metrics")]
    table += [(r["name"], r["version"], r["task"] or "(shared)", r["method"], str(r["rank"] or "-"), r["base"], r["quantization"],
               " ".join(f"{k}={v}" for k, v in r["metrics"].items())) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def _info(args) -> int:
    from adapterhub_lite.artifacts.registries import open_registry

    name, version, entry = open_registry(args.registry).resolve(args.ref)
    print(json.dumps({"name": name, "version": version, **entry}, indent=2))
    return 0


def _pull(args) -> int:
    from adapterhub_lite.artifacts.registries import open_registry

    folder = open_registry(args.registry).pull(args.ref, args.to)
    print(json.dumps({"folder": str(folder)}) if args.json else folder)
    return 0


def _verify(args) -> int:
    from adapterhub_lite.artifacts.registries import open_registry

    reg = open_registry(args.registry)
    if args.name is not None:  # a name that is not there is the user's mistake (exit 2), not a damaged registry (exit 1)
        if "@" in args.name:
            raise DataError(f"verify takes an adapter name and checks every version of it, got {args.name!r}; "
                            f"give {args.name.split('@')[0]!r}")
        reg.resolve(args.name)  # refuses an unknown name, listing the known ones
    problems = reg.verify(args.name)
    # what was checked, so that "ok" on a folder that holds no registry (a wrong --registry) does not read as a pass
    checked = [r for r in reg.rows() if args.name in (None, r["name"])]
    if args.json:
        print(json.dumps({"ok": not problems, "problems": problems, "versions_checked": len(checked)}))
        return 1 if problems else 0
    for p in problems:
        print(f"FAIL {p}")
    what = (f"{len(checked)} version(s) of {len({r['name'] for r in checked})} adapter(s) checked" if checked
            else f"nothing to check: registry {str(args.registry)!r} holds no versions")
    print(f"verify: {'ok' if not problems else f'{len(problems)} problem(s)'}, {what}")
    return 1 if problems else 0


def _reindex(args) -> int:
    from adapterhub_lite.artifacts.registries import open_registry

    reg = open_registry(args.registry)
    if not hasattr(reg, "reindex"):
        raise DataError(f"{args.registry} is a Hub registry: restore its index.json from the repository's history (the Hub keeps every commit)")
    index = reg.reindex()
    print(json.dumps({"registry": str(args.registry), "rebuilt": sorted(f"{n}@{v}" for n, vs in index["adapters"].items() for v in vs)}))
    return 0


def _convert(args) -> int:
    from adapterhub_lite.artifacts.folder import convert_pickle

    if not args.trust_pickle:
        raise DataError("convert loads a pickle file; pass --trust-pickle to confirm you trust where it came from")
    print(convert_pickle(args.adapter))
    return 0


def check_registry(registry: str | None) -> None:
    """Refuse an empty --registry (read as the current folder) and a local one that is an existing file: every command
    would fail on it, each in its own words (a publish as a disk error, the readers as "does not exist")."""
    if registry is not None and not str(registry).strip():  # "" is the current folder: a publish would fill it
        raise DataError("--registry is empty; give a registry folder (publish creates one) or hf://org/repo")
    if registry and not str(registry).startswith("hf://") and Path(registry).exists() and not Path(registry).is_dir():
        raise DataError(f"--registry {registry!r} is a file, not a folder; give a registry folder (publish creates one) or hf://org/repo")


def add_registry_commands(sub: argparse._SubParsersAction) -> None:
    """Register publish, list, info, pull, verify and reindex on the main parser."""
    p = sub.add_parser("publish", help="publish an adapter folder as a new immutable version")
    p.add_argument("adapter", help="the adapter folder to publish (a run's output, e.g. runs/sst2)")
    p.add_argument("--version", default="auto", help="MAJOR.MINOR.PATCH, or auto (bump the patch)")
    p.add_argument("--name", help="registry name (default: the name its adapterhub.json records: a trained adapter's task name, a merge's --name)")
    p.add_argument("--allow-base-change", action="store_true",
                   help="publish a version trained on another backbone than the name's latest (moves every client of the name to it)")
    p.set_defaults(func=_publish)
    p = sub.add_parser("list", help="list every published version")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON list instead of a table")
    p.set_defaults(func=_list)
    for name, func, text in (("info", _info, "show one version's index entry"), ("pull", _pull, "copy a verified version out")):
        p = sub.add_parser(name, help=text)
        p.add_argument("ref", help="name, name@latest or name@1.0.0")
        p.set_defaults(func=func)
    sub.choices["pull"].add_argument("--to", type=nonempty, required=True, help="new folder to copy into")
    p = sub.add_parser("verify", help="re-hash every file of every version; exit 1 on a mismatch")
    p.add_argument("name", nargs="?", help="one adapter's name: check only its versions (default: every adapter)")
    p.set_defaults(func=_verify)
    p = sub.add_parser("reindex", help="rebuild a missing or damaged index.json from the version folders (each checked as a publish)")
    p.set_defaults(func=_reindex)
    for name in ("publish", "list", "info", "pull", "verify", "reindex"):
        sub.choices[name].add_argument("--registry", default="adapters", help=REGISTRY_HELP)
    for name in ("info", "pull", "verify"):  # list has its own; info always prints JSON, the flag is taken for uniformity
        sub.choices[name].add_argument("--json", action="store_true", help="print one JSON object")


def add_convert_command(sub: argparse._SubParsersAction) -> None:
    """Register `convert` on the main parser (apart from the others: it comes after infer and merge in --help)."""
    p = sub.add_parser("convert", help="turn a trusted pickle adapter (adapter_model.bin) into safetensors")
    p.add_argument("adapter", help="the adapter folder holding adapter_model.bin (replaced in place by adapter_model.safetensors)")
    p.add_argument("--trust-pickle", action="store_true", help="required: pickle files can run code when loaded")
    p.set_defaults(func=_convert)

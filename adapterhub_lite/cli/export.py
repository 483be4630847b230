"""`adapterhub-lite export vllm|lorax`: the command that serves the registry's LoRA adapters elsewhere."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from adapterhub_lite.artifacts.files import atomic_write
from adapterhub_lite.cli.args import output_file_problem
from adapterhub_lite.ops.export import ENGINES, ExportError, fingerprint_warning, plan_export, render_text, shell_script


def write_script(path: str | Path, text: str) -> None:
    """Write an executable script atomically (executable before it appears under its name)."""
    path = Path(path)
    problem = output_file_problem(path, "serve.sh")
    if problem:
        raise ExportError(problem)
    try:
        atomic_write(path, text, mode=0o755)
    except OSError as exc:
        raise ExportError(f"cannot write --output {str(path)!r} ({exc.strerror or type(exc).__name__}); nothing was written") from None


def _export(args) -> int:
    plan = plan_export(args.registry, args.engine, all_versions=args.all_versions, base=args.base)
    if args.output:
        write_script(args.output, shell_script(plan))
    print(f"warning: {fingerprint_warning(args.engine, plan['base'])}", file=sys.stderr)
    sys.stdout.write(json.dumps(plan) + "\n" if args.json else render_text(plan))
    return 0


def add_export_command(sub) -> argparse.ArgumentParser:
    """Register `export` on the CLI's subparsers."""
    p = sub.add_parser("export", help="print the vLLM / LoRAX command that serves the registry's LoRA adapters")
    p.add_argument("engine", choices=sorted(ENGINES), help="the serving engine to export to")
    p.add_argument("--registry", default="adapters", help="a local folder (default: adapters) or hf://org/repo")
    p.add_argument("--json", action="store_true", help="print one JSON object (command argv, adapters, skipped, notes)")
    p.add_argument("--output", help="also write a runnable shell script here")
    p.add_argument("--all-versions", action="store_true", help="serve every version as name@version too (the latest also as name)")
    p.add_argument("--base", help="serve the adapters of this backbone (hub id or name) when the registry mixes several")
    p.set_defaults(func=_export)
    return p

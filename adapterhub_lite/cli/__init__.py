"""The command line, on top of every layer: `adapterhub-lite …` (main.py), with the registry, router (infer, merge),
serve, multi-task and export commands in their own modules, the argument helpers they share in args.py (a leaf), and
ranks.py (one error line under torchrun, a leaf).

Commands import the library inside their functions, so `adapterhub-lite list` or `--help` never pays
for torch, transformers and peft (seconds to import)."""

from adapterhub_lite.cli.main import build_parser, main

__all__ = ["build_parser", "main"]

"""Command line: `adapterhub-lite train | eval | predict` (+ publish, list, info, pull, verify, reindex, convert from
cli/registry.py; infer, merge from cli/router.py; train-multi, interference, compose-fit from cli/multitask.py; serve from
cli/serve.py; export from cli/export.py).

Bad input → one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import warnings
from pathlib import Path

from adapterhub_lite.cli.args import (  # noqa: F401 - cli.add_device_args was public
    add_device_args,
    check_output_file,
    count,
    nonempty,
    numbered_input,
    read_jsonl,
    write_output,
)
from adapterhub_lite.cli.export import add_export_command
from adapterhub_lite.cli.multitask import add_commands
from adapterhub_lite.cli.ranks import said_by_rank0
from adapterhub_lite.cli.registry import add_convert_command, add_registry_commands, check_registry
from adapterhub_lite.cli.router import add_router_commands
from adapterhub_lite.cli.serve import add_serve_command
from adapterhub_lite.core.errors import AdapterHubError, DataError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (`error: …`, exit 2) like every other bad input."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message}; see {self.prog} --help\n")


def _train(args) -> int:
    from adapterhub_lite.core.spec import load_spec
    from adapterhub_lite.training.recipes.train import train

    # --dtype / --quantization override the spec's
    overrides = args.overrides + [f"{k}={getattr(args, k)}" for k in ("dtype", "quantization") if getattr(args, k)]
    spec = load_spec(args.spec, overrides)
    args.run_output = Path(args.output or Path("runs") / spec.name)  # train's own default: Ctrl-C's message names its checkpoint
    out = train(spec, args.output, overwrite=args.overwrite, resume=args.resume, device=args.device,
                command="adapterhub-lite train " + shlex.join(sys.argv[2:]), progress=not args.no_progress)
    if os.environ.get("RANK", "0") == "0":  # under torchrun / accelerate launch, rank 0 answers for the run
        meta = json.loads((out / "adapterhub.json").read_text())
        print(json.dumps({"output": str(out), **{k: v for k, v in meta["metrics"].items() if k != "per_class"}}))
    return 0


def _split_for(spec, split: str, adapter: str | None = None, recorded: dict | None = None):
    """The rows `eval` scores: the spec's train or dev split, or a data file. `recorded`: the sidecar's `data` (each
    split's source and sha256). The spec's paths are relative to where the adapter was trained, and eval reads them
    from the current directory: a missing one is refused with eval's fix (--split), and another file under the same
    name, or an `hf:` dataset whose fingerprint changed since, is said in a warning (its metrics are not the recorded
    split's)."""
    from adapterhub_lite.core.data import FILE_SUFFIXES, load_split, to_split

    source = getattr(spec.data, split) if split in ("train", "dev") else split
    if split not in ("train", "dev") and not Path(split).exists():
        raise DataError(f"--split {split!r} is neither dev nor train nor a data file that exists; give dev, train or the path of a "
                        f"{' / '.join(FILE_SUFFIXES)} file")
    local = split in ("train", "dev") and not source.startswith("hf:")
    if local and not Path(source).exists():
        raise DataError(f"the adapter's data.{split} {source!r} does not exist relative to {Path.cwd()} (its spec's paths are "
                        f"relative to where it was trained); run eval from there, or give --split with the file's path")
    ds, sha = load_split(source)
    was = ((recorded or {}).get(split) or {}).get("sha256") if split in ("train", "dev") else None
    if was and was != sha and local:
        print(f"warning: data.{split} {source!r} (relative to {Path.cwd()}) is not the file this adapter recorded (sha256 "
              f"{was[:12]} recorded, {sha[:12]} read): these metrics are on other rows than its own; give --split with the "
              "file's path to score it on purpose", file=sys.stderr)
    elif was and was != sha:  # an hf: split's hash is the datasets fingerprint, which follows the Hub revision it read
        print(f"warning: data.{split} {source!r} is not the dataset this adapter recorded (datasets fingerprint {was[:12]} "
              f"recorded, {sha[:12]} read): the Hub dataset, or the datasets version that reads it, changed since it trained, "
              "so these metrics may be on other rows than its own", file=sys.stderr)
    return to_split(spec, ds, source, sha, adapter=adapter)


def _eval(args) -> int:
    from adapterhub_lite.artifacts.folder import read_sidecar
    from adapterhub_lite.artifacts.loading import load_adapter
    from adapterhub_lite.core.data_checks import absent_classes, check_lengths, cut_rows
    from adapterhub_lite.model.evaluate import evaluate_split

    spec = _sidecar_spec(args.adapter)  # a bad --split or data file is refused before the backbone loads
    split = _split_for(spec, args.split, f"adapter {str(args.adapter)!r}", read_sidecar(Path(args.adapter)).get("data"))
    model, backbone, spec, meta = load_adapter(args.adapter, quantization=args.quantization, device=args.device, dtype=args.dtype,
                                         allow_base_mismatch=args.allow_base_mismatch)
    check_lengths(spec, backbone.tokenizer)
    # scored on the prompt's end only, or with a class no row holds (macro_f1 then averages the others): said, never silently
    for warning in (cut_rows(spec, backbone.tokenizer, split, training=False, limit=args.limit), absent_classes(spec, split, args.limit)):
        if warning:
            print(warning, file=sys.stderr)
    metrics, _, seconds = evaluate_split(model, backbone.tokenizer, spec, split, limit=args.limit, progress=not args.no_progress)
    n = min(len(split), args.limit or len(split))
    result = {"adapter": str(args.adapter), "split": args.split, "rows": n, **metrics,
              "latency_ms_per_example": round(1000 * seconds / n, 2),
              "trainable_parameters": meta["trainable_parameters"],
              "adapter_file_bytes": (Path(args.adapter) / "adapter_model.safetensors").stat().st_size}
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>24}: {json.dumps(value)}")
    return 0


def _predict(args) -> int:
    from adapterhub_lite.artifacts.loading import load_adapter
    from adapterhub_lite.core.data import readable, render, request_row
    from adapterhub_lite.core.data_checks import check_lengths
    from adapterhub_lite.model.backbone import model_context
    from adapterhub_lite.model.evaluate import predict
    from adapterhub_lite.serving.jobs import unread_settings

    if (args.text is None) == (args.input is None):
        raise DataError("predict needs exactly one of --text TEXT or --input FILE.jsonl")
    check_output_file(args.output)
    task = _sidecar_spec(args.adapter)
    rows, lines = [], []
    for line, row in [(0, {"text": args.text})] if args.input is None else numbered_input(args.input):
        lines.append(line)
        try:  # every row is checked against the adapter's task before the backbone loads
            rows.append(request_row(task, row))
        except DataError as exc:
            if args.input is None:
                raise
            raise DataError(f"{args.input}:{line}: {exc}") from None  # which row of the file, not just what is wrong
    # a key that reads like a generation setting (max_new_tokens, temperature …) and that the prompt does not read: predict
    # answers greedily within the task's own budget, so echoing it beside the answer would look as if it had been applied
    unread = unread_settings([{k: v for k, v in r.items() if k not in task.prompt_fields} for r in rows], also=frozenset({"max_new_tokens"}))
    if unread:
        where = f"{args.input}: row(s) on line(s) {[lines[i] for i in unread[0]][:5]}" if args.input is not None else "the request"
        raise DataError(f"{where} set {unread[1]}, which predict does not read (it answers greedily, within the task's train.max_new_tokens); "
                        "drop them, or run the rows with `adapterhub-lite infer`, which takes a per-request 'max_new_tokens'")
    model, backbone, spec, _ = load_adapter(args.adapter, quantization=args.quantization, device=args.device, dtype=args.dtype,
                                      allow_base_mismatch=args.allow_base_mismatch)
    check_lengths(spec, backbone.tokenizer)
    # the backbone's context, not train.max_length: every prompt read whole, as serve, infer and Router.run read it;
    # a backbone naming no context length (no max_position_embeddings) has no limit to refuse at, so none is set
    context = model_context(backbone)
    try:
        preds = predict(model, backbone.tokenizer, spec, [render(spec, r) for r in rows], progress=not args.no_progress,
                        context=sys.maxsize if context is None else context)
    except DataError as exc:  # a prompt over the context: which line of the file it was
        if getattr(exc, "row", None) is None or args.input is None:
            raise
        raise DataError(f"{args.input}:{lines[exc.row]}: {exc}") from None
    write_output(args.output, "".join(json.dumps({**r, "prediction": readable(spec, p)}) + "\n" for r, p in zip(rows, preds)))
    return 0


def _sidecar_spec(folder: str):
    """The task spec an adapter folder records (read without loading anything)."""
    from adapterhub_lite.artifacts.folder import SIDECAR, read_sidecar
    from adapterhub_lite.core.errors import AdapterLoadError
    from adapterhub_lite.core.spec import spec_from_dict

    if not Path(folder).is_dir():  # as eval says it: "missing adapter_config.json" would send the user looking inside a folder
        raise AdapterLoadError(f"adapter folder {folder!r} does not exist; pass a folder written by `adapterhub-lite train`")
    return spec_from_dict(read_sidecar(Path(folder))["task"], source=f"task spec in {Path(folder) / SIDECAR}")


def build_parser() -> argparse.ArgumentParser:
    """The `adapterhub-lite` parser: this module's commands and those of cli/registry.py, router.py, multitask.py, serve.py,
    export.py."""
    parser = _Parser(prog="adapterhub-lite", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train one task adapter from a YAML spec")
    t.add_argument("spec", help="task spec YAML, e.g. scripts/tasks/sst2.yaml")
    t.add_argument("overrides", nargs="*", default=[], help="dotted.key=value overrides, e.g. method=prefix train.max_steps=300")
    t.add_argument("--output", help="adapter folder (default runs/<name>)")
    t.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    t.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    t.set_defaults(func=_train)

    for name, func, text in (("eval", _eval, "score an adapter on a split"), ("predict", _predict, "run an adapter on new inputs")):
        p = sub.add_parser(name, help=text)
        p.add_argument("adapter", type=nonempty, help="adapter folder")
        p.set_defaults(func=func)
        add_device_args(p, adapters=True)
        if name == "eval":
            p.add_argument("--split", default="dev", help="dev, train, or a data file path")
            p.add_argument("--limit", type=count(1), help="score only the first N rows")
            p.add_argument("--json", action="store_true", help="print one JSON object")
        else:
            p.add_argument("--text", help="one input (for prompts that read one column)")
            p.add_argument("--input", help="JSONL file of rows with the prompt's columns")
            p.add_argument("--output", help="write JSONL predictions here instead of stdout")
    add_device_args(t)

    add_registry_commands(sub)
    add_router_commands(sub)
    add_convert_command(sub)
    add_commands(sub)
    add_serve_command(sub)
    add_export_command(sub)
    return parser


def _quiet_library_bars() -> None:
    """--no-progress means no bar at all: also transformers' "Loading weights" and the hub's download bars."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when transformers / huggingface_hub are imported
    if "transformers" in sys.modules:  # already imported (e.g. in-process callers): tell it directly
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


_PACKAGE = str(Path(__file__).resolve().parents[1])  # adapterhub_lite/: a warning raised from here is ours


def _one_line_warnings(shown):
    """A `warnings.showwarning` that prints the package's own warnings (another quantization, an adapter left out of
    routing or not served) as one `warning: …` line, as train's data warnings print: Python's default adds the file,
    line, category and source line, which tell a command-line user nothing. Others go to `shown` with their origin."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if not str(filename).startswith(_PACKAGE) or not issubclass(category, UserWarning):
            return shown(message, category, filename, lineno, file, line)
        with contextlib.suppress(OSError):  # as warnings' own: a closed stderr does not turn a warning into a failure
            print(f"warning: {message}", file=file or sys.stderr)

    return show


def _interrupted(output: Path | None) -> str:
    """Ctrl-C's one line: for a training run, what it kept and how to go on (--resume continues from the checkpoint)."""
    if output is None or not str(output).strip():
        return "interrupted"
    from adapterhub_lite.training.checkpoint import Checkpoint

    ckpt = Checkpoint(output.parent / f".{output.name}.partial")  # the work folder of training/output.py
    if not ckpt.exists():
        return (f"interrupted before the first checkpoint of {str(output)!r} (there is none to --resume from); "
                "run the same command again to start over")
    step = ckpt.step()
    at = f"at step {step}" if step is not None else "(its step is unreadable)"
    return (f"interrupted; the checkpoint {at} is kept in {ckpt.find()}: run the same command with --resume to continue "
            "from it, or with --overwrite to start over")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `adapterhub-lite`."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse stops collecting `overrides` at the first option; accept `key=value` after options too.
    positional = "overrides" if hasattr(args, "overrides") else "specs" if hasattr(args, "specs") else None
    if extra and positional and all("=" in e and not e.startswith("-") for e in extra):
        setattr(args, positional, getattr(args, positional) + extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "no_progress", False):
        _quiet_library_bars()
    shown = warnings.showwarning  # put back on return: main() is also called in-process
    warnings.showwarning = _one_line_warnings(shown)
    try:
        check_registry(getattr(args, "registry", None))
        return args.func(args)
    except AdapterHubError as exc:
        if not said_by_rank0(str(exc)):  # under torchrun, rank 0 prints what every process refused alike
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(_interrupted(getattr(args, "run_output", None)), file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`list | head`): nothing more to say, and nobody to say it to
        with contextlib.suppress(OSError, ValueError):  # stdout to /dev/null, so the interpreter's final flush does not fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())

"""Command line: `adapterhub-lite infer` (a JSONL file of requests through the Router's engine) and `merge` (LoRA
adapters into a new adapter folder). Bad input → one line on stderr, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

from adapterhub_lite.cli.args import (
    add_device_args,
    add_route_threshold,
    check_output_file,
    count,
    distinct_sources,
    finite_float,
    nonempty,
    numbered_input,
    positive_float,
    write_output,
)
from adapterhub_lite.cli.registry import REGISTRY_HELP
from adapterhub_lite.core.errors import AdapterHubError, DataError
from adapterhub_lite.core.names import RESERVED


def _infer(args) -> int:
    from adapterhub_lite.model.evaluate import progress_bar
    from adapterhub_lite.serving.jobs import bad_budgets, unread_settings
    from adapterhub_lite.serving.router import Router

    check_output_file(args.output)
    numbered = numbered_input(args.input)
    requests, lines = [r for _, r in numbered], [n for n, _ in numbered]  # a blank line makes a request's index and its line differ
    bad = [lines[i] for i, r in enumerate(requests) if "adapter" not in r]
    if bad:
        raise DataError(f"{args.input}: request(s) on line(s) {bad[:5]} name no 'adapter'; give each a name, 'base' or 'auto'")
    # base / auto read `text` whole (core.data.raw_text, as the engine checks it), refused here before the backbone loads; a named
    # adapter's columns are request_row's to judge, as predict, Router.run and serve judge them (a number is its text)
    bad = [i for i, r in enumerate(requests) if r["adapter"] in RESERVED and not isinstance(r.get("text"), str)]
    if bad:
        raise DataError(f"{args.input}: request(s) on line(s) {[lines[i] for i in bad][:5]} have a 'text' that is {json.dumps(requests[bad[0]].get('text'))}, "
                        "not a string; give every request its text")
    bad = bad_budgets(requests, 32)
    if bad:
        raise DataError(f"{args.input}: request(s) on line(s) {[lines[i] for i, _ in bad][:5]} ask for max_new_tokens {bad[0][1]!r}; "
                        "give a whole number ≥ 1 (or leave it out: the task's own budget)")
    # other keys ride along into the answers (an id, say); these read like settings, which infer would not apply
    # infer reads task inputs (`text`, columns), no raw prompt: token ids were continued raw, a row's `text` beside them unread
    unread = unread_settings(requests, also=frozenset({"prompt", "prompt_ids"}))
    if unread:
        raise DataError(f"{args.input}: request(s) on line(s) {[lines[i] for i in unread[0]][:5]} set {unread[1]}, which infer does not read (it answers "
                        "greedily, each task within its own budget); give 'max_new_tokens' for a budget, and drop the rest")
    _check_versions(args.registry, args.input, requests, lines)
    router = Router.from_registry(args.registry, quantization=args.quantization, device=args.device, dtype=args.dtype,
                                  memory_budget_mb=args.memory_budget_mb, allow_base_mismatch=args.allow_base_mismatch,
                                  route_threshold=args.route_threshold)
    # the server's engine over the whole file: continuous batching, --batch-size rows at a time
    with progress_bar(len(requests), "infer", not args.no_progress) as bar:
        # name@latest is name, as the server reads it (serving/runtime.py); each answer names the adapter that answered
        routed = [{**r, "adapter": r["adapter"].removesuffix("@latest")} if isinstance(r["adapter"], str) else r for r in requests]
        try:
            results = router.run(routed, max_batch_rows=args.batch_size, on_done=lambda i: bar.update(1))
        except AdapterHubError as exc:  # a prompt over the context, say: which of the file's requests it was
            if getattr(exc, "request_index", None) is None:
                raise
            raise DataError(f"{args.input}: request on line {lines[exc.request_index]}: {exc.detail}") from None  # the line, not run()'s index
    answers = [{**req, **res} for req, res in zip(requests, results)]
    write_output(args.output, "".join(json.dumps(a) + "\n" for a in answers))
    return 0


def _check_versions(registry: str, source: str, requests: list[dict], lines: list[int]) -> None:
    """Refuse, before the backbone loads, a request naming a version (name@version) the registry does not hold, in the
    registry's words (which list the versions); the ones it holds are served pinned, as `serve` serves them (the engine
    would only find out after loading the backbone)."""
    from adapterhub_lite.artifacts.index import parse_ref
    from adapterhub_lite.artifacts.registries import open_registry

    pinned = {}  # ref → the request lines naming it
    for n, r in zip(lines, requests):  # each request's line in the file
        if isinstance(r["adapter"], str) and "@" in r["adapter"] and not r["adapter"].endswith("@latest"):
            pinned.setdefault(r["adapter"], []).append(n)
    if not pinned:
        return
    reg = open_registry(registry)
    for ref, lines in pinned.items():
        try:
            parse_ref(ref)  # an empty or malformed version: its own fix says what to write
        except AdapterHubError as exc:
            raise DataError(f"{source}: request(s) on line(s) {lines[:5]}: {exc}") from None
        try:
            reg.resolve(ref)  # an unknown name or version, refused in the registry's words (which list the versions)
        except AdapterHubError as exc:
            raise DataError(f"{source}: request(s) on line(s) {lines[:5]} name {ref!r}: {exc}; name a published version, "
                            f"the name alone (its latest), or 'base' / 'auto'") from None


def _merge(args) -> int:
    from adapterhub_lite.artifacts.files import unwritable_output
    from adapterhub_lite.artifacts.registries import adapter_ref
    from adapterhub_lite.artifacts.sidecar import Sidecar
    from adapterhub_lite.ops.merge import merge_adapters, save_merged
    from adapterhub_lite.training.output import check_parent

    if len(args.weights) != len(args.adapters):
        raise DataError(f"--weights has {len(args.weights)} values for {len(args.adapters)} adapters; give one weight per adapter")
    refs = [adapter_ref(a, args.registry) for a in args.adapters]
    # a pinned registry version is named as written, as a server recipe names it, so two versions of one adapter
    # (toy@1.0.0 toy@1.1.0, a soup) are two sources; a folder keeps its (registered) name, name@latest is the name
    refs = [(a if "@" in a and not Path(a).is_dir() and not a.endswith("@latest") else name, folder) for a, (name, folder) in zip(args.adapters, refs)]
    folders = distinct_sources(args.adapters, refs, args.weights)
    output = Path(args.output)
    if output.exists() or output.is_symlink():  # refused before the backbone loads, not after the merge was computed
        raise DataError(f"--output {args.output!r} already exists; choose a new folder")
    check_parent(output)  # a parent that is a file: mkdir's FileExistsError came out as a traceback, exit 1
    name = args.name or output.name
    model, meta = merge_adapters(folders, dict(zip(folders, args.weights)), args.method,
                                 density=args.density, name=name, report_rows=args.report_rows, task=args.task,
                                 quantization=args.quantization, device=args.device, dtype=args.dtype,
                                 allow_base_mismatch=args.allow_base_mismatch, seed=args.seed,
                                 majority_sign_method=args.majority_sign_method)
    # saved here, not by merge_adapters(output=...), so that only the write's OSError is read as the disk's (one line, exit
    # 2, not a traceback). The server's own merges keep the OSError (a server fault, a 500, not a 400).
    try:
        save_merged(model, name, Sidecar.from_dict(meta), output)
    except OSError as exc:
        raise unwritable_output("the merged adapter", args.output, exc) from None
    print(json.dumps({"output": args.output, "merge_report": meta["merge_report"]}))
    return 0



def add_router_commands(sub) -> None:
    """`infer` and `merge` on the subparsers `sub` of the adapterhub-lite parser."""
    p = sub.add_parser("infer", help="serve a JSONL file of requests, each naming its adapter (or base / auto)")
    p.add_argument("--input", required=True, help='JSONL requests: {"adapter": "sst2" | "base" | "auto", "text": …}')
    p.add_argument("--output", help="JSONL answers (default: stdout)")
    p.add_argument("--batch-size", type=count(1), default=32, help="rows run together, continuous batching (Router's max_batch_rows)")
    p.add_argument("--memory-budget-mb", type=positive_float, help="evict least-recently-used adapters beyond this")
    add_route_threshold(p)
    add_device_args(p, adapters=True)
    p.set_defaults(func=_infer)
    p = sub.add_parser("merge", help="merge LoRA adapters into a new adapter folder")
    p.add_argument("adapters", nargs="+", help="registry names (name or name@version) or adapter folders")
    p.add_argument("--weights", type=finite_float, nargs="+", required=True, help="one weight per source adapter, in order")
    p.add_argument("--method", default="linear", help="on A and B apart (equal ranks): linear, ties, dare_linear, dare_ties, magnitude_prune; "
                   "on ΔW (mixed ranks): delta_linear (= cat), svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd")
    p.add_argument("--density", type=finite_float, help="ties / dare / magnitude_prune (and their _svd): share of each update kept")
    p.add_argument("--majority-sign-method", choices=("total", "frequency"),
                   help="ties, dare_ties (and their _svd): elect each sign by the summed values (total, peft's default) or by count")
    p.add_argument("--seed", type=int, default=0, help="dare_* drop at random: torch's generator is seeded with this (one seed, one merge)")
    p.add_argument("--output", type=nonempty, required=True, help="new folder for the merged adapter (publishable)")
    p.add_argument("--name", help="adapter name (default: the output folder's name)")
    p.add_argument("--task", help="the task the merged adapter serves: a source's task name, or none for raw text (default: the sources' common task)")
    p.add_argument("--report-rows", type=count(0), default=200, help="dev rows per source task in the report (0: none)")
    add_device_args(p, adapters=True)
    p.set_defaults(func=_merge)
    for name in ("infer", "merge"):
        sub.choices[name].add_argument("--registry", default="adapters", help=REGISTRY_HELP)

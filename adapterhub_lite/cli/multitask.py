"""Multi-task commands of `adapterhub-lite`: train-multi, interference, compose-fit."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from adapterhub_lite.cli.args import add_device_args, count, distinct_sources, finite_float, nonempty
from adapterhub_lite.training.joint_config import SHARED_TRAIN_KEYS  # read without torch: --help stays fast


def _train_multi(args) -> int:
    from adapterhub_lite.core.spec import load_spec
    from adapterhub_lite.training.joint_config import JointConfig
    from adapterhub_lite.training.recipes.joint import train_joint

    paths, overrides = _specs_and_overrides(args.specs)
    overrides += [f"{k}={getattr(args, k)}" for k in ("dtype", "quantization") if getattr(args, k)]
    specs = [load_spec(path, overrides) for path in paths]
    weighting_args = {k: v for k, v in (("alpha", args.alpha), ("beta", args.beta), ("window", args.window)) if v is not None}
    if args.fixed_weights:
        weighting_args = {"weights": dict(zip([s.name for s in specs], args.fixed_weights))}
    args.run_output = Path(args.output)  # Ctrl-C's message names its checkpoint (cli/main.py)
    cfg = JointConfig.from_specs(specs, weighting=args.weighting, weighting_args=weighting_args, sampling=args.sampling,
                      temperature=args.temperature, shared_adapter=args.shared_adapter, shared_r=args.shared_r)
    out = train_joint(specs, args.output, cfg, overwrite=args.overwrite, resume=args.resume, device=args.device,
                      progress=not args.no_progress,
                      command="adapterhub-lite train-multi " + shlex.join(sys.argv[2:]))
    if os.environ.get("RANK", "0") == "0":  # under torchrun / accelerate launch, rank 0 answers for the run
        print(json.dumps({"output": str(out), **json.loads((out / "run.json").read_text())["dev"]}))
    return 0


def _specs_and_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """Positional arguments: spec files, and dotted.key=value overrides applied to every spec (as `train` takes them)."""
    overrides = [i for i in items if "=" in i]
    return [i for i in items if "=" not in i], overrides


def _interference(args) -> int:
    from adapterhub_lite.ops.interference import interference

    report = interference(args.adapters, args.output, merges=tuple(args.merge),
                          density=args.density, rows=args.rows or None, tolerance=args.tolerance, quantization=args.quantization,
                          device=args.device, dtype=args.dtype, allow_base_mismatch=args.allow_base_mismatch, seed=args.seed)
    print(json.dumps({"output": args.output, "scores": report["scores"], "flags": report["flags"]}))
    return 0


def _compose_fit(args) -> int:
    from adapterhub_lite.artifacts.registries import adapter_ref
    from adapterhub_lite.core.spec import load_spec
    from adapterhub_lite.training.recipes.compose import compose_fit

    overrides = args.overrides + [f"{k}={getattr(args, k)}" for k in ("dtype", "quantization") if getattr(args, k)]
    spec = load_spec(args.spec, overrides)
    sources = distinct_sources(args.sources, [adapter_ref(ref, args.registry) for ref in args.sources])
    report = compose_fit(spec, sources, args.output,
                         shots=args.shots, search=args.search, budget=args.budget, l1=args.l1, seed=args.seed,
                         baselines=not args.no_baselines, lora_steps=args.lora_steps, eval_rows=args.rows or None,
                         overwrite=args.overwrite, device=args.device, dtype=args.dtype, allow_base_mismatch=args.allow_base_mismatch,
                         command="adapterhub-lite compose-fit " + shlex.join(sys.argv[2:]))
    print(json.dumps({"output": args.output, **report}))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the multi-task subcommands on the main parser."""
    p = sub.add_parser("train-multi", help="train several task adapters jointly (mixed batches, weighted losses)")
    p.add_argument("specs", nargs="+", metavar="SPEC_OR_OVERRIDE",
                   help="task spec YAMLs (LoRA) and dotted.key=value overrides for every spec, e.g. scripts/tasks/sst2.yaml "
                        "scripts/tasks/rte.yaml train.max_steps=240 (the train keys a joint run takes once — "
                        f"{', '.join(SHARED_TRAIN_KEYS)} — must agree across the specs that give them; what they leave out is chosen as train chooses it)")
    p.add_argument("--output", type=nonempty, required=True, help="run folder: one adapter folder per task inside")
    p.add_argument("--weighting", default="dynamic", choices=("equal", "fixed", "dynamic", "uncertainty"),
                   help="task loss weights: equal (mean), fixed (--fixed-weights), dynamic (by each task's recent loss), "
                        "uncertainty (learned log-variances)")
    p.add_argument("--alpha", type=finite_float, help="dynamic: sigmoid slope α (default 5)")
    p.add_argument("--beta", type=finite_float, help="dynamic: loss at which a task weighs 0.5 (default 0.5)")
    p.add_argument("--window", type=count(1), help="dynamic: steps of loss history per task (default 20)")
    p.add_argument("--fixed-weights", type=finite_float, nargs="+", help="fixed: one weight per spec, in order")
    p.add_argument("--sampling", default="temperature", choices=("proportional", "temperature", "round_robin", "dynamic"),
                   help="each row's task: proportional to rows, temperature (--temperature), round_robin, dynamic (more rows "
                        "for the tasks whose dev metric lags its best)")
    p.add_argument("--temperature", type=finite_float, default=2.0, help="temperature sampling: p ∝ n^(1/T)")
    p.add_argument("--shared-adapter", action="store_true", help="also train one LoRA every task uses under its own")
    p.add_argument("--shared-r", type=count(1), default=8, help="rank of the shared adapter")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint (taken every train.checkpoint_every steps; left out: at every eval)")
    add_device_args(p)
    p.set_defaults(func=_train_multi)

    p = sub.add_parser("interference", help="task × adapter matrix of dev scores (single, merged, joint); flags negative transfer")
    p.add_argument("adapters", nargs="+", help="single-task adapter folders and joint run folders (from train-multi)")
    p.add_argument("--output", type=nonempty, required=True, help="folder for report.json and heatmap.png")
    p.add_argument("--merge", nargs="*", default=["linear", "ties"], help="merge methods to add as columns (none: --merge)")
    p.add_argument("--density", type=finite_float, default=0.5, help="ties / dare / magnitude_prune (and their _svd) density")
    p.add_argument("--rows", type=count(0), default=200, help="dev rows per cell (0: all)")
    p.add_argument("--tolerance", type=finite_float, default=0.01, help="score drop that counts as negative transfer")
    p.add_argument("--seed", type=int, default=0, help="dare_* merges drop at random: seeded as `merge --seed` (one seed, one merge)")
    add_device_args(p, adapters=True)
    p.set_defaults(func=_interference)

    p = sub.add_parser("compose-fit", help="fit composition weights over existing LoRAs for a new task from a few shots")
    p.add_argument("spec", help="the new task's spec YAML")
    p.add_argument("overrides", nargs="*", default=[], help="dotted.key=value overrides, e.g. train.max_length=128")
    p.add_argument("--from", dest="sources", nargs="+", required=True, help="source adapters: registry names or folders")
    p.add_argument("--output", type=nonempty, required=True, help="folder for the composed adapter and compose_report.json")
    p.add_argument("--shots", type=count(1), default=16, help="labeled training rows the weights are fitted on")
    p.add_argument("--search", default="cma", choices=("cma", "gradient"), help="CMA-ES (gradient-free) or Adam on the weights")
    p.add_argument("--budget", type=count(1), default=40, help="loss evaluations (cma) or steps (gradient)")
    p.add_argument("--l1", type=finite_float, default=0.05, help="L1 penalty on the weights (LoraHub uses 0.05)")
    p.add_argument("--lora-steps", type=count(0), default=40, help="steps of the LoRA-on-the-same-shots baseline")
    p.add_argument("--no-baselines", action="store_true", help="skip base / single source / few-shot LoRA comparisons")
    p.add_argument("--rows", type=count(0), default=0, help="dev rows in the comparisons (0: all)")
    p.add_argument("--seed", type=int, default=0, help="picks the shots and seeds the search")
    p.add_argument("--registry", default="adapters", help="where --from names are looked up (default: adapters)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_device_args(p, adapters=True)
    p.set_defaults(func=_compose_fit)

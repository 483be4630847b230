"""Multi-task commands of `adapterhub-lite`: train-multi, interference, compose-fit."""

from __future__ import annotations

import argparse
import json
import shlex
import sys


def _train_multi(args) -> int:
    from ..spec import load_spec
    from .joint import JointConfig, train_joint

    specs = [load_spec(path, args.overrides) for path in args.specs]
    weighting_args = {k: v for k, v in (("alpha", args.alpha), ("beta", args.beta), ("window", args.window)) if v is not None}
    if args.fixed_weights:
        weighting_args = {"weights": dict(zip([s.name for s in specs], args.fixed_weights))}
    cfg = JointConfig(max_steps=args.steps, batch_size=args.batch_size, warmup_steps=args.warmup_steps, eval_every=args.eval_every,
                      eval_samples=args.eval_samples, weighting=args.weighting, weighting_args=weighting_args,
                      sampling=args.sampling, temperature=args.temperature, shared_adapter=args.shared_adapter,
                      shared_r=args.shared_r, max_minutes=args.max_minutes, seed=args.seed)
    out = train_joint(specs, args.output, cfg, overwrite=args.overwrite, device=args.device, progress=not args.no_progress,
                      command="adapterhub-lite train-multi " + shlex.join(sys.argv[2:]))
    print(json.dumps({"output": str(out), **json.loads((out / "run.json").read_text())["dev"]}))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the multi-task subcommands on the main parser."""
    p = sub.add_parser("train-multi", help="train several task adapters jointly (mixed batches, weighted losses)")
    p.add_argument("specs", nargs="+", help="task spec YAMLs (LoRA), e.g. scripts/tasks/sst2.yaml scripts/tasks/rte.yaml")
    p.add_argument("--output", required=True, help="run folder: one adapter folder per task inside")
    p.add_argument("--weighting", default="dynamic", choices=("equal", "fixed", "dynamic", "uncertainty"))
    p.add_argument("--alpha", type=float, help="dynamic: sigmoid slope α (default 5)")
    p.add_argument("--beta", type=float, help="dynamic: loss at which a task weighs 0.5 (default 0.5)")
    p.add_argument("--window", type=int, help="dynamic: steps of loss history per task (default 20)")
    p.add_argument("--fixed-weights", type=float, nargs="+", help="fixed: one weight per spec, in order")
    p.add_argument("--sampling", default="temperature", choices=("proportional", "temperature", "round_robin", "dynamic"))
    p.add_argument("--temperature", type=float, default=2.0, help="temperature sampling: p ∝ n^(1/T)")
    p.add_argument("--shared-adapter", action="store_true", help="also train one LoRA every task uses under its own")
    p.add_argument("--shared-r", type=int, default=8, help="rank of the shared adapter")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16, help="rows per step, mixed over the tasks")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-samples", type=int, default=200, help="dev rows per task in periodic evals (final: all)")
    p.add_argument("--max-minutes", type=float, default=0.0, help="wall-clock budget; 0: none")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--device")
    p.add_argument("--overrides", nargs="*", default=[], help="dotted.key=value applied to every spec")
    p.set_defaults(func=_train_multi)

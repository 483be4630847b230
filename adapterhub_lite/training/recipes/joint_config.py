"""What a joint run is: the settings it takes once for all its tasks, and which sets of tasks it accepts.

Each task's own spec gives its prompt, labels, LoRA shape and learning rate; the keys one schedule and one
mixed batch need (SHARED_TRAIN_KEYS) must agree across the tasks' specs, and the rest (weighting, sampling,
the shared adapter) is joint-only. Read without torch: the CLI builds this before anything is loaded, and a
resumed run's identity (training/progress.py) is computed from it. The run itself is joint.py's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from adapterhub_lite.core.errors import SpecError
from adapterhub_lite.core.spec import TaskSpec, TrainConfig

SHARED = "shared"


@dataclass
class JointConfig:
    """Settings of a joint run (each task's own spec gives its prompt, labels, LoRA shape and lr).

    The keys a joint run takes once for all tasks (SHARED_TRAIN_KEYS) are a spec's `train` keys, with the
    spec's defaults (core.spec.TrainConfig); from_specs reads them off the tasks' specs. The rest is joint-only."""

    max_steps: int = TrainConfig.max_steps
    batch_size: int = TrainConfig.batch_size  # rows per step, mixed over tasks
    grad_accum: int = TrainConfig.grad_accum
    warmup_steps: int = TrainConfig.warmup_steps
    schedule: str = TrainConfig.schedule
    eval_every: int = TrainConfig.eval_every
    eval_samples: int = TrainConfig.eval_samples
    max_grad_norm: float = TrainConfig.max_grad_norm
    patience: int = TrainConfig.patience  # early stopping on the tasks' mean dev score
    min_delta: float = TrainConfig.min_delta
    min_steps: int = TrainConfig.min_steps
    weighting: str = "dynamic"
    weighting_args: dict = field(default_factory=dict)  # alpha/beta/window (dynamic), weights (fixed)
    sampling: str = "temperature"
    temperature: float = 2.0
    shared_adapter: bool = False
    shared_r: int = 8
    max_minutes: float = TrainConfig.max_minutes
    seed: int = TrainConfig.seed
    log_every: int = TrainConfig.log_every  # steps per metrics row (per-task losses, weights, rows), as for one adapter
    checkpoint_every: int | None = None  # None: at every eval (what `train` resolves when a spec leaves it out)

    @classmethod
    def from_specs(cls, specs: list[TaskSpec], **joint_only) -> JointConfig:
        """The shared keys from the specs (which must agree; see joint_settings), the joint-only ones as given."""
        return cls(**joint_settings(specs), **joint_only)


# The spec `train` keys a joint run takes once for every task (one schedule, one batch of mixed rows).
SHARED_TRAIN_KEYS = ("max_steps", "batch_size", "grad_accum", "warmup_steps", "schedule", "eval_every", "eval_samples", "max_grad_norm",
                     "patience", "min_delta", "min_steps", "max_minutes", "seed", "log_every", "checkpoint_every")
# Each task's own: lr and weight_decay (its optimizer group), max_length, max_new_tokens, eval_batch_size. What a joint run
# decides itself: an eager forward (train.compile: `auto` and `never` run eager, `always` is refused). Not read at all:
# these, which would change the run, so a spec setting them is refused rather than trained otherwise.
UNREAD_TRAIN_KEYS = ("epochs", "batch_tokens")


def joint_settings(specs: list[TaskSpec]) -> dict:
    """JointConfig fields from the specs' `train` keys, which must agree across the tasks (override
    them on the command line, e.g. train.max_steps=240, to make them agree); all disagreements at once."""
    out, problems = {}, []
    for key in UNREAD_TRAIN_KEYS:
        set_by = {s.name: getattr(s.train, key) for s in specs if getattr(s.train, key) != getattr(TrainConfig, key)}
        if set_by:
            problems.append(f"train.{key} is set ({', '.join(f'{n}: {v}' for n, v in set_by.items())}) but a joint run does not read it "
                            f"(it counts train.max_steps of train.batch_size mixed rows); pass train.{key}={getattr(TrainConfig, key)} "
                            "and set those instead")
    always = [s.name for s in specs if s.train.compile == "always"]
    if always:  # the per-row LoRA layer gathers each row's factors in Python (rowlora.py): no compiled graph for it here
        problems.append(f"train.compile is 'always' ({', '.join(always)}) but a joint run's per-row adapters run eager; "
                        "pass train.compile=auto (or never) to train them jointly, or train each task alone to compile it")
    for key in SHARED_TRAIN_KEYS:
        values = {s.name: _train_value(s, key) for s in specs}
        if len(set(values.values())) > 1:
            problems.append(f"train.{key} differs between the tasks ({', '.join(f'{n}: {v}' for n, v in values.items())}); "
                            f"a joint run has one: pass train.{key}=VALUE")
        out[key] = next(iter(values.values()))
    if problems:
        raise SpecError(problems, "joint training")
    return out


def _train_value(spec: TaskSpec, key: str):
    """A spec's `train` key as a joint run reads it: checkpoint_every left out is None (at every eval, as `train`
    resolves it), not TrainConfig's fixed default; warmup_steps left out in a run of no more steps than that default is
    what `train` would choose."""
    if key == "checkpoint_every" and "train.checkpoint_every" not in spec.given:
        return None
    t = spec.train
    if key == "warmup_steps" and "train.warmup_steps" not in spec.given and t.warmup_steps >= t.max_steps:
        # TrainConfig's fixed 20 in a shorter run would be refused by fit() (a warm-up as long as the run), naming a
        # value nobody wrote: a short run warms up as `train` chooses for one. Imported here: defaults.py loads torch,
        # and cli/multitask.py reads this module for --help
        from adapterhub_lite.training.defaults import default_warmup

        return default_warmup(t.max_steps)[0]
    return getattr(spec.train, key)


def check_specs(specs: list[TaskSpec]) -> None:
    """Refuse, all problems at once, a set of tasks that cannot be trained jointly."""
    problems = []
    names = [s.name for s in specs]
    if len(specs) < 2:
        problems.append(f"joint training needs at least two tasks, got {names}")
    if len(set(names)) < len(names) or SHARED in names:
        problems.append(f"task names must be distinct and not {SHARED!r}, got {names}")
    problems += [f"task {s.name!r} uses method {s.method!r}; joint training trains LoRA adapters (set method: lora)"
                 for s in specs if s.method != "lora"]
    for key in ("base", "quantization", "dtype"):
        values = {s.name: getattr(s, key) for s in specs}
        if len(set(values.values())) > 1:
            problems.append(f"all tasks must share one backbone, but {key} differs: {values}")
    dropouts = {s.name: s.method_args.get("lora_dropout", 0.0) for s in specs}
    if len(set(dropouts.values())) > 1:
        problems.append(f"all tasks must use one lora_dropout (the batch shares one dropout mask), got {dropouts}")
    if problems:
        raise SpecError(problems, "joint training")

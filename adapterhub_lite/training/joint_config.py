"""What a joint run is: the settings it takes once for all its tasks, and which sets of tasks it accepts.

Each task's own spec gives its prompt, labels, LoRA shape and learning rate; the keys one schedule and one
mixed batch need (SHARED_TRAIN_KEYS) must agree across the tasks' specs that give them (those no spec gives are
chosen when the run starts, as `train` chooses them: training.defaults.resolve_joint), and the rest (weighting,
sampling, the shared adapter) is joint-only. Read without torch: the CLI builds this before anything is loaded, and a
resumed run's identity (progress.py) is computed from it, and defaults.resolve_joint chooses what the specs leave out;
so it is the library's, below the recipes. The run itself is recipes/joint.py's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from adapterhub_lite.core.errors import SpecError
from adapterhub_lite.core.spec import TaskSpec, TrainConfig

SHARED = "shared"


@dataclass
class JointConfig:
    """Settings of a joint run (each task's own spec gives its prompt, labels, LoRA shape and lr).

    The keys a joint run takes once for all tasks (SHARED_TRAIN_KEYS) are a spec's `train` keys; from_specs reads those
    the tasks' specs give, and the run chooses the others (the fallbacks below, core.spec.TrainConfig's, are for a
    JointConfig built by hand, taken as written). The rest is joint-only."""

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
    # The SHARED_TRAIN_KEYS some task's spec gives: the others are chosen at the start of the run as `train` chooses them
    # (training.defaults.resolve_joint). None (a JointConfig built by hand): every key as written. Not a setting.
    given: frozenset | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_specs(cls, specs: list[TaskSpec], **joint_only) -> JointConfig:
        """The shared keys the specs give (which must agree; see joint_settings), the joint-only ones as given; the
        shared keys no spec gives are left to the run (resolve_joint), as `train` leaves them to defaults.resolve."""
        settings = joint_settings(specs)
        return cls(**settings, **joint_only, given=frozenset(settings))

    def to_dict(self) -> dict:
        """The settings (what run.json records and a resume checks), without `given`."""
        out = asdict(self)
        out.pop("given")
        return out


# The spec `train` keys a joint run takes once for every task (one schedule, one batch of mixed rows).
SHARED_TRAIN_KEYS = ("max_steps", "batch_size", "grad_accum", "warmup_steps", "schedule", "eval_every", "eval_samples", "max_grad_norm",
                     "patience", "min_delta", "min_steps", "max_minutes", "seed", "log_every", "checkpoint_every")
# Each task's own: lr and weight_decay (its optimizer group), max_length, max_new_tokens, eval_batch_size. What a joint run
# decides itself: an eager forward (train.compile: `auto` and `never` run eager, `always` is refused). Not read at all:
# these, which would change the run, so a spec setting them is refused rather than trained otherwise.
UNREAD_TRAIN_KEYS = ("epochs", "batch_tokens")


def joint_settings(specs: list[TaskSpec]) -> dict:
    """The SHARED_TRAIN_KEYS the specs' `train` sections give, which must agree across the tasks that give them (override
    them on the command line, e.g. train.max_steps=240, to make them agree); all disagreements at once. A key one task
    gives and another leaves out is the giver's; a key no task gives is not in the result (the run chooses it)."""
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
        values = {s.name: getattr(s.train, key) for s in specs if f"train.{key}" in s.given}
        if len(set(values.values())) > 1:
            problems.append(f"train.{key} differs between the tasks ({', '.join(f'{n}: {v}' for n, v in values.items())}); "
                            f"a joint run has one: pass train.{key}=VALUE")
        if values:
            out[key] = next(iter(values.values()))
    if problems:
        raise SpecError(problems, "joint training")
    return out


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
            problems.append(f"all tasks must share one backbone, but {key} differs: {values}; pass {key}=VALUE (an override sets it for every task)")
    dropouts = {s.name: s.method_args.get("lora_dropout", 0.0) for s in specs}
    if len(set(dropouts.values())) > 1:
        problems.append(f"all tasks must use one lora_dropout (the batch shares one dropout mask), got {dropouts}; "
                        "pass method_args.lora_dropout=VALUE (an override sets it for every task)")
    if problems:
        raise SpecError(problems, "joint training")

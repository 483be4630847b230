"""Run state that a resumed run needs, the order rows are read in, and what identifies a run."""

from __future__ import annotations

import hashlib
import json
import random
import resource
from dataclasses import dataclass, field

import torch

from adapterhub_lite.core.errors import AdapterHubError
from adapterhub_lite.core.spec import TaskSpec


class TrainingError(AdapterHubError):
    """Training cannot go on (a non-finite loss, a full disk, a resume that does not match its checkpoint)."""


@dataclass
class RunState:
    """Progress of a run besides weights and optimizer: step, clock, best so far, the log."""

    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    wall_seconds: float = 0.0  # wall-clock time the run spent to its last checkpoint, evals too: what train.max_minutes counts
    best_metric: float | None = None
    best_step: int = 0
    bad_evals: int = 0  # evals since the score last beat plateau_score by more than min_delta
    plateau_score: float | None = None  # the score of the last real improvement (patience's reference)
    stopped_early: bool = False  # early stopping ended the run here: a resume of it (a failed folder write) trains no further
    out_of_time: float = 0.0  # the train.max_minutes that ended the run here (0: none did); a resume trains on only with more
    history: list[dict] = field(default_factory=list)


@dataclass
class Cursor:
    """Where a task's data is read: the current epoch's row order and the position in it."""

    epoch_order: list[int] = field(default_factory=list)
    cursor: int = 0
    epoch: int = 0


def _epoch_order(lengths: list[int], batch_size: int, seed: int) -> list[int]:
    """A shuffled epoch whose consecutive batches hold rows of similar length.

    Padding is wasted compute, and on a CPU compute is the budget. So: shuffle, cut into pools
    of 32 batches, sort each pool by length, cut into batches, and shuffle the batches.
    """
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    pool = batch_size * 32
    batches = []
    for i in range(0, len(perm), pool):
        chunk = sorted(perm[i : i + pool], key=lengths.__getitem__)
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    return [row for b in torch.randperm(len(batches), generator=g).tolist() for row in batches[b]]


def next_rows(cursor: Cursor, lengths: list[int], k: int, seed: int, micro_batches: int = 1) -> list[int]:
    """The next k rows of the current epoch; a new epoch (seeded by its number) when one ends.

    Every process of a data-parallel run draws the same *global* rows (k is the global micro-batch)
    and then takes its own share (`shard`), so the data order does not depend on the process count.
    The epoch is cut into optimizer steps (`micro_batches` draws of k), so accumulating 4 × 4 rows
    reads the very rows of one batch of 16, in micro-batches of similar length.
    """
    rows = []
    while len(rows) < k:
        if cursor.cursor >= len(cursor.epoch_order):
            cursor.epoch_order = _epoch_order(lengths, k * micro_batches, seed + cursor.epoch)
            cursor.epoch += 1
            cursor.cursor = 0
        take = cursor.epoch_order[cursor.cursor : cursor.cursor + k - len(rows)]
        cursor.cursor += len(take)
        rows += take
    return rows


def shard(items: list, rank: int, world: int) -> list:
    """This process's share of a global batch: every world-th item from its rank (all when alone)."""
    return items[rank::world]


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's generators (torch.manual_seed seeds every CUDA device too)."""
    random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_mb(device: str) -> float:
    """Peak memory of the run: allocated on the GPU, or the process's resident set on the CPU."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


GLOBAL_BATCH = "train.batch_size × processes"
# Spec keys that do not change what a run computes: a resume may differ in these (a new time
# budget, data files moved but byte-identical — the data is compared by its sha256 instead).
_RESUME_FREE_KEYS = ("name", "train.max_minutes", "train.eval_batch_size", "data.train", "data.dev")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "labels":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_identity(spec: TaskSpec, data: dict, processes: int = 1) -> dict:
    """What a checkpoint resumes: the spec's training-relevant keys and the data's sha256, with a hash of both.

    Stored in the checkpoint (plain JSON-like values, so torch.load(weights_only=True) reads it)
    and compared on resume, so an edited spec or data file is refused instead of silently continuing
    with the old optimizer and schedule. The process count is not part of it, the global batch is:
    a run resumes under any process count whose batch_size × processes is the same.
    """
    keys = {k: v for k, v in _flatten(spec.to_dict()).items() if k not in _RESUME_FREE_KEYS}
    keys[GLOBAL_BATCH] = keys.pop("train.batch_size") * processes
    splits = {name: split.sha256 for name, split in data.items()}
    blob = json.dumps({"spec": keys, "data": splits}, sort_keys=True, default=str).encode()
    return {"sha256": hashlib.sha256(blob).hexdigest(), "spec": json.loads(json.dumps(keys, default=str)), "data": splits}


def joint_identity(specs: list[TaskSpec], cfg, data: dict, processes: int = 1) -> dict:
    """One run identity for the tasks and the joint settings (cfg: a joint_config.JointConfig; checked on resume;
    the global batch counts, not the process count)."""
    ids = {s.name: run_identity(s, data[s.name], processes) for s in specs}
    settings = {k: v for k, v in cfg.to_dict().items() if k != "max_minutes"}
    settings[GLOBAL_BATCH] = settings.pop("batch_size") * processes
    spec = {f"{n}.{k}": v for n, i in ids.items() for k, v in i["spec"].items()} | {f"joint.{k}": v for k, v in settings.items()}
    data_ = {f"{n}/{k}": v for n, i in ids.items() for k, v in i["data"].items()}
    blob = json.dumps({"spec": spec, "data": data_}, sort_keys=True, default=str).encode()
    return {"sha256": hashlib.sha256(blob).hexdigest(), "spec": json.loads(json.dumps(spec, default=str)), "data": data_}


def check_resume(saved: dict | None, now: dict, where, processes: int = 1) -> None:
    """Refuse a resume whose spec or data differ from the checkpoint's, naming each difference (`processes`: this
    run's count, to say which train.batch_size gives the checkpoint's global batch under it)."""
    if saved is None:
        raise TrainingError(f"checkpoint in {where} records no spec or data hash (written by an older version); run with --overwrite instead of --resume to start fresh")
    if saved["sha256"] == now["sha256"]:
        return
    changed = [f"{k}: {saved['spec'].get(k)!r} → {now['spec'].get(k)!r}" for k in sorted(set(saved["spec"]) | set(now["spec"]))
               if saved["spec"].get(k) != now["spec"].get(k)]
    changed += [f"data {k}: sha256 {str(saved['data'].get(k))[:12]} → {str(now['data'].get(k))[:12]}"
                for k in sorted(set(saved["data"]) | set(now["data"])) if saved["data"].get(k) != now["data"].get(k)]
    raise TrainingError(f"--resume refused: the checkpoint in {where} was written for another spec or data ({'; '.join(changed)}); "
                        f"{_global_batch_fix(saved['spec'], now['spec'], processes)}restore them, or run without --resume "
                        "(and with --overwrite) to start fresh")


def _global_batch_fix(saved: dict, now: dict, processes: int) -> str:
    """The fix when the global batch differs (a resume under another process count with the same train.batch_size, which
    'restore them' leaves the user to work out): the batch_size that gives the checkpoint's under this many processes."""
    for key in sorted(saved):
        old = saved.get(key)
        if key.endswith(GLOBAL_BATCH) and isinstance(old, int) and old != now.get(key):
            if old % processes == 0:
                return f"under {processes} process(es) give train.batch_size={old // processes} (the checkpoint's global batch {old}); "
            return f"the checkpoint's global batch {old} does not divide among {processes} processes: resume under a count that divides it; "
    return ""

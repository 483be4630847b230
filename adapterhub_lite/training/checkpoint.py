"""Checkpoints through accelerate, swapped in atomically.

A checkpoint folder holds accelerate's `save_state` (optimizer, scheduler, every process's RNG
states — CUDA included) and our `state.pt`: the adapter's own weights (by their unwrapped names,
so a run resumes under any process count), the run's progress, the recipe's state (data cursors,
task sampler, loss weights) and the spec/data identity that resume checks. accelerate is told not
to save the model: its weights are the frozen backbone's, hundreds of MB that never change.

A new checkpoint is written to `checkpoint.tmp/` and only then replaces `checkpoint/`; the
previous one stays until the new one is complete. A crash between the two renames leaves the
previous one as `checkpoint.old/`, which `find` then uses. `checkpoint.tmp/` is never read.
Everything is read with `weights_only=True` (accelerate's loader does the same for its files):
a planted file cannot run code.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from adapterhub_lite.training.parallel import Parallel
from adapterhub_lite.training.progress import TrainingError


class Checkpoint:
    """The checkpoint folder of a run's work folder (rank 0 writes `state.pt` and swaps)."""

    def __init__(self, work: Path, parallel: Parallel | None = None):
        self.work = Path(work)
        self.dir = self.work / "checkpoint"
        self.parallel = parallel
        if parallel is not None:  # accelerate keeps optimizer/scheduler/RNG; the adapter is in state.pt
            acc = parallel.accelerator
            acc.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
            acc.register_load_state_pre_hook(lambda models, input_dir: models.clear())

    def find(self) -> Path | None:
        """The complete checkpoint folder to resume from (the newest), or None."""
        for folder in (self.dir, self.dir.with_name("checkpoint.old")):
            if (folder / "state.pt").is_file():
                return folder
        return None

    def exists(self) -> bool:
        return self.find() is not None

    def step(self) -> int | None:
        """The step the checkpoint was written at (None when there is none, or it cannot be read safely)."""
        folder = self.find()
        if folder is None:
            return None
        try:
            step = _payload(folder)["state"]["step"]
        except Exception:  # a cut or foreign file: the caller says the step is unreadable
            return None
        return step if isinstance(step, int) else None

    def save(self, payload: dict) -> None:
        """Write `payload` (tensors and plain values) + accelerate's state, then swap it in.

        Every process calls it. A failed write (a full disk) removes the temp folder, keeps the
        previous checkpoint and raises TrainingError on every process.
        """
        par = self.parallel
        tmp, old = self.dir.with_name("checkpoint.tmp"), self.dir.with_name("checkpoint.old")
        if par.main:
            if not self.dir.exists() and old.exists():  # the last swap was interrupted: finish it first
                old.rename(self.dir)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        par.barrier()
        problem = None
        try:
            par.accelerator.save_state(str(tmp), safe_serialization=True)
            if par.main:
                torch.save(payload, tmp / "state.pt")
        except OSError as exc:
            problem = exc.strerror or type(exc).__name__
        if par.agree(problem is not None):
            if par.main:
                shutil.rmtree(tmp, ignore_errors=True)
            kept = f"the previous checkpoint in {self.dir} is kept" if self.dir.exists() else "no earlier checkpoint exists"
            raise TrainingError(f"cannot write a checkpoint in {self.work} ({problem or 'failed on another process'}); {kept}; "
                                "free space and rerun with --resume")
        if par.main:
            if self.dir.exists():
                shutil.rmtree(old, ignore_errors=True)
                self.dir.rename(old)
            tmp.rename(self.dir)
            shutil.rmtree(old, ignore_errors=True)
        par.barrier()

    def load(self) -> dict:
        """Restore optimizer, scheduler and this process's RNG states; return the payload save() wrote."""
        folder = self.find()
        if folder is None:
            raise TrainingError(f"--resume given but {self.dir} does not exist; run without --resume to start fresh")
        try:
            payload = _payload(folder)
            self.parallel.accelerator.load_state(str(folder))
        except Exception as exc:  # UnpicklingError for anything but tensors and plain values; EOFError for a cut file
            raise TrainingError(f"cannot read checkpoint {folder} safely ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}); "
                                "run with --overwrite instead of --resume to discard it and start fresh") from None
        return payload


def _payload(folder: Path) -> dict:
    """The `state.pt` save() wrote in a checkpoint folder, read weights_only: tensors and plain values only, so a
    planted file cannot run code here (UnpicklingError for anything else, EOFError for a cut file)."""
    return torch.load(folder / "state.pt", map_location="cpu", weights_only=True)

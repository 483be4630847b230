"""Where a run writes: a hidden work folder beside the output, and the finished folder moved into
place whole at the end, so a crash never leaves half an adapter where a user or the registry looks."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from adapterhub_lite.artifacts.files import atomic_write, open_lock_file, os_problem, write_jsonl
from adapterhub_lite.artifacts.folder import check_finite, model_card, plot_curves, replaceable
from adapterhub_lite.artifacts.sidecar import Sidecar, base_record, build
from adapterhub_lite.core.data import label_words
from adapterhub_lite.core.errors import DataError, OutputExistsError
from adapterhub_lite.core.spec import TaskSpec
from adapterhub_lite.training.checkpoint import Checkpoint
from adapterhub_lite.training.progress import TrainingError


@contextlib.contextmanager
def claim_output(output: Path, overwrite: bool, resume: bool):
    """Hold `output` for one run (yields its work folder, as prepare_output): its parent is checked to be a
    writable folder (missing folders are created, and removed again if the run leaves them empty), then
    rank 0 takes a lock on a sibling `.NAME.lock` (non-blocking: a second run into the same output is
    refused and touches nothing), held until the finished folder is in place. The other processes of a
    data-parallel run (torchrun: RANK > 0) take no lock: only rank 0 writes.
    """
    output = Path(output)
    missing = check_parent(output)
    writer = int(os.environ.get("RANK", "0") or 0) == 0
    created, lock = [], None
    try:
        if writer:
            for folder in missing:
                try:
                    folder.mkdir(exist_ok=True)
                except OSError as exc:  # os.access passes what mkdir may still refuse (root under /proc, ENOSPC, a quota)
                    raise DataError(f"--output {str(output)!r} cannot be written: folder {str(folder)!r} cannot be created "
                                    f"({os_problem(exc)}); pick an --output in a folder you can write to") from None
                created.append(folder)
            lock = _lock(output)
        yield prepare_output(output, overwrite, resume)
    finally:
        if lock is not None:  # unlinked while still held: a peer that opened this inode retries on a fresh file
            with contextlib.suppress(OSError):
                Path(lock.lock_file).unlink()
            lock.release()
        for folder in reversed(created):  # only the folders this run made, and only while empty
            with contextlib.suppress(OSError):
                folder.rmdir()


def _lock(output: Path):
    from filelock import FileLock, Timeout  # imported here: `import adapterhub_lite` stays free of fcntl/msvcrt

    path = output.parent / f".{output.name}.lock"
    try:
        open_lock_file(path)
    except OSError as exc:
        raise DataError(f"--output {str(output)!r} cannot be written: its lock file cannot be created ({os_problem(exc)}); "
                        "pick an --output in a folder you can write to") from None
    lock = FileLock(str(path), blocking=False)
    try:
        lock.acquire()
    except Timeout:
        raise OutputExistsError(f"output {str(output)!r} is being written by another run right now (it holds {path}); "
                                "wait for that run to finish, or pick another --output") from None
    return lock


def check_parent(output: Path) -> list[Path]:
    """Refuse an --output whose nearest existing ancestor is not a writable folder, before anything loads;
    return the missing folders between it and the output, outermost first."""
    missing, folder = [], Path(output).parent
    try:
        while not (folder.exists() or folder.is_symlink()):
            missing.append(folder)
            folder = folder.parent
    except OSError as exc:  # stat's own refusal, e.g. a path component over the file system's 255 bytes (ENAMETOOLONG)
        raise DataError(f"--output {str(output)!r} cannot be written: {os_problem(exc)}; pick a shorter or valid --output") from None
    if not folder.is_dir():
        raise DataError(f"--output {str(output)!r} cannot be written: {str(folder)!r} is a file, not a folder; "
                        "pick an --output whose parent is a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DataError(f"--output {str(output)!r} cannot be written: folder {str(folder)!r} is not writable by this user; "
                        "pick an --output in a folder you can write to")
    return missing[::-1]


def prepare_output(output: Path, overwrite: bool, resume: bool) -> Path:
    """The hidden work folder beside `output`; refuses what cannot be written before anything is.

    `--overwrite` replaces only what this package writes (see folder.replaceable): a user's file or
    a folder of other things is refused, never renamed or deleted. A fresh run (no --resume) into an
    output whose work folder holds an interrupted run's checkpoint is refused unless --overwrite
    (which discards it: remove_work); a fresh run would silently replace it.
    """
    output = Path(output)
    work = output.parent / f".{output.name}.partial"
    ckpt = Checkpoint(work)
    if resume and not ckpt.exists() and (output.exists() or output.is_symlink()):
        # "run without --resume" would only meet "already exists": a finished run needs --overwrite to train again
        raise OutputExistsError(f"--resume given but {str(output)!r} already exists and {work} holds no checkpoint (a finished run): "
                                "nothing to resume; train it again with "
                                "--overwrite (without --resume), or give another --output")
    if resume and not ckpt.exists():
        raise OutputExistsError(f"--resume given but {work}/checkpoint does not exist; run without --resume to start fresh")
    if not resume and not overwrite and ckpt.exists():
        step = ckpt.step()
        at = f"at step {step}" if step is not None else "(its step is unreadable)"
        raise OutputExistsError(f"{ckpt.find()} holds an interrupted run {at} for {str(output)!r}; rerun with --resume to "
                                "continue it, or with --overwrite to discard it and start over (train(): resume=True / overwrite=True)")
    if output.exists() or output.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"output folder {str(output)!r} already exists; pass --overwrite to replace it (train(): overwrite=True) or another --output")
        refuse_unreplaceable(output)
    return work


def remove_work(work: Path) -> None:
    """Remove a run's work folder: after its output is in place, or (--overwrite without --resume) an interrupted run's,
    checkpoint included, before training starts. Its checkpoints' `state.pt` (what marks a checkpoint: Checkpoint.find) first, the
    previous one's before the newest. rmtree goes in the directory's order: a process killed during it could leave a
    state.pt beside a half-removed optimizer state, and the finished run was then taken for an interrupted one
    ("rerun with --resume", which then could not read it)."""
    for name in ("checkpoint.old", "checkpoint"):
        with contextlib.suppress(OSError):
            (work / name / "state.pt").unlink()
    shutil.rmtree(work, ignore_errors=True)


def refuse_unreplaceable(output: Path) -> None:
    """Refuse (OutputExistsError) an existing `output` that --overwrite may not replace (folder.replaceable says why)."""
    why = replaceable(output)
    if why:
        raise OutputExistsError(f"--overwrite refused for {str(output)!r}: {why}; --overwrite replaces only adapter folders "
                                "or empty folders: pick another --output")


def publish_folder(final: Path, output: Path) -> None:
    """Move the finished folder into place; an old folder (under --overwrite) goes only after.

    Only a folder this package wrote (or an empty one) is replaced; anything else is refused,
    checked again here because it may have appeared while training ran.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.exists() or output.is_symlink():
        refuse_unreplaceable(output)
        trash = output.with_name(f".{output.name}.old")
        shutil.rmtree(trash, ignore_errors=True)
        output.rename(trash)
        final.rename(output)
        shutil.rmtree(trash)
    else:
        final.rename(output)


@contextlib.contextmanager
def disk_errors(partial: Path, output: Path):
    """Turn an OSError while writing the final folder (a full disk, a read-only output) into one line,
    removing the half-written folder; the checkpoint stays, so --resume redoes only the end."""
    try:
        yield
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise TrainingError(f"cannot write the adapter for {str(output)!r} ({exc.strerror or type(exc).__name__}: "
                            f"{exc.filename or partial}); nothing was written there; free space or pick another --output, "
                            "then rerun with --resume") from None


def adapter_meta(spec: TaskSpec, backbone, data: dict, metrics: dict, *, routing: dict | None, command: str | None, **extra) -> Sidecar:
    """The sidecar of an adapter trained for `spec` on backbone `backbone` (extra: further Sidecar fields)."""
    return build(spec.name, task=spec.to_dict(), method=spec.method, base=base_record(spec.base, backbone),
                 label_words=label_words(spec) if spec.type == "classification" else None, metrics=metrics, routing=routing,
                 data={name: {"source": s.source, "sha256": s.sha256, "rows": len(s)} for name, s in data.items()},
                 command=command, **extra)


def finish_folder(folder: Path, meta: Sidecar, history: list[dict], primary: str) -> None:
    """Sidecar, model card, metrics log and curves beside the PEFT files of a finished adapter.

    Refuses (TrainingError) weights holding NaN or inf: such a folder would be served and published as if fine.
    """
    check_finite(folder, TrainingError)
    meta.save(folder)
    atomic_write(folder / "README.md", model_card(meta.to_dict()))  # replaces peft's stub card
    write_jsonl(folder / "metrics.jsonl", history)
    plot_curves(history, primary, folder / "curves.png")

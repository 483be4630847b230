"""Where a run writes: a hidden work folder beside the output, and the finished folder moved into
place whole at the end, so a crash never leaves half an adapter where a user or the registry looks."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from adapterhub_lite.artifacts.files import atomic_write, write_jsonl
from adapterhub_lite.artifacts.folder import check_finite, model_card, plot_curves, replaceable
from adapterhub_lite.artifacts.sidecar import Sidecar, base_record, build
from adapterhub_lite.core.data import label_words
from adapterhub_lite.core.errors import OutputExistsError
from adapterhub_lite.core.spec import TaskSpec
from adapterhub_lite.training.checkpoint import Checkpoint
from adapterhub_lite.training.progress import TrainingError


def prepare_output(output: Path, overwrite: bool, resume: bool) -> Path:
    """The hidden work folder beside `output`; refuses what cannot be written before anything is.

    `--overwrite` replaces only what this package writes (see folder.replaceable): a user's file or
    a folder of other things is refused, never renamed or deleted.
    """
    output = Path(output)
    work = output.parent / f".{output.name}.partial"
    if resume and not Checkpoint(work).exists():
        raise OutputExistsError(f"--resume given but {work}/checkpoint does not exist; run without --resume to start fresh")
    if output.exists() or output.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"output folder {str(output)!r} already exists; pass --overwrite to replace it or --output to pick another")
        refuse_unreplaceable(output)
    return work


def refuse_unreplaceable(output: Path) -> None:
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

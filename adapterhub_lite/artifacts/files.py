"""Files written so that a reader never sees half of one: a temp name beside the target, fsync, rename.

Every artifact (sidecar, adapter folder, registry index, predictions, scripts) is written through here.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, data: str | bytes, mode: int = 0o644) -> None:
    """Write a file so that it is either absent or complete, never partial (`mode` before it appears: 0o755 for a script)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode() if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # mkstemp makes 0600; these are files to share
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def share_files(folder: Path) -> None:
    """Make a folder's regular files 0644, as atomic_write does: some writers (safetensors, mkstemp) make them
    0600, which no other user could read, publish or serve. (Reading the umask would briefly change it for
    every thread of a server.)"""
    for p in Path(folder).iterdir():
        if p.is_file() and not p.is_symlink():
            os.chmod(p, 0o644)


def write_json(path: Path, obj) -> None:
    """`obj` as indented JSON, atomically."""
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, atomically."""
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))

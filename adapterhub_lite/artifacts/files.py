"""Files written so that a reader never sees half of one: a temp name beside the target, fsync, rename.

Every artifact (sidecar, adapter folder, registry index, predictions, scripts) is written through here.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
from pathlib import Path

from adapterhub_lite.core.errors import AdapterHubError

STALE_SECONDS = 24 * 3600  # a temp of another host (a shared or NFS folder) is cleared only after this long


def atomic_write(path: Path, data: str | bytes, mode: int = 0o644) -> None:
    """Write a file so that it is either absent or complete, never partial (`mode` before it appears: 0o755 for a script)."""
    path = Path(path)
    prefix = f".{path.name}.write-"
    sweep_stale(path.parent, prefix)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=_owned(prefix + "x" * 8))  # mkstemp's random part has no '-'
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


def os_problem(exc: OSError) -> str:
    """An OSError in a few words: 'No space left on device (ENOSPC) at /reg/x'."""
    code = errno.errorcode.get(exc.errno, type(exc).__name__) if exc.errno else type(exc).__name__
    return f"{exc.strerror or exc} ({code})" + (f" at {exc.filename}" if exc.filename else "")


def unwritable_output(what: str, output: str | Path, exc: OSError) -> AdapterHubError:
    """The one-line refusal of a command whose --output could not be written (a full disk, a read-only folder): the
    OS's reason and the fix, where the OSError's traceback said it in a dozen lines. Its writer has cleared its temp."""
    return AdapterHubError(f"cannot write {what} to --output {str(output)!r}: {os_problem(exc)}; free disk space or choose a "
                           "writable --output, then run again (nothing was written)")


def open_lock_file(path: Path) -> None:
    """Create the lock file `path` if missing, or open the one there for writing, as filelock will: filelock reports a
    file it cannot open (a folder in its place, another user's file, /proc) as a lock someone else holds, and waits
    for it. Called first, the OSError says what is wrong instead."""
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o644))


def host() -> str:
    """This machine's name as it goes into temp folder names (no path or '-'-splitting surprises before it)."""
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "unknown"


def owner() -> str:
    """`<pid>-<host>`: what a temp folder's name says of the process that made it, so that a later process can
    remove it once that one is gone (a SIGKILLed process cannot remove its own)."""
    return f"{os.getpid()}-{host()}"


def left_by_dead_process(pid: str, owner_host: str) -> bool:
    """Whether a temp folder named with `owner()`'s pid and host was left by a process of this host that has ended.
    Another host's processes cannot be checked from here (a shared or NFS folder): False for those."""
    import psutil  # cross-platform pid check (os.kill(pid, 0) would send CTRL_C_EVENT on Windows)

    return owner_host == host() and pid.isdigit() and not psutil.pid_exists(int(pid))


def temp_beside(path: Path, kind: str) -> Path:
    """A hidden name beside `path` to build it under, then rename: `.<name>.<kind>-<id>-<pid>-<host>`. A writer
    killed before its rename (SIGKILL, the OOM killer) cannot remove it; the name lets the next writer of `path`
    tell it from a live writer's, where a random name would stay beside the output for good: the dead writers' temps
    of this kind are swept here (sweep_stale), so every writer that names its temp this way clears them."""
    path = Path(path)
    prefix = f".{path.name}.{kind}-"
    sweep_stale(path.parent, prefix)
    name = prefix + uuid.uuid4().hex[:8]
    return path.with_name(name + _owned(name))


def _owned(name: str) -> str:
    """`-<pid>-<host>` to end a temp's name with, or "" where that would take it past a file name's 255 bytes (an
    output named at the limit is still written; its temp, if left, is then cleared after STALE_SECONDS only)."""
    tail = f"-{owner()}"
    return tail if len((name + tail).encode()) <= 255 else ""


def sweep_stale(parent: Path, prefix: str) -> None:
    """Remove the `<prefix><id>-<pid>-<host>` temps in `parent` (temp_beside's, atomic_write's, a publisher's) of
    processes of this host that have ended. Another host's pids cannot be checked from here, so its temps, and any of
    that prefix but of another form, go only when older than STALE_SECONDS: no writer holds its temp that long."""
    for tmp in left_behind(parent, prefix):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def left_behind(parent: Path, prefix: str) -> list[Path]:
    """The `<prefix><id>-<pid>-<host>` temps in `parent` whose writers have ended, by sweep_stale's rule (a dead pid of
    this host; another host's, or a name of another form, once older than STALE_SECONDS), in name order."""
    now, found = time.time(), []
    for tmp in sorted(Path(parent).glob(glob.escape(prefix) + "*")):
        parts = tmp.name[len(prefix):].split("-", 2)  # id, pid, host (a host may hold '-')
        try:
            age = now - tmp.lstat().st_mtime
        except OSError:
            continue  # cleared meanwhile
        if (len(parts) == 3 and left_by_dead_process(parts[1], parts[2])) or age > STALE_SECONDS:
            found.append(tmp)
    return found


def write_json(path: Path, obj) -> None:
    """`obj` as indented JSON, atomically."""
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, atomically."""
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))

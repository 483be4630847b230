"""One line for a usage error under torchrun / accelerate launch, not one per process.

Every process of a data-parallel run reads the same command line and files, so a bad input is refused by each of
them, in the same words. Rank 0 prints it; a process of higher rank stays quiet only when rank 0 refused the same
thing, as rank 0 left it in the launcher's key-value store (the c10d TCPStore at MASTER_ADDR:MASTER_PORT that
torchrun runs). A refusal that only one process meets (a device, a file on one node) is printed by that process,
so no failure is hidden. A leaf of the CLI: imports nothing of the package.
"""

from __future__ import annotations

import os
from datetime import timedelta

# How long a process of higher rank waits for rank 0's refusal: the ranks reach the same refusal at about the same
# time (same inputs, same checks); one that waits longer is stopped by the launcher when rank 0 exits anyway.
WAIT_S = 20.0


def _store():
    """The launcher's store as a client, or None outside torchrun (no MASTER_ADDR / MASTER_PORT) or when it cannot be reached."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port or not port.isdigit():
        return None
    try:
        from torch.distributed import TCPStore  # torch is imported only here, under a launcher

        return TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=WAIT_S), wait_for_workers=False)
    except (RuntimeError, OSError, ValueError):  # no store there (another launcher set RANK): every process speaks for itself
        return None


def said_by_rank0(message: str) -> bool:
    """Whether this process's refusal `message` is rank 0's, which rank 0 prints (so this process need not).

    Rank 0 records its message and answers False (it prints). Outside a launched run, always False.
    """
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    if not (rank.isdigit() and world.isdigit()) or int(world) <= 1:
        return False
    store = _store()
    if store is None:
        return False
    key = f"adapterhub_lite/refused/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    try:
        if int(rank) == 0:
            store.set(key, message)
            return False
        store.wait([key], timedelta(seconds=WAIT_S))
        return store.get(key).decode() == message
    except (RuntimeError, OSError, ValueError):  # rank 0 refused nothing in time (DistStoreError), or the store went away: say it here
        return False

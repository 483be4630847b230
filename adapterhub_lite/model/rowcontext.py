"""The slot table and each batch's slot assignment, shared by every per-row layer (rowlora.py) of one model.

A `RowContext` holds the *slot table* (slot → [(entry name, weight)]) and, while a batch runs, each row's
slot. The slot assignment of a batch — which slot each row uses, as one index tensor on the device — is
computed once per batch here, not once per layer: a layer never reads row ids back to the host. The layer
(rowlora.RowLoraLinear) reads the assignment and the table; it holds the factors, this holds no tensors of
an adapter.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass
class Assignment:
    """One batch's slot assignment (which slot each row uses), computed once and read by every layer.

    ("Routing" in this package means content routing, serving/routing.py; this is not that.)
    """

    id: int
    slots: tuple[int, ...]  # the distinct slots of the batch, in first-seen order (a live plan: every slot it may meet)
    index: torch.Tensor | None  # [B] position of each row's slot in `slots`; None when one slot serves every row
    per_row: list[int] | None  # each row's slot (host copy; None when one slot serves every row)
    device: torch.device | str | None
    _slot_ids: torch.Tensor | None = None
    # live: the rows' slots are read from a device buffer the caller rewrites in place (RowContext.plan_live), so the
    # layers gather from it at every call and cache nothing: a CUDA graph captured under it replays correctly for
    # whatever the buffer holds at replay.
    live: bool = False

    def slot_ids(self) -> torch.Tensor | int:
        """Each row's slot number as one device tensor (an int when one slot serves every row): the index into a
        slot pool, made once per batch and shared by every layer."""
        if self._slot_ids is not None:
            return self._slot_ids
        if self.per_row is None:
            return self.slots[0]
        self._slot_ids = torch.tensor(self.per_row, device=self.device)
        return self._slot_ids


class RowContext:
    """The slot table and the running batch's slot assignment, shared by every RowLoraLinear of a model.

    The slot table maps a slot (an int) to the entries it adds and their weights:
    bank: slot → [(adapter, 1.0)]; joint training: task i → [("shared", 1), (task, 1)];
    composition: the composed slot → [(source_j, w_j)] with w a (possibly trainable) tensor.
    """

    _ids = itertools.count(1)

    def __init__(self):
        self.table: dict[int, list[tuple[str, float | torch.Tensor]]] = {}
        self.version = 0  # bumped by define()/forget(): layers drop stacks built from the old table
        self.active: Assignment | None = None

    def define(self, slot: int, parts: list[tuple[str, float | torch.Tensor]]) -> None:
        """Let `slot` add Σ weight·update of the named entries."""
        self.table[slot] = list(parts)
        self.version += 1

    def forget(self, slot: int) -> None:
        """Drop `slot` from the table."""
        self.table.pop(slot, None)
        self.version += 1

    def plan(self, slots: list[int] | int | None, device: torch.device | str | None = None) -> Assignment | None:
        """The slot assignment of a batch whose row i uses slot slots[i] (an int: every row; None: none)."""
        if slots is None:
            return None
        if isinstance(slots, int):
            return Assignment(next(self._ids), (slots,), None, None, device)
        distinct = tuple(dict.fromkeys(slots))
        # One host → device copy per batch; every layer indexes with this same tensor.
        index = None if len(distinct) == 1 else torch.tensor([distinct.index(s) for s in slots], device=device)
        return Assignment(next(self._ids), distinct, index, None if index is None else list(slots), device)

    def plan_live(self, slot_ids: torch.Tensor) -> Assignment:
        """A plan whose row i uses slot slot_ids[i], read from that device buffer at every call (see Assignment.live):
        for a decode step captured once and replayed while rows come and go (serving/static.py)."""
        return Assignment(next(self._ids), tuple(self.table), None, None, slot_ids.device, _slot_ids=slot_ids, live=True)

    @contextmanager
    def using(self, plan: Assignment | None):
        """Run the model under a planned slot assignment (None: the plain base). Entering the same plan
        again (each decode step of a batch) reuses what the layers gathered for it."""
        saved, self.active = self.active, plan
        try:
            yield
        finally:
            self.active = saved

    def assign(self, slots: list[int] | int | None, device: torch.device | str | None = None):
        """Context: run the model with row i using slot slots[i] (an int: every row; None: the plain base)."""
        return self.using(self.plan(slots, device))

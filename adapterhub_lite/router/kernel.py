"""The per-row LoRA kernel: every row of a batch through its own low-rank update, in one pass.

For a linear layer y = W x, row i adds B_i A_i x_i (scale folded into B_i). The factors of the
adapters in the batch are zero-padded to the widest rank (exact: padded columns contribute 0),
stacked once per adapter, gathered per row, and applied with two batched matmuls. The same code
serves inference (the router's AdapterBank: accumulate in place) and joint multi-task training
(the factors are trainable parameters: gathering is differentiable and the update is added out of
place, so autograd sees every row's gradient reach its own adapter).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F


def stack_factors(factors: list[tuple[torch.Tensor, torch.Tensor]], index: torch.Tensor):
    """Per-row factors At [n, in, r_max] and Bt [n, r_max, out] for rows using factors[index[i]].

    factors: (A [r, in], B·scale [out, r]) per adapter; ranks may differ (zero-padded).
    """
    r_max = max(a.shape[0] for a, _ in factors)
    At = torch.stack([F.pad(a, (0, 0, 0, r_max - a.shape[0])).T for a, _ in factors])  # [u, in, r_max]
    Bt = torch.stack([F.pad(b, (0, r_max - b.shape[1])).T for _, b in factors])  # [u, r_max, out]
    if len(factors) == 1:  # one adapter for every row: a broadcast view, no per-row copies
        return At.expand(len(index), -1, -1), Bt.expand(len(index), -1, -1)
    return At.index_select(0, index), Bt.index_select(0, index)


def gather(ids: list, lookup, device):
    """Per-row adapter ids → (rows that have factors here, None = all; At; Bt), or None if no row has.

    lookup(id) gives an adapter's (A, B·scale) at this module or None; it is called once per
    distinct id of the batch, never for adapters the batch does not use.
    """
    found = {a: lookup(a) for a in dict.fromkeys(ids)}
    used = [a for a, f in found.items() if f is not None]
    rows = [i for i, a in enumerate(ids) if found[a] is not None]
    if not rows:
        return None
    slot = {a: j for j, a in enumerate(used)}
    At, Bt = stack_factors([found[a] for a in used], torch.tensor([slot[ids[i]] for i in rows], device=device))
    keep = None if len(rows) == len(ids) else torch.tensor(rows, dtype=torch.long, device=device)
    return keep, At, Bt


def add_rows(out: torch.Tensor, x: torch.Tensor, At: torch.Tensor, Bt: torch.Tensor,
             rows: torch.Tensor | None = None) -> torch.Tensor:
    """out[rows] += x[rows] @ At @ Bt (every row when rows is None); returns out.

    x [B, T, in], out [B, T, out]. In place when autograd is off (no copy of the layer's output);
    out of place when it is on, which costs one copy but keeps the graph simple and correct.
    """
    xs = x if rows is None else x.index_select(0, rows)
    xa = torch.bmm(xs.to(At.dtype), At)
    grad = torch.is_grad_enabled()
    if rows is None and not grad and out.dtype == At.dtype:
        return out.baddbmm_(xa, Bt)  # the common serving case: no temporary [B, T, out] at all
    delta = torch.bmm(xa, Bt).to(out.dtype)
    if rows is None:
        return out + delta if grad else out.add_(delta)
    return out.index_add(0, rows, delta) if grad else out.index_add_(0, rows, delta)


class RowLora:
    """Per-row LoRA on a model's linear layers, through the kernel above, with autograd.

    `factors(module_name, adapter)` returns that adapter's (A [r, in], B·scale [out, r]) at a
    module, or None where it has none; they are recomputed on every forward, so they may be live
    functions of trainable parameters (joint training, learned composition weights). Inside
    `route(index)` row i of every batch uses adapter index[i] (an int: every row the same).
    """

    def __init__(self, modules: dict[str, torch.nn.Module], factors, dropout: float = 0.0):
        self.factors, self.dropout = factors, dropout
        self.index: torch.Tensor | int | None = None
        for name, m in modules.items():
            m.register_forward_hook(self._hook(name))

    @contextmanager
    def route(self, index: torch.Tensor | int):
        """Context in which the hooks act (outside it the model runs without these adapters)."""
        saved, self.index = self.index, index
        try:
            yield
        finally:
            self.index = saved

    def _hook(self, name: str):
        def hook(module, args, out):
            if self.index is None:
                return None
            x = args[0]
            ids = [self.index] * len(x) if isinstance(self.index, int) else self.index.tolist()
            gathered = gather(ids, lambda a: self.factors(name, a), x.device)
            if gathered is None:  # no row of this batch has an adapter on this module
                return None
            if self.dropout and module.training:
                x = F.dropout(x, self.dropout, training=True)  # on the LoRA branch only, as peft does
            rows, At, Bt = gathered
            return add_rows(out, x, At, Bt, rows)

        return hook

"""Per-row LoRA (and IA3): one linear layer in which every row of a batch uses its own adapter.

peft applies one adapter (or one set of active adapters) to the whole batch. Serving many tasks
at once, training several task adapters in one pass, and composing adapters all need the same
thing instead: row i of the batch adds Σ_k w_k · s_k · B_k A_k x_i over the adapters its *slot*
names. This module is that one idea, in the shape of a peft tuner layer:

- `RowLoraLinear` wraps a `base_layer` (nn.Linear, bitsandbytes Linear8bitLt or Linear4bit): the
  base runs as it is (quantized or not) and the per-row update is added to its output.
- It holds *entries*: name → (A [r, in], B [out, r], scale), each at its own rank. They may be
  plain tensors (serving: the router's bank) or live trainable parameters (joint training,
  learned composition): the layer never copies them into state of its own. An entry may also
  carry a *bias*, an offset [out] its rows add (what peft's bias="lora_only" and lora_bias=True
  change: rowconfig.bias_deltas); a slot adds Σ w_k · c_k of its entries'.
- A `RowContext` (rowcontext.py), shared by every RowLoraLinear of one model, holds the *slot
  table* (slot → [(entry name, weight)]) and each batch's slot assignment, computed once per batch.

The update of a slot is its entries' factors concatenated along the rank (w·s folded into B),
zero-padded to the widest slot of the batch (exact: padded columns add 0), stacked, gathered per
row, and applied with two batched matmuls.

The same layer also carries IA3 (peft's (IA)³): *scale entries* name → (vector l, on_input). As
peft's IA3 Linear computes it, a module listed in the adapter's `feedforward_modules` scales its
input, base(x ⊙ l); any other scales its output, base(x) ⊙ l (bias included). A slot's vectors
are built once per table version and gathered per row like the LoRA stacks; rows whose slot has no
scale entry at a layer get ones. One layer class serves both kinds, so `wrap`/`unwrap` by module
name stay one level deep whatever mix of adapters a model holds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adapterhub_lite.core.errors import AdapterLoadError
from adapterhub_lite.model.rowcontext import Assignment, RowContext


def _pick_rows(stack: torch.Tensor, pick: torch.Tensor | int | None) -> torch.Tensor:
    """Each row's entry of a per-slot stack [n, ...]: one slot for every row (an int pick, or a
    stack of one) gives that slot's entry alone, which broadcasts over the rows."""
    if isinstance(pick, int):
        return stack[pick]
    if pick is not None:
        return stack.index_select(0, pick)
    return stack[0] if stack.shape[0] == 1 else stack


class RowLoraLinear(torch.nn.Module):
    """A linear layer (`base_layer`) plus per-row LoRA updates and IA3 scalings assigned by a shared RowContext.

    Row i computes s_out ⊙ base(s_in ⊙ x_i) + ΔW x_i + c, with its slot's IA3 vectors s_in / s_out
    (ones where the slot has none), its slot's LoRA update ΔW and its bias offset c (zero where it has none).
    """

    def __init__(self, base_layer: torch.nn.Module, context: RowContext, dropout: float = 0.0, cache: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self.context = context
        self.dropout = dropout
        # cache=True (serving): entries never change in place, so stacks built for one table
        # version are reused across batches. Trainable entries change at every optimizer step, so
        # training rebuilds them per forward (and under autograd must, to carry the gradient).
        self.cache = cache
        self.entries: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self.scales: dict[str, tuple[torch.Tensor, bool]] = {}  # IA3: name → (vector l, on_input)
        self.biases: dict[str, torch.Tensor] = {}  # name → the offset [out] its rows add (an entry's trained bias)
        self.in_features = getattr(base_layer, "in_features", None)
        self.out_features = getattr(base_layer, "out_features", None)
        self._pool: tuple | None = None  # cache=True: (At [S, in, R], Bt [S, R, out], C [S, out] | None), slot s at index s (see _sync_pool)
        self._pool_slots: dict = {}  # slot → what was copied there (its entries' put numbers and weights)
        self._puts: dict[str, int] = {}  # name → the number of the put that holds its factors (see _sync_pool)
        self._pool_key: tuple | None = None  # (table version, entries version) the pool was synced at
        self.pool_rank: int | None = None  # a fixed pool rank (the server's --max-lora-rank); None: the widest held
        self.pool_slots: int | None = None  # a fixed slot count (the server's --max-loras + 1); None: the highest held + 1
        self._rows: tuple | None = None  # (plan key, the running batch's per-row stacks)
        self._scale_all: tuple | None = None  # as _all, for the IA3 vectors
        self._scale_rows: tuple | None = None  # as _rows: (plan key, (per-row s_in, per-row s_out))
        self._version = 0

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (as peft's tuner layers expose it), for code that reads its dtype or shape."""
        return self.base_layer.weight

    # -- entries ---------------------------------------------------------------------------------
    def put(self, name: str, a: torch.Tensor, b: torch.Tensor, scale: float, bias: torch.Tensor | None = None) -> None:
        """Hold adapter `name`'s factors at this layer: A [r, in], B [out, r], update = scale·B·A; `bias` [out]: an
        offset its rows add as well (taken as it is: no scale is applied to it)."""
        if a.shape[1] != self.in_features or b.shape != (self.out_features, a.shape[0]):
            raise AdapterLoadError(f"LoRA factors {tuple(a.shape)} / {tuple(b.shape)} do not fit a {self.in_features}→{self.out_features} layer")
        if bias is not None and bias.shape != (self.out_features,):
            raise AdapterLoadError(f"LoRA bias of shape {tuple(bias.shape)} does not fit a {self.in_features}→{self.out_features} layer")
        where = next(self.base_layer.parameters()).device
        if a.device != where or b.device != where or (bias is not None and bias.device != where):  # caught here, not deep in a matmul
            raise AdapterLoadError(f"LoRA factors on {a.device}/{b.device} for a layer on {where}; move them to {where} first")
        self.entries[name] = (a, b, scale)
        if bias is None:
            self.biases.pop(name, None)
        else:
            self.biases[name] = bias
        self._version += 1
        self._puts[name] = self._version

    def put_scale(self, name: str, vector: torch.Tensor, on_input: bool) -> None:
        """Hold IA3 adapter `name`'s vector here: on_input scales the input (peft's feedforward
        modules: base(x ⊙ l)), else the output (base(x) ⊙ l). The product is computed in the
        vector's dtype and rounded to the activation's once, as peft does with its fp32 vectors."""
        want = self.in_features if on_input else self.out_features
        if vector.numel() != want:
            side = "input" if on_input else "output"
            raise AdapterLoadError(f"IA3 vector of {vector.numel()} values does not fit the {side} of a {self.in_features}→{self.out_features} layer")
        where = next(self.base_layer.parameters()).device
        if vector.device != where:
            raise AdapterLoadError(f"IA3 vector on {vector.device} for a layer on {where}; move it to {where} first")
        self.scales[name] = (vector.reshape(-1), bool(on_input))
        self._version += 1

    def drop(self, name: str) -> None:
        """Forget adapter `name` here (its LoRA factors and its IA3 vector, whichever it has)."""
        self.entries.pop(name, None)
        self.biases.pop(name, None)
        self._puts.pop(name, None)
        self.scales.pop(name, None)
        self._version += 1

    def _pool_shape(self) -> tuple[int, int]:
        """(slots, rank) of the LoRA pool for the table as it is: the highest slot number + 1 (the bank reuses the
        lowest free slot, so this stops growing at the most adapters resident at once) and the widest rank held here
        (at least `pool_rank`, the server's --max-lora-rank). Both follow the table down as well as up, so evicting
        adapters frees what they took; the pool is reallocated only when one of them changes. With `pool_slots` and
        `pool_rank` fixed (--max-loras and --max-lora-rank) it is allocated once at that shape and never changes (its
        bias rows, [slots, out], are there only while an adapter with a trained bias is, see _sync_pool)."""
        need = max(self.context.table, default=0) + 1
        widest = max((e[0].shape[0] for e in self.entries.values()), default=0)
        return max(need, self.pool_slots or 0), max(widest, self.pool_rank or 0)

    def stack_nbytes(self) -> int:
        """Bytes of this layer's serving memory (cache=True): the LoRA pool at the shape the table needs (every slot
        at the widest rank, A and B, and a bias per slot while an entry here has one) and one IA3 vector per table
        slot on each scaled side. Computed from the entries, so it is known before the pool is resized (lazily, at
        the next forward)."""
        total = 0
        if self.entries:
            slots, rank = self._pool_shape()
            a = next(iter(self.entries.values()))[0]
            total += slots * (rank * (self.in_features + self.out_features) + (self.out_features if self.biases else 0)) * a.element_size()
        for on_input in {on for _, on in self.scales.values()}:
            vec = next(v for v, on in self.scales.values() if on == on_input)
            total += (max(self.context.table, default=0) + 1) * (self.in_features if on_input else self.out_features) * vec.element_size()
        return total

    def drop_rows(self) -> None:
        """Forget the per-row factors and vectors gathered for the last plan (its batch has ended): working memory of a
        batch is not kept while nothing runs; the next batch gathers its own."""
        self._rows = self._scale_rows = None

    def row_nbytes(self) -> int:
        """Bytes of the running batch's per-row factors and IA3 vectors: what the last plan gathered from the pool,
        one row each at the pool's rank (working memory that grows with the batch's rows, as its activations do;
        it outlives the step, cached for the batch's next steps). Views of the pool (one slot serving every row)
        take none. Steps replayed from a CUDA graph gather into the graph's own memory instead."""
        pools = (*(self._pool or ()), *(self._scale_all[1][:2] if self._scale_all else ()))
        shared = {t.untyped_storage().data_ptr() for t in pools if isinstance(t, torch.Tensor)}  # (inference mode keeps no _base)
        total = 0
        for cached in (self._rows, self._scale_rows):
            if cached is not None and cached[1] is not None:
                total += sum(t.numel() * t.element_size() for t in cached[1]
                             if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in shared)
        return total

    def _sync_pool(self) -> None:
        """Serving (cache=True): make the slot pool (At [S, in, R], Bt [S, R, out], indexed by the slot number itself)
        hold the table, copying only the slots whose entries changed: loading an adapter is one copy into its slot
        per layer, not a rebuild of every resident adapter's stack. A slot with nothing here stays zero (exact: it
        adds 0). The pool is reallocated only when a slot number or a rank outgrows it."""
        ctx = self.context
        if self._pool_key == (ctx.version, self._version):
            return
        if not self.entries:
            self._pool, self._pool_slots, self._pool_key = None, {}, (ctx.version, self._version)
            return
        slots, rank = self._pool_shape()
        ref = next(iter(self.entries.values()))[0]
        if self._pool is None or (slots, rank) != (self._pool[0].shape[0], self._pool[0].shape[2]):
            self._pool = (ref.new_zeros(slots, self.in_features, rank), ref.new_zeros(slots, rank, self.out_features), None)
            self._pool_slots = {}  # nothing copied into the new pool yet
        if bool(self.biases) != (self._pool[2] is not None):
            # The bias rows exist only while an entry here has a bias (a layer without one adds nothing per row), and
            # come and go without touching A and B. Zero rows are right for every slot copied so far: an entry that
            # has a bias now was put since, so its slot's key changed and it is copied below.
            self._pool = (*self._pool[:2], ref.new_zeros(slots, self.out_features) if self.biases else None)
        keys = {}
        for slot, parts in ctx.table.items():
            # Which put holds each entry, not id() of its tensors: an adapter dropped and put again under its name (a
            # reload) may get tensors at the freed objects' addresses, and its slot would keep the old factors
            key = tuple((n, self._puts[n], self.entries[n][2], w) for n, w in parts if n in self.entries)
            if key:
                keys[slot] = key
        At, Bt, C = self._pool
        for slot in set(self._pool_slots) - set(keys):  # left (or changed to nothing here): back to zero
            At[slot].zero_()
            Bt[slot].zero_()
            if C is not None:
                C[slot].zero_()
        for slot, key in keys.items():
            if self._pool_slots.get(slot) != key:
                a, b = self.slot_factors(slot)
                r = a.shape[0]
                At[slot, :, :r].copy_(a.T)
                At[slot, :, r:].zero_()
                Bt[slot, :r].copy_(b.T)
                Bt[slot, r:].zero_()
                if C is not None:
                    c = self.slot_bias(slot)
                    if c is None:
                        C[slot].zero_()
                    else:
                        C[slot].copy_(c)
        self._pool_slots, self._pool_key = keys, (ctx.version, self._version)

    # -- the kernel --------------------------------------------------------------------------------
    def slot_factors(self, slot: int):
        """(A [R, in], B·w·s [out, R]) of one slot here, its entries concatenated; None if it has none."""
        parts = [(self.entries[n], w) for n, w in self.context.table.get(slot, ()) if n in self.entries]
        if not parts:
            return None
        if len(parts) == 1:
            (a, b, s), w = parts[0]
            return a, b * (s * w)
        return torch.cat([a for (a, _, _), _ in parts]), torch.cat([b * (s * w) for (_, b, s), w in parts], dim=1)

    def slot_bias(self, slot: int) -> torch.Tensor | None:
        """Σ w·c [out] of one slot's entries' biases here; None if none of them has one."""
        parts = [(self.biases[n], w) for n, w in self.context.table.get(slot, ()) if n in self.biases and n in self.entries]
        if not parts:
            return None
        return parts[0][0] if len(parts) == 1 and not isinstance(parts[0][1], torch.Tensor) and parts[0][1] == 1 else sum(c * w for c, w in parts)

    def _stack(self, slots) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """At [n, in, R], Bt [n, R, out] (zero-padded to the widest R) and C [n, out] (None if no slot has a bias) for the slots given."""
        factors = [self.slot_factors(s) for s in slots]
        if all(f is None for f in factors):
            return None
        ref = next(f for f in factors if f is not None)[0]
        r_max = max(f[0].shape[0] for f in factors if f is not None)
        zero_a = ref.new_zeros(r_max, self.in_features)
        zero_b = ref.new_zeros(self.out_features, r_max)
        At = torch.stack([zero_a.T if f is None else F.pad(f[0], (0, 0, 0, r_max - f[0].shape[0])).T for f in factors])
        Bt = torch.stack([zero_b.T if f is None else F.pad(f[1], (0, r_max - f[1].shape[1])).T for f in factors])
        biases = [self.slot_bias(s) for s in slots]
        C = None if all(c is None for c in biases) else torch.stack([ref.new_zeros(self.out_features) if c is None else c for c in biases])
        return At, Bt, C

    def _per_row(self, plan: Assignment):
        """The plan's per-row factors (At [B|1, in, R], Bt [B|1, R, out], C [B|1, out] | None) or None; built once per batch.

        Serving (cache=True) reads the slot pool (_sync_pool), so a batch costs one index_select per
        layer (a slice when one slot serves every row) and its decode steps reuse that. Otherwise the
        stack holds just the batch's slots, rebuilt per forward under autograd so the gradient reaches
        the entries.
        """
        ctx = self.context
        key = (plan.id, ctx.version, self._version)
        if (self.cache or not torch.is_grad_enabled()) and not plan.live and self._rows is not None and self._rows[0] == key:
            return self._rows[1]
        if self.cache:
            self._sync_pool()
            if self._pool is None or not any(slot in self._pool_slots for slot in plan.slots):
                stacks, pick = None, None  # no row of this batch is adapted here: no matmul at all
            else:
                stacks, pick = self._pool, plan.slot_ids()
        else:
            stacks, pick = self._stack(plan.slots), plan.index
        if isinstance(pick, torch.Tensor) and stacks is not None and pick.device != stacks[0].device:
            pick = pick.to(stacks[0].device)  # a plan made without a device: one copy, then cached
        if stacks is not None:  # views [in, R], [R, out], [out] when one slot serves every row
            stacks = tuple(None if s is None else _pick_rows(s, pick) for s in stacks)
        if (self.cache or not torch.is_grad_enabled()) and not plan.live:
            self._rows = (key, stacks)
        return stacks

    def _scale_stack(self, slots) -> tuple[torch.Tensor | None, torch.Tensor | None, frozenset]:
        """(s_in [n, in] | None, s_out [n, out] | None, the slots with a vector here) for the slots given.

        A slot's vector is the product of its entries' vectors (peft multiplies its active IA3
        adapters' vectors); an entry of weight w contributes 1 + w·(l − 1) (its own l at w = 1,
        taken as it is so that the plain case stays exact; ones at w = 0).
        """
        ins, outs = [], []
        for slot in slots:
            acc = {True: None, False: None}  # on_input → the slot's vector so far
            for n, w in self.context.table.get(slot, ()):
                if n not in self.scales:
                    continue
                vec, on_input = self.scales[n]
                v = vec if not isinstance(w, torch.Tensor) and w == 1 else 1 + w * (vec - 1)
                acc[on_input] = v if acc[on_input] is None else acc[on_input] * v
            ins.append(acc[True])
            outs.append(acc[False])
        scaled = frozenset(s for s, i, o in zip(slots, ins, outs) if i is not None or o is not None)

        def stack(vs, width):
            if all(v is None for v in vs):
                return None
            ones = next(v for v in vs if v is not None).new_ones(width)
            return torch.stack([ones if v is None else v for v in vs])
        return stack(ins, self.in_features), stack(outs, self.out_features), scaled

    def _per_row_scales(self, plan: Assignment) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The plan's IA3 vectors (s_in, s_out), each [B, n], [n] (one slot serves every row) or None;
        built once per batch, cached as _per_row caches the LoRA stacks."""
        ctx = self.context
        key = (plan.id, ctx.version, self._version)
        if (self.cache or not torch.is_grad_enabled()) and not plan.live and self._scale_rows is not None and self._scale_rows[0] == key:
            return self._scale_rows[1]
        if self.cache:
            # one vector per slot number (ones where a slot has none here), so a row's slot number indexes it directly,
            # as it indexes the LoRA pool: no host-side lookup per batch
            if self._scale_all is None or self._scale_all[0] != key[1:]:
                self._scale_all = (key[1:], self._scale_stack(range(max(ctx.table, default=0) + 1)))
            s_in, s_out, scaled = self._scale_all[1]
        else:
            s_in, s_out, scaled = self._scale_stack(plan.slots)
        picked = (None, None)
        if not scaled.isdisjoint(plan.slots):  # else no row of this batch is scaled here: no multiply at all
            pick = plan.slot_ids() if self.cache else plan.index
            ref = s_in if s_in is not None else s_out
            if isinstance(pick, torch.Tensor) and pick.device != ref.device:
                pick = pick.to(ref.device)
            picked = tuple(None if s is None else _pick_rows(s, pick) for s in (s_in, s_out))
        if (self.cache or not torch.is_grad_enabled()) and not plan.live:
            self._scale_rows = (key, picked)
        return picked

    @staticmethod
    def _scaled(t: torch.Tensor, s: torch.Tensor, in_place: bool) -> torch.Tensor:
        """t ⊙ s, row i of t by row i of s (s [B, n]) or every row by s ([n]); computed in the
        promoted dtype and rounded to t's once, as peft's (t.to(l.dtype) · l).to(t.dtype)."""
        if s.dim() == 2:
            if s.shape[0] != t.shape[0]:
                raise AdapterLoadError(f"per-row IA3 got {t.shape[0]} rows but the assigned batch has {s.shape[0]}; assign the batch that is being run")
            s = s.view(s.shape[0], *[1] * (t.dim() - 2), s.shape[1])
        if torch.is_grad_enabled():
            return (t * s).to(t.dtype)  # out of place under autograd
        if in_place:
            return t.mul_(s)  # the base layer's fresh output, scaled where it lies
        return torch.mul(t, s, out=torch.empty_like(t))  # no temporary in the promoted dtype

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        plan = self.context.active
        s_in = s_out = None
        if plan is not None and self.scales:
            s_in, s_out = self._per_row_scales(plan)
        out = self.base_layer(x if s_in is None else self._scaled(x, s_in, in_place=False), *args, **kwargs)
        if s_out is not None:
            out = self._scaled(out, s_out, in_place=True)
        if plan is None or not self.entries:
            return out
        stacks = self._per_row(plan)
        if stacks is None:  # no slot of this batch adapts this layer
            return out
        At, Bt, C = stacks
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout, training=True)  # on the LoRA branch only, as peft does
        if x.dtype != At.dtype:
            x = x.to(At.dtype)
        # Every op here runs once per adapted layer per step, so the common cases take the fewest:
        # under inference the update is accumulated into the base output in place.
        inplace = not torch.is_grad_enabled() and out.dtype == At.dtype and out.is_contiguous()
        if At.dim() == 2:  # one slot serves every row: plain matmuls over all tokens
            xa = x @ At
            if inplace:
                out.view(-1, out.shape[-1]).addmm_(xa.view(-1, xa.shape[-1]), Bt)
                return out if C is None else out.add_(C)
            y = xa @ Bt
            return out + (y if C is None else y + C).to(out.dtype)  # out of place under autograd
        flat = x.dim() == 2  # [B, in], e.g. the LM head on each row's last hidden state
        xs, ys = (x[:, None], out[:, None]) if flat else (x, out)
        if At.shape[0] != xs.shape[0]:
            raise AdapterLoadError(f"per-row LoRA got {xs.shape[0]} rows but the assigned batch has {At.shape[0]}; assign the batch that is being run")
        xa = torch.bmm(xs, At)
        if inplace:
            ys.baddbmm_(xa, Bt)  # no [B, T, out] temporary
            if C is not None:
                ys.add_(C[:, None])
            return out
        y = torch.bmm(xa, Bt)
        y = ys + (y if C is None else y + C[:, None]).to(ys.dtype)  # out of place under autograd: every row's gradient reaches its own entries
        return y[:, 0] if flat else y


def wrap(model: torch.nn.Module, names, context: RowContext, **kwargs) -> dict[str, RowLoraLinear]:
    """Put a RowLoraLinear around each named linear module (an existing one is reused); returns them."""
    modules = dict(model.named_modules())
    shared = check_own(modules, names, context)
    if shared:  # checked before any module is touched
        raise AdapterLoadError(shared)
    out = {}
    for name in names:
        module = modules[name]
        if isinstance(module, RowLoraLinear):
            out[name] = module
            continue
        parent_name, _, child = name.rpartition(".")
        layer = RowLoraLinear(module, context, **kwargs)
        setattr(modules[parent_name] if parent_name else model, child, layer)
        out[name] = layer
    return out


def check_own(modules: dict, names, context: RowContext) -> str | None:
    """Why `context` cannot put per-row layers on these modules (None when it can): a module that already
    carries another context's layer belongs to another bank (a second Router on the same backbone), and
    sharing it would apply that bank's row assignment to this one's rows."""
    for name in names:
        module = modules.get(name)
        if isinstance(module, RowLoraLinear) and module.context is not context:
            return (f"module {name!r} already serves the per-row adapters of another Router (or joint run) on this backbone; "
                    "give each Router its own backbone (load_backbone(...) again)")
    return None


def unwrap(model: torch.nn.Module, names=None) -> None:
    """Put the base layers back in place of the RowLoraLinear layers (all, or the named ones)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, RowLoraLinear) and (names is None or name in names):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.base_layer)

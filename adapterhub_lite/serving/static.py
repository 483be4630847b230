"""Static decode shapes: the running rows decode over preallocated buffers, so a decode step has one shape per bucket.

Why this exists. The dynamic path (serving/decoding.py) grows every layer's cache by a torch.cat per step (a copy of
the whole cache), pads two caches to one width to let rows join, and every step has new shapes, so nothing can
be captured and the host launches every kernel of every step anew: on an H200 a 135M model decoded 577 tokens/s
for 32 rows that way, bound by the host. Here a decode step only ever reads and writes fixed buffers:

- the KV cache is one tensor per layer, [rows, kv_heads, width, head_dim], allocated up front. Row r's cache is
  columns 0..len_r-1 of row r: its own positions only (prefix, prompt, the tokens it made), compacted when it
  joins, so no row carries another row's padding. Keys carry their rotary positions, so a column index means
  nothing but "written";
- a step writes each row's new key and value at the row's own column (`_col`, a device tensor) with a scatter,
  sets that column in the row's mask (a device bool tensor) and attends over the first W columns;
- the rows' tokens, positions, adapter slots and columns are device buffers the step reads in place: nothing in
  the step depends on a host-side value but the bucket (B rows, W columns);
- on a GPU each (B, W) bucket is captured once as a CUDA graph and replayed (B and W are padded up to powers of
  two, so a few graphs serve every batch). The first replay of each graph is checked against the eager step it
  was captured from; a mismatch, or a capture that fails (bitsandbytes 8-bit kernels may not capture), logs why
  and the batch runs eager from then on;
- on the CPU the step runs eager over exactly the live rows and columns (views, no copies): padding to buckets
  buys nothing without a graph.

Rows join by copying their prefilled cache into the next free rows; a row that leaves is replaced by the last
live row (one row copy), so the live rows are always 0..n-1 and a step runs over a prefix of the buffers. The
buffers double (rows, width) until they hold what was asked of them and then never change: static after
warm-up; with a KV cache budget (--kv-cache-mb) they never hold more than its positions (rows × columns). A
growth, or any change of the resident adapters (the per-row layers' tables), drops the graphs; they are captured
again on next use.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from adapterhub_lite.core.errors import AdapterHubError
from adapterhub_lite.model.heads import head_logits

log = logging.getLogger("adapterhub_lite.serve")

_MIN_WIDTH = 64  # the first allocation's columns: most prompts plus their answers fit without a growth
ATTENTIONS = ("sdpa", "eager")  # the attentions whose mask the step builds (boolean for sdpa, additive for eager)


def attention(config) -> str:
    """The attention implementation a model's decoder runs."""
    return getattr(config, "_attn_implementation", None) or "eager"


def _bucket(n: int, cap: int | None = None) -> int:
    """The power of two at or above n, or `cap` (the buffer's size) when that power is past it."""
    b = 1 << max(0, n - 1).bit_length()
    return cap if cap is not None and b > cap >= n else b


def _grow(have: int, need: int, floor: int, cap: int | None) -> int:
    """A buffer dimension that holds `need`: unchanged if it does, else doubled (at least `floor`), at most `cap`
    unless `need` itself is more."""
    if need <= have:
        return have
    size = max(need, 2 * have, floor)
    return size if cap is None else max(need, min(size, cap))


class _Layer(CacheLayerMixin):
    """One decoder layer's preallocated keys and values; a step writes each row's new entry at the row's own column."""

    is_compileable = True
    is_sliding = False

    def __init__(self, batch: StaticBatch):
        super().__init__()
        self.batch = batch
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # allocated by the batch, never lazily
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        B, W = self.batch._shape
        if key_states.shape[2] != 1:
            raise AdapterHubError(f"the static decode cache takes one position per row and step, got {key_states.shape[2]}")
        col = self.batch._col[:B].view(B, 1, 1, 1)
        self.keys[:B].scatter_(2, col.expand(B, key_states.shape[1], 1, key_states.shape[3]), key_states.to(self.keys.dtype))
        self.values[:B].scatter_(2, col.expand(B, value_states.shape[1], 1, value_states.shape[3]), value_states.to(self.values.dtype))
        return self.keys[:B, :, :W], self.values[:B, :, :W]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.batch._shape[1], 0

    def get_seq_length(self) -> int:
        return self.batch._shape[1]

    def get_max_length(self) -> int:
        return self.keys.shape[2]


class StaticBatch:
    """The running rows of a continuous batch, decoded over preallocated buffers (see the module docstring).

    It offers the interface every decoding batch offers (serving/decoding.py): `keys`, `slots`, `logits` (each
    live row's next-token logits, [n, vocab]), `join(new)`, `keep(rows)`, `advance(tokens)` and `joinable`.
    """

    joinable = True  # rows join at any step: they are copied into free rows

    def __init__(self, bank, max_rows: int, max_width: int | None = None, graphs: bool = False, max_positions: int | None = None):
        attn = attention(bank.config)
        if attn not in ATTENTIONS:
            raise AdapterHubError(f"static decoding builds its own attention mask for sdpa or eager attention; this model uses {attn!r}")
        self.bank = bank
        self.max_rows, self.max_width = max_rows, max_width
        self.max_positions = max_positions  # rows × columns the buffers may hold (--kv-cache-mb in positions); None: no bound
        self.graphs = bool(graphs) and bank.device.type == "cuda"
        self._additive = attn == "eager"  # eager attention adds its mask; sdpa takes a boolean one
        self.keys: list = []
        self.slots: list[int] = []
        self.lengths: list[int] = []  # each live row's written columns (host copy of _col): the bucket needs no device read
        self.logits: torch.Tensor | None = None
        self._rows = self._width = 0  # allocated
        self.nbytes = 0  # of the cache and its row buffers on the device (set when they are allocated)
        self._layers: list[_Layer] = []
        self._cache: Cache | None = None
        self._shape = (0, 0)  # (rows, columns) of the step being run; read by the cache layers
        self._plan = None  # the eager plan of the live rows' slots (rebuilt when rows join or leave)
        self._graphs: dict[tuple[int, int], tuple] = {}
        self._graph_key = None
        self._graph_pool = None
        self.captured = 0  # graphs captured (since start)

    # -- the buffers ---------------------------------------------------------------------------------
    def _reserve(self, rows: int, width: int, like: list) -> None:
        """Make room for `rows` rows of `width` columns, doubling what is allocated (capped at max_rows / max_width
        unless more is needed, and at max_positions rows × columns), and keep what the live rows hold. `like`: cache
        layers of the shapes and dtypes to hold."""
        if rows <= self._rows and width <= self._width:
            return
        new_rows = _grow(self._rows, rows, 1, self.max_rows)
        new_width = _grow(self._width, width, _MIN_WIDTH, self.max_width)
        cap, used = self.max_positions, max(self.lengths, default=0)
        if cap is not None and new_rows * new_width > cap:
            # The cache budget bounds the buffers, not only what the rows reserve: doubling, and keeping the most rows
            # and the widest width ever asked for, held several times the budget. The scheduler admits rows × their
            # widest reservation within it, and no live row needs more columns than it reserved, so rows × width
            # fits; width first (a tight width would grow again at every decode step), then any rows left room for.
            new_width = max(width, used + 1, min(new_width, cap // rows))  # never narrower than the live rows' columns
            new_rows = max(rows, min(new_rows, cap // new_width))
        n, dev = len(self.keys), self.bank.device
        # Everything is allocated and filled before anything is replaced: an out-of-memory here (a join that needs a
        # wider cache) fails the newcomers, and the running rows keep the buffers they had.
        kv = []
        for i, src in enumerate(like):
            _, heads, _, kdim = src.keys.shape
            k = torch.zeros(new_rows, heads, new_width, kdim, dtype=src.keys.dtype, device=dev)
            v = torch.zeros(new_rows, heads, new_width, src.values.shape[-1], dtype=src.values.dtype, device=dev)
            if n:
                k[:n, :, :used] = self._layers[i].keys[:n, :, :used]
                v[:n, :, :used] = self._layers[i].values[:n, :, :used]
            kv.append((k, v))
        mask = torch.zeros(new_rows, new_width, dtype=torch.bool, device=dev)
        small = {}
        for name, shape in (("_col", (new_rows,)), ("_pos", (new_rows, 1)), ("_slot", (new_rows,)), ("_tok", (new_rows,)), ("_live", (new_rows,))):
            small[name] = torch.zeros(shape, dtype=torch.long, device=dev)
            if n:
                small[name][:n] = getattr(self, name)[:n]
        if n:
            mask[:n, :used] = self._mask[:n, :used]  # a row's mask is set over its written columns only (the width may shrink)
        if not self._layers:
            self._layers = [_Layer(self) for _ in kv]
            self._cache = Cache(layers=self._layers)
        for layer, (k, v) in zip(self._layers, kv):
            layer.keys, layer.values = k, v
        self._mask = mask
        self.__dict__.update(small)
        self._rows, self._width = new_rows, new_width
        self.nbytes = sum(t.numel() * t.element_size() for k, v in kv for t in (k, v)) + mask.numel() + \
            sum(t.numel() * t.element_size() for t in small.values())
        self._graphs.clear()  # their buffers are gone

    # -- rows come and go ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.keys)

    @torch.inference_mode()
    def join(self, new) -> None:
        """Take the rows of a just-prefilled `Decoding`: each row's used cache columns are copied, in order, to
        columns 0..len-1 of a free row."""
        if not new.joinable:
            raise AdapterHubError("this model's cache (sliding-window or static layers) cannot take rows mid-way; start a new batch")
        n0, k = len(self.keys), len(new.keys)
        used = new.mask != 0
        lengths = used.sum(1).tolist()  # one read per join: the host keeps each row's length from here on
        L = max(lengths)
        self._reserve(n0 + k, L + 1, new.cache.layers)  # + 1: the column the next step writes
        # each row's used columns first, in their order (a stable sort of "unused"), then the first L of them
        order = torch.argsort((~used).to(torch.int8), dim=1, stable=True)[:, :L]
        for dst, src in zip(self._layers, new.cache.layers):
            for mine, theirs in ((dst.keys, src.keys), (dst.values, src.values)):
                idx = order[:, None, :, None].expand(k, theirs.shape[1], L, theirs.shape[3])
                mine[n0:n0 + k, :, :L] = theirs.gather(2, idx)
        rows = slice(n0, n0 + k)
        length = torch.tensor(lengths, device=self.bank.device)
        self._mask[rows] = False
        self._mask[rows, :L] = torch.arange(L, device=self.bank.device)[None, :] < length[:, None]
        self._col[rows] = length
        self._pos[rows] = new.next_pos
        self._slot[rows] = torch.tensor(new.slots, device=self.bank.device)
        self._live[rows] = 1
        self.logits = new.logits if not n0 else torch.cat([self.logits, new.logits])
        self.keys, self.slots, self.lengths = self.keys + list(new.keys), self.slots + list(new.slots), self.lengths + lengths
        self._plan = None

    @torch.inference_mode()
    def keep(self, rows: list[int]) -> list[int]:
        """Keep the rows at these positions (the others finished or were cancelled). Each leaving row below the
        new count takes the place of a kept row above it (one row copy), so the live rows stay 0..m-1. Returns,
        for each new position, the old position of its row (the order `tokens` must follow)."""
        n, m = len(self.keys), len(rows)
        kept = set(rows)
        holes = [j for j in range(m) if j not in kept]
        movers = [j for j in rows if j >= m]
        order = list(range(m))
        if holes:
            dst, src = (torch.tensor(x, device=self.bank.device) for x in (holes, movers))
            width = max(self.lengths[j] for j in movers)
            for layer in self._layers:
                layer.keys[dst, :, :width] = layer.keys[src, :, :width]
                layer.values[dst, :, :width] = layer.values[src, :, :width]
            for buf in (self._mask, self._col, self._pos, self._slot, self._live):
                buf[dst] = buf[src]
            for h, j in zip(holes, movers):
                order[h] = j
        if m < n:  # freed rows: masked out, base slot, column 0 (what a padding row of a bucket runs with)
            for buf in (self._mask, self._col, self._pos, self._slot, self._live):
                buf[m:n] = 0
        self.keys = [self.keys[j] for j in order]
        self.slots = [self.slots[j] for j in order]
        self.lengths = [self.lengths[j] for j in order]
        if self.logits is not None and m:
            self.logits = self.logits[torch.tensor(order, device=self.logits.device)]
        elif not m:
            self.logits = None
        self._plan = None
        return order

    # -- the step -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def advance(self, tokens: torch.Tensor) -> None:
        """Feed each live row its chosen token [n] and compute its next logits (one decode step)."""
        n = len(self.keys)
        need = max(self.lengths) + 1
        if need > self._width:
            self._reserve(n, need, self._layers)
        self._tok[:n].copy_(tokens)
        if self.graphs:
            logits = self._replay(_bucket(n, self._rows), _bucket(need, self._width)).clone()  # the graph's output is rewritten by the next replay
        else:
            if self._plan is None:  # one plan per membership: the layers gather each row's factors once for it
                self._plan = self.bank.context.plan(self.slots, self.bank.device)
            logits = self._step(n, need, self._plan)
        self.logits = logits[:n]
        self.lengths = [length + 1 for length in self.lengths]

    def _step(self, B: int, W: int, plan) -> torch.Tensor:
        """One decode step over rows 0..B-1 and columns 0..W-1, reading and writing only the buffers (this is what a
        graph captures): mark each row's new column, run the model (the cache layers write there), move on."""
        self._shape = (B, W)
        mask = self._mask[:B]
        mask.scatter_(1, self._col[:B, None], True)
        attend = mask[:, None, None, :W]
        if self._additive:
            attend = torch.zeros(attend.shape, dtype=self.bank.dtype, device=mask.device).masked_fill_(~attend, torch.finfo(self.bank.dtype).min)
        with self.bank.context.using(plan):
            hidden = self.bank._run(self.bank.embed(self._tok[:B, None]), attend, self._pos[:B], self._cache)[:, -1]
            logits = head_logits(self.bank.model, hidden)
        self._col[:B] += self._live[:B]  # padding rows of a bucket stay at column 0
        self._pos[:B] += self._live[:B, None]
        return logits

    def _graph_state(self) -> tuple:
        """What a captured graph depends on beyond the buffers: the per-row layers and their tables (a load, an
        eviction or a new wrapped module changes it) and the buffers' size."""
        ctx = self.bank.context
        return (ctx.version, tuple((name, id(layer), layer._version) for name, layer in self.bank._lora.items()), self._rows, self._width)

    def _replay(self, B: int, W: int) -> torch.Tensor:
        state = self._graph_state()
        if state != self._graph_key:
            self._graphs.clear()
            self._graph_key = state
        if (B, W) not in self._graphs:
            return self._capture(B, W)
        graph, out = self._graphs[(B, W)]
        graph.replay()
        return out

    def _capture(self, B: int, W: int) -> torch.Tensor:
        """Capture the (B, W) step as a CUDA graph and run this step through it, checked against the eager step.

        The eager warm-up (on a side stream, as CUDA graph capture requires) computes this step's answer; the
        row state it advanced is put back, the step is captured and replayed, and the two answers must agree.
        If capture fails or they differ, graphs are switched off for this batch (logged) and the step is run
        eager again, which rewrites the same cache columns."""
        plan = self.bank.context.plan_live(self._slot[:B])
        saved = self._col.clone(), self._pos.clone()
        side = torch.cuda.Stream() if self.bank.device.type == "cuda" else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            reference = self._step(B, W, plan).clone()
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)
        self._col.copy_(saved[0])
        self._pos.copy_(saved[1])
        try:
            graph, out = self._record(lambda: self._step(B, W, plan))
            graph.replay()
            same = torch.allclose(out.float(), reference.float(), rtol=1e-3, atol=1e-3)
            problem = None if same else f"max |graph - eager| = {(out.float() - reference.float()).abs().max().item():.3g}"
        except Exception as exc:  # noqa: BLE001 - e.g. a kernel that cannot be captured: eager from here on
            problem = f"{type(exc).__name__}: {exc}"
        if problem is None:
            self._graphs[(B, W)] = (graph, out)
            self.captured += 1
            return out
        log.warning("CUDA graph of the decode step (%d rows, %d columns) not used (%s); decoding eager from now on", B, W, problem)
        self.graphs = False
        self._graphs.clear()
        self._col.copy_(saved[0])
        self._pos.copy_(saved[1])
        return self._step(B, W, plan)

    def _record(self, fn):
        """Capture fn() as a CUDA graph (nothing runs until a replay); returns the graph and fn's output tensor, which
        each replay rewrites in place. All graphs share one memory pool: only one step's output is alive at a time."""
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            out = fn()
        return graph, out

"""The adapters one backbone serves: which are known, which are resident on the device, which sit in host memory.

The AdapterManager (vLLM's LoRA model manager, for every adapter kind) is the engine's catalogue:

    inspect / add / register   an adapter's checks (files' sha256, sidecar, backbone fingerprint), then the entry
    hold / unload / fetch      residency on the device under the memory budget (LRU, never evicting what a
                               running batch uses), behind a host-memory LRU of --max-cpu-loras adapters
    route / prepare / classify a request read for its adapter and classification rows scored: serving/reading.py,
                               the manager's request side (a mixin)

It holds no queue and decides nothing about batches: the engine (serving/engine.py) does, and the Router
(serving/router.py), the public Python API, is this manager with the calls a user makes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from adapterhub_lite.artifacts.files import left_by_dead_process, owner
from adapterhub_lite.artifacts.folder import check_adapter_folder, folder_hashes
from adapterhub_lite.artifacts.loading import check_fingerprint, check_fits
from adapterhub_lite.artifacts.registry import check_if_registered
from adapterhub_lite.core.errors import AdapterHubError, AdapterLoadError
from adapterhub_lite.core.names import BASE
from adapterhub_lite.core.numbers import is_count
from adapterhub_lite.core.spec import TaskSpec, spec_from_dict
from adapterhub_lite.model.backbone import Backbone, model_context
from adapterhub_lite.ops.merge import merge_adapters
from adapterhub_lite.ops.merge_sources import read_source
from adapterhub_lite.serving.bank import AdapterBank
from adapterhub_lite.serving.reading import RequestReader, _locked
from adapterhub_lite.serving.resident import read_adapter
from adapterhub_lite.serving.routing import ContentRouter, check_probability

SCRATCH_PREFIX = "adapterhub-router-"


def scratch_folder() -> tempfile.TemporaryDirectory:
    """The folder a router writes merged adapters into, under the system's temp folder and removed by close().

    A server killed with SIGKILL (or by the OOM killer) cannot remove its own, so each is named for the process that
    owns it (`adapterhub-router-<pid>-<host>-<random>`) and a new router removes those whose process is gone on this
    host. A folder of a live process, of another host (a shared /tmp) or without that name is left alone."""
    for old in Path(tempfile.gettempdir()).glob(SCRATCH_PREFIX + "*"):
        pid, _, rest = old.name[len(SCRATCH_PREFIX):].partition("-")
        if "-" in rest and left_by_dead_process(pid, rest.rsplit("-", 1)[0]):  # mkdtemp's random part has no '-'
            shutil.rmtree(old, ignore_errors=True)
    return tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{owner()}-")


class ResidencyFull(AdapterLoadError):
    """The adapters a batch needs at once do not fit the memory budget together (the engine lets the request wait)."""


class AdapterUnavailable(AdapterLoadError):
    """A known adapter that cannot be served (its files failed their checks); the others are served."""


class AdapterManager(RequestReader):
    """Known adapters, their residency and their requests made ready, over one backbone. Safe to call from several
    threads: calls take turns under `lock`."""

    def __init__(self, backbone: Backbone, registry=None, memory_budget_mb: float | None = None,
                 route_threshold: float = 0.5, allow_base_mismatch: bool = False, max_model_len: int | None = None,
                 max_cpu_loras: int = 64, max_lora_rank: int | None = None, max_loras: int | None = None):
        self.route_threshold = check_probability(route_threshold)  # refused here, not at the first `auto` request
        # counts: 1.5 or True passed a range check and served as a float or 1 (max_model_len=nan passed and a request
        # then ran out of memory); a str was a TypeError from the comparison
        counts = {"max_model_len": max_model_len, "max_cpu_loras": max_cpu_loras, "max_lora_rank": max_lora_rank, "max_loras": max_loras}
        wrong = {k: v for k, v in counts.items() if (v is not None or k == "max_cpu_loras") and not (is_count(v) and v >= 1)}
        if wrong:
            k, v = next(iter(wrong.items()))
            unset = "" if k == "max_cpu_loras" else ", or None for the default"
            raise AdapterHubError(f"{k}={v!r}: give a whole number ≥ 1 (--{k.replace('_', '-')}){unset}")
        if memory_budget_mb is not None and (isinstance(memory_budget_mb, bool) or not isinstance(memory_budget_mb, (int, float))):
            raise AdapterHubError(f"memory_budget_mb is {memory_budget_mb!r}; give a number of MB above 0, or None for no budget")
        self.backbone, self.registry = backbone, registry
        self.max_model_len = check_context(backbone, max_model_len)
        self.bank = AdapterBank(backbone.model, max_lora_rank=max_lora_rank, max_loras=max_loras)
        if memory_budget_mb is not None and not memory_budget_mb > 0:  # (nan fails too) a budget nothing fits would refuse every adapter
            raise AdapterHubError(f"memory_budget_mb is {memory_budget_mb}; give a number of MB above 0, or None for no budget")
        self.budget = None if memory_budget_mb is None else memory_budget_mb * 2**20
        self.allow_base_mismatch = allow_base_mismatch
        self.folders: dict[str, Path] = {}  # every adapter we know how to load
        self.metas: dict[str, dict] = {}
        self.hashes: dict[str, dict[str, str]] = {}  # name → {file: sha256} as register() checked them
        self.changed: dict[str, str] = {}  # adapters refused at load because their files changed since (reported by /health)
        self.unavailable: dict[str, str] = {}  # registry adapters that failed their checks: name → why (/health, /v1/models)
        self.kinds: dict[str, tuple[str, int]] = {}  # name → (peft type, virtual tokens), read from adapter_config.json at register
        self.resident: OrderedDict[str, None] = OrderedDict()  # LRU order, most recent last
        # names unloaded while accepted requests used them (vLLM's unload): kept for those requests alone, never `auto`'s
        # pick; the server refuses new requests to them and forgets them when their last request ends
        self.leaving: set[str] = set()
        self._content: ContentRouter | None = None
        self.evictions = 0  # adapters unloaded to stay within the memory budget
        self._scratch = scratch_folder()  # merged adapters
        self.lock = threading.RLock()
        # The host cache (S-LoRA's tier between the device and the disk): adapters read and checked, in host memory,
        # least recently used first. Loading one of them onto the device is a copy: no disk, no hashing.
        self.host: OrderedDict[str, tuple] = OrderedDict()
        self.max_cpu_loras = max_cpu_loras
        self._host_lock = threading.Lock()  # fetch() runs on loader threads

    def mark_unavailable(self, name: str, why: Exception) -> None:
        """List an adapter that failed its checks as unavailable: not served, its requests answered with why."""
        self.forget(name)
        self.unavailable[name] = str(why)
        warnings.warn(f"adapter {name!r} is unavailable and will not be served: {why}", stacklevel=3)

    def register(self, name: str, folder: str | Path | None = None) -> None:
        """Make an adapter known: a registry name (latest version) or an explicit folder (inspect, then add)."""
        self.add(self.inspect(name, folder))

    def inspect(self, name: str, folder: str | Path | None = None) -> Registration:
        """Every check register() makes, with all its reading and hashing, and nothing changed: safe to run on a
        worker thread (the server does, so registry I/O never stalls decoding); `add` then takes the result."""
        _check_name_type(name)
        hashes = None
        if folder is None:
            if self.registry is None:
                raise AdapterLoadError(f"no folder given for adapter {name!r} and the router has no registry")
            # one index read for the folder and its hashes: `latest` may move (a publish) between two reads, and a folder
            # checked against another version's hashes would fail every later load as an integrity error
            listed, version, entry = self.registry.resolve(name)
            folder = self.registry.verified(listed, version, entry)  # re-hashes every file against the entry's sha256 (and refuses extra files)
            hashes = {f: rec["sha256"] for f, rec in entry["files"].items()}  # so these are the folder's
        else:
            check_if_registered(Path(folder))  # a registry's version folder named by its path is re-hashed too
        folder = Path(folder)
        meta = check_adapter_folder(folder)  # the same checks as a publish: no symlinks or pickles, a sound sidecar, finite weights
        check_fingerprint(name, meta["base"]["fingerprint"], self.backbone.fingerprint, "the router serves", self.allow_base_mismatch)
        config = json.loads((folder / "adapter_config.json").read_text())
        kind = (str(config.get("peft_type")), int(config.get("num_virtual_tokens") or 0))
        # the hashes: every later load must find the same bytes (a registry version's are the ones just verified)
        return Registration(name, folder, meta, hashes or folder_hashes(folder), kind)

    @_locked
    def add(self, reg: Registration) -> None:
        """Make an inspected adapter known (no I/O)."""
        name = reg.name
        # a name registered again (Router.register over a served name) must serve the new folder: the bank kept the old
        # factors resident under it and answered with them, unsaid, until an eviction (the server forgets a name first)
        self.unload(name)
        with self._host_lock:  # with the host cache's lock: a read on a loader thread sees the old entry or the new one, whole
            self.folders[name], self.metas[name], self.hashes[name], self.kinds[name] = reg.folder, reg.meta, reg.hashes, reg.kind
            self.host.pop(name, None)  # a copy read from an earlier folder under this name is stale
        self.changed.pop(name, None)
        self.unavailable.pop(name, None)
        if self.routing_target(name):  # refitted on the next `auto` request
            self._content = None

    def _check_unchanged(self, name: str, folder: Path, hashes: dict[str, str], now: dict[str, str] | None = None) -> None:
        """Refuse to load an adapter whose files changed since register() checked them (hashed at every load; `now`:
        the sha256 of bytes the caller read itself, for the files in `hashes`)."""
        now = folder_hashes(folder) if now is None else now
        if now != hashes:
            moved = sorted(f for f in set(now) | set(hashes) if now.get(f) != hashes.get(f))
            why = f"{', '.join(moved)} in {folder} changed since it was checked"
            # the server's files, not the request, are at fault: unavailable (a 503 no retry cures) as a version damaged
            # before start-up is, and listed so in /v1/models and /health until a reload registers it again
            self.changed[name] = self.unavailable[name] = why
            raise AdapterUnavailable(f"adapter {name!r}: {why}; it is not loaded: re-publish it (or restore the files) and load it "
                                     f"again ({_AGAIN}); the other adapters are served")

    def close(self) -> None:
        """Remove the folders of merged adapters (the scratch folder); the router serves nothing after."""
        self._scratch.cleanup()

    def known(self) -> list[str]:
        return list(self.folders)

    def _ensure(self, name: str, keep: frozenset = frozenset()) -> None:
        """Make `name` resident (loading it if needed) and most recently used; evict over budget,
        never `name` itself or an adapter in `keep` (the others the running batch needs)."""
        self._check_known(name)
        if name in self.resident:
            self.resident.move_to_end(name)
            return
        self._free_slot_for(name, keep)
        self.bank.add(name, self.folders[name], loaded=self.fetch(name))
        self.resident[name] = None
        keep = keep | {name}
        while self.budget is not None and self.resident_bytes() > self.budget:
            spare = next((n for n in self.resident if n not in keep), None)
            if spare is None:
                held = sorted(n for n in self.resident if n in keep)
                if held == [name]:  # one adapter alone over the budget: served, as before (budgets bound the rest)
                    return
                need = self.resident_bytes() / 2**20
                self.unload(name)  # taken back: the budget holds (the engine lets the request wait for room)
                raise ResidencyFull(f"this batch needs adapters {held} resident at once ({need:.2f} MB with the slots that serve them) "
                                    f"but the memory budget is {self.budget / 2**20:.2f} MB; raise memory_budget_mb (--memory-budget-mb) "
                                    "or send smaller batches")
            self.unload(spare)
            self.evictions += 1
            self._lower(name)

    def _free_slot_for(self, name: str, keep: frozenset) -> None:
        """With --max-loras, a LoRA or IA3 adapter needs one of that many slots: evict the least recently used
        slot holder the batch does not need, or wait (ResidencyFull) when the batch needs them all."""
        cap = self.bank.max_loras
        if cap is None or self.kinds[name][0] not in ("LORA", "IA3"):
            return
        while self.bank.slots_held() >= cap:
            spare = next((n for n in self.resident if n not in keep and self.bank.slot(n)), None)
            if spare is None:
                held = sorted(n for n in self.resident if self.bank.slot(n))
                raise ResidencyFull(f"adapter {name!r} needs one of the {cap} adapter slots (--max-loras) but this batch uses all of them "
                                    f"({held}); it waits for one to be free")
            self.unload(spare)
            self.evictions += 1

    def _check_known(self, name: str) -> None:
        """Refuse a name that is not a servable adapter, with why (unknown, or unavailable and what failed)."""
        _check_name_type(name)
        if name in self.unavailable:
            raise AdapterUnavailable(f"adapter {name!r} is unavailable: {self.unavailable[name]}; the other adapters are served: "
                                     f"repair or re-publish it, then load it again ({_AGAIN})")
        if name not in self.folders and "@" in name and self.registry is not None:
            # a pinned version (name@version), registered on first use as the server registers it (serving/runtime.py),
            # so Router.run and infer serve what serve serves; an unknown name or version is refused in the registry's
            # words (which list the versions), a damaged one is listed as unavailable with why
            self.registry.resolve(name)
            try:
                self.add(self.inspect(name))
            except AdapterHubError as exc:
                self.mark_unavailable(name, exc)
                raise
        if name not in self.folders:
            known = self.known()  # thousands of adapters: name the first ones and the count, in one readable line
            shown = ", ".join(known[:20]) + (f", … ({len(known)} in all)" if len(known) > 20 else "")
            raise AdapterLoadError(f"unknown adapter {name!r}; known: {shown or 'none'}, or 'base' / 'auto'")

    def _lower(self, name: str) -> None:
        """Move a just-loaded adapter down to a lower slot that an eviction freed: the slot pools are sized by the
        highest slot in use, so an eviction below it frees memory only once nothing sits above the gap."""
        free = self.bank.free_slot()
        if free is not None and 0 < free < self.bank.slot(name):
            self.bank.remove(name)
            self.bank.add(name, self.folders[name], loaded=self.fetch(name))  # from host memory: a copy

    def fetch(self, name: str) -> tuple:
        """The adapter's (config, weights) in host memory: from the host cache, else read from its folder after
        the checks every load makes (the files' sha256 as registered, the shapes against the backbone).
        Safe to call from a loader thread while the engine decodes (it touches neither the model nor the bank)."""
        with self._host_lock:
            if name in self.host:
                self.host.move_to_end(name)
                return self.host[name]
            # what is read is this registration: a reload or an unload may replace or drop the name meanwhile
            folder, hashes = self.folders.get(name), self.hashes.get(name)
        if folder is None:  # unloaded while its request waited for this read
            raise AdapterLoadError(f"unknown adapter {name!r}: it was unloaded while the request waited; load it again, or name another adapter")
        self._check_unchanged(name, folder, hashes)
        check_fits(folder, self.backbone.model)
        loaded = read_adapter(name, folder)
        # hashed again once read: files rewritten between the check above and the read (a copy over them, a re-publish)
        # were served, and kept in host memory, as the version checked; only a change undone within the read passes
        self._check_unchanged(name, folder, hashes)
        with self._host_lock:
            # kept only if the name still stands for what was read: else the next load would serve these weights under
            # the version that replaced them (add() dropped the old entry, and nothing would drop this one)
            if self.hashes.get(name) is hashes:
                self.host[name] = loaded
                while len(self.host) > self.max_cpu_loras:
                    self.host.popitem(last=False)
        return loaded

    def in_host(self, name: str) -> bool:
        """Whether loading `name` onto the device needs no disk read."""
        return name == BASE or name in self.resident or name in self.host

    def host_bytes(self) -> int:
        """Bytes of the adapters kept in the host cache."""
        with self._host_lock:
            return sum(t.numel() * t.element_size() for _, weights in self.host.values() for t in weights.values())

    def resident_bytes(self) -> int:
        """What the resident adapters take on the device: their own tensors and the padded stacks that serve them
        (what --memory-budget-mb bounds)."""
        return sum(self.bank.nbytes(n) for n in self.resident) + self.bank.stack_bytes()

    def memory(self) -> dict:
        """The adapters' device memory as /health reports it (bytes): what the budget bounds (their own tensors and
        the slot pools) and, beside it, the running batch's per-row factors gathered from the pools."""
        own = sum(self.bank.nbytes(n) for n in self.resident)
        stacks = self.bank.stack_bytes()
        return {"resident_adapters": len(self.resident), "adapter_bytes": own, "stack_bytes": stacks, "total_bytes": own + stacks,
                "budget_bytes": None if self.budget is None else int(self.budget),
                "batch_row_bytes": self.bank.row_bytes(),  # the running batch's gathered factors: rows' working memory, outside the budget
                "host_cached_adapters": len(self.host), "host_bytes": self.host_bytes(), "max_cpu_loras": self.max_cpu_loras}

    @_locked
    def unload(self, name: str) -> None:
        """Free a resident adapter (it stays known and reloads on next use)."""
        if name in self.resident:
            self.bank.remove(name)
            del self.resident[name]

    def build_merge(self, weights: dict[str, float], method: str = "linear", *, density: float | None = None, task: str | None = None,
                    name: str = "merged", output: str | Path | None = None, report_rows: int | None = 0,
                    majority_sign_method: str | None = None) -> tuple[Path, dict]:
        """Write the merged adapter's folder (not registered); returns (folder, sidecar). Without a report
        (report_rows=0) peft merges the sources' factors on a weightless model of the backbone's shape, so no
        second backbone is loaded and the served model is not touched: the server runs this off its engine thread."""
        output = Path(output) if output else Path(self._scratch.name) / name
        # the sources as registered now, checked as every load is: a reload or an unload may have taken one away since
        # the request was read (a KeyError and a plain 500 in the chaos soak), and files changed on disk were merged
        with self._host_lock:
            sources = {n: (self.folders.get(n), self.hashes.get(n)) for n in weights}
        contents = {}
        for n, (folder, hashes) in sources.items():
            if folder is None and n in self.unavailable:
                raise AdapterUnavailable(f"merge source {n!r} is unavailable: {self.unavailable[n]}; the server serves the other adapters")
            if folder is None:
                raise AdapterUnavailable(f"merge source {n!r} was unloaded while the merge was built; see GET /v1/models")
            # each file read once, its bytes checked and merged: hashing the folder and letting peft read it again after
            # left a window in which a file swapped meanwhile (and put back) was merged unchecked
            try:
                contents[n] = read_source(folder)
            except (OSError, AdapterHubError):  # a file gone since register(): changed, as _check_unchanged says
                self._check_unchanged(n, folder, hashes)
                raise
            now = {f: hashlib.sha256(b).hexdigest() for f, b in contents[n].items()}
            self._check_unchanged(n, folder, {f: hashes.get(f) for f in now}, now)
        _, sidecar = merge_adapters({n: folder for n, (folder, _) in sources.items()}, weights, method, density=density, name=name,
                                    output=output, quantization=self.backbone.fingerprint["quantization"], report_rows=report_rows, task=task,
                                    device=str(self.backbone.device), dtype=self.backbone.dtype, base_config=self.backbone.model.config,
                                    contents=contents, majority_sign_method=majority_sign_method)
        return output, sidecar

    def spec(self, name: str) -> TaskSpec | None:
        """The task an adapter was trained for; None for a component (e.g. a joint run's shared
        adapter), which serves raw text like the base model."""
        task = self.metas[name]["task"]
        return spec_from_dict(task) if task else None

    @_locked
    def hold(self, names, keep: frozenset = frozenset()) -> None:
        """Make these adapters resident together (with those in `keep`, e.g. the rows already running)."""
        needed = (frozenset(names) | keep) - {BASE}
        for n in sorted(frozenset(names) - {BASE}):
            self._ensure(n, keep=needed)

    @_locked
    def retire(self, name: str) -> None:
        """Keep `name` for the requests already accepted for it, and no other: `auto` stops picking it (forget() ends it)."""
        self.leaving.add(name)
        if self.routing_target(name):
            self._content = None

    @_locked
    def forget(self, name: str) -> None:
        """Unload an adapter and drop it from the catalogue (requests naming it are refused after)."""
        self.unload(name)
        self.leaving.discard(name)
        with self._host_lock:  # as in add(): a read on a loader thread sees the name known or gone, whole
            for table in (self.folders, self.metas, self.hashes, self.changed, self.kinds, self.unavailable, self.host):
                table.pop(name, None)
        if self.routing_target(name):
            self._content = None

    def virtual_tokens(self, name: str) -> tuple[str, int]:
        """(peft type, positions a prompt- or prefix-tuning adapter puts before every prompt); ("", 0) for `base`.
        Read from the adapter's config, so a request is measured before its adapter is resident."""
        return ("", 0) if name == BASE else self.kinds[name]


# how an unavailable adapter is loaded again, for each way in: the refusal reaches the server's clients, Router callers
# and infer alike (infer read "reload (POST /v1/reload)", which only a server has)
_AGAIN = "serve: POST /v1/reload; a Router: register(name, folder); infer: run it again"


def _check_name_type(name) -> None:
    """Refuse an adapter name that is not a string (an int was a TypeError from `'@' in name`)."""
    if not isinstance(name, str):
        raise AdapterLoadError(f"adapter name {name!r} is a {type(name).__name__}, not a string; name an adapter such as 'sst2', or 'base' / 'auto'")


def check_context(backbone: Backbone, max_model_len: int | None) -> int:
    """The context a router serves: `max_model_len`, at most (and by default) the backbone's own."""
    own = model_context(backbone)
    if max_model_len is None:
        if own is None:
            raise AdapterLoadError(f"backbone {backbone.name!r} names no context length (max_position_embeddings); give max_model_len (--max-model-len)")
        return own
    if max_model_len < 1 or (own is not None and max_model_len > own):
        raise AdapterLoadError(f"max_model_len={max_model_len} but backbone {backbone.name!r} was trained for positions up to {own}; "
                               f"give 1 to {own} (--max-model-len)")
    return max_model_len


@dataclass
class Registration:
    """An adapter folder that passed register()'s checks, ready to be added (Router.inspect → Router.add)."""

    name: str
    folder: Path
    meta: dict
    hashes: dict[str, str]
    kind: tuple[str, int]

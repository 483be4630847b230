"""The server's catalogue of models: registry adapters (latest and pinned versions), adapters loaded
at run time, per-request merges, and registry reloads.

Every change to the router runs on the engine thread between two decode steps (Engine.call), so
it never races a batch; an adapter that running rows use is never unloaded or replaced under them: an unload (as vLLM's)
takes the name from new requests at once and frees the adapter when the requests accepted before it have ended.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

from adapterhub_lite.artifacts.index import check_name
from adapterhub_lite.core.errors import AdapterHubError, AdapterLoadError
from adapterhub_lite.core.names import AUTO, BASE, MERGED_PREFIX, is_request_merge
from adapterhub_lite.core.numbers import is_finite_number
from adapterhub_lite.ops.merge import MERGE_METHODS as METHODS
from adapterhub_lite.ops.merge_sources import SOURCE_FILES
from adapterhub_lite.serving import protocol as P
from adapterhub_lite.serving.engine import Engine
from adapterhub_lite.serving.manager import AdapterUnavailable

# a merged_adapters recipe's fields: LoRAX's (ids, weights, merge_strategy, density, majority_sign_method) and task
RECIPE_FIELDS = ("ids", "weights", "merge_strategy", "density", "majority_sign_method", "task")


class Catalogue:
    """What `model` may name, and the calls that change it."""

    def __init__(self, engine: Engine, max_merges: int = 16):
        self.engine = engine
        self.router = engine.router
        self.runtime: dict[str, None] = {}  # adapters loaded through /v1/load_lora_adapter, in the order they were loaded
        self.merges: OrderedDict[str, dict] = OrderedDict()  # merged adapter name → its recipe, least recently used first
        self.max_merges = max_merges  # merged adapters kept (each a folder on disk and a catalogue entry)
        self._pending: dict[str, asyncio.Future] = {}  # merges being built (one build per recipe)
        self.created = int(time.time())
        # name@version → why, for the version a registry name failed its checks on: its pinned id is as unavailable
        self.failed: dict[str, str] = {}
        for name, why in self.router.unavailable.items() if self.router.registry is not None else ():
            try:  # those from_registry marked: each name's latest version then
                self.failed[f"{name}@{self.router.registry.resolve(name)[1]}"] = why
            except AdapterHubError:
                pass

    # -- reading -----------------------------------------------------------------------------------
    def models(self) -> list[dict]:
        """`base` and `auto`, every adapter as `name` and `name@version`, then the runtime-loaded ones (last loaded
        last), as vLLM's model cards in vLLM's order: the base model first, since clients take `data[0]` for the default.

        The base names its weights (`root`) and its context (`max_model_len`); an adapter names where it
        comes from (`root`: its registry version or folder) and, as `parent`, the id of the model it runs
        on, so a client can pair them.
        """
        registry, held = self.router.registry, self.router.folders
        weights = self.base_root
        roots = {BASE: weights, AUTO: weights}  # auto routes over the adapters on the base
        ids = []
        if registry is not None:
            for row in registry.rows():  # by name, then version: a name's last row is its latest
                name, pinned = row["name"], f"{row['name']}@{row['version']}"
                roots[name] = roots[pinned] = registry.location(row["name"], row["version"])
                ids += [name, pinned]
        out, gone = [], self.unavailable()  # a registry adapter that failed its checks is listed, with why it is not served
        for i in dict.fromkeys([BASE, AUTO] + ids + list(self.runtime)):
            if i in self.router.leaving:  # unloaded: its accepted requests finish, nobody may name it (a reload defers it)
                continue
            # a name the router holds names what it serves now (a reload deferred by running rows keeps the old
            # version; a run-time load, the folder it was read from)
            root = str(held[i]) if i in held else roots.get(i)
            entry = {"id": i, "object": "model", "created": self.created, "owned_by": "adapterhub-lite",
                     "root": root, "parent": None if i == BASE else BASE, "permission": [self._permission(i)]}
            entry["max_model_len"] = self._context(i)
            if i in gone:
                entry.update(available=False, unavailable_reason=gone[i])
            out.append(entry)
        return out

    def _context(self, model: str) -> int | None:
        """A card's `max_model_len`: the positions a request to it may fill (prompt and answer). A prompt- or
        prefix-tuning adapter's virtual tokens take theirs first. `auto` (whichever adapter it routes to) and an id not
        inspected yet: null, as vLLM lists its LoRA cards, rather than a guess; the key is on every card, as vLLM's."""
        if model == BASE:
            return self.router.max_model_len
        kind = self.router.kinds.get(model)
        return None if kind is None else self.router.max_model_len - kind[1]

    @property
    def base_root(self) -> str:
        """The base's `root` in GET /v1/models: the backbone's weights (its hub id, else its folder)."""
        backbone = self.router.backbone
        return backbone.hub_id or backbone.name

    def _permission(self, model: str) -> dict:
        """vLLM's model_permission object (OpenAI's, since dropped from its API), which clients written for vLLM read
        from each card: what a request may do with the model here (sample, read log-probs; no fine-tuning)."""
        return {"id": f"modelperm-{model}", "object": "model_permission", "created": self.created, "allow_create_engine": False,
                "allow_sampling": True, "allow_logprobs": True, "allow_search_indices": False, "allow_view": True,
                "allow_fine_tuning": False, "organization": "*", "group": None, "is_blocking": False}

    def unavailable(self) -> dict[str, str]:
        """Every id `models()` lists as unavailable → why: the names the router refuses and the pinned versions that
        failed their checks (so /health and /v1/models say the same, before anyone has asked for the pinned id)."""
        held = self.router.folders
        return {**self.router.unavailable, **{i: why for i, why in self.failed.items() if i not in held and i not in self.router.unavailable}}

    def has_task(self, model: str) -> bool:
        return model == AUTO or (model in self.router.metas and bool(self.router.metas[model]["task"]))

    def is_classifier(self, model: str) -> bool:
        return self.has_task(model) and model != AUTO and self.router.metas[model]["task"]["type"] == "classification"

    async def _on_engine(self, fn, flags: dict | None = None):
        """Run fn(router) on the engine thread; its errors become 400s (`flags`: command-line words to
        replace by the request fields that mean the same, so the fix named fits a request)."""
        return await self._answered(asyncio.wrap_future(self.engine.call(fn)), flags)

    async def _off_engine(self, fn, *args, flags: dict | None = None):
        """Run fn(*args) (registry I/O: reading, hashing, checking; building a merge) on a worker thread, off the
        engine thread and the event loop; its errors become 400s as _on_engine's do."""
        return await self._answered(asyncio.to_thread(fn, *args), flags)

    @staticmethod
    async def _answered(work, flags: dict | None):
        try:
            return await work
        except P.ApiError:
            raise
        except AdapterHubError as exc:
            if isinstance(exc, AdapterUnavailable):  # the server's files, not the request: as a request naming it is answered
                raise P.unavailable(str(exc)) from None
            message = str(exc)
            for flag, field in (flags or {}).items():
                message = message.replace(flag, field)
            raise P.ApiError(400, message, code=P.error_code(exc)) from None

    async def ensure_known(self, model: str) -> str:
        """`model` if the server can serve it (a pinned registry version is registered on first use); else 404.
        `name@latest` is `name`, which /v1/reload keeps at the registry's latest version."""
        if model.removesuffix("@latest") in self.router.leaving:
            raise P.ApiError(404, f"the model {model!r} was unloaded (POST /v1/unload_lora_adapter): the requests accepted before finish on it, "
                             "new ones are refused; load it again, or see GET /v1/models", code="model_not_found")
        if model.endswith("@latest") and model.removesuffix("@latest") in self.router.folders and model.removesuffix("@latest") not in self.runtime:
            return model.removesuffix("@latest")
        if model.removesuffix("@latest") in self.router.unavailable:
            raise P.unavailable(f"adapter {model!r} is unavailable: {self.router.unavailable[model.removesuffix('@latest')]}; "
                                "the server serves the other adapters (GET /v1/models)")
        if model in (BASE, AUTO) or model in self.router.folders:
            if model in self.merges:
                self.merges.move_to_end(model)
            return model
        if "@" in model and self.router.registry is not None:
            try:
                self.router.registry.resolve(model)
            except AdapterHubError:
                pass
            else:
                try:
                    reg = await self._off_engine(self.router.inspect, model)
                except P.ApiError as exc:  # a damaged pinned version: listed as unavailable, answered with why
                    self.router.unavailable[model] = str(exc)
                else:
                    await self._on_engine(lambda r: r.add(reg) if model not in r.folders else None)
                if model in self.router.unavailable:
                    return await self.ensure_known(model)  # the 503 naming why
                return model
        raise P.ApiError(404, f"the model {model!r} does not exist; see GET /v1/models (adapters, name@version, 'base', 'auto')",
                         code="model_not_found")

    # -- per-request merges (LoRAX's merged_adapters) ------------------------------------------------
    async def merged(self, recipe, model: str | None = None) -> str:
        """The adapter a `merged_adapters` recipe names; built once per recipe, then cached like any adapter.

        Its task (prompt template, labels) is `recipe["task"]`, else the request's `model` when that
        is one of the sources, else the sources' common task."""
        if not isinstance(recipe, dict):
            raise P.bad("merged_adapters", recipe, 'give {"ids": [...], "weights": [...], "merge_strategy": "linear", "density": ...}')
        unread = sorted(set(recipe) - set(RECIPE_FIELDS))
        if unread:  # else a field this server does not read (a typo, a newer LoRAX option) was merged without, unsaid
            raise P.bad(f"merged_adapters.{unread[0]}", recipe[unread[0]], f"this server reads only {', '.join(RECIPE_FIELDS)} in a recipe; drop it",
                        code="unsupported_field")
        ids, weights = recipe.get("ids"), recipe.get("weights")
        method = recipe.get("merge_strategy", "linear")
        density, task, sign = recipe.get("density"), recipe.get("task"), recipe.get("majority_sign_method")
        if not isinstance(ids, list) or len(ids) < 2 or not all(isinstance(i, str) for i in ids) or len(set(ids)) != len(ids):
            raise P.bad("merged_adapters.ids", ids, "give two or more distinct adapter names")
        if weights is None:
            weights = [1.0 / len(ids)] * len(ids)
        if not isinstance(weights, list) or len(weights) != len(ids) or not all(is_finite_number(w) for w in weights):
            raise P.bad("merged_adapters.weights", weights, f"give {len(ids)} finite numbers, one per id")
        if method not in METHODS:
            raise P.bad("merged_adapters.merge_strategy", method, f"use one of {', '.join(METHODS)}")
        if density is not None and not (is_finite_number(density) and 0 < density <= 1):
            raise P.bad("merged_adapters.density", density, "give a number in (0, 1]")
        if sign not in (None, "total", "frequency"):
            raise P.bad("merged_adapters.majority_sign_method", sign, 'give "total" (the default) or "frequency"')
        named = ids
        ids = []
        for i in named:
            if i not in self.router.folders and i not in (BASE, AUTO):
                # a pinned `name@1.0.0` is registered on first use, as a request naming it is (it was "not known" to a merge
                # until some request had named it alone), `name@latest` is `name`, and a damaged version is its 503
                try:
                    i = await self.ensure_known(i)
                except P.ApiError as exc:
                    if exc.status != 404:
                        raise
            if i not in self.router.folders or i in self.router.leaving:  # unloaded: gone for new requests, merges included
                raise P.ApiError(404, f"merged_adapters names {i!r}, which this server does not know; see GET /v1/models", code="model_not_found")
            ids.append(i)
        if len(set(ids)) != len(ids):  # `gen_b` and `gen_b@latest`: one source, which the merge would take once, unsaid
            raise P.bad("merged_adapters.ids", named, "name each adapter once (name@latest is name)")
        if task is None and model in ids and self.router.metas[model]["task"]:
            task = self.router.metas[model]["task"]["name"]
        # the sources' files as registered are part of the recipe: a source loaded again under its name from other files
        # (unload then load, a registry reload to a new version) makes another merge, not the old files' merge again
        sources = {i: {f: (self.router.hashes.get(i) or {}).get(f) for f in SOURCE_FILES} for i in ids}
        key = json.dumps({"ids": ids, "weights": weights, "method": method, "density": density, "task": task, "sources": sources,
                          **({"majority_sign_method": sign} if sign is not None else {})}, sort_keys=True)
        name = MERGED_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:12]
        if name in self.router.folders:
            if name in self.merges:
                self.merges.move_to_end(name)
            return name
        if name not in self._pending:  # concurrent requests with one recipe share one build
            async def build():
                flags = {"--task": "merged_adapters.task"}
                await self._on_engine(self._make_room)
                # each build writes into a folder of its own (a fixed `.building-<name>` left by a failed or abandoned build
                # refused the same recipe for good: "output folder ... already exists"), renamed into place when registered
                building = Path(tempfile.mkdtemp(prefix=f".building-{name}-", dir=self.router._scratch.name))
                try:
                    # the merge itself runs in a worker thread: off the engine thread (decoding goes on) and off the event loop
                    folder, _ = await self._off_engine(
                        lambda: self.router.build_merge(dict(zip(ids, map(float, weights))), method, density=density, task=task, name=name,
                                                        report_rows=0, output=building / name, majority_sign_method=sign), flags=flags)
                    reg = await self._off_engine(self.router.inspect, name, folder)
                    await self._on_engine(lambda r: self._register_merge(r, name, folder, reg), flags)
                finally:  # registered: moved out already; failed (inspecting, registering) or cancelled: nothing is left behind
                    shutil.rmtree(building, ignore_errors=True)
                # counted here, not by the requests waiting for it: they may all have left (cancelled) while it was built,
                # and a registered merge outside self.merges would be outside --max-merges for good
                self.merges[name] = json.loads(key)

            def built(fut: asyncio.Future) -> None:  # the build is let go of when it ends, whoever still waits for it
                if self._pending.get(name) is fut:
                    del self._pending[name]
                if not fut.cancelled():
                    fut.exception()  # read, so a failure nobody waited for is not logged as never retrieved
            self._pending[name] = asyncio.ensure_future(build())
            self._pending[name].add_done_callback(built)
        await asyncio.shield(self._pending[name])
        if name in self.merges:
            self.merges.move_to_end(name)
        return name

    @staticmethod
    def _register_merge(router, name: str, folder: Path, reg) -> None:
        """Engine thread: the built and inspected folder takes its name (a rename in the scratch folder) and is added."""
        final = Path(router._scratch.name) / name
        if name in router.folders:  # built twice (a race with an eviction): keep the registered one
            shutil.rmtree(folder, ignore_errors=True)
            return
        shutil.rmtree(final, ignore_errors=True)
        folder.rename(final)
        try:
            router.add(dataclasses.replace(reg, folder=final))
        except BaseException:  # not served, so not kept: a folder outside the catalogue would sit outside --max-merges
            shutil.rmtree(final, ignore_errors=True)
            raise

    def _make_room(self, router) -> None:
        """Before building a merge (engine thread): over max_merges, forget the least recently used merges no request
        the engine holds names (running, or queued: one accepted for a merge must find it), and delete their folders;
        when every one is wanted, refuse (429-like: retry later)."""
        while len(self.merges) >= self.max_merges:
            wanted = self.engine.wanted()
            idle = next((n for n in self.merges if n not in wanted), None)
            if idle is None:
                raise P.ApiError(429, f"all {self.max_merges} merged adapters (--max-merges) are in use by running or queued requests; retry shortly",
                                 "rate_limit_exceeded", "merges_full", headers={"Retry-After": "1"})
            folder = router.folders.get(idle)
            router.forget(idle)
            self.merges.pop(idle)
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)

    # -- adapters at run time (vLLM's /v1/load_lora_adapter) ----------------------------------------
    async def load(self, name, path, inplace: bool = False) -> str:
        """Register a folder under `name`, through the same integrity and fingerprint checks as the registry.
        `inplace` (vLLM's load_inplace) loads a new name as any load, and replaces an adapter loaded at run time under
        `name` when no request uses it (else a 409); registry adapters are not replaced."""
        if not isinstance(name, str) or not name:
            raise P.bad("lora_name", name, "give the name requests will use")
        try:
            check_name(name)
        except AdapterHubError as exc:
            raise P.bad("lora_name", name, str(exc)) from None
        if is_request_merge(name):  # else a client could load its own weights under the name another client's recipe hashes to
            raise P.bad("lora_name", name, f"names of the shape {MERGED_PREFIX}<12 hex digits> are the per-request merges'; choose another name")
        replacing = inplace and name in self.runtime  # vLLM's load_inplace on a served name: new weights under it
        if not replacing:
            self._check_free(name, registry=self.router.registry is not None and name in self.router.registry.index()["adapters"])
        if not isinstance(path, str) or not path:
            raise P.bad("lora_path", path, "give the path of an adapter folder on the server's machine")
        if path.startswith("~"):  # vLLM's get_adapter_absolute_path expands it: '~/adapters/x' is not a folder named '~' here
            path = os.path.expanduser(path)  # (Path.expanduser raises for '~nosuchuser/x'; this leaves it as sent: a 404)
        if not Path(path).exists():  # nothing there: vLLM answers 404 (NotFoundError), a folder it cannot read 400
            raise P.ApiError(404, f"`lora_path` is {path!r}, which does not exist on the server's machine; give the path of an adapter folder there",
                             code="adapter_not_found", param="lora_path")
        if not Path(path).is_dir():
            raise P.bad("lora_path", path, "it is a file; give the path of an adapter folder on the server's machine")
        if not (Path(path) / "adapter_config.json").exists():  # vLLM: no adapter config there is "No adapter found", a 404 too
            raise P.ApiError(404, f"`lora_path` is {path!r}, a folder with no adapter in it (no adapter_config.json); give the path of an "
                             "adapter folder written by `adapterhub-lite train`", code="adapter_not_found", param="lora_path")
        reg = await self._off_engine(self._inspect, name, path)  # hashing and checks: off the engine thread and the event loop

        def add(router):  # listed with the add, on the engine thread: a request cancelled meanwhile leaves no unlisted adapter
            if replacing and name in self.runtime:
                # never under a request that was read for the old weights: its answer would be made of both
                if name in self.engine.wanted():
                    raise P.ApiError(409, f"adapter {name!r} is in use by running or queued requests; it is replaced in place only when "
                                     "none use it: retry when they finish", code="in_use")
            else:
                # checked again here: another load of this name (or a reload adding it) may have landed while this folder was
                # inspected, and router.add would replace it, unsaid, under the client answered 200 for it
                self._check_free(name)
            router.add(reg)  # replacing: drops the old weights (resident and host copies) first
            self.runtime[name] = None
        await self._on_engine(add)
        return name

    def _inspect(self, name: str, path: str):
        """Worker thread: the folder's registry checks, and (as vLLM's worker refuses at the load) a LoRA wider than
        --max-lora-rank: loaded, every request to it would be refused by the slots instead."""
        reg = self.router.inspect(name, path)
        limit = self.router.bank.max_lora_rank
        if limit is not None and reg.kind[0] == "LORA":
            config = json.loads((reg.folder / "adapter_config.json").read_text())
            rank = max([config["r"], *(config.get("rank_pattern") or {}).values()])  # what peft sizes the factors by
            if rank > limit:
                raise AdapterLoadError(f"LoRA adapter {name!r} at {path!r} has rank {rank} but this server's adapter slots hold rank {limit} "
                                       "at most (--max-lora-rank); restart it with a higher --max-lora-rank, or load a lower-rank adapter")
        return reg

    def _check_free(self, name: str, registry: bool = False) -> None:
        """Refuse (vLLM's 400) a run-time load under a name already served: loaded at run time, reserved, or a registry
        adapter (`registry`: the registry names it, registered or not yet); 409 while an unloaded adapter of that name
        still finishes its requests (its slot, host copy and catalogue entries are keyed by name: two under one name would
        mix)."""
        if name in self.router.leaving:
            raise P.ApiError(409, f"adapter {name!r} was unloaded and still finishes the requests accepted before the unload; a load under "
                             "its name waits for them to end: retry shortly", code="draining", headers={"Retry-After": "1"})
        if name in self.runtime:
            raise P.ApiError(400, f"an adapter named {name!r} is already loaded at run time; unload it first or choose another name",
                             code="already_loaded")
        if name in (BASE, AUTO) or name in self.router.folders or registry:
            # not "unload it first": the reserved names and registry adapters are not unloaded at run time
            raise P.ApiError(400, f"an adapter named {name!r} is already served ({'a reserved name' if name in (BASE, AUTO) else 'from the registry'}: "
                             "runtime and registry adapters keep apart names, and these are not unloaded); choose another name",
                             code="already_loaded")

    async def unload(self, name) -> str:
        """Drop an adapter loaded at run time (registry adapters stay), as vLLM does: at once for new requests (404, gone
        from /v1/models, from `auto` and from merges); the requests already accepted for it, running or queued, finish on
        its weights, and its slot, host copy and catalogue entries go when the last of them ends."""
        if not isinstance(name, str) or not name:
            raise P.bad("lora_name", name, "give the name the adapter was loaded under")

        def forget(router):
            # read here, on the engine thread that lists a load with its add: read on the event loop, a load whose add
            # had run but whose listing had not yet (the engine thread between the two) was answered "not loaded"
            if name not in self.runtime:
                raise P.ApiError(404, f"no adapter {name!r} was loaded at run time (loaded: {sorted(self.runtime) or 'none'}); "
                                 "registry adapters stay served", code="model_not_found")
            self.runtime.pop(name)
            if name in self.engine.wanted():  # queued requests too: each was accepted for it, and would fail as unknown
                router.retire(name)
                self.engine.when_unused(name, lambda r: r.forget(name) if name in r.leaving else None)
            else:
                router.forget(name)
        await self._on_engine(forget)
        return name

    async def reload(self) -> dict:
        """Pick up new registry versions: register new names, move names to their latest version."""
        if self.router.registry is None:
            raise P.ApiError(400, "this server has no registry to reload", code="no_registry")

        router = self.router

        def read() -> dict:
            """Worker thread: each name's latest version hashed and checked (the I/O), nothing changed yet."""
            found = {}
            for name in sorted(router.registry.index()["adapters"]):
                if name in self.runtime:  # loaded at run time under this name before the registry had it: it stays until unloaded
                    found[name] = ("shadowed", None)
                    continue
                pinned = None
                try:
                    pinned = f"{name}@{router.registry.resolve(name)[1]}"
                    folder = router.registry.path(pinned)  # re-hashes the version's files
                    # the version served, unless it was refused at a load since (its files changed): the path's re-hash
                    # just passed, so it is registered again and served
                    same = name in router.folders and Path(router.folders[name]) == Path(folder) and name not in router.unavailable
                    found[name] = ("same", None) if same else ("read", router.inspect(name, folder))
                except AdapterHubError as exc:  # one damaged version: listed as unavailable, the rest reload
                    found[name] = ("damaged", (str(exc), pinned))
            # a pinned id refused for its files (at its use, or listed as its name's damaged version): whole again?
            for pinned in dict.fromkeys([i for i in router.unavailable if "@" in i] + list(self.failed)):
                try:
                    router.registry.path(pinned)  # re-hashes the version's files
                except AdapterHubError:
                    continue
                found[pinned] = ("repaired", None)
            return found

        def apply(router) -> dict:
            """Engine thread, between two steps: the catalogue changes (no I/O)."""
            out = {"added": [], "updated": [], "deferred": [], "shadowed": [], "unavailable": {}}
            # queued requests too: each was read for its version (template, task budget, virtual tokens) and is answered by it
            wanted = self.engine.wanted()
            for name, (what, value) in found.items():
                # read() saw no run-time adapter under the name, but one may have been loaded since (its add on this thread)
                if what == "shadowed" or name in self.runtime:
                    out["shadowed"].append(name)
                elif name in router.leaving:  # a run-time adapter unloaded under requests: the registry's comes after they end
                    out["deferred"].append(name)
                elif what == "repaired":  # forgotten: the next request naming it registers it as on first use
                    router.forget(name)
                    self.failed.pop(name, None)
                elif what != "same" and name in router.folders and name in wanted:
                    out["deferred"].append(name)  # never swap an adapter under running rows or the requests queued for it
                elif what == "damaged":
                    router.forget(name)
                    router.unavailable[name] = out["unavailable"][name] = value[0]
                    if value[1] is not None:
                        self.failed[value[1]] = value[0]
                elif what == "read":
                    out["updated" if name in router.folders else "added"].append(name)
                    router.forget(name)
                    router.add(value)
            return out

        found = await asyncio.to_thread(read)
        return await self._on_engine(apply)

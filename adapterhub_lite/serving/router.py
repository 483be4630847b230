"""Router: many task adapters served on one frozen backbone, the public Python API.

    r = Router.from_registry("adapters/")        # the backbone loads once, adapters lazily
    r.use("sst2"); r.predict("a gorgeous, witty film")   # "positive"; through "auto", run()'s answer (and its routing)
    r.merge({"sst2": 0.5, "ag_news": 0.5}, method="ties", density=0.5, task="sst2", name="mix")
    r.run([{"adapter": "sst2", "text": "…"}, {"adapter": "date_iso", "text": "…"},
           {"adapter": "base", "text": "…"}, {"adapter": "auto", "text": "…"}])

A Router is the AdapterManager (serving/manager.py: known adapters, residency, requests made ready)
with the calls a user makes. `run` serves a batch whose every row names its own adapter through the
server's engine (serving/engine.py): the same scheduler, budgets and decoding as `serve`, here to the
end on the calling thread; classification rows are scored over their labels, generation rows decode
to their own stop.
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from peft import PeftModel

from adapterhub_lite.artifacts.registries import open_registry
from adapterhub_lite.core.data import load_task_data
from adapterhub_lite.core.errors import AdapterHubError, AdapterLoadError
from adapterhub_lite.core.names import AUTO, BASE
from adapterhub_lite.model.backbone import load_backbone
from adapterhub_lite.ops.merge import MergeError, fold_into_base
from adapterhub_lite.serving.engine import Engine
from adapterhub_lite.serving.manager import AdapterManager, _locked
from adapterhub_lite.serving.routing import check_probability
from adapterhub_lite.serving.scheduler import Budgets


def _verifies(reg, name: str) -> bool:
    """Whether `name`'s latest version passes the registry's integrity check (its files, and its entry against them)."""
    try:
        reg.path(name)
    except AdapterHubError:
        return False
    return True


class Router(AdapterManager):
    """Swap, merge and batch task adapters over one backbone. Safe to call from several threads: calls take turns."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.active: str | None = None  # the adapter `predict` uses
        self.folded: list[str] = []  # adapters folded into the backbone weights (merge(into_base=True))
        self._engine: Engine | None = None  # run()'s engine, kept between calls (its loader threads and metrics)

    @classmethod
    def from_registry(cls, registry: str | Path = "adapters", *, quantization: str | None = None,
                      device: str | None = None, dtype: str | None = None, **kwargs) -> Router:
        """Open a registry and load the backbone its adapters share (adapters load on first use)."""
        if "route_threshold" in kwargs:  # refused before the backbone loads (the constructor checks it again; its default is sound)
            check_probability(kwargs["route_threshold"])
        reg = open_registry(registry)
        index = reg.index()["adapters"]
        if not index:
            raise AdapterLoadError(f"registry {registry} has no adapters; publish some first")
        latest = {name: reg.resolve(name)[2] for name in index}
        # the backbone (and its quantization) is the first adapter's that passes its integrity check: an entry edited
        # by hand is refused below, and must not choose the backbone the others are served on meanwhile
        first = next((e for n, e in latest.items() if _verifies(reg, n)), next(iter(latest.values())))  # others: refused by register()
        backbone = load_backbone(first["base"]["name"], quantization or first["quantization"], device, dtype=dtype or "auto")
        router = cls(backbone, reg, **kwargs)

        def inspect(name: str):  # on a worker: hashing releases the GIL, so thousands of adapters check in parallel
            try:
                return router.inspect(name)
            except AdapterHubError as exc:
                return exc
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            for name, found in zip(latest, pool.map(inspect, latest)):
                if isinstance(found, AdapterHubError):
                    router.mark_unavailable(name, found)
                else:
                    router.add(found)
        if router.unavailable and not router.folders:
            raise AdapterLoadError(f"no adapter of registry {registry} can be served: " + "; ".join(router.unavailable.values()))
        return router

    # -- swap ----------------------------------------------------------------------------------
    @_locked
    def use(self, name: str) -> None:
        """Make `name` the adapter that `predict` uses (loaded now; reloaded on use if it is evicted later); "base" or
        "auto" (each request routed by its content) too."""
        if name not in (BASE, AUTO):
            self._ensure(name)
        self.active = name

    @_locked
    def predict(self, text: str | dict, adapter: str | None = None):
        """One request through the active (or the given) adapter: its prediction (the label word, or the answer's first
        line). Through "auto", run()'s answer instead, {"adapter", "prediction", "routing"}: the caller did not name the
        adapter, so the answer says which one gave it and why (base's raw continuation, when routing falls back, would
        otherwise read as a task's answer)."""
        adapter = adapter or self.active
        if adapter is None:
            raise AdapterLoadError("no active adapter: call use(name) first or pass adapter=")
        row = text if isinstance(text, dict) else {"text": text}
        answer = self._serve([{**row, "adapter": adapter}])[0]  # one request: its error needs no index
        return answer if adapter == AUTO else answer["prediction"]

    # -- merge ---------------------------------------------------------------------------------
    @_locked
    def merge(self, weights: dict[str, float], method: str = "linear", *, density: float | None = None, task: str | None = None,
              name: str = "merged", output: str | Path | None = None, report_rows: int | None = 0, into_base: bool = False,
              majority_sign_method: str | None = None) -> dict:
        """Merge known LoRA adapters into a new adapter `name`, register it, and return its sidecar.

        With into_base=True the merged update is also folded into the router's backbone weights:
        `base` requests (and every adapter, which applies on top) then run the folded weights; `name` itself is
        then refused as an adapter (it would apply twice). On an
        8-bit backbone the folded weights are re-quantized; sidecar["fold"] reports the max |Δlogit|
        this causes on the first source task's dev prompts.
        """
        if not isinstance(weights, dict) or not weights:  # a list failed as AttributeError: 'list' object has no attribute 'items'
            raise MergeError(f"merge() takes a dict of source name → weight with at least one source, got {weights!r:.60}; "
                             "pass e.g. {'sst2': 0.5, 'ag_news': 0.5}")
        for source in weights:  # an unknown name was 'unloaded while the merge was built; see GET /v1/models' (the server's words)
            if source in (BASE, AUTO) or not isinstance(source, str):
                raise MergeError(f"merge source {source!r} is no adapter; name the LoRA adapters to merge")
            self._check_known(source)  # as run() names one: 'unknown adapter …; known: …', a pinned version registered on first use
        if not isinstance(name, str):  # a number was a TypeError from the output path
            raise MergeError(f"the merged adapter's name {name!r} is a {type(name).__name__}, not a string; give name='...'")
        if name in self.folders or name in (BASE, AUTO):  # register() would put the merge in its place, unsaid
            raise MergeError(f"an adapter named {name!r} is already served by this router; give the merge another name (name=...)")
        scratch = output is None
        output, sidecar = self.build_merge(weights, method, density=density, task=task, name=name, output=output, report_rows=report_rows,
                                           majority_sign_method=majority_sign_method)
        try:
            self.register(name, output)
        except BaseException:  # a merge in the router's own folder that is not served is not kept: a retry would find it there
            if scratch:
                shutil.rmtree(output, ignore_errors=True)
            raise
        if into_base:
            spec = self.spec(next(iter(weights)))
            probe = load_task_data(spec, ("dev",))["dev"].prompts[:16] if spec else ["The capital of France is"]
            # peft wraps the backbone's own linears (the bank's per-row layers step aside meanwhile),
            # folds the update into them and unwraps: the modules stay the same objects, only their
            # weights change, and the bank's layers go back around them.
            with self.bank.plain() as model:
                _, error = fold_into_base(PeftModel.from_pretrained(model, output), self.backbone.tokenizer, probe)
            sidecar["fold"] = {"into_base": True, "max_abs_dlogit": round(error, 6), "probe_prompts": len(probe),
                               "quantization": self.backbone.fingerprint["quantization"]}
            self.folded.append(name)
        return sidecar

    def _check_known(self, name: str) -> None:
        """As the manager's, and a merge folded into the backbone is refused by name: every row runs it already, so
        served as an adapter it would be applied a second time on top (W + 2ΔW)."""
        if name in self.folded:
            raise MergeError(f"adapter {name!r} is folded into the backbone's weights (merge(..., into_base=True)), so every request runs it "
                             "already; served as an adapter it would apply twice: name 'base' for it")
        super()._check_known(name)

    # -- heterogeneous batches -----------------------------------------------------------------
    @_locked
    def run(self, requests: list[dict], max_new_tokens: int = 32, *, max_batch_rows: int = 32, on_done=None) -> list[dict]:
        """Serve a batch in which each request names its adapter ("base", "auto" or a known name): the server's
        engine, run to the end here (Engine.run says what each request gets). Rows run `max_batch_rows` at a time,
        continuously batched; adapters that do not fit the memory budget together take turns. A request that fails
        raises its error (the first failing one in order) once the others have ended, naming it: 'run(): requests[i] …'
        (its index is the error's `request_index`; its own words, without the index, are its `detail`)."""
        try:
            return self._serve(requests, max_new_tokens, max_batch_rows=max_batch_rows, on_done=on_done)
        except AdapterHubError as exc:
            index = getattr(exc, "request_index", None)
            if index is None:
                raise
            # the same error object, so its type (ContextLengthError, AdapterLoadError …) still tells what went wrong
            exc.detail = getattr(exc, "detail", str(exc))
            row = requests[index]  # not a dict when that is its error
            named = f" (adapter {row.get('adapter')!r})" if isinstance(row, dict) and "adapter" in row else ""
            exc.args = (f"run(): requests[{index}]{named}: {exc.detail}",)
            raise

    @_locked
    def _serve(self, requests: list[dict], max_new_tokens: int = 32, *, max_batch_rows: int = 32, on_done=None) -> list[dict]:
        """run() without naming the failing request in its error (predict serves one)."""
        if self._engine is None or self._engine.max_batch_rows != max_batch_rows:
            self.close_engine()
            self._engine = Engine(self, budgets=Budgets(max_rows=max_batch_rows))
        return self._engine.run(requests, max_new_tokens, on_done=on_done)

    def close_engine(self) -> None:
        """Stop run()'s engine (its loader threads); the next run() makes a new one."""
        if self._engine is not None:
            self._engine.stop()
            self._engine = None

    def close(self) -> None:
        """Stop run()'s engine and remove the merged adapters' folders; the router serves nothing after."""
        self.close_engine()
        super().close()


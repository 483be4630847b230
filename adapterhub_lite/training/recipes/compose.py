"""Learned composition for a new task (after LoraHub): weights over existing LoRA adapters, fitted
on a few labeled examples, saved as an ordinary adapter.

The composed update at every module is Σ_i w_i·B_i·A_i — stored exactly, as the sources' factors
concatenated with w_i folded into B_i (rank Σ r_i), so w = (1, 0, …) is the first source exactly.
The weights are found by CMA-ES (gradient-free, the `cma` package) or by gradient descent on the
weights alone (the factors stay frozen), minimising the few-shot loss + l1·Σ|w_i|, as LoraHub does.
The few-shot rows are kept in the output folder (shots.jsonl), so the result can be reproduced.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch

from adapterhub_lite.artifacts.files import atomic_write, write_json
from adapterhub_lite.artifacts.folder import check_adapter_folder, read_sidecar
from adapterhub_lite.artifacts.loading import check_fingerprint
from adapterhub_lite.artifacts.registry import registered_as
from adapterhub_lite.artifacts.samples import routing_entry
from adapterhub_lite.core.data import Split, label_words, load_split, load_task_data, to_split
from adapterhub_lite.core.data_checks import check_lengths, data_warnings
from adapterhub_lite.core.errors import AdapterHubError
from adapterhub_lite.core.spec import TaskSpec
from adapterhub_lite.model.adapter import read_lora, save_lora
from adapterhub_lite.model.backbone import autocast, load_backbone
from adapterhub_lite.model.evaluate import evaluate_split
from adapterhub_lite.model.heads import label_token_ids, task_loss
from adapterhub_lite.model.rowadapters import RowAdapters
from adapterhub_lite.model.rowconfig import LoraFactors
from adapterhub_lite.training.output import adapter_meta, claim_output, finish_folder, publish_folder, remove_work
from adapterhub_lite.training.progress import peak_memory_mb
from adapterhub_lite.training.recipes.train import train

SEARCHES = ("cma", "gradient")


class ComposeError(AdapterHubError):
    """Sources that cannot be composed (not LoRA, another backbone, no common module)."""


class Composition(RowAdapters):
    """Sources' LoRA factors on one backbone, combined with weights w by the per-row LoRA layer.

    Slot i is source i alone; the composed slot adds Σ w_i·ΔW_i (w may be a tensor that requires
    grad: the layer builds the update from it on every forward). Inside `composed()` the model runs
    with the composition, inside `assign(i)` with source i alone, and elsewhere it is the plain backbone.
    """

    def __init__(self, model, sources: dict[str, LoraFactors]):
        self.names = list(sources)
        self.sources = [sources[n] for n in self.names]
        self.modules = sorted(set().union(*[s.modules.keys() for s in self.sources]))
        named = dict(model.named_modules())
        missing = [m for m in self.modules if m not in named]
        if missing:
            raise ComposeError(f"the sources adapt modules this backbone lacks, e.g. {missing[0]!r}; were they trained on another model?")
        if model.get_output_embeddings() in [named[m] for m in self.modules]:
            raise ComposeError("a source adapts the LM head, which composition does not support; compose adapters of the decoder's linear layers")
        super().__init__(model, {m: m for m in self.modules})
        for name, src in zip(self.names, self.sources):
            self.put(name, {m: (a.float().to(self.device), b.float().to(self.device), scale) for m, (a, b, scale) in src.modules.items()})
        for i, name in enumerate(self.names):
            self.define(i, [(name, 1.0)])
        self.composed_slot = len(self.names)
        self.weights = torch.zeros(len(self.names))

    @property
    def weights(self) -> torch.Tensor:
        return self._weights

    @weights.setter
    def weights(self, w: torch.Tensor) -> None:
        self._weights = w
        w = w.to(self.device)  # differentiable: a gradient search reaches w through this copy
        self.define(self.composed_slot, [(n, w[i]) for i, n in enumerate(self.names)])

    def composed(self):
        """Context: the model runs with the weighted composition."""
        return self.assign(self.composed_slot)

    def export(self) -> dict:
        """The composed factors (sources concatenated, w folded into B), for save_lora."""
        return self.export_slot(self.composed_slot)


def _load_sources(folders: dict[str, Path], backbone, allow_base_mismatch: bool = False) -> dict[str, LoraFactors]:
    problems, out = [], {}
    for name, folder in folders.items():
        # the checks of every way in (a sound sidecar, safetensors only, whole and finite weights): a truncated source was
        # a traceback, and one holding NaN was fitted over and refused only when the composed adapter was saved
        meta = check_adapter_folder(folder, ComposeError)
        if meta["method"] != "lora":
            problems.append(f"{name} is a {meta['method']} adapter")
            continue
        check_fingerprint(name, meta["base"]["fingerprint"], backbone.fingerprint, "compose-fit uses", allow=allow_base_mismatch)
        out[name] = read_lora(folder)
    if problems:
        raise ComposeError(f"only LoRA adapters can be composed: {'; '.join(problems)}")
    return out


def _source_records(folders: dict[str, Path]) -> dict[str, dict]:
    """What the sidecar says of each source, as merge says it: its folder, its registry name@version when it is a
    registry's version folder, and the sha256 of its weights (a folder path alone may hold other weights later)."""
    out = {}
    for name, folder in folders.items():
        found = registered_as(folder)
        out[name] = {"folder": str(folder), "registry_ref": f"{found[1]}@{found[2]}" if found else None,
                     "adapter_sha256": hashlib.sha256((Path(folder) / "adapter_model.safetensors").read_bytes()).hexdigest()}
    return out


def _shots(spec: TaskSpec, n: int, seed: int):
    ds, _ = load_split(spec.data.train)
    if n > len(ds):
        raise ComposeError(f"--shots {n} is more than the {len(ds)} training rows of {spec.name}; ask for fewer")
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return ds.select(idx)


def _shot_warnings(spec: TaskSpec, shots: Split) -> list[str]:
    """What compose-fit says of the shots it fits on: classes none of them holds (the weights are fitted without
    them: with fewer shots than classes, or by the draw) and shots that repeat an earlier shot's prompt (fewer
    distinct examples than --shots)."""
    out, n = [], len(shots)
    if spec.type == "classification":
        words, held = label_words(spec), set(shots.answers)
        missing = [repr(str(w)) for i, w in enumerate(words) if i not in held]
        if missing:
            out.append(f"warning: the {n} shots hold no row of class(es) {', '.join(missing)} ({len(missing)} of {len(words)}), so the "
                       "weights are fitted without them; give more --shots (at least one per class) or another --seed")
    seen, again = set(), []
    for i, prompt in enumerate(shots.prompts):
        if prompt in seen:
            again.append(i + 1)
        seen.add(prompt)
    if again:
        out.append(f"warning: {len(again)} of the {n} shots repeat an earlier shot's prompt (shots.jsonl line {', '.join(map(str, again[:5]))}"
                   f"{', …' if len(again) > 5 else ''}), so the weights are fitted on {n - len(again)} distinct inputs; drop the repeated "
                   f"rows from {spec.data.train!r}")
    return out


def compose_fit(spec: TaskSpec, sources: dict[str, str | Path], output: str | Path, *, shots: int = 16, search: str = "cma",
                budget: int = 40, l1: float = 0.05, seed: int = 0, baselines: bool = True, lora_steps: int = 40,
                eval_rows: int | None = None, overwrite: bool = False, device: str | None = None, dtype: str | None = None,
                command: str | None = None, allow_base_mismatch: bool = False) -> dict:
    """Fit composition weights for `spec` from `shots` training rows, write the composed adapter
    folder, and return the report (also saved in the folder as compose_report.json).

    With `baselines`, the report compares on the dev set: the base model zero-shot, every single
    source (and the best of them), and a LoRA trained on the same shots for `lora_steps` steps.
    """
    if search not in SEARCHES:
        raise ComposeError(f"search {search!r} is not one of {', '.join(SEARCHES)}")
    if len(sources) < 2:
        raise ComposeError(f"compose-fit needs at least two source adapters, got {list(sources)}")
    if not (isinstance(l1, (int, float)) and math.isfinite(l1) and l1 >= 0):  # a negative penalty rewarded large weights, unsaid
        raise ComposeError(f"--l1 must be a penalty ≥ 0, got {l1!r}; e.g. --l1 0.05 (LoraHub's), or 0 for none")
    if baselines and lora_steps < 1:  # its sidecar would record max_steps 0, which no reader accepts
        raise ComposeError(f"lora_steps {lora_steps} leaves the LoRA-on-shots baseline untrained; give --lora-steps 1 or more, "
                           "or --no-baselines to skip the comparisons")
    output = Path(output)
    with claim_output(output, overwrite, resume=False) as work:  # held until the adapter is in place: a second run into it is refused
        shot_ds = _shots(spec, shots, seed)
        shot_text = "".join(json.dumps(r, default=str) + "\n" for r in shot_ds)
        shot_split = to_split(spec, shot_ds, f"{spec.data.train} ({shots} shots, seed {seed})", hashlib.sha256(shot_text.encode()).hexdigest(),
                              file=spec.data.train)
        dev = load_task_data(spec, ("dev",))["dev"]
        backbone = load_backbone(spec.base, spec.quantization, device, dtype=dtype or spec.dtype)
        check_lengths(spec, backbone.tokenizer)  # max_length must fit the longest label or target (needs the tokenizer)
        scored = Split(dev.prompts[:eval_rows], dev.answers[:eval_rows], dev.source, dev.sha256)  # the dev rows the report scores
        # what train says of its data (prompts cut, dev rows fitted on, classes dev lacks), and of few shots: said, never silently
        for warning in data_warnings(spec, backbone.tokenizer, {"train": shot_split, "dev": scored}) + _shot_warnings(spec, shot_split):
            print(warning, file=sys.stderr)
        comp = Composition(backbone.model, _load_sources({n: Path(f) for n, f in sources.items()}, backbone, allow_base_mismatch))
        tok = backbone.tokenizer
        labels = label_token_ids(tok, spec) if spec.type == "classification" else None

        def objective(w: torch.Tensor) -> torch.Tensor:
            comp.weights = w
            with comp.composed(), autocast(backbone):
                loss = task_loss(backbone.model, tok, shot_split.prompts, shot_split.answers, spec.train.max_length, labels)
            return loss + l1 * w.abs().sum()

        start = time.perf_counter()
        weights, trace = (_cma if search == "cma" else _gradient)(objective, len(comp.names), budget, seed)
        finite = [t for t in trace if math.isfinite(t["loss"])]
        if not finite:  # the searches keep the best finite loss: with none, w would stay 0 and the "composed" adapter be the base model
            raise ComposeError(f"every one of the {len(trace)} few-shot losses the search evaluated was {trace[0]['loss']}, so no weights "
                               "were fitted; run in fp32 (--dtype fp32) and check the sources' weights and the task's shots")
        best_step = min(finite, key=lambda t: t["loss"])["step"]  # the weights kept are the lowest loss's, not the last's
        comp.weights = weights
        fit_seconds = time.perf_counter() - start

        seconds: list[float] = []

        def dev_score(route) -> dict:
            with route:
                metrics, _, took = evaluate_split(backbone.model, tok, spec, dev, limit=eval_rows)
            seconds.append(took)
            return {k: v for k, v in metrics.items() if k != "per_class"}

        primary = spec.primary_metric
        report = {"task": spec.name, "metric": primary, "shots": shots, "search": search, "budget": budget, "l1": l1,
                  "weights": dict(zip(comp.names, [round(w, 5) for w in weights.tolist()])), "fit_seconds": round(fit_seconds, 1),
                  "dev_rows": min(eval_rows or len(dev), len(dev)), "composed": dev_score(comp.composed())}
        if baselines:
            report["base"] = dev_score(comp.assign(None))  # the layers idle: the plain backbone
            report["sources"] = {n: dev_score(comp.assign(i)) for i, n in enumerate(comp.names)}
            best = max(report["sources"], key=lambda n: report["sources"][n][primary])
            report["best_single"] = {"adapter": best, **report["sources"][best]}
            report["lora_on_shots"] = _lora_on_shots(spec, shot_text, work, lora_steps, device, dtype, report["dev_rows"])

        out = work / "adapter"
        save_lora(out, comp.export(), backbone.hub_id)
        atomic_write(out / "shots.jsonl", shot_text)
        tokens = len(trace) * sum(len(ids) for ids in tok(shot_split.prompts).input_ids)  # prompt tokens read by the search
        run_device = str(next(backbone.model.parameters()).device)
        routing = routing_entry(backbone.model, tok, spec, out)  # hooks idle: the plain backbone's view of the task's inputs
        # metrics_rows (as merge records it): the composed score is on the first --rows dev rows, data.dev names the whole file
        meta = adapter_meta(spec, backbone, {"train": shot_split, "dev": dev}, report["composed"], routing=routing, command=command or " ".join(sys.argv),
                            metrics_rows=report["dev_rows"],
                            trainable_parameters={"trainable": len(comp.names), "total": len(comp.names), "percent": 100.0},
                            efficiency={"adapter_file_bytes": (out / "adapter_model.safetensors").stat().st_size,
                                        "peak_memory_mb": round(peak_memory_mb(run_device), 1), "train_tokens_per_s": round(tokens / max(fit_seconds, 1e-9), 1),
                                        "latency_ms_per_example": round(1000 * seconds[0] / report["dev_rows"], 2), "device": run_device},
                            train_state={"steps": len(trace), "best_step": best_step, "stopped_by": "budget", "train_seconds": report["fit_seconds"], "tokens": tokens},
                            composition={"search": search, "weights": report["weights"], "l1": l1, "shots": shots, "seed": seed,
                                         "sources": _source_records({n: Path(sources[n]) for n in comp.names})})
        finish_folder(out, meta, trace, primary)
        write_json(out / "compose_report.json", report)
        publish_folder(out, output)
        remove_work(work)
    return report


@torch.no_grad()
def _cma(objective, n: int, budget: int, seed: int):
    """CMA-ES from w = 0 (the base model), step 0.5; `budget` loss evaluations, no more; the best weights evaluated."""
    import cma

    es = cma.CMAEvolutionStrategy([0.0] * n, 0.5, {"seed": seed + 1, "bounds": [-1.5, 1.5], "verbose": -9})
    trace, best = [], (float("inf"), torch.zeros(n))
    # cma's own maxfevals is checked between generations, so the last one ran whole: 48 evaluations for --budget 40 over
    # 4 sources (a generation of 8), 6 for a budget of 1. The budget is spent here, one evaluation at a time, and a
    # generation cut short is not told to cma (tell takes whole ones): the best weights evaluated are kept by us.
    while len(trace) < budget and not es.stop():
        xs, losses = es.ask(), []
        for x in xs[: budget - len(trace)]:
            w = torch.tensor(x, dtype=torch.float32)
            losses.append(objective(w).item())
            trace.append({"step": len(trace) + 1, "loss": round(losses[-1], 5)})
            if losses[-1] < best[0]:
                best = (losses[-1], w)
        if len(losses) == len(xs):
            es.tell(xs, losses)
    return best[1], trace


def _gradient(objective, n: int, budget: int, seed: int):
    """Adam on the weights alone (lr 0.05) for `budget` steps; the best weights seen are kept."""
    w = torch.zeros(n, requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.05)
    trace, best = [], (float("inf"), w.detach().clone())
    for step in range(budget):
        loss = objective(w)
        if loss.item() < best[0]:
            best = (loss.item(), w.detach().clone())
        trace.append({"step": step + 1, "loss": round(loss.item(), 5)})
        opt.zero_grad()
        loss.backward()
        opt.step()
    return best[1], trace


def _lora_on_shots(spec: TaskSpec, shot_text: str, work: Path, steps: int, device, dtype, dev_rows: int) -> dict:
    """The usual alternative: a fresh LoRA (the spec's own LoRA settings) trained on the same rows, and scored on
    the dev rows the other entries of the report are scored on (the first `dev_rows`)."""
    work.mkdir(parents=True, exist_ok=True)
    shots_file = work / "shots.jsonl"
    atomic_write(shots_file, shot_text)
    few = copy.deepcopy(spec)
    few.data.train = str(shots_file)
    dev_ds, _ = load_split(spec.data.dev, "dev")
    if dev_rows < len(dev_ds):  # train's final eval reads the whole dev split: give it the report's rows only
        dev_file = work / "dev.jsonl"
        atomic_write(dev_file, "".join(json.dumps(r, default=str) + "\n" for r in dev_ds.select(range(dev_rows))))
        few.data.dev = str(dev_file)
    few.dtype = dtype or spec.dtype
    if few.method != "lora":
        few.method, few.method_args = "lora", {}
    few.train.max_steps, few.train.batch_size = steps, min(shot_text.count("\n"), spec.train.batch_size)
    few.train.warmup_steps, few.train.eval_every, few.train.checkpoint_every = 0, steps, steps
    few.train.patience, few.train.max_minutes, few.train.epochs = 0, 0.0, 0.0
    # given, so train's defaults (defaults.resolve) keep them rather than choose a budget from the shots
    few.given = spec.given | {f"train.{k}" for k in ("max_steps", "batch_size", "warmup_steps", "eval_every", "checkpoint_every",
                                                     "patience", "max_minutes", "epochs")}
    folder = train(few, work / "lora_on_shots", progress=False, device=device)
    meta = read_sidecar(folder)
    return {"steps": steps, "dev_rows": meta["data"]["dev"]["rows"], **{k: v for k, v in meta["metrics"].items() if k != "per_class"}}

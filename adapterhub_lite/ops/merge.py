"""Merge LoRA adapters at load time into a new, ordinary adapter folder (peft does the maths).

`merge_adapters` loads the sources onto one backbone, combines them with peft's
`add_weighted_adapter`, saves the result as a publishable adapter folder with a sidecar built for
it (sources, weights, method, density, its own task or none; no metrics or routing data borrowed
from a source), and reports each source task's dev score under the merged adapter next to its
score under its own adapter.

What each method acts on (ΔW_i = s_i·B_i·A_i is source i's update of a layer's weight):

- On the factors A and B separately (equal ranks; the merged rank is that rank):
  `linear` — A = Σ √(w_i s_i)·A_i and B = Σ √(w_i s_i)·B_i, so B·A = Σ w_i ΔW_i *plus the cross
  terms* √(w_i s_i w_j s_j)·B_i·A_j (i ≠ j); `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` —
  prune (and for TIES elect signs) on A and on B, each on its own, not on ΔW.
- On ΔW itself: `delta_linear` (peft's `cat`) — the sources' factors concatenated along the rank
  with w_i·s_i folded in: exactly Σ w_i ΔW_i at rank Σ r_i; `svd` — Σ w_i ΔW_i truncated to the
  largest source rank by SVD; `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd` —
  TIES / DARE / magnitude pruning on the ΔW_i themselves, then the same SVD truncation. These take
  mixed ranks.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import merge_utils

from adapterhub_lite.artifacts.files import atomic_write, temp_beside
from adapterhub_lite.artifacts.folder import hub_model_id, nonfinite_tensors
from adapterhub_lite.artifacts.registry import registered_as
from adapterhub_lite.artifacts.sidecar import SIDECAR, Sidecar, build
from adapterhub_lite.core.data import load_task_data
from adapterhub_lite.core.numbers import is_count, is_finite_number
from adapterhub_lite.core.spec import spec_from_dict
from adapterhub_lite.model.backbone import load_backbone
from adapterhub_lite.model.evaluate import evaluate_split
from adapterhub_lite.model.lora_format import base_rewriting_problem, with_peft_defaults
from adapterhub_lite.ops.merge_sources import MergeError, load_sources, read_json, read_source, read_weights

FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")  # act on A and B separately; equal ranks
DELTA_METHODS = ("delta_linear", "cat", "svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")  # act on ΔW
MERGE_METHODS = FACTOR_METHODS + DELTA_METHODS
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune", "ties_svd", "dare_linear_svd", "dare_ties_svd",
                   "magnitude_prune_svd")  # prune each update to a density first
SIGN_METHODS = ("ties", "dare_ties", "ties_svd", "dare_ties_svd")  # elect a sign per entry: majority_sign_method total or frequency
RANDOM_METHODS = ("dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd")  # DARE drops at random (torch's CPU generator)
_GLOBAL_RNG = threading.Lock()  # one seeded merge at a time draws from torch's global generator (the server builds merges on threads)
_PEFT_NAME = {"delta_linear": "cat"}  # peft's `cat` is the exact ΔW sum; the name says what it does
NO_TASK = "none"  # task= for a merged adapter that serves no task (raw text, like a joint run's shared adapter)


def _check_sources(metas: dict[str, dict], method: str, weights: dict[str, float], allow_base_mismatch: bool = False) -> None:
    if method not in MERGE_METHODS:
        raise MergeError(f"merge method {method!r} is not one of {', '.join(MERGE_METHODS)}")
    if set(weights) != set(metas):
        raise MergeError(f"weights name {sorted(weights)} but the sources are {sorted(metas)}; give one weight per source")
    bad = {n: w for n, w in weights.items() if not is_finite_number(w)}  # True is no weight
    if bad:
        raise MergeError(f"merge weights must be finite numbers, got {bad}; give each source a finite weight such as 0.5")
    not_lora = {n: m["method"] for n, m in metas.items() if m["method"] != "lora"}
    if not_lora:
        raise MergeError(f"only LoRA adapters can be merged; {not_lora} are not (serve them side by side in one batch instead)")
    bases = {m["base"]["fingerprint"]["id"] for m in metas.values()}
    if len(bases) > 1 and not allow_base_mismatch:
        raise MergeError(f"sources were trained on different backbones {sorted(bases)}; merge adapters of one backbone")


def _ranks(configs: dict[str, dict]) -> dict[str, int]:
    """Each source's largest rank (its r or a rank_pattern entry), as peft sizes the merged adapter by."""
    return {n: max([c["r"], *(c.get("rank_pattern") or {}).values()]) for n, c in configs.items()}


def check_merge(configs: dict[str, dict], metas: dict[str, dict], weights: dict[str, float], method: str, density: float | None,
                allow_base_mismatch: bool = False, majority_sign_method: str | None = None) -> dict[str, int]:
    """Refuse a merge peft would fail on or do wrong, in one line; return the sources' ranks (each one's largest).
    `configs`: each source's adapter_config.json as read (a key it leaves out means peft's default, e.g. r=8)."""
    _check_sources(metas, method, weights, allow_base_mismatch)
    configs = {n: with_peft_defaults(c, f"merge source {n!r}'s adapter_config.json", MergeError) for n, c in configs.items()}
    # A PiSSA / OLoRA / CorDA … source is the residual of a base its init rewrote: merged beside others it would be
    # served on the unchanged backbone (peft keeps the first source's config, so a later source's init goes unsaid)
    rewritten = next(filter(None, (base_rewriting_problem(c, f"merge source {n!r}", use="merge") for n, c in configs.items())), None)
    if rewritten:
        raise MergeError(rewritten)
    on_parameters = {n: c["target_parameters"] for n, c in configs.items() if c.get("target_parameters")}
    if on_parameters:  # peft's add_weighted_adapter raises a bare ValueError on them (a 500 from a per-request merge)
        raise MergeError(f"{sorted(on_parameters)} set target_parameters {on_parameters} (LoRA on nn.Parameter, e.g. MoE experts), which "
                         "peft's add_weighted_adapter cannot merge; merge adapters that target modules alone (target_modules), or retrain "
                         "without target_parameters")
    ranks = _ranks(configs)
    patterned = {n: c["rank_pattern"] for n, c in configs.items() if set((c.get("rank_pattern") or {}).values()) - {c["r"]}}
    if method in FACTOR_METHODS and patterned:  # peft stacks A and B layer by layer: other ranks in a layer fail there
        raise MergeError(f"method {method!r} needs one LoRA rank in every layer, but {sorted(patterned)} set other ranks per module "
                         f"(rank_pattern {patterned}); use method 'delta_linear' (or 'cat') or 'svd', which handle different ranks")
    if method in FACTOR_METHODS and len(set(ranks.values())) > 1:
        raise MergeError(f"method {method!r} needs equal LoRA ranks but they are {ranks}; "
                         "use method 'delta_linear' (or 'cat') or 'svd', which handle different ranks")
    if method in DENSITY_METHODS and density is None:
        raise MergeError(f"method {method!r} needs a density in (0, 1], e.g. --density 0.5")
    if method in DENSITY_METHODS and not (is_finite_number(density) and 0 < density <= 1):
        raise MergeError(f"density must be in (0, 1], got {density!r}; e.g. --density 0.5")
    if majority_sign_method is not None and method not in SIGN_METHODS:
        raise MergeError(f"method {method!r} elects no signs, so majority_sign_method ({majority_sign_method!r}) is unused; drop it, or use one of "
                         f"{', '.join(SIGN_METHODS)}")
    if majority_sign_method not in (None, "total", "frequency"):
        raise MergeError(f"majority_sign_method is {majority_sign_method!r}; give 'total' (the default) or 'frequency'")
    if method not in DENSITY_METHODS and density is not None:
        raise MergeError(f"method {method!r} does not use a density (got {density}); drop --density, or use one of {', '.join(DENSITY_METHODS)}")
    return ranks


def add_merged(model: PeftModel, names: list[str], weights: list[float], adapter_name: str, method: str, density: float | None = None,
               majority_sign_method: str | None = None) -> None:
    """Add the merge of the loaded adapters `names` to `model` as `adapter_name` (peft's add_weighted_adapter,
    which takes this module's method names). Call check_merge first."""
    if adapter_name in model.peft_config:  # peft would silently keep the existing adapter
        raise MergeError(f"an adapter named {adapter_name!r} is already loaded (a source's name?); give the merged adapter another name")
    kwargs = {"density": density} if density is not None else {}
    if majority_sign_method is not None:
        kwargs["majority_sign_method"] = majority_sign_method
    model.add_weighted_adapter(names, weights, adapter_name, combination_type=_PEFT_NAME.get(method, method), **kwargs)
    merged = model.peft_config[adapter_name]
    if merged.use_rslora:
        # peft's merged config is the first source's with lora_alpha = r, i.e. a scale of 1 (each source's own scale is
        # already in the merged factors), but it keeps that source's use_rslora: the merge then ran at √r times its update
        # (the exact `cat` sum off by √(Σr)), saved so. Scale 1 here, as for any other first source.
        merged.use_rslora = False
        for module in model.modules():
            if isinstance(module, LoraLayer) and adapter_name in module.scaling:
                module.use_rslora[adapter_name] = False
                module.set_scale(adapter_name, 1.0)  # lora_alpha / r = 1


def cpu_random_pruning(tensor: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """peft's merge_utils.random_pruning (DARE's drop), its mask drawn on the CPU and moved to the tensor's device.

    peft draws it with torch.bernoulli on the tensor's own device, i.e. from that device's generator: a merge whose
    backbone sat on a GPU dropped other entries than the same `merge --seed` on a CPU (CUDA's Philox stream is not the
    CPU's Mersenne Twister). Drawn from the CPU generator, one seed is one adapter on any machine, and on the CPU the
    very mask peft draws (the same call on the same generator)."""
    mask = torch.bernoulli(torch.full(tensor.shape, density, dtype=tensor.dtype, device="cpu")).to(tensor.device)
    pruned = tensor * mask
    return pruned / density if rescale else pruned


@contextmanager
def _masks_from_the_cpu():
    """peft's DARE draws through cpu_random_pruning while a merge holds _GLOBAL_RNG (every merge does: only one swaps it at a
    time). peft's prune() looks random_pruning up in its module when called, so the swap reaches dare_linear / dare_ties."""
    own = merge_utils.random_pruning
    merge_utils.random_pruning = cpu_random_pruning
    try:
        yield
    finally:
        merge_utils.random_pruning = own


def _task_label(task: dict | None) -> str:
    return f"{task['name']} ({task['type']})" if task else "no task"


def merged_task(metas: dict[str, dict], task: str | None) -> dict | None:
    """The task spec the merged adapter serves: the sources' common task when task is None, the
    source task named `task`, or none at all for task='none' (it then serves raw text)."""
    tasks = {n: m.get("task") for n, m in metas.items()}
    names = sorted({t["name"] for t in tasks.values() if t})
    if task is None:
        if len({(t["name"], t["type"]) if t else None for t in tasks.values()}) == 1:
            return next(iter(tasks.values()))
        described = ", ".join(f"{n}: {_task_label(t)}" for n, t in tasks.items())
        raise MergeError(f"the sources serve different tasks ({described}); name the merged adapter's task with --task "
                         f"(one of {', '.join(names) or 'none'}), or --task {NO_TASK} for an adapter that serves raw text")
    if task == NO_TASK:
        return None
    match = [t for t in tasks.values() if t and t["name"] == task]
    if not match:
        raise MergeError(f"--task {task!r} is not the task of any source (their tasks: {', '.join(names) or 'none'}); name one of them, or {NO_TASK}")
    return match[0]


def factor_model(config) -> torch.nn.Module:
    """A model of the backbone's shape that holds no weights, for peft to merge adapters on.

    peft's add_weighted_adapter reads only the adapters' factors, but it builds them inside the base model's
    layers and allocates the merged adapter where each base weight lives. So every module is made on the
    meta device (no memory), and each linear layer's weight becomes a zero-stride view of one zero on the
    CPU: the right shape, dtype and device, 4 bytes in all. The merged factors are then real CPU tensors,
    computed exactly as on the real backbone, and no second backbone is ever loaded."""
    from transformers import AutoModelForCausalLM

    # torch's device context is this thread's alone; accelerate's (and peft's low_cpu_mem_usage) init_empty_weights
    # patches nn.Module.register_parameter for the whole process, so a server building two merges at once (or a thread
    # making parameters meanwhile) got meta factors, and the patch could outlive both builds
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    zero = torch.zeros((), dtype=torch.float32)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight = torch.nn.Parameter(zero.expand(module.out_features, module.in_features), requires_grad=False)
            if module.bias is not None:
                module.bias = torch.nn.Parameter(zero.expand(module.out_features), requires_grad=False)
    return model


def peft_names(names: list[str], merged: str) -> dict[str, str]:
    """A name peft can load each source under: its own, or with '.' (a ModuleDict key cannot hold one) made '_' (an empty
    name '_'), then '_' added until it is no other source's, no other alias and not the merged adapter's name."""
    taken = set(names) | {merged}
    alias = {}
    for n in names:
        a = n
        if not n or "." in n:  # nor an empty one: a ModuleDict key cannot be ""
            a = n.replace(".", "_") or "_"
            while a in taken:
                a += "_"
            taken.add(a)
        alias[n] = a
    return alias


def merge_adapters(folders: dict[str, str | Path], weights: dict[str, float], method: str = "linear", *,
                   density: float | None = None, name: str = "merged", output: str | Path | None = None,
                   task: str | None = None, quantization: str | None = None, report_rows: int | None = 200,
                   device: str | None = None, dtype: str | torch.dtype | None = None, allow_base_mismatch: bool = False,
                   base_config=None, contents: dict[str, dict[str, bytes]] | None = None, seed: int = 0,
                   majority_sign_method: str | None = None):
    """Merge LoRA adapter folders into one; returns (PeftModel with the merged adapter active, sidecar).

    `task`: the task the merged adapter serves. None: the sources' common task (sources of different
    tasks or task types are refused); a source's task name: that task's spec (prompt, labels …);
    'none': no task (serves raw text). `output` (optional) receives the merged adapter as an ordinary
    folder (PEFT files + sidecar). `report_rows` dev rows per source task are scored under the merged
    and the own adapter (None: all; 0: no report). `device` and `dtype` (None: auto) are the
    backbone's (see load_backbone); the merged factors are computed by peft in the adapters' own fp32
    whatever the backbone's dtype. With `base_config` (the backbone's config) and no report, peft merges on
    a model of that shape without weights (factor_model): no backbone is loaded, the factors are the same.
    Each source's files are read once (read_source) and the merge is built from those bytes; `contents` (name →
    read_source's dict) gives bytes a caller read and checked itself, and then the folders are not read at all.
    `seed`: torch's generator is seeded with it before the sources are loaded, so the random DARE methods give one
    adapter per seed: the one `torch.manual_seed(seed)`, then PeftModel.from_pretrained / load_adapter of the sources
    in order and add_weighted_adapter give on the CPU, whatever the backbone's device (the masks are drawn there).
    `majority_sign_method` (peft's: 'total', its default, or 'frequency'): how the TIES methods elect each sign.
    """
    # counts of the Python API (the CLI parses its own): True read as 1, 1.5 as 1 by torch.manual_seed, and
    # report_rows=-1 scored every dev row but the last
    if report_rows is not None and not (is_count(report_rows) and report_rows >= 0):
        raise MergeError(f"report_rows is {report_rows!r}; give a whole number of dev rows ≥ 0 per source task (0: no report, None: every row)")
    if not (is_count(seed) and seed >= 0):
        raise MergeError(f"seed is {seed!r}; give a whole number ≥ 0 (the DARE methods' seed)")
    folders = {n: Path(f) for n, f in folders.items()}
    files = contents if contents is not None else {n: read_source(f) for n, f in folders.items()}
    metas = {n: Sidecar.from_dict(read_json(files[n], SIDECAR, f), str(f / SIDECAR)).to_dict() for n, f in folders.items()}
    configs = {n: read_json(files[n], "adapter_config.json", f) for n, f in folders.items()}
    states = {n: read_weights(files[n], f) for n, f in folders.items()}  # a damaged file is refused before a backbone loads
    ranks = check_merge(configs, metas, weights, method, density, allow_base_mismatch, majority_sign_method)
    if name in folders:
        raise MergeError(f"the merged adapter's name {name!r} is also a source's name; choose another --name")
    if not name or "." in name:  # peft keeps adapters in torch ModuleDicts, whose keys cannot hold '.'
        raise MergeError(f"the merged adapter's name {name!r} may not contain '.' or be empty, which peft cannot use as an adapter name; "
                         "choose a name without '.' (--name)")
    own_task = merged_task(metas, task)
    first = next(iter(metas.values()))
    names = list(folders)
    # the sources' names stay in the sidecar, the report and every message; peft gets names it can hold. A pinned
    # `name@1.0.0` (the server's id of a registry version) or a folder `v1.2` was refused here, a valid request's 400
    alias = peft_names(names, name)
    if base_config is not None and report_rows == 0:
        backbone, base = None, factor_model(base_config)  # the adapters' factors only, made where each base weight lives
    else:
        backbone = load_backbone(first["base"]["name"], quantization or first["base"]["fingerprint"]["quantization"], device, dtype or "auto")
        base = backbone.model
    # DARE's drops come from torch's global generator, which peft's random init of every adapter it makes moves first:
    # seeded here before the sources are loaded (and put back after), so a recipe is one adapter however often it is
    # built (the server rebuilds an evicted merge under the same name) and equals peft's own after torch.manual_seed(seed)
    with _GLOBAL_RNG, torch.random.fork_rng(), _masks_from_the_cpu():
        torch.manual_seed(seed)
        model = load_sources(base, {alias[n]: (configs[n], states[n], folders[n]) for n in names})
        add_merged(model, [alias[n] for n in names], [weights[n] for n in names], name, method, density, majority_sign_method)
    model.set_adapter(name)
    model.eval()

    report = _report(model, backbone.tokenizer, metas, name, report_rows, alias) if backbone is not None and report_rows != 0 else {}
    shas = {n: hashlib.sha256(files[n]["adapter_model.safetensors"]).hexdigest() for n in names}  # of the bytes merged
    sidecar = merged_sidecar(model, name, metas, folders, weights, method, density, ranks, own_task, report, shas,
                             seed if method in RANDOM_METHODS else None,
                             (majority_sign_method or "total") if method in SIGN_METHODS else None)
    if output is not None:
        save_merged(model, name, sidecar, Path(output))
    return model, sidecar.to_dict()


def merged_sidecar(model: PeftModel, name: str, metas: dict[str, dict], folders: dict[str, Path], weights: dict[str, float],
                   method: str, density: float | None, ranks: dict[str, int], task: dict | None, report: dict,
                   shas: dict[str, str], seed: int | None = None, majority_sign_method: str | None = None) -> Sidecar:
    """The sidecar of a merged adapter, built for what it is: its task (or none), the shared backbone,
    the merge recipe and sources, and as metrics only what was measured on the merged adapter itself."""
    own = next((n for n, m in metas.items() if task and m.get("task") and m["task"]["name"] == task["name"]), None)
    measured = report.get(own, {}) if own else {}
    params = sum(p.numel() for n, p in model.named_parameters() if f".{name}." in n and "lora_" in n)
    sources = {}
    for n, m in metas.items():
        found = registered_as(folders[n])
        sources[n] = {"folder": str(folders[n]), "registry_ref": f"{found[1]}@{found[2]}" if found else None,
                      "task": m["task"]["name"] if m.get("task") else None, "rank": ranks[n],
                      "adapter_sha256": shas[n]}
    first = next(iter(metas.values()))
    return build(
        name, task=task, method="lora", base=first["base"],  # every source's backbone fingerprint is this one (checked)
        label_words=metas[own].get("label_words") if own else None,
        metrics=measured.get("merged", {}),  # the merged adapter's own dev scores on its task, when the report ran
        metrics_rows=measured.get("rows"),
        trainable_parameters={"trainable": params, "note": "parameters of the merged adapter (merged, not trained)"},
        merge={"method": method, "acts_on": "factors" if method in FACTOR_METHODS else "delta_w", "density": density, "seed": seed,
               "majority_sign_method": majority_sign_method,
               "weights": weights, "ranks": ranks, "rank": model.peft_config[name].r, "sources": sources},
        merge_report=report,
        routing=None,  # no routing sample of its own: content routing leaves it out (requests may still name it)
    )


def _report(model: PeftModel, tok, metas: dict[str, dict], merged: str, rows: int | None, alias: dict[str, str]) -> dict:
    """Each source task's dev score under the merged adapter vs under its own adapter (loaded as alias[name])."""
    out = {}
    for n, meta in metas.items():
        if not meta.get("task"):  # a component (a joint run's shared adapter) has no task to score
            continue
        spec = spec_from_dict(meta["task"])
        dev = load_task_data(spec, ("dev",))["dev"]
        scores = {}
        for label, adapter in (("merged", merged), ("own", alias[n])):
            model.set_adapter(adapter)
            metrics, _, _ = evaluate_split(model, tok, spec, dev, limit=rows)
            scores[label] = {k: v for k, v in metrics.items() if k != "per_class"}
        primary = spec.primary_metric
        out[n] = {**scores, "metric": primary, "delta": round(scores["merged"][primary] - scores["own"][primary], 4),
                  "rows": min(len(dev), rows or len(dev))}
    model.set_adapter(merged)
    return out


def save_merged(model: PeftModel, name: str, meta: Sidecar, output: Path) -> Path:
    """Write the merged adapter alone as an adapter folder (temp folder, then rename)."""
    if output.exists():
        raise MergeError(f"output folder {str(output)!r} already exists; choose another --output")
    state = {k: v for k, v in model.named_parameters() if f".{name}." in k and "lora_" in k}
    bad = nonfinite_tensors(state)
    if bad:
        raise MergeError(f"the merged adapter has non-finite values in {len(bad)} tensor(s), e.g. {bad[0]}; check the weights and the sources")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(output, "merge")  # clears the temps of merges into this folder killed mid-write
    try:
        # embeddings are never resized or trained here: without this, peft's "auto" looks up the base's config on the Hub
        model.save_pretrained(tmp / "out", selected_adapters=[name], save_embedding_layers=False)
        saved = tmp / "out" / (name if name != "default" else "")  # peft puts every adapter but "default" in a subfolder
        meta.save(saved)
        atomic_write(saved / "README.md", merged_card(name, meta.to_dict()))
        # a rename, not shutil.move, which puts a folder *inside* a destination that exists: one made since the check above
        # (a second merge into it, a user) would have got this merge as output/<name>/, unsaid
        taken = MergeError(f"output folder {str(output)!r} was created while the merge was written (another merge into it?); it is "
                           "left as it is and nothing was written: choose another --output")
        if output.exists() or output.is_symlink():
            raise taken
        try:
            saved.rename(output)
        except OSError:
            if output.exists():  # its OSError ("Directory not empty") would read as a disk problem
                raise taken from None
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output


def merged_card(name: str, sidecar: dict) -> str:
    """The merged adapter's model card: huggingface_hub's metadata header as a trained adapter's card has it (library,
    a Hub base model and its base_model:adapter tag, pipeline_tag), then the recipe and the per-task report."""
    from huggingface_hub import ModelCard, ModelCardData

    hub, merge = hub_model_id(sidecar["base"]["hub_id"]), sidecar["merge"]
    data = ModelCardData(library_name="peft", base_model=hub, pipeline_tag="text-generation",
                         tags=["adapterhub_lite", "lora", "merged"] + ([f"base_model:adapter:{hub}"] if hub else []))
    body = (f"# {name}: {merge['method']} merge of {', '.join(merge['sources'])}\n\n"
            f"Task: {_task_label(sidecar['task'])}. Weights: {merge['weights']}. Per-task dev report (merged vs own adapter):\n\n"
            "| source | metric | merged | own | Δ |\n|---|---|---|---|---|\n"
            + "".join(f"| {n} | {r['metric']} | {r['merged'][r['metric']]} | {r['own'][r['metric']]} | {r['delta']} |\n"
                      for n, r in sidecar["merge_report"].items()))
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


@torch.no_grad()
def fold_into_base(model: PeftModel, tok, texts: list[str]):
    """Fold the active adapter into the base weights; returns (model, max |Δlogit| it caused).

    On an fp32 base the fold is exact up to rounding; on an 8-bit base the merged weights are
    re-quantized, so the error is real and worth knowing before serving the folded model.
    """
    ids = tok(texts, return_tensors="pt", padding=True).to(next(model.parameters()).device)
    before = model(**ids).logits
    folded = model.merge_and_unload()
    after = folded(**ids).logits
    mask = ids["attention_mask"].bool()
    return folded, (before - after).abs()[mask].max().item()

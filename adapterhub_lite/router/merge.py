"""Merge LoRA adapters at load time into a new, ordinary adapter folder (peft does the maths).

`merge_adapters` loads the sources onto one backbone, combines them with peft's
`add_weighted_adapter` (linear, cat, svd, ties, dare_linear, dare_ties), saves the result as a
publishable adapter folder whose sidecar records the sources and weights, and reports each source
task's dev score under the merged adapter next to its score under its own adapter.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from peft import PeftModel

from ..backbone import load_backbone
from ..data import load_task_data
from ..errors import AdapterHubError
from ..evaluate import evaluate_split
from ..folder import FORMAT, SIDECAR, atomic_write, read_sidecar, write_json
from ..spec import spec_from_dict

MERGE_METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties")  # prune each update to a density first


class MergeError(AdapterHubError):
    """Adapters that cannot be merged as asked (method, ranks, types or backbones differ)."""


def _check_sources(metas: dict[str, dict], method: str, weights: dict[str, float]) -> None:
    if method not in MERGE_METHODS:
        raise MergeError(f"merge method {method!r} is not one of {', '.join(MERGE_METHODS)}")
    if set(weights) != set(metas):
        raise MergeError(f"weights name {sorted(weights)} but the sources are {sorted(metas)}; give one weight per source")
    not_lora = {n: m["method"] for n, m in metas.items() if m["method"] != "lora"}
    if not_lora:
        raise MergeError(f"only LoRA adapters can be merged; {not_lora} are not (serve them side by side in one batch instead)")
    bases = {m["base"]["fingerprint"]["id"] for m in metas.values()}
    if len(bases) > 1:
        raise MergeError(f"sources were trained on different backbones {sorted(bases)}; merge adapters of one backbone")


def _ranks(folders: dict[str, Path]) -> dict[str, int]:
    return {n: json.loads((f / "adapter_config.json").read_text())["r"] for n, f in folders.items()}


def check_merge(folders: dict[str, Path], metas: dict[str, dict], weights: dict[str, float], method: str, density: float | None) -> dict[str, int]:
    """Refuse a merge peft would fail on or do wrong, in one line; return the sources' ranks."""
    _check_sources(metas, method, weights)
    ranks = _ranks(folders)
    if method in ("linear", *DENSITY_METHODS) and len(set(ranks.values())) > 1:
        raise MergeError(f"method {method!r} needs equal LoRA ranks but they are {ranks}; use method 'cat' or 'svd', which handle different ranks")
    if method in DENSITY_METHODS and density is None:
        raise MergeError(f"method {method!r} needs a density in (0, 1], e.g. --density 0.5")
    return ranks


def merge_adapters(folders: dict[str, str | Path], weights: dict[str, float], method: str = "linear", *,
                   density: float | None = None, name: str = "merged", output: str | Path | None = None,
                   quantization: str | None = None, report_rows: int | None = 200, device: str | None = None,
                   dtype: str | torch.dtype | None = None):
    """Merge LoRA adapter folders into one; returns (PeftModel with the merged adapter active, sidecar).

    `output` (optional) receives the merged adapter as an ordinary folder (PEFT files + sidecar).
    `report_rows` dev rows per source task are scored under the merged and the own adapter (None: all;
    0: no report). `device` and `dtype` (None: auto) are the backbone's (see load_backbone); the merged factors
    are computed by peft in the adapters' own fp32 whatever the backbone's dtype.
    """
    folders = {n: Path(f) for n, f in folders.items()}
    metas = {n: read_sidecar(f) for n, f in folders.items()}
    ranks = check_merge(folders, metas, weights, method, density)
    first = next(iter(metas.values()))
    bb = load_backbone(first["base"]["name"], quantization or first["base"]["fingerprint"]["quantization"], device, dtype or "auto")
    names = list(folders)
    model = PeftModel.from_pretrained(bb.model, folders[names[0]], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(folders[n], adapter_name=n)
    kwargs = {"density": density} if density is not None else {}
    model.add_weighted_adapter(names, [weights[n] for n in names], name, combination_type=method, **kwargs)
    model.set_adapter(name)
    model.eval()

    report = _report(model, bb.tokenizer, metas, name, report_rows) if report_rows != 0 else {}
    sidecar = {
        **first,
        "name": name,
        "merge": {"method": method, "density": density, "weights": weights, "ranks": ranks,
                  "sources": {n: {"folder": str(folders[n]), "task": m["task"]["name"]} for n, m in metas.items()}},
        "metrics": report.get(names[0], {}).get("merged", first["metrics"]),
        "merge_report": report,
    }
    if output is not None:
        save_merged(model, name, sidecar, Path(output))
    return model, sidecar


def _report(model: PeftModel, tok, metas: dict[str, dict], merged: str, rows: int | None) -> dict:
    """Each source task's dev score under the merged adapter vs under its own adapter."""
    out = {}
    for n, meta in metas.items():
        spec = spec_from_dict(meta["task"])
        dev = load_task_data(spec, ("dev",))["dev"]
        scores = {}
        for label, adapter in (("merged", merged), ("own", n)):
            model.set_adapter(adapter)
            metrics, _, _ = evaluate_split(model, tok, spec, dev, limit=rows)
            scores[label] = {k: v for k, v in metrics.items() if k != "per_class"}
        primary = spec.primary_metric
        out[n] = {**scores, "metric": primary, "delta": round(scores["merged"][primary] - scores["own"][primary], 4),
                  "rows": min(len(dev), rows or len(dev))}
    model.set_adapter(merged)
    return out


def save_merged(model: PeftModel, name: str, sidecar: dict, output: Path) -> Path:
    """Write the merged adapter alone as an adapter folder (temp folder, then rename)."""
    if output.exists():
        raise MergeError(f"output folder {str(output)!r} already exists; choose another --output")
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as tmp:
        model.save_pretrained(tmp, selected_adapters=[name])
        saved = Path(tmp) / name  # peft puts every adapter but "default" in a subfolder
        write_json(saved / SIDECAR, {**sidecar, "format": FORMAT})
        card = (f"---\nlibrary_name: peft\nbase_model: {sidecar['base']['hub_id']}\ntags: [adapterhub_lite, lora, merged]\n---\n\n"
                f"# {name}: {sidecar['merge']['method']} merge of {', '.join(sidecar['merge']['sources'])}\n\n"
                f"Weights: {sidecar['merge']['weights']}. Per-task dev report (merged vs own adapter):\n\n"
                "| source | metric | merged | own | Δ |\n|---|---|---|---|---|\n"
                + "".join(f"| {n} | {r['metric']} | {r['merged'][r['metric']]} | {r['own'][r['metric']]} | {r['delta']} |\n"
                          for n, r in sidecar["merge_report"].items()))
        atomic_write(saved / "README.md", card)
        shutil.move(str(saved), output)
    return output


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

"""Interference report: every task's dev score under every adapter, negative transfer flagged.

Columns of the task × adapter matrix:
    base                      the plain backbone (zero-shot)
    <adapter>                 every single-task adapter given
    merged:<method>           the single-task LoRA adapters merged with equal weights (the report's `merges` names them
                              and their weights: other methods' adapters are left out of the merge): the adapter merge_adapters builds
                              (as `adapterhub-lite merge --seed <seed>` and the server do), so a dare_* column is one
                              adapter per seed (default 0, recorded in the report's `merges`)
    joint:<run>               for each task, its adapter from a joint (train-multi) run
A merged or joint cell is flagged when the task scores worse (negative transfer) or better (positive
transfer) than under its own single-task adapter by more than `tolerance`; another task's adapter is
flagged when it takes the task below the base model (interference). Every flag carries z, the
difference in standard errors, because a few hundred dev rows make small differences noise.
Output: report.json and heatmap.png.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch
from peft import PeftModel

from adapterhub_lite.artifacts.files import left_behind, temp_beside, unwritable_output, write_json
from adapterhub_lite.artifacts.folder import pyplot, read_sidecar, save_figure
from adapterhub_lite.artifacts.loading import check_fingerprint
from adapterhub_lite.core.data import load_task_data
from adapterhub_lite.core.errors import AdapterHubError
from adapterhub_lite.core.spec import spec_from_dict
from adapterhub_lite.model.backbone import load_backbone
from adapterhub_lite.model.evaluate import evaluate_split
from adapterhub_lite.ops.merge import DENSITY_METHODS, NO_TASK, RANDOM_METHODS, check_merge, merge_adapters


def _columns(folders: list[Path]) -> tuple[dict[str, Path], dict[str, dict[str, Path]]]:
    """Split the inputs into single-task adapters {name: folder} and joint runs {run: {task: folder}}."""
    singles, joints = {}, {}
    for f in folders:
        if (f / "run.json").is_file():
            tasks = json.loads((f / "run.json").read_text())["tasks"]
            joints[f"joint:{f.name}"] = {t: f / t for t in tasks}
        else:
            meta = read_sidecar(f)
            if not meta.get("task"):
                raise AdapterHubError(f"{f} is not a task adapter (no task in its sidecar); pass task adapters or joint run folders")
            task = meta["task"]["name"]
            if task in singles:  # a dict keyed by task kept the last alone: the other adapter's column was left out, unsaid
                raise AdapterHubError(f"{singles[task]} and {f} are both adapters of task {task!r}, and the matrix has one column per "
                                      "task adapter; give one adapter per task (compare two runs of a task with `eval`)")
            singles[task] = f
    if not singles:
        raise AdapterHubError("give at least one single-task adapter: the tasks of the matrix are theirs")
    return singles, joints


def interference(folders: list[str | Path], output: str | Path, *, merges: tuple[str, ...] = ("linear", "ties"), density: float = 0.5,
                 rows: int | None = 200, tolerance: float = 0.01, quantization: str | None = None, device: str | None = None,
                 dtype: str | torch.dtype | None = None, allow_base_mismatch: bool = False, seed: int = 0) -> dict:
    """Score every task under every adapter and write report.json + heatmap.png into `output`.

    `quantization` (default: the adapters' own), `device` and `dtype` (None: auto) are the backbone's (see load_backbone).
    `seed`: the merges' (merge_adapters'), so a dare_* column is the adapter `adapterhub-lite merge --seed <seed>` writes.
    """
    _check_output(Path(output))  # first: a report a killed run left aside is put back even if this run is then refused
    singles, joints = _columns([Path(f) for f in folders])
    metas = {n: read_sidecar(f) for n, f in singles.items()}
    names = list(singles)
    methods = {n: m["method"] for n, m in metas.items()}
    if len(set(methods.values())) > 1:  # peft's load_adapter raised a bare ValueError (a traceback) after the backbone loaded
        raise AdapterHubError(f"the adapters are of different methods ({', '.join(f'{n}: {m}' for n, m in methods.items())}), and the report "
                              "loads them all on one peft model, which holds adapters of one method; give adapters of one method")
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        # a negative tolerance flagged every cell as transfer (|Δ| > -1 always) and every other adapter as interference
        raise AdapterHubError(f"--tolerance must be a score difference ≥ 0, got {tolerance!r}; e.g. --tolerance 0.01")
    lora = [n for n in names if metas[n]["method"] == "lora"]
    equal = {n: 1.0 / len(lora) for n in lora}
    merged = {m: {"density": density} if m in DENSITY_METHODS else {} for m in (merges if len(lora) > 1 else ())}
    for method, kwargs in merged.items():  # refuse a bad merge before loading anything
        check_merge({n: json.loads((singles[n] / "adapter_config.json").read_text()) for n in lora}, {n: metas[n] for n in lora},
                    equal, method, kwargs.get("density"))
    first = next(iter(metas.values()))
    backbone = load_backbone(first["base"]["name"], quantization or first["base"]["fingerprint"]["quantization"], device, dtype or "auto")
    for n, m in metas.items():
        check_fingerprint(n, m["base"]["fingerprint"], backbone.fingerprint, "the report uses", allow=allow_base_mismatch)
    model = PeftModel.from_pretrained(backbone.model, singles[names[0]], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(singles[n], adapter_name=n)
    columns = ["base", *names]
    for method, kwargs in merged.items():
        # merge_adapters' own seeded build (the DARE methods drop at random), on the weightless model as the server builds
        # merges: merged here from the report's loaded adapters, the drops depended on where torch's generator stood
        with tempfile.TemporaryDirectory() as tmp:
            merge_adapters({n: singles[n] for n in lora}, equal, method, density=kwargs.get("density"), name="merged", output=Path(tmp) / "m",
                           task=NO_TASK, report_rows=0, allow_base_mismatch=allow_base_mismatch, base_config=backbone.model.config, seed=seed)
            model.load_adapter(Path(tmp) / "m", adapter_name=f"merged:{method}")
        kwargs["seed"] = seed if method in RANDOM_METHODS else None
        columns.append(f"merged:{method}")
    for run, tasks in joints.items():
        for t, f in tasks.items():
            check_fingerprint(f"{run}/{t}", read_sidecar(f)["base"]["fingerprint"], backbone.fingerprint, "the report uses", allow=allow_base_mismatch)
            model.load_adapter(f, adapter_name=f"{run}/{t}")
        columns.append(run)
    model.eval()

    specs = {n: spec_from_dict(m["task"]) for n, m in metas.items()}
    scores: dict[str, dict[str, float | None]] = {}
    n_rows: dict[str, int] = {}
    for task, spec in specs.items():
        dev = load_task_data(spec, ("dev",))["dev"]
        scores[task], n_rows[task] = {}, min(rows or len(dev), len(dev))
        for col in columns:
            adapter = f"{col}/{task}" if col in joints else col
            if col in joints and task not in joints[col]:
                scores[task][col] = None  # this run did not train the task
                continue
            scores[task][col] = _score(model, backbone.tokenizer, spec, dev, None if col == "base" else adapter, rows)
    report = {"tasks": list(specs), "columns": columns, "metric": {t: s.primary_metric for t, s in specs.items()},
              "rows": n_rows, "tolerance": tolerance, "merges": {f"merged:{m}": {"method": m, **kw, "weights": equal} for m, kw in merged.items()}, "scores": scores, "flags": _flags(scores, joints, tolerance, n_rows),
              "adapters": {n: str(f) for n, f in singles.items()}, "joint_runs": {r: sorted(t) for r, t in joints.items()}}
    _save(report, Path(output))
    return report


REPORT_FILES = {"report.json", "heatmap.png"}


def _check_output(output: Path) -> None:
    """Refuse, before anything loads, an output that is a symlink, is not a folder, holds files besides a report, or lies
    under a file; put back first a previous report that a killed run left aside (_restore_aside)."""
    if output.is_symlink():  # as pull, merge and train --overwrite: replacing the link, or the folder it names, would surprise someone
        raise AdapterHubError(f"--output {str(output)!r} is a symlink (to {os.readlink(output)!r}); interference replaces its --output "
                              "as a whole and does not write through or replace a link: give the folder itself or a new one")
    _restore_aside(output)
    if output.exists() and (not output.is_dir() or {p.name for p in output.iterdir()} - REPORT_FILES):
        raise AdapterHubError(f"--output {str(output)!r} exists and is not a report folder (it holds files besides {', '.join(sorted(REPORT_FILES))}); "
                              "choose a new folder")
    folder = output.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():  # mkdir's NotADirectoryError came out as a traceback, after every cell was scored
        raise AdapterHubError(f"--output {str(output)!r} cannot be written: {str(folder)!r} is a file, not a folder; choose an --output under a folder")


def _save(report: dict, output: Path) -> None:
    """report.json and heatmap.png, made in a hidden folder beside `output` and renamed into place as one folder, so a
    reader (or a killed run) sees the previous pair, the new pair, or none, never one file of each."""
    _check_output(output)  # again: a link or other files may have appeared while the cells were scored
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_beside(output, "report")  # clears the temps of runs killed mid-write
    try:
        tmp.mkdir()
        write_json(tmp / "report.json", report)
        heatmap(report, tmp / "heatmap.png")
        if output.exists():
            _swap(tmp, output)
        else:
            tmp.rename(output)
    except OSError as exc:  # a full disk after every cell was scored
        raise unwritable_output("the report", output, exc) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap(new: Path, output: Path) -> None:
    """Put the folder `new` in place of the report folder `output` (checked: it holds report files alone).

    Replacing the two files one after the other would leave, for a kill between, the new report.json beside the old heatmap.
    A folder cannot be renamed over a non-empty one, so the old moves aside first: a kill between the two renames
    leaves no report in place, never a mismatched one, and the old one whole beside it, which the next run on this
    --output puts back before anything else (_restore_aside)."""
    old = temp_beside(output, "replaced")
    output.rename(old)
    try:
        new.rename(output)
    except OSError:
        old.rename(output)  # the previous report stays, as the error says
        raise
    shutil.rmtree(old, ignore_errors=True)


def _restore_aside(output: Path) -> None:
    """Put back the previous report that a run killed between _swap's two renames left aside (`.<output>.replaced-…`),
    so that it is in place again whether or not this run then writes its own (a run refused later, or failing, left
    none). One whose run did land its new report (killed while removing it) is removed. A live run's is never touched."""
    for aside in left_behind(output.parent, f".{output.name}.replaced-"):
        try:
            if output.exists() or output.is_symlink():
                shutil.rmtree(aside)
            else:
                aside.rename(output)
        except OSError:
            continue  # another run restored or cleared it meanwhile


@torch.no_grad()
def _score(model, tok, spec, dev, adapter: str | None, rows: int | None) -> float:
    if adapter is not None:
        model.set_adapter(adapter)
    with model.disable_adapter() if adapter is None else nullcontext():
        metrics, _, _ = evaluate_split(model, tok, spec, dev, limit=rows)
    return metrics[spec.primary_metric]


def _flags(scores: dict, joints: dict, tolerance: float, rows: dict[str, int]) -> list[dict]:
    """Cells that differ from the task's reference (own adapter, or base) by more than `tolerance`.

    Each flag carries z = delta / its standard error (two independent proportions over the task's
    `rows[task]` dev rows): with 200 rows one standard error is ~3 points, so |z| < 2 is noise.
    """
    flags = []
    for task, row in scores.items():
        for col, value in row.items():
            if value is None or col in ("base", task):
                continue
            versus_own = col.startswith("merged:") or col in joints
            ref = row[task] if versus_own else row["base"]
            delta = value - ref
            if versus_own and abs(delta) > tolerance:
                kind = "negative_transfer" if delta < 0 else "positive_transfer"
            elif not versus_own and delta < -tolerance:
                kind = "interference"
            else:
                continue
            se = math.sqrt(max(value * (1 - value) + ref * (1 - ref), 1e-12) / rows[task])
            flags.append({"task": task, "adapter": col, "kind": kind, "score": value, "own" if versus_own else "base": ref,
                          "delta": round(delta, 4), "z": round(delta / se, 2)})
    return flags


def heatmap(report: dict, path: Path) -> None:
    """The task × adapter matrix as a PNG; flagged cells are outlined (red: worse, green: better)."""
    plt = pyplot()
    tasks, cols = report["tasks"], report["columns"]
    grid = torch.tensor([[math.nan if report["scores"][t][c] is None else report["scores"][t][c] for c in cols] for t in tasks])
    fig, ax = plt.subplots(figsize=(1.3 * len(cols) + 2, 0.7 * len(tasks) + 1.6))
    ax.imshow(grid.numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(tasks)), [f"{t} ({report['metric'][t]})" for t in tasks], fontsize=8)
    for i, t in enumerate(tasks):
        for j, c in enumerate(cols):
            v = report["scores"][t][c]
            ax.text(j, i, "—" if v is None else f"{v:.3f}", ha="center", va="center", fontsize=8, color="white" if (v or 0) < 0.6 else "black")
    colors = {"negative_transfer": "red", "interference": "red", "positive_transfer": "lime"}
    for f in report["flags"]:
        i, j = tasks.index(f["task"]), cols.index(f["adapter"])
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor=colors[f["kind"]], lw=3.5 if abs(f["z"]) >= 2 else 1.2))
    ax.set_title("dev score of each task (rows) under each adapter (columns); outlined: flagged, bold outline: |z| ≥ 2", fontsize=9)
    save_figure(fig, path, dpi=100)


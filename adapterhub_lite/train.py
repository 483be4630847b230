"""Train one adapter for one task: a single readable loop.

spec → data → backbone → adapter → loop (accumulate, clip, step, schedule, eval, keep best,
checkpoint) → adapter folder. Work happens in a hidden `.NAME.partial/` folder beside the output;
the output folder appears, complete, only at the end (rename), so a crash never leaves half an
adapter where a user or the registry would look. `resume=True` continues from the checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import platform
import random
import resource
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from tqdm.auto import tqdm
from transformers import get_scheduler

from . import __version__
from .adapter import attach, init_from, trainable_parameters
from .backbone import autocast, dtype_name, load_backbone
from .data import check_lengths, label_words, load_task_data
from .errors import AdapterHubError, DataError, OutputExistsError
from .evaluate import evaluate_split, label_token_ids
from .folder import (
    FORMAT,
    SIDECAR,
    atomic_write,
    check_base,
    check_finite,
    model_card,
    nonfinite_tensors,
    plot_curves,
    read_sidecar,
    replaceable,
    write_json,
    write_jsonl,
)
from .heads import loss_plan_ids
from .router.routing import routing_entry
from .spec import TaskSpec

log = logging.getLogger(__name__)


class TrainingError(AdapterHubError):
    """Training cannot go on (a non-finite loss, a full disk, a resume that does not match its checkpoint)."""


# Spec keys that do not change what a run computes: a resume may differ in these (a new time
# budget, data files moved but byte-identical — the data is compared by its sha256 instead).
_RESUME_FREE_KEYS = ("name", "train.max_minutes", "train.eval_batch_size", "data.train", "data.dev")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "labels":
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_identity(spec: TaskSpec, data: dict) -> dict:
    """What a checkpoint resumes: the spec's training-relevant keys and the data's sha256, with a hash of both.

    Stored in the checkpoint (plain JSON-like values, so torch.load(weights_only=True) reads it)
    and compared on resume, so an edited spec or data file is refused instead of silently continuing
    with the old optimizer and schedule.
    """
    keys = {k: v for k, v in _flatten(spec.to_dict()).items() if k not in _RESUME_FREE_KEYS}
    splits = {name: split.sha256 for name, split in data.items()}
    blob = json.dumps({"spec": keys, "data": splits}, sort_keys=True, default=str).encode()
    return {"sha256": hashlib.sha256(blob).hexdigest(), "spec": json.loads(json.dumps(keys, default=str)), "data": splits}


def check_resume(saved: dict | None, now: dict, where: Path) -> None:
    """Refuse a resume whose spec or data differ from the checkpoint's, naming each difference."""
    if saved is None:
        raise TrainingError(f"checkpoint in {where} records no spec or data hash (written by an older version); run without --resume to start fresh")
    if saved["sha256"] == now["sha256"]:
        return
    changed = [f"{k}: {saved['spec'].get(k)!r} → {now['spec'].get(k)!r}" for k in sorted(set(saved["spec"]) | set(now["spec"]))
               if saved["spec"].get(k) != now["spec"].get(k)]
    changed += [f"data {k}: sha256 {str(saved['data'].get(k))[:12]} → {str(now['data'].get(k))[:12]}"
                for k in sorted(set(saved["data"]) | set(now["data"])) if saved["data"].get(k) != now["data"].get(k)]
    raise TrainingError(f"--resume refused: the checkpoint in {where} was written for another spec or data ({'; '.join(changed)}); "
                        "restore them, or run without --resume (and with --overwrite) to start fresh")


@dataclass
class RunState:
    """Everything about progress that a resumed run needs besides weights and optimizer."""

    step: int = 0
    epoch_order: list[int] = field(default_factory=list)
    cursor: int = 0
    epoch: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    best_metric: float | None = None
    best_step: int = 0
    bad_evals: int = 0
    history: list[dict] = field(default_factory=list)


def _epoch_order(lengths: list[int], batch_size: int, seed: int) -> list[int]:
    """A shuffled epoch whose consecutive batches hold rows of similar length.

    Padding is wasted compute, and on a CPU compute is the budget. So: shuffle, cut into pools
    of 32 batches, sort each pool by length, cut into batches, and shuffle the batches.
    """
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(lengths), generator=g).tolist()
    pool = batch_size * 32
    batches = []
    for i in range(0, len(perm), pool):
        chunk = sorted(perm[i : i + pool], key=lengths.__getitem__)
        batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
    return [row for b in torch.randperm(len(batches), generator=g).tolist() for row in batches[b]]


def next_rows(state: RunState, lengths: list[int], k: int, seed: int) -> list[int]:
    """The next k rows of the current epoch; a new epoch (seeded by its number) when one ends."""
    rows = []
    while len(rows) < k:
        if state.cursor >= len(state.epoch_order):
            state.epoch_order = _epoch_order(lengths, k, seed + state.epoch)
            state.epoch += 1
            state.cursor = 0
        take = state.epoch_order[state.cursor : state.cursor + k - len(rows)]
        state.cursor += len(take)
        rows += take
    return rows


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's generators (torch.manual_seed seeds every CUDA device too)."""
    random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_mb(device: str) -> float:
    """Peak memory of the run: allocated on the GPU, or the process's resident set on the CPU."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def versions() -> dict:
    import bitsandbytes
    import peft
    import transformers

    return {"adapterhub_lite": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__}


class Checkpoint:
    """Adapter weights + optimizer + scheduler + RNG + RunState in one folder, swapped in atomically.

    A new checkpoint is written to `checkpoint.tmp/` and only then replaces `checkpoint/`; the
    previous one stays until the new one is complete. A crash between the two renames leaves the
    previous one as `checkpoint.old/`, which `find` then uses. `checkpoint.tmp/` is never read.
    """

    def __init__(self, work: Path):
        self.work = Path(work)
        self.dir = self.work / "checkpoint"

    def find(self) -> Path | None:
        """The complete checkpoint folder to resume from (the newest), or None."""
        for folder in (self.dir, self.dir.with_name("checkpoint.old")):
            if (folder / "state.pt").is_file():
                return folder
        return None

    def exists(self) -> bool:
        return self.find() is not None

    def write(self, payload: dict, opt, sched) -> None:
        """Save `payload` + optimizer, scheduler and RNG states (temp folder, then swap).

        Everything saved is tensors and plain Python values, so `read` loads it with weights_only=True.
        A failed write (a full disk) removes the temp folder, keeps the previous checkpoint and
        raises TrainingError.
        """
        tmp = self.dir.with_name("checkpoint.tmp")
        old = self.dir.with_name("checkpoint.old")
        if not self.dir.exists() and old.exists():  # the last swap was interrupted: finish it first
            old.rename(self.dir)
        shutil.rmtree(tmp, ignore_errors=True)
        # the CUDA generators too: dropout on the GPU draws from them, and resume must be exact there as well
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        try:
            tmp.mkdir()
            torch.save({**payload, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                        "rng": torch.get_rng_state(), "cuda_rng": cuda_rng, "py_rng": random.getstate()}, tmp / "state.pt")
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            kept = f"the previous checkpoint in {self.dir} is kept" if self.dir.exists() else "no earlier checkpoint exists"
            raise TrainingError(f"cannot write a checkpoint in {self.work} ({exc.strerror or type(exc).__name__}); {kept}; "
                                "free space and rerun with --resume") from None
        if self.dir.exists():
            shutil.rmtree(old, ignore_errors=True)
            self.dir.rename(old)
        tmp.rename(self.dir)
        shutil.rmtree(old, ignore_errors=True)

    def read(self, opt, sched) -> dict:
        """Restore optimizer, scheduler and RNG states; return the rest of what write() saved."""
        folder = self.find()
        if folder is None:
            raise TrainingError(f"--resume given but {self.dir} does not exist; run without --resume to start fresh")
        try:  # weights_only: tensors and plain values only, so a planted file cannot run code here
            ckpt = torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError for anything but tensors and plain values; EOFError for a cut file
            raise TrainingError(f"cannot read checkpoint {folder / 'state.pt'} safely ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
                                "run without --resume to start fresh") from None
        opt.load_state_dict(ckpt.pop("optimizer"))  # moves the states onto the parameters' device
        sched.load_state_dict(ckpt.pop("scheduler"))
        torch.set_rng_state(ckpt.pop("rng"))
        cuda_rng = ckpt.pop("cuda_rng", None)
        if cuda_rng is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_rng)
        random.setstate(_as_py_rng(ckpt.pop("py_rng")))
        return ckpt

    def save(self, model, opt, sched, state: RunState, best: dict | None, scaler=None, run: dict | None = None) -> None:
        """Checkpoint a single-adapter run (with the fp16 loss scaler's state, when there is one)."""
        payload = {"adapter": get_peft_model_state_dict(model), "best": best, "state": state.__dict__, "run": run}
        if scaler is not None and scaler.is_enabled():
            payload["scaler"] = scaler.state_dict()
        self.write(payload, opt, sched)

    def load(self, model, opt, sched, scaler=None, run: dict | None = None) -> tuple[RunState, dict | None]:
        """Restore a single-adapter run; with `run`, refuse a checkpoint written for another spec or data."""
        ckpt = self.read(opt, sched)
        if run is not None:
            check_resume(ckpt.get("run"), run, self.work)
        set_peft_model_state_dict(model, ckpt["adapter"])
        if scaler is not None and "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        return RunState(**ckpt["state"]), ckpt["best"]


def _as_py_rng(state) -> tuple:
    """random.setstate wants tuples; a state that went through a list-preserving format is mended."""
    version, internal, gauss = state
    return version, tuple(internal), gauss


def prepare_output(output: Path, overwrite: bool, resume: bool) -> Path:
    """The hidden work folder beside `output`; refuses what cannot be written before anything is.

    `--overwrite` replaces only what this package writes (see folder.replaceable): a user's file or
    a folder of other things is refused, never renamed or deleted.
    """
    output = Path(output)
    work = output.parent / f".{output.name}.partial"
    if resume and not Checkpoint(work).exists():
        raise OutputExistsError(f"--resume given but {work}/checkpoint does not exist; run without --resume to start fresh")
    if output.exists() or output.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"output folder {str(output)!r} already exists; pass --overwrite to replace it or --output to pick another")
        _refuse_unreplaceable(output)
    return work


def _refuse_unreplaceable(output: Path) -> None:
    why = replaceable(output)
    if why:
        raise OutputExistsError(f"--overwrite refused for {str(output)!r}: {why}; --overwrite replaces only adapter folders "
                                "or empty folders: pick another --output")


def train(spec: TaskSpec, output: str | Path | None = None, *, overwrite: bool = False, resume: bool = False,
          command: str | None = None, device: str | None = None, progress: bool = True) -> Path:
    """Train the spec's adapter and write its folder; returns the folder's path.

    The backbone computes in `spec.dtype` (autocast); the adapter's own weights, the optimizer
    and the loss stay fp32. fp16 adds a loss scaler (bf16 has fp32's range and needs none).
    """
    output = Path(output or Path("runs") / spec.name)  # adapters/ is the registry (publish into it)
    work = prepare_output(output, overwrite, resume)
    data = load_task_data(spec)  # validates everything before a single byte is written
    bb = load_backbone(spec.base, spec.quantization, device, dtype=spec.dtype)
    seed_everything(spec.train.seed)  # before attach: the adapter's initial weights are random
    model = attach(bb.model, spec.method, spec.method_args)
    source = _init_from(spec, model, bb) if spec.init_from else None  # a resumed run then loads its checkpoint
    tok, cfg, device = bb.tokenizer, spec.train, bb.device
    label_tokens = None
    if spec.type == "classification":
        label_tokens = label_token_ids(tok, spec)
        if len({tuple(t) for t in label_tokens}) < len(label_tokens):
            raise DataError(f"labels {label_words(spec)} tokenize to identical sequences; choose distinct verbalizer words")
    check_lengths(spec, tok, data)  # max_length must hold a prompt token plus the longest label or target

    work.mkdir(parents=True, exist_ok=True)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # peft keeps adapters fp32 on a low-precision base (autocast_adapter_dtype); make sure of it
        if p.dtype != torch.float32:
            p.data = p.data.float()
    # fused AdamW: one kernel for every parameter instead of a few per tensor on the GPU
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    sched = get_scheduler(cfg.schedule, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=bb.dtype == torch.float16)  # fp16 gradients underflow unscaled
    ckpt = Checkpoint(work)
    state, best = RunState(), None
    run = run_identity(spec, data)
    if resume:
        state, best = ckpt.load(model, opt, sched, scaler, run=run)
        print(f"resuming from step {state.step}", file=sys.stderr)
    write_jsonl(work / "metrics.jsonl", state.history)

    train_split, dev = data["train"], data["dev"]
    primary = spec.primary_metric
    # Tokenized once, here: the loop only slices lists of ids (dev too, for the periodic evals).
    prompt_ids = train_split.prompt_ids(tok)
    answers = train_split.answers if label_tokens is not None else train_split.answer_ids(tok)
    dev.prompt_ids(tok)

    def batch_loss(rows: list[int]) -> torch.Tensor:
        plan = loss_plan_ids([prompt_ids[i] for i in rows], [answers[i] for i in rows], cfg.max_length, label_tokens, tok.eos_token_id)
        with autocast(bb):  # forward only: backward runs each op in the dtype its forward used
            return plan.run(model, tok.pad_token_id)

    # Tokens the model reads per row: for the length-bucketed sampler and the tokens/s figure.
    lengths = [len(ids) for ids in prompt_ids]
    if label_tokens is None:
        lengths = [n + len(a) for n, a in zip(lengths, answers)]

    def record(row: dict) -> None:
        state.history.append(row)
        with open(work / "metrics.jsonl", "a") as fh:  # append-only log for `tail -f`; rewritten on resume
            fh.write(json.dumps(row) + "\n")

    # The loss stays on the device and is summed there; reading it (a host sync that drains the GPU
    # queue) happens once per log row: every log_every steps and before every eval, checkpoint and
    # the end. A row's loss is the mean over the steps since the previous row. The window always
    # ends at a checkpoint, so a resumed run writes exactly the rows of an uninterrupted one.
    window_loss, window_steps = torch.zeros((), device=device), 0
    # The first step whose loss was not finite, tracked on the device (0: none) so that finding
    # it costs no sync; it is read with the window's loss. Under fp16 the loss scaler skips such
    # steps and recovers, so there only a non-finite adapter (checked at each checkpoint) stops the run.
    first_bad = torch.zeros((), dtype=torch.long, device=device)
    stop_on_bad_loss = not scaler.is_enabled()
    start_wall = time.monotonic() - state.train_seconds
    bar = tqdm(total=cfg.max_steps, initial=state.step, disable=not progress, desc=spec.name, dynamic_ncols=True)
    stopped_by = "max_steps"
    while state.step < cfg.max_steps:
        model.train()
        t0, tokens = time.perf_counter(), 0
        step_loss = torch.zeros((), device=device)
        for _ in range(cfg.grad_accum):
            rows = next_rows(state, lengths, cfg.batch_size, cfg.seed)
            loss = batch_loss(rows) / cfg.grad_accum  # scale so accumulated grads average, not sum
            scaler.scale(loss).backward()
            step_loss += loss.detach()
            tokens += sum(lengths[i] for i in rows)
        window_loss += step_loss
        first_bad = torch.where((first_bad == 0) & ~torch.isfinite(step_loss), state.step + 1, first_bad)
        scaler.unscale_(opt)  # clip the true gradients (no-op unless fp16)
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        scaler.step(opt)
        scaler.update()
        sched.step()
        opt.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens += tokens
        window_steps += 1
        bar.update(1)

        last = state.step == cfg.max_steps
        out_of_time = cfg.max_minutes > 0 and time.monotonic() - start_wall > cfg.max_minutes * 60
        evaluating = state.step % cfg.eval_every == 0 or last or out_of_time
        checkpointing = state.step % cfg.checkpoint_every == 0 or evaluating
        logged = state.step % cfg.log_every == 0 or checkpointing
        if logged:
            mean_loss, bad_step = torch.stack([window_loss / window_steps, first_bad.to(window_loss.dtype)]).tolist()  # the one host sync
            window_loss.zero_()
            window_steps = 0
            if bad_step and stop_on_bad_loss:
                raise TrainingError(f"training stopped: the loss became non-finite at step {int(bad_step)} (window mean {mean_loss}); "
                                    f"nothing was saved past the last good checkpoint {_last_good(ckpt)}; lower train.lr "
                                    "(or raise train.warmup_steps) and train again without --resume")
        state.train_seconds += time.perf_counter() - t0  # after the sync, so queued GPU work is counted
        if logged:
            tps = state.tokens / max(state.train_seconds, 1e-9)
            loss_value = round(mean_loss, 5) if math.isfinite(mean_loss) else None  # JSON has no inf/NaN (an fp16 overflow)
            record({"step": state.step, "loss": loss_value, "lr": sched.get_last_lr()[0], "tokens_per_s": round(tps, 1)})
            bar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{tps:.0f}")

        if evaluating:
            metrics, _, _ = evaluate_split(model, tok, spec, dev, limit=cfg.eval_samples)
            value = metrics[primary]
            record({"step": state.step, **{k: v for k, v in metrics.items() if k != "per_class"}})
            if state.best_metric is None or value > state.best_metric:
                state.best_metric, state.best_step, state.bad_evals = value, state.step, 0
                best = copy.deepcopy(get_peft_model_state_dict(model))  # keep the best, not the last
            else:
                state.bad_evals += 1
            bar.write(f"step {state.step}: dev {primary}={value:.4f} (best {state.best_metric:.4f} @ {state.best_step})", file=sys.stderr)
            if cfg.patience and state.bad_evals >= cfg.patience:
                stopped_by = "early_stopping"
        if out_of_time and stopped_by == "max_steps":
            stopped_by = "max_minutes"
        if state.step % cfg.checkpoint_every == 0 or stopped_by != "max_steps":
            _check_adapter_finite(model, state.step, mean_loss, ckpt)  # a diverged adapter never replaces a good checkpoint
            ckpt.save(model, opt, sched, state, best, scaler=scaler, run=run)
        if stopped_by != "max_steps":
            break
    bar.close()

    if best is not None:
        set_peft_model_state_dict(model, best)
    metrics, _, eval_seconds = evaluate_split(model, tok, spec, dev)
    print(f"final dev ({len(dev)} rows, best step {state.best_step}): " + json.dumps({k: v for k, v in metrics.items() if k != "per_class"}), file=sys.stderr)

    _check_adapter_finite(model, state.step, None, ckpt)
    final = work / "adapter"
    shutil.rmtree(final, ignore_errors=True)
    # base_model_name_or_path stays the hub id: peft (AutoPeftModel, the Hub) resolves the base by
    # it, and a local path would mean nothing on another machine. The built-in backbone's weights
    # are a de-quantized Q4_1 GGUF of that model, not its bf16 checkpoint, so the sidecar's
    # base.weights and the model card name the exact file and sha256 (backbone.weights_source).
    model.peft_config["default"].base_model_name_or_path = bb.hub_id
    with _disk_errors(final, output):
        model.save_pretrained(final)  # PEFT files (safetensors); peft also writes a README we replace
    with model.disable_adapter():  # routing sample of the inputs, as the plain backbone sees them
        routing = routing_entry(model, tok, spec, final)
    meta = adapter_meta(spec, bb, data, metrics, routing=routing, command=command,
                        trainable_parameters=trainable_parameters(model),
                        efficiency={
                            "adapter_file_bytes": (final / "adapter_model.safetensors").stat().st_size,
                            "peak_memory_mb": round(peak_memory_mb(str(device)), 1),
                            "train_tokens_per_s": round(state.tokens / max(state.train_seconds, 1e-9), 1),
                            "latency_ms_per_example": round(1000 * eval_seconds / len(dev), 2),
                            "device": str(device),
                        },
                        train_state={"steps": state.step, "best_step": state.best_step, "stopped_by": stopped_by,
                                     "train_seconds": round(state.train_seconds, 1), "tokens": state.tokens},
                        init_from=source)
    with _disk_errors(final, output):
        finish_folder(final, meta, state.history, primary)
        publish_folder(final, output)
    shutil.rmtree(work, ignore_errors=True)
    return output


def _last_good(ckpt: Checkpoint) -> str:
    folder = ckpt.find()
    return f"(in {folder})" if folder else "(none was written yet)"


def _check_adapter_finite(model, step: int, loss: float | None, ckpt: Checkpoint) -> None:
    """Stop before a diverged adapter is checkpointed or saved (a finite loss can precede NaN weights)."""
    if nonfinite_tensors(get_peft_model_state_dict(model)):
        seen = f" (last loss {loss})" if loss is not None else ""
        raise TrainingError(f"training stopped: the adapter's weights became non-finite by step {step}{seen}; nothing was saved past "
                            f"the last good checkpoint {_last_good(ckpt)}; lower train.lr and train again without --resume")


@contextlib.contextmanager
def _disk_errors(partial: Path, output: Path):
    """Turn an OSError while writing the final folder (a full disk, a read-only output) into one line,
    removing the half-written folder; the checkpoint stays, so --resume redoes only the end."""
    try:
        yield
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise TrainingError(f"cannot write the adapter for {str(output)!r} ({exc.strerror or type(exc).__name__}: "
                            f"{exc.filename or partial}); nothing was written there; free space or pick another --output, "
                            "then rerun with --resume") from None


def _init_from(spec: TaskSpec, model, bb) -> dict:
    """Load the init_from adapter's weights into the fresh adapter; return what to record."""
    from .registry import adapter_ref

    ref = spec.init_from
    _, folder = adapter_ref(ref)
    meta = read_sidecar(folder)
    check_base(ref, meta["base"]["fingerprint"], bb.fingerprint, "this run trains on", allow=False)
    init_from(model, folder)
    return {"ref": ref, "folder": str(folder), "task": (meta.get("task") or {}).get("name"), "metrics": meta.get("metrics")}


def adapter_meta(spec: TaskSpec, bb, data: dict, metrics: dict, *, routing: dict | None, command: str | None, **extra) -> dict:
    """The sidecar of an adapter trained for `spec` on backbone `bb` (extra keys appended as given)."""
    return {
        "format": FORMAT,
        "name": spec.name,
        "task": spec.to_dict(),
        "method": spec.method,
        "label_words": label_words(spec) if spec.type == "classification" else None,
        # weights: the exact file the backbone came from and its sha256 (hub_id names the model, not these weights)
        "base": {"name": spec.base, "hub_id": bb.hub_id, "fingerprint": bb.fingerprint, "dtype": dtype_name(bb.dtype), "weights": bb.source},
        "metrics": metrics,
        **extra,
        "routing": routing,
        "data": {name: {"source": s.source, "sha256": s.sha256, "rows": len(s)} for name, s in data.items()},
        "command": command or " ".join(sys.argv),
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def finish_folder(folder: Path, meta: dict, history: list[dict], primary: str) -> None:
    """Sidecar, model card, metrics log and curves beside the PEFT files of a finished adapter.

    Refuses (TrainingError) weights holding NaN or inf: such a folder would be served and published as if fine.
    """
    check_finite(folder, TrainingError)
    write_json(folder / SIDECAR, meta)
    atomic_write(folder / "README.md", model_card(meta))  # replaces peft's stub card
    write_jsonl(folder / "metrics.jsonl", history)
    plot_curves(history, primary, folder / "curves.png")


def publish_folder(final: Path, output: Path) -> None:
    """Move the finished folder into place; an old folder (under --overwrite) goes only after.

    Only a folder this package wrote (or an empty one) is replaced; anything else is refused,
    checked again here because it may have appeared while training ran.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.exists() or output.is_symlink():
        _refuse_unreplaceable(output)
        trash = output.with_name(f".{output.name}.old")
        shutil.rmtree(trash, ignore_errors=True)
        output.rename(trash)
        final.rename(output)
        shutil.rmtree(trash)
    else:
        final.rename(output)

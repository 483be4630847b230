"""Train one adapter for one task: the single-task recipe over the training library.

spec → data → backbone → adapter → the loop (training/loop.py: accumulate, clip, step, schedule,
eval, keep best, checkpoint) → adapter folder. Work happens in a hidden `.NAME.partial/` folder
beside the output; the output folder appears, complete, only at the end (rename), so a crash never
leaves half an adapter where a user or the registry would look. `resume=True` continues from the
checkpoint. Under torchrun / accelerate launch the same function trains data-parallel.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from adapterhub_lite.artifacts.folder import read_sidecar
from adapterhub_lite.artifacts.loading import check_fingerprint
from adapterhub_lite.artifacts.registries import adapter_ref
from adapterhub_lite.artifacts.samples import routing_entry
from adapterhub_lite.core.data import Split, label_words, load_task_data
from adapterhub_lite.core.data_checks import check_lengths, data_warnings
from adapterhub_lite.core.errors import DataError
from adapterhub_lite.core.spec import TaskSpec
from adapterhub_lite.model.adapter import attach, init_from, trainable_parameters
from adapterhub_lite.model.backbone import autocast, load_backbone
from adapterhub_lite.model.evaluate import evaluate_split
from adapterhub_lite.model.heads import CompiledCall, label_token_ids, loss_items, loss_plan_ids, read_tokens
from adapterhub_lite.training.checkpoint import Checkpoint  # noqa: F401 - tests patch train.Checkpoint.save
from adapterhub_lite.training.defaults import check_step_rows, resolve
from adapterhub_lite.training.loop import LoopConfig, Recipe, StepLoss, fit
from adapterhub_lite.training.output import adapter_meta, claim_output, disk_errors, finish_folder, prepare_output, publish_folder, remove_work
from adapterhub_lite.training.parallel import Parallel, local_device
from adapterhub_lite.training.progress import Cursor, TrainingError, next_rows, peak_memory_mb, run_identity, seed_everything, shard

__all__ = ["train", "TrainingError", "adapter_meta", "finish_folder", "prepare_output", "publish_folder", "peak_memory_mb"]


# torch.compile's backend for the training forward (tests use "eager": the same graphs, no C++ build)
COMPILE_BACKEND = "inductor"


def compiles(spec: TaskSpec, device: torch.device) -> bool:
    """Whether train.compile asks for a compiled forward here: `auto` on CUDA for an unquantized backbone and a LoRA
    or IA3 adapter (bitsandbytes' int8/4-bit matmuls break the graph; prompt and prefix tuning reshape the input
    in peft's top-level forward), `always` anywhere, `never` nowhere."""
    mode = spec.train.compile
    return mode == "always" or (mode == "auto" and device.type == "cuda" and spec.quantization == "none" and spec.method in ("lora", "ia3"))


class SingleTask(Recipe):
    """One task, one adapter: a batch is rows of the task's train split through the adapter."""

    def __init__(self, spec: TaskSpec, model, backbone, data: dict, processes: int = 1):
        self.spec, self.model, self.backbone, self.data = spec, model, backbone, data
        self.compile = compiles(spec, backbone.device)
        self._compiled: tuple | None = None  # (the call it wraps, its CompiledCall)
        self.name = spec.name
        self.identity = run_identity(spec, data, processes)
        tok = backbone.tokenizer
        self.label_tokens = label_token_ids(tok, spec) if spec.type == "classification" else None
        train_split = data["train"]
        # Tokenized once, here: a step only slices lists of ids (dev too, for the periodic evals).
        self.prompt_ids = train_split.prompt_ids(tok)
        self.answers = train_split.answers if self.label_tokens is not None else train_split.answer_ids(tok)
        data["dev"].prompt_ids(tok)
        # Tokens per row, untruncated: the length-bucketed sampler's key. What the model reads of each row after
        # truncation to max_length (the tokens/s figure): read_tokens, the length of its loss plan's sequences.
        self.lengths = [len(ids) for ids in self.prompt_ids]
        if self.label_tokens is None:
            self.lengths = [n + len(a) for n, a in zip(self.lengths, self.answers)]
        self.read = [read_tokens(len(p), a, spec.train.max_length, self.label_tokens) for p, a in zip(self.prompt_ids, self.answers)]
        self.cursor = Cursor()

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr": self.spec.train.lr,
                 "weight_decay": self.spec.train.weight_decay}]

    def step_loss(self, call, parallel: Parallel) -> StepLoss:
        cfg, tok = self.spec.train, self.backbone.tokenizer
        # Every process draws the same global rows and takes its share: the data order (and so the
        # result) does not depend on the process count. The loss is summed over the share; fit()
        # divides by the step's count (the global rows' target tokens, or rows for classification).
        rows = next_rows(self.cursor, self.lengths, cfg.batch_size * parallel.world, cfg.seed, cfg.grad_accum)
        count = loss_items([self.answers[i] for i in rows], cfg.max_length, self.label_tokens)
        mine = shard(rows, parallel.rank, parallel.world)
        plan = loss_plan_ids([self.prompt_ids[i] for i in mine], [self.answers[i] for i in mine], cfg.max_length,
                             self.label_tokens, tok.eos_token_id, reduction="sum")
        with autocast(self.backbone):  # forward only: backward runs each op in the dtype its forward used
            loss = plan.run(self.model, tok.pad_token_id, call=self._call(call))
        return StepLoss(loss, count, sum(self.read[i] for i in rows))

    def _call(self, call):
        """`call` itself, or (train.compile) its compiled forward, made once: on CUDA captured as CUDA graphs."""
        if not self.compile:
            return call
        if self._compiled is None or self._compiled[0] is not call:
            mode = "reduce-overhead" if self.backbone.device.type == "cuda" else None
            limit = getattr(self.backbone.model.config, "max_position_embeddings", None)
            self._compiled = (call, CompiledCall(call, mode=mode, backend=COMPILE_BACKEND, limit=limit))
        return self._compiled[1]

    def evaluate(self, limit, parallel):
        metrics, _, _ = evaluate_split(self.model, self.backbone.tokenizer, self.spec, self.data["dev"], limit=limit,
                                       shard=(parallel.rank, parallel.world), gather=parallel.gather)
        return metrics[self.spec.primary_metric], {k: v for k, v in metrics.items() if k != "per_class"}

    def state_dict(self):
        return {"cursor": self.cursor.__dict__}

    def load_state_dict(self, state):
        self.cursor = Cursor(**state["cursor"])


def loop_config(spec: TaskSpec) -> LoopConfig:
    """The loop settings of a spec's `train` section."""
    return LoopConfig.from_train(spec.train)


def train(spec: TaskSpec, output: str | Path | None = None, *, overwrite: bool = False, resume: bool = False,
          command: str | None = None, device: str | None = None, progress: bool = True) -> Path:
    """Train the spec's adapter and write its folder; returns the folder's path.

    The backbone computes in `spec.dtype` (autocast); the adapter's own weights, the optimizer
    and the loss stay fp32. fp16 adds a loss scaler (bf16 has fp32's range and needs none).
    Launched by torchrun / accelerate launch, every process trains its share of each global batch
    (batch_size rows) and rank 0 writes the folder.
    """
    if output is not None and not str(output).strip():
        raise DataError("--output is empty; give the adapter folder to write (or leave it out for runs/<name>)")
    output = Path(output or Path("runs") / spec.name)  # adapters/ is the registry (publish into it)
    with claim_output(output, overwrite, resume) as work:  # held (rank 0) until the folder is in place
        _train(spec, output, work, overwrite=overwrite, resume=resume, command=command, device=device, progress=progress)
    return output


def _train(spec: TaskSpec, output: Path, work: Path, *, overwrite: bool, resume: bool, command: str | None, device: str | None,
           progress: bool) -> None:
    data = load_task_data(spec)  # validates everything before a single byte is written
    check_labels_trained(spec, data["train"])
    backbone = load_backbone(spec.base, spec.quantization, local_device(device), dtype=spec.dtype)
    parallel = Parallel(backbone.device, spec.quantization)
    resolved = resolve(spec, data, backbone.model, backbone.tokenizer, parallel.world)  # what the spec left out, from the data and model
    spec = resolved.spec
    t = spec.train
    rows = len(data["train"])
    check_step_rows(t.batch_size, t.grad_accum, parallel.world, rows, f"{data['train'].source!r} has {rows} training rows")
    if parallel.main:
        print(f"resolved spec ('#': chosen, as the spec left it out):\n{resolved.describe()}", file=sys.stderr)
    seed_everything(spec.train.seed)  # before attach: the adapter's initial weights are random
    model = attach(backbone.model, spec.method, spec.method_args)
    source = _init_from(spec, model, backbone) if spec.init_from else None  # a resumed run then loads its checkpoint
    tok = backbone.tokenizer
    check_lengths(spec, tok, data)  # max_length must hold a prompt token plus the longest label or target; labels tokenize apart
    if parallel.main:  # a prompt longer than max_length is read without its start, a dev row seen in training: said, never silently
        for warning in data_warnings(spec, tok, data):
            print(warning, file=sys.stderr)

    recipe = SingleTask(spec, model, backbone, data, parallel.world)
    if overwrite and not resume and parallel.main:  # start over: an interrupted run's checkpoint goes only now, all checked
        remove_work(work)
    result = fit(recipe, loop_config(spec), parallel, work, resume=resume, progress=progress, compute_dtype=backbone.dtype)
    state = result.state
    # the final eval of the best weights: every process its share, then rank 0 writes (the others wait for a write only)
    final = evaluate_split(model, backbone.tokenizer, spec, data["dev"], shard=(parallel.rank, parallel.world), gather=parallel.gather)
    if parallel.main:
        _write_folder(spec, model, backbone, data, state, result.stopped_by, work, output, command, source, parallel, resolved.choices, final)
    parallel.barrier()


def check_labels_trained(spec: TaskSpec, train: Split) -> None:
    """Refuse a classification spec with a label no train row holds: the loss never asks for it, so the adapter cannot
    learn it, and its dev rows would be scored as if it could."""
    if spec.type != "classification":
        return
    seen = set(train.answers)  # label indices
    keys = list(spec.labels) if isinstance(spec.labels, dict) else label_words(spec)
    missing = [str(k) for i, k in enumerate(keys) if i not in seen]
    if missing:
        raise DataError(f"label(s) {', '.join(map(repr, missing))} of 'labels' have no row in data.train {train.source!r} ({len(train)} rows): "
                        f"an adapter cannot learn a class it never sees; add train rows labelled {missing[0]!r}, or drop it from 'labels'")


def _write_folder(spec, model, backbone, data, state, stopped_by, work: Path, output: Path, command, source, parallel, defaults,
                  final: tuple) -> None:
    tok, dev = backbone.tokenizer, data["dev"]
    metrics, _, eval_seconds = final
    shown = {k: v for k, v in metrics.items() if k != "per_class"}
    print(f"final dev ({len(dev)} rows, best step {state.best_step}): {json.dumps(shown)}", file=sys.stderr)
    final = work / "adapter"
    shutil.rmtree(final, ignore_errors=True)
    # base_model_name_or_path stays the hub id: peft (AutoPeftModel, the Hub) resolves the base by
    # it, and a local path would mean nothing on another machine. The built-in backbone's weights
    # are a de-quantized Q4_1 GGUF of that model, not its bf16 checkpoint, so the sidecar's
    # base.weights and the model card name the exact file and sha256 (model/weights.py: weights_source).
    model.peft_config["default"].base_model_name_or_path = backbone.hub_id
    with disk_errors(final, output):
        # save_embedding_layers=False: embeddings are never resized or trained here, and peft's "auto" would
        # look the hub id up online to compare vocabulary sizes (a failed request and two warnings offline)
        model.save_pretrained(final, save_embedding_layers=False)  # PEFT files (safetensors); peft also writes a README we replace
    with model.disable_adapter():  # routing sample of the inputs, as the plain backbone sees them
        routing = routing_entry(model, tok, spec, final)
    t = spec.train
    meta = adapter_meta(spec, backbone, data, metrics, routing=routing, command=command,
                        trainable_parameters=trainable_parameters(model),
                        efficiency={
                            "adapter_file_bytes": (final / "adapter_model.safetensors").stat().st_size,
                            "peak_memory_mb": round(peak_memory_mb(str(backbone.device)), 1),
                            "train_tokens_per_s": round(state.tokens / max(state.train_seconds, 1e-9), 1),
                            "latency_ms_per_example": round(1000 * eval_seconds / len(range(len(dev))[:: parallel.world]), 2),  # rank 0's rows
                            "device": str(backbone.device),
                        },
                        train_state={"steps": state.step, "best_step": state.best_step, "stopped_by": stopped_by,
                                     "train_seconds": round(state.train_seconds, 1), "tokens": state.tokens,
                                     "processes": parallel.world, "global_batch": t.batch_size * parallel.world * t.grad_accum,
                                     "compiled": compiles(spec, backbone.device)},
                        init_from=source, defaults=defaults)
    with disk_errors(final, output):
        finish_folder(final, meta, state.history, spec.primary_metric)
        publish_folder(final, output)
    remove_work(work)


def _init_from(spec: TaskSpec, model, backbone) -> dict:
    """Load the init_from adapter's weights into the fresh adapter; return what to record."""
    ref = spec.init_from
    _, folder = adapter_ref(ref)
    meta = read_sidecar(folder)
    check_fingerprint(ref, meta["base"]["fingerprint"], backbone.fingerprint, "this run trains on", allow=False)
    init_from(model, folder)
    return {"ref": ref, "folder": str(folder), "task": (meta.get("task") or {}).get("name"), "metrics": meta.get("metrics")}

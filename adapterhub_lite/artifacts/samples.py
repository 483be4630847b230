"""Routing samples: a sample of a task's inputs as the base model sees them, kept beside the adapter.

`routing.safetensors` holds one embedding per input (mean-pooled and last-token hidden states of a
middle and the last layer, each L2-normalised, concatenated); the sidecar's `routing` record names
the file and the embedding. Training writes them (train.py, joint and composed runs); the router
reads them to route `auto` requests by content (serving/routing.py). They live here, beside the
folder writer, so that training does not import the router and the router does not import training.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from adapterhub_lite.artifacts.files import atomic_write
from adapterhub_lite.artifacts.sidecar import Sidecar
from adapterhub_lite.core.data import load_split
from adapterhub_lite.core.errors import AdapterHubError
from adapterhub_lite.core.spec import TaskSpec, spec_from_dict
from adapterhub_lite.model.heads import no_logits

ROUTING_FILE = "routing.safetensors"
POOLING = ("mean", "last")
MAX_LENGTH = 128


class RoutingError(AdapterHubError):
    """Content routing cannot use an adapter's routing data, or has none to use."""


def embedding_spec(model) -> dict:
    """What `embed` computes on this backbone; stored with every routing sample and compared on load.

    `layers` index the model's hidden states (0 = token embeddings). The middle layer separates
    topic-like inputs (news paragraphs of rte vs ag_news) that the last layer alone blurs.
    """
    n = model.config.num_hidden_layers
    layers = [n // 2, n]
    return {"layers": layers, "pooling": list(POOLING), "normalize": "l2 per pool", "max_length": MAX_LENGTH,
            "dim": len(layers) * len(POOLING) * model.config.hidden_size}


@torch.no_grad()
def embed(model, tokenizer, texts: list[str], batch_size: int = 32) -> torch.Tensor:
    """Routing embeddings of texts by the (adapter-free) backbone, as `embedding_spec` says: [N, dim]."""
    spec = embedding_spec(model)
    device = next(model.parameters()).device
    # on the host: routing samples are saved and fitted there. A text of no tokens ("" for SmolLM2) keeps its NaN row:
    # there is nothing to pool, and the router sends a non-finite embedding to base
    result = torch.full((len(texts), spec["dim"]), float("nan"))
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # less padding
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True, max_length=spec["max_length"]).to(device)
        tokens = enc["attention_mask"].sum(1).cpu()
        if not tokens.any():  # only empty texts: a [rows, 0] batch, which the model cannot run
            continue
        hidden = model(**enc, output_hidden_states=True, logits_to_keep=no_logits(enc["input_ids"])).hidden_states  # hidden states only
        mask = enc["attention_mask"].unsqueeze(-1).float()
        last = (enc["attention_mask"] * torch.arange(mask.shape[1], device=device)).argmax(1)  # either padding side
        pools = []
        for layer in spec["layers"]:
            h = hidden[layer].float()
            pools += [(h * mask).sum(1) / mask.sum(1), h[torch.arange(len(idx), device=device), last]]
        vectors = torch.cat([torch.nn.functional.normalize(p, dim=-1) for p in pools], -1).cpu()
        result[[i for i, n in zip(idx, tokens.tolist()) if n]] = vectors[tokens > 0]
    return result


def routing_text(spec: TaskSpec, row: dict) -> str:
    """What the router sees of a training row: its prompt columns' values, one per line."""
    return "\n".join(str(row[f]).strip() for f in dict.fromkeys(spec.prompt_fields))


def task_texts(spec: TaskSpec, split: str, limit: int | None = None, seed: int = 0) -> list[str]:
    """Routing texts of a task split (a seeded sample of `limit` rows when given)."""
    ds, _ = load_split(getattr(spec.data, split))
    rows = list(range(len(ds)))
    if limit is not None and limit < len(rows):
        rows = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:limit].tolist()
    return [routing_text(spec, ds[i]) for i in rows]


def routing_entry(model, tokenizer, spec: TaskSpec, folder: str | Path, samples: int = 384, seed: int = 0) -> dict:
    """Embed a sample of the task's training inputs into `folder`/routing.safetensors; return the sidecar record.

    `model` must run as the plain backbone (for a PeftModel: inside `disable_adapter()`).
    """
    vectors = embed(model, tokenizer, task_texts(spec, "train", samples, seed))
    vectors = vectors[torch.isfinite(vectors).all(-1)]  # rows with empty inputs: no embedding to route by
    Path(folder).mkdir(parents=True, exist_ok=True)  # callers may embed before writing the PEFT files
    atomic_write(Path(folder) / ROUTING_FILE, save({"embeddings": vectors.half().contiguous()}))
    return {"file": ROUTING_FILE, "embedding": embedding_spec(model), "samples": len(vectors), "seed": seed}


def add_routing(folder: str | Path, model, tokenizer, **kwargs) -> dict:
    """(Re)fit the routing data of an existing adapter folder: its routing file and sidecar record."""
    folder = Path(folder)
    meta = Sidecar.load(folder)
    meta.routing = routing_entry(model, tokenizer, spec_from_dict(meta.task), folder, **kwargs)
    meta.save(folder)
    return meta.routing


def load_routing(folder: str | Path, meta: dict, embedding: dict) -> torch.Tensor:
    """An adapter's routing sample [N, dim]. Anything that keeps it from routing — no routing record (a
    merged adapter), another embedding, a missing, unreadable or misshapen file — is one RoutingError,
    so the router can leave that adapter out with a warning."""
    record = meta.get("routing")
    if not isinstance(record, dict) or "file" not in record:
        raise RoutingError(f"{folder} has no routing file; fit one with add_routing(folder, model, tokenizer)")
    if record.get("embedding") != embedding:
        raise RoutingError(f"{folder}'s routing data used embedding {record.get('embedding')!r}, this backbone embeds with {embedding!r}; "
                           "refit it with add_routing(folder, model, tokenizer)")
    if not isinstance(record["file"], str) or Path(record["file"]).name != record["file"] or record["file"] in ("", ".", ".."):
        raise RoutingError(f"{folder}'s routing file {record['file']!r} is not a plain file name; refit it with add_routing")
    path = Path(folder) / record["file"]
    if not path.is_file():
        raise RoutingError(f"{folder}'s sidecar names routing file {record['file']!r}, which is missing; refit it with add_routing(folder, model, tokenizer)")
    try:
        vectors = load_file(path).get("embeddings")
    except (OSError, SafetensorError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise RoutingError(f"{path} cannot be read ({type(exc).__name__}: {first}); refit it with add_routing(folder, model, tokenizer)") from None
    if vectors is None or vectors.ndim != 2 or vectors.shape[1] != embedding["dim"] or not len(vectors):
        shape = None if vectors is None else list(vectors.shape)
        raise RoutingError(f"{path} holds embeddings of shape {shape}, expected [N, {embedding['dim']}]; refit it with add_routing")
    if not torch.isfinite(vectors).all():
        raise RoutingError(f"{path} holds non-finite embeddings; refit it with add_routing(folder, model, tokenizer)")
    return vectors.float()

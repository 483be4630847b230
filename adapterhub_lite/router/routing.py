"""Content routing: pick an adapter from the request text itself (`adapter: "auto"`).

Each adapter carries a few prototypes of its training inputs in its sidecar: k-means centroids of
the base model's mean-pooled, L2-normalised last hidden states. A request goes to the adapter with
the most similar prototype; when the softmax confidence over adapters is below the threshold it
falls back to the base model. Prototypes live with each adapter, so adapters can be added or
removed without refitting anything.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..data import load_split
from ..folder import SIDECAR, read_sidecar, write_json
from ..spec import TaskSpec, spec_from_dict

BASE = "base"


@torch.no_grad()
def embed(model, tokenizer, texts: list[str], batch_size: int = 32, max_length: int = 128) -> torch.Tensor:
    """Mean-pooled, L2-normalised last hidden states of the (adapter-free) backbone: [N, H]."""
    out = []
    device = next(model.parameters()).device
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # less padding
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True, max_length=max_length).to(device)
        hidden = model(**enc, output_hidden_states=True, logits_to_keep=1).hidden_states[-1].float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        out.append((idx, torch.nn.functional.normalize(pooled, dim=-1).cpu()))
    result = torch.empty(len(texts), out[0][1].shape[-1])
    for idx, vecs in out:
        result[idx] = vecs
    return result


def routing_text(spec: TaskSpec, row: dict) -> str:
    """What the router sees of a training row: its prompt columns' values, one per line."""
    return "\n".join(str(row[f]).strip() for f in dict.fromkeys(spec.prompt_fields))


def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Spherical k-means (cosine) on unit vectors; returns k unit centroids."""
    g = torch.Generator().manual_seed(seed)
    k = min(k, len(x))
    centroids = x[torch.randperm(len(x), generator=g)[:k]].clone()
    for _ in range(iters):
        assign = (x @ centroids.T).argmax(-1)
        for j in range(k):
            members = x[assign == j]
            if len(members):
                centroids[j] = torch.nn.functional.normalize(members.mean(0), dim=0)
    return centroids


def fit_prototypes(model, tokenizer, texts: list[str], k: int = 4, seed: int = 0) -> torch.Tensor:
    """k prototypes of a task's inputs."""
    return kmeans(embed(model, tokenizer, texts), k, seed=seed)


def routing_entry(model, tokenizer, spec: TaskSpec, samples: int = 256, k: int = 4, seed: int = 0) -> dict:
    """The sidecar's `routing` record: prototypes of the task's training inputs.

    `model` must run as the plain backbone (for a PeftModel: inside `disable_adapter()`).
    """
    texts = task_texts(spec, "train", samples, seed)
    protos = fit_prototypes(model, tokenizer, texts, k, seed)
    return {"embedding": "mean-pooled last hidden state of the base model, L2-normalised",
            "samples": len(texts), "prototypes": [[round(v, 5) for v in p.tolist()] for p in protos]}


def add_routing(folder: str | Path, model, tokenizer, **kwargs) -> dict:
    """Fit routing prototypes for an existing adapter folder and store them in its sidecar."""
    folder = Path(folder)
    meta = read_sidecar(folder)
    meta["routing"] = routing_entry(model, tokenizer, spec_from_dict(meta["task"]), **kwargs)
    write_json(folder / SIDECAR, meta)
    return meta["routing"]


def task_texts(spec: TaskSpec, split: str, limit: int | None = None, seed: int = 0) -> list[str]:
    """Routing texts of a task split (a seeded sample of `limit` rows when given)."""
    ds, _ = load_split(getattr(spec.data, split))
    rows = list(range(len(ds)))
    if limit is not None and limit < len(rows):
        rows = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:limit].tolist()
    return [routing_text(spec, ds[i]) for i in rows]


class ContentRouter:
    """Nearest-prototype routing over adapters, with a confidence threshold and a base fallback."""

    def __init__(self, prototypes: dict[str, torch.Tensor], threshold: float = 0.5, temperature: float = 0.02):
        self.names = list(prototypes)
        self.protos = torch.cat([prototypes[n] for n in self.names])
        self.owner = torch.tensor([i for i, n in enumerate(self.names) for _ in range(len(prototypes[n]))])
        self.threshold, self.temperature = threshold, temperature

    @classmethod
    def from_sidecars(cls, metas: dict[str, dict], **kwargs) -> ContentRouter:
        protos = {n: torch.tensor(m["routing"]["prototypes"]) for n, m in metas.items() if m.get("routing")}
        return cls(protos, **kwargs)

    def scores(self, vectors: torch.Tensor) -> torch.Tensor:
        """Per adapter, the best cosine similarity of any of its prototypes: [N, adapters]."""
        sims = vectors @ self.protos.T
        best = torch.full((len(vectors), len(self.names)), -math.inf)
        return best.scatter_reduce(1, self.owner.expand(len(vectors), -1), sims, reduce="amax")

    def route(self, vectors: torch.Tensor) -> list[tuple[str, float]]:
        """(adapter name or "base", confidence) for each embedded request."""
        probs = (self.scores(vectors) / self.temperature).softmax(-1)
        conf, idx = probs.max(-1)
        return [(self.names[i] if c >= self.threshold else BASE, round(c, 4)) for i, c in zip(idx.tolist(), conf.tolist())]


def routing_accuracy(model, tokenizer, specs: dict[str, TaskSpec], router: ContentRouter, limit: int | None = None) -> dict:
    """Share of each task's dev inputs routed to that task's adapter."""
    out = {}
    for name, spec in specs.items():
        texts = task_texts(spec, "dev", limit)
        routed = router.route(embed(model, tokenizer, texts))
        out[name] = round(sum(r == name for r, _ in routed) / len(texts), 4)
    out["mean"] = round(sum(out.values()) / len(specs), 4)
    return out


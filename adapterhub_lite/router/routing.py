"""Content routing: pick an adapter from the request text itself (`adapter: "auto"`).

Each adapter carries a sample of its training inputs as the base model sees them: `routing.safetensors`
beside its PEFT files holds one embedding per input (mean-pooled and last-token hidden states of a
middle and the last layer, each L2-normalised, concatenated), and the sidecar's `routing` record
names the file and the embedding. The router fits a small L2-regularised multinomial logistic
regression (scikit-learn) over the samples of every adapter it knows (again whenever that set changes:
seconds) and sends a request to the most probable adapter, or to the base model when that
probability is below the threshold. The data lives with each adapter, so adapters can be added or
removed without refitting anything offline.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ..data import load_split
from ..errors import AdapterHubError
from ..folder import atomic_write
from ..sidecar import Sidecar
from ..spec import TaskSpec, spec_from_dict

BASE = "base"
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
    result = torch.empty(len(texts), spec["dim"])  # on the host: routing samples are saved and fitted there
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # less padding
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True, max_length=spec["max_length"]).to(device)
        hidden = model(**enc, output_hidden_states=True, logits_to_keep=1).hidden_states
        mask = enc["attention_mask"].unsqueeze(-1).float()
        last = (enc["attention_mask"] * torch.arange(mask.shape[1], device=device)).argmax(1)  # either padding side
        pools = []
        for layer in spec["layers"]:
            h = hidden[layer].float()
            pools += [(h * mask).sum(1) / mask.sum(1), h[torch.arange(len(idx), device=device), last]]
        result[idx] = torch.cat([torch.nn.functional.normalize(p, dim=-1) for p in pools], -1).cpu()
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


class ContentRouter:
    """Multinomial logistic regression over adapters' routing samples, with a base fallback.

    scikit-learn's `StandardScaler` + `LogisticRegression` (lbfgs): features are standardised with the
    pooled samples' mean and spread, classes are weighted equally whatever their sample counts
    (`class_weight="balanced"`), and the weights carry an L2 penalty `l2` (see `_c`). It lives on
    the host, in numpy: a few thousand samples of a few thousand features fit in seconds there,
    requests are moved to it whatever device embedded them, and a caller serving under
    `torch.inference_mode` needs nothing special (no autograd is involved).
    """

    def __init__(self, samples: dict[str, torch.Tensor], threshold: float = 0.5, l2: float = 1e-3, max_iter: int = 1000):
        if not samples:
            raise RoutingError("no adapter has usable routing data; train adapters with this package or run add_routing on their folders")
        self.names, self.threshold = list(samples), threshold
        shapes = {n: tuple(v.shape) for n, v in samples.items()}
        dims = {s[1] for s in shapes.values() if len(s) == 2}
        bad = [n for n, s in shapes.items() if len(s) != 2 or not s[0]]
        if bad or len(dims) != 1:
            raise RoutingError(f"routing samples must be non-empty [N, dim] tensors of one dim, got shapes {shapes}; refit them with add_routing")
        x = np.concatenate([samples[n].detach().cpu().float().numpy() for n in self.names])
        y = np.concatenate([np.full(len(samples[n]), i) for i, n in enumerate(self.names)])
        self.model = None  # one adapter: nothing to tell apart, its probability is 1
        if len(self.names) > 1:
            self.model = make_pipeline(StandardScaler(), LogisticRegression(C=self._c(l2, len(x), len(self.names)), class_weight="balanced", max_iter=max_iter))
            self.model.fit(x, y)

    @staticmethod
    def _c(l2: float, n: int, k: int) -> float:
        """scikit-learn's C for the objective `mean class-weighted CE + l2 * ||W||^2` over n samples and k classes.

        sklearn minimises 0.5 ||W||^2 + C * sum_i s_i CE_i; with balanced weights s_i sum to n, so the
        mean weighted CE is (1/n) sum_i s_i CE_i and dividing the objective by 2 * l2 gives C = 1 / (2 * l2 * n)
        (0.26 for 5 tasks x 384 samples at l2 = 1e-3). For two classes sklearn fits one weight vector d (the
        logit difference) where the K-vector form has w and -w: l2 * 2 ||w||^2 = l2 / 2 * ||d||^2, so C doubles.
        """
        return (2.0 if k == 2 else 1.0) / (2 * l2 * n)

    def probs(self, vectors: torch.Tensor) -> torch.Tensor:
        """Probability of each adapter for each embedded request: [N, adapters] (float32, on the host)."""
        x = vectors.detach().cpu().float().numpy()
        if self.model is None:
            return torch.ones(len(x), 1)
        # classes_ are 0..k-1 in order (every adapter has samples), so the columns follow self.names
        return torch.from_numpy(self.model.predict_proba(x)).float()

    def route(self, vectors: torch.Tensor) -> list[tuple[str, float]]:
        """(adapter name or "base", confidence) for each embedded request."""
        conf, idx = self.probs(vectors).max(-1)
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

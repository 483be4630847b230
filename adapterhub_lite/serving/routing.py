"""Content routing: pick an adapter from the request text itself (`adapter: "auto"`).

Each adapter carries a sample of its training inputs as the base model sees them: `routing.safetensors`
beside its PEFT files holds one embedding per input (mean-pooled and last-token hidden states of a
middle and the last layer, each L2-normalised, concatenated), and the sidecar's `routing` record
names the file and the embedding. The router fits a small L2-regularised multinomial logistic
regression (scikit-learn) over the samples of every adapter it knows (again whenever that set changes:
seconds) and sends a request to the most probable adapter, or to the base model when that
probability is below the threshold, or when the request is unlike that adapter's own samples (novelty:
a softmax over the known adapters is confident far from all of them, so a poem or a question would
otherwise go to, say, a sentiment adapter and come back "positive"). The data lives with each adapter,
so adapters can be added or removed without refitting anything offline.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import KFold
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from adapterhub_lite.artifacts.samples import RoutingError
from adapterhub_lite.core.names import BASE


def check_probability(value, what: str = "route_threshold", none_ok: bool = False) -> float | None:
    """`value` if it is a probability (a real number from 0 to 1), else RoutingError naming it and the fix.

    One check for the router's confidence threshold and its novelty quantile, wherever they are given (Router,
    ContentRouter, scripts/eval_routing.py). A NaN compares false with every confidence, so it would send every `auto`
    request to base without a word, as a threshold above 1 would; below 0 reads as a typo for a probability."""
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise RoutingError(f"{what} is {value!r}; give a probability from 0 to 1" + (" (or None to switch it off)" if none_ok else ""))
    return float(value)


@dataclass(frozen=True)
class Routing:
    """How `auto` chose one request's adapter, for the caller to audit: Router.run's and infer's `routing`, the server's
    per-choice `routing` field and x-adapterhub-routing header (README, "Routing by content").

    Read off the classifier's probabilities that routing computes anyway: no pass of its own."""

    adapter: str  # what served the request: the candidate, or "base"
    confidence: float  # the classifier's probability of the candidate (0.0 when there was no text to embed)
    candidate: str | None  # the most probable adapter (None: nothing to route by)
    runner_up: str | None = None  # the second most probable (None with one adapter)
    runner_up_confidence: float | None = None
    fallback: str | None = None  # why base answered: "threshold", "tie", "novelty" or "no_text"; None when the candidate did

    def as_dict(self) -> dict:
        """The record as JSON-ready fields (None where a field does not apply)."""
        return asdict(self)

    def header(self) -> str:
        """One HTTP header item: `adapter;confidence=0.93;candidate=…;runner_up=…;…` (the fields that apply)."""
        return ";".join([self.adapter] + [f"{k}={v}" for k, v in self.as_dict().items() if k != "adapter" and v is not None])


class ContentRouter:
    """Multinomial logistic regression over adapters' routing samples, with a base fallback.

    scikit-learn's `StandardScaler` + `LogisticRegression` (lbfgs): features are standardised with the
    pooled samples' mean and spread, classes are weighted equally whatever their sample counts
    (`class_weight="balanced"`), and the weights carry an L2 penalty `l2` (see `_c`). It lives on
    the host, in numpy: a few thousand samples of a few thousand features fit in seconds there,
    requests are moved to it whatever device embedded them, and a caller serving under
    `torch.inference_mode` needs nothing special (no autograd is involved).

    Novelty: a request goes to the chosen adapter only if it is also near that adapter's samples. The
    distance is the mean cosine distance to its `neighbors` nearest samples in the standardised space
    (`sklearn.neighbors.NearestNeighbors`); the cut-off is the `novelty` quantile of the same distance
    for the adapter's own samples, each measured against the other folds of a `folds`-fold split, so
    about that share of an adapter's own kind of input passes. `novelty=None` switches the check off.
    Everything is deterministic (unshuffled folds, exact neighbours).
    """

    def __init__(self, samples: dict[str, torch.Tensor], threshold: float = 0.5, l2: float = 1e-3, max_iter: int = 1000,
                 novelty: float | None = 0.99, neighbors: int = 5, folds: int = 5):
        threshold, novelty = check_probability(threshold, "threshold"), check_probability(novelty, "novelty", none_ok=True)
        if not samples:
            raise RoutingError("no adapter has usable routing data; train adapters with this package or run add_routing on their folders")
        # the classes in sorted name order: the fit (lbfgs over the samples concatenated in this order) and the tie rule
        # then depend on which adapters are known, not on the order they were registered in (a restart and a run-time load differ)
        self.names, self.threshold = sorted(samples), threshold
        shapes = {n: tuple(v.shape) for n, v in samples.items()}
        dims = {s[1] for s in shapes.values() if len(s) == 2}
        bad = [n for n, s in shapes.items() if len(s) != 2 or not s[0]]
        if bad or len(dims) != 1:
            raise RoutingError(f"routing samples must be non-empty [N, dim] tensors of one dim, got shapes {shapes}; refit them with add_routing")
        x = np.concatenate([samples[n].detach().cpu().float().numpy() for n in self.names])
        # each adapter's twins: the others with the very same samples (one adapter published under two names, or trained
        # twice on the same inputs). The classifier gives twins probabilities equal only to lbfgs' precision (0.4988 and
        # 0.4986 beside a third adapter), so an exact comparison split their requests between them by rounding noise.
        parts = np.split(x, np.cumsum([len(samples[n]) for n in self.names])[:-1])
        self.twins = [[m for j, m in enumerate(self.names) if j != i and np.array_equal(parts[i], parts[j])] for i in range(len(self.names))]
        y = np.concatenate([np.full(len(samples[n]), i) for i, n in enumerate(self.names)])
        self.model = None  # one adapter: nothing to tell apart, its probability is 1
        if len(self.names) > 1:
            self.model = make_pipeline(StandardScaler(), LogisticRegression(C=self._c(l2, len(x), len(self.names)), class_weight="balanced", max_iter=max_iter))
            self.model.fit(x, y)
        self.scaler = self.model[0] if self.model is not None else StandardScaler().fit(x)
        self.novelty, self.near, self.cutoffs = novelty, [], []
        if novelty is not None:
            for i in range(len(self.names)):
                near, cutoff = self._fit_novelty(self.scaler.transform(x[y == i]), novelty, neighbors, folds)
                self.near.append(near)
                self.cutoffs.append(cutoff)

    @staticmethod
    def _fit_novelty(z: np.ndarray, quantile: float, neighbors: int, folds: int) -> tuple[NearestNeighbors, float]:
        """One adapter's neighbour index and distance cut-off, calibrated on its own samples' held-out folds.

        Each sample's distance is measured against the other folds only (against all samples it would be
        its own zero), so the cut-off is what an unseen input of the adapter's kind scores. A lone sample
        has no fold to hold out: its cut-off is 0 (only that very input passes), never a guess.
        """
        n = len(z)
        if n < 2:
            return NearestNeighbors(n_neighbors=1, metric="cosine").fit(z), 0.0
        k = min(neighbors, n - -(-n // min(folds, n)))  # the smallest training fold must hold k samples
        held = np.empty(n)
        for train, test in KFold(min(folds, n)).split(z):
            held[test] = NearestNeighbors(n_neighbors=k, metric="cosine").fit(z[train]).kneighbors(z[test])[0].mean(1)
        return NearestNeighbors(n_neighbors=k, metric="cosine").fit(z), float(np.quantile(held, quantile))

    def distances(self, vectors: torch.Tensor, adapters: list[int] | None = None) -> torch.Tensor:
        """Each request's novelty distance from each adapter's samples, over its cut-off: [N, adapters] (1 = at the
        cut-off). With `adapters` (one index per request): only that adapter's, [N] — what routing reads, so a
        request is measured against one adapter's samples, not against every adapter's."""
        z = self.scaler.transform(vectors.detach().cpu().float().numpy())
        if adapters is None:
            cols = [near.kneighbors(z)[0].mean(1) / max(cut, 1e-12) for near, cut in zip(self.near, self.cutoffs)]
            return torch.from_numpy(np.stack(cols, 1)).float()
        out, picked = np.empty(len(z)), np.asarray(adapters)
        for i in np.unique(picked):
            rows = picked == i
            out[rows] = self.near[i].kneighbors(z[rows])[0].mean(1) / max(self.cutoffs[i], 1e-12)
        return torch.from_numpy(out).float()

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
        """(adapter name or "base", confidence) for each embedded request: `decide`'s adapter and confidence."""
        return [(r.adapter, r.confidence) for r in self.decide(vectors)]

    def decide(self, vectors: torch.Tensor) -> list[Routing]:
        """How each embedded request is routed (Routing): its adapter, the classifier's probability and runner-up, and why
        it fell back to base, if it did.

        Base when the classifier is unsure (below the threshold, or two adapters tie for the highest probability: adapters
        with the same samples, e.g. one published under two names), when the request is farther from the chosen
        adapter's samples than its cut-off (novelty), or when the embedding is not finite (an empty text has no
        token to pool: nothing to route by). The confidence is the classifier's either way.
        """
        vectors = vectors.detach().cpu().float()  # routing runs on the host (see the class)
        finite = torch.isfinite(vectors).all(-1)
        out = [Routing(BASE, 0.0, None, fallback="no_text")] * len(vectors)
        rows = finite.nonzero().flatten().tolist()
        if not rows:
            return out
        probs = self.probs(vectors[finite])
        top = probs.topk(min(2, probs.shape[1]), -1)  # the candidate and the runner-up, from the probabilities computed anyway
        conf, idx = top.values[:, 0], top.indices[:, 0]
        # no one most probable adapter (the same probability, or a twin's samples): nothing to pick by name order
        tied = [t or bool(self.twins[i]) for t, i in zip(((probs == conf[:, None]).sum(-1) > 1).tolist(), idx.tolist())]
        near = self.distances(vectors[finite], idx.tolist()) if self.novelty is not None else None
        for j, (row, i, c) in enumerate(zip(rows, idx.tolist(), conf.tolist())):
            # a tie first: below the threshold too, the classifier could not have told the twins apart at any confidence
            why = "tie" if tied[j] else "threshold" if c < self.threshold else "novelty" if near is not None and near[j] > 1.0 else None
            second = (self.names[top.indices[j, 1]], round(top.values[j, 1].item(), 4)) if probs.shape[1] > 1 else (None, None)
            out[row] = Routing(BASE if why else self.names[i], round(c, 4), self.names[i], *second, fallback=why)
        return out

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

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from adapterhub_lite.artifacts.samples import RoutingError, embed, task_texts
from adapterhub_lite.core.names import BASE
from adapterhub_lite.core.spec import TaskSpec


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

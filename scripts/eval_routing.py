"""Routing accuracy of `adapter: "auto"` on the dev sets of the shared tasks, and how often inputs of no adapter's
task still reach an adapter; prints one JSON line.

Each task's routing sample is embedded from its training inputs (as `adapterhub-lite train` stores
it in routing.safetensors), the router is fitted over all of them, and then every dev input is
routed among all tasks (`routing_accuracy`: the share of each task's dev inputs that went to its own adapter, and their
mean over tasks; `routed_to`: where each task's dev inputs went, an adapter or base, counted). Leave-one-out (`held_out_to_adapter`): the router is
fitted on all tasks but one and that task's dev inputs are routed; each should go to base, and the
figure is the share that went to an adapter instead. `--ood FILE` (one text a line, e.g.
scripts/routing_ood.txt: questions, code, arithmetic, other languages, single words) is routed
over all tasks the same way (`ood_to_adapter`).

    python scripts/eval_routing.py scripts/tasks/{sst2,rte,ag_news,date_iso,person_json}.yaml --ood scripts/routing_ood.txt
"""

import argparse
import json
import time
from collections import Counter

from adapterhub_lite.artifacts.samples import RoutingError, embed, embedding_spec, task_texts
from adapterhub_lite.core.names import BASE
from adapterhub_lite.core.spec import load_spec
from adapterhub_lite.model.backbone import load_backbone
from adapterhub_lite.serving.routing import ContentRouter, check_probability


def to_adapter(router: ContentRouter, vectors) -> float:
    """Share of embedded inputs the router sends to some adapter rather than base."""
    return sum(r != BASE for r, _ in router.route(vectors)) / len(vectors)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--quantization", default="8bit")
    ap.add_argument("--samples", type=int, default=384, help="training inputs per task in its routing sample")
    ap.add_argument("--dev-limit", type=int, default=None, help="dev inputs per task (a seeded sample; default all)")
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--novelty", type=float, default=0.99, help="ContentRouter's novelty quantile; 0 switches the check off")
    ap.add_argument("--ood", help="a file of inputs that belong to no task, one a line")
    args = ap.parse_args()
    try:  # before the backbone loads and every input is embedded (minutes)
        check_probability(args.threshold, "--threshold")
        check_probability(args.novelty, "--novelty")
    except RoutingError as err:
        ap.error(str(err))
    backbone = load_backbone(args.base, args.quantization)
    specs = {s.name: s for s in map(load_spec, args.specs)}
    kwargs = {"threshold": args.threshold, "novelty": args.novelty or None}
    t0 = time.perf_counter()
    vec = lambda texts: embed(backbone.model, backbone.tokenizer, texts)  # noqa: E731
    samples = {n: vec(task_texts(s, "train", args.samples)) for n, s in specs.items()}
    dev = {n: vec(task_texts(s, "dev", args.dev_limit)) for n, s in specs.items()}
    t1 = time.perf_counter()
    router = ContentRouter(samples, **kwargs)
    fit_seconds = time.perf_counter() - t1
    # where each task's dev inputs went (an adapter or base), and the share that reached their own task's adapter
    confusion = {n: dict(Counter(r for r, _ in router.route(v)).most_common()) for n, v in dev.items()}
    recall = {n: confusion[n].get(n, 0) / len(v) for n, v in dev.items()}
    acc = {n: round(r, 4) for n, r in recall.items()}
    acc["mean"] = round(sum(recall.values()) / len(dev), 4)  # of the unrounded shares (a mean of rounded ones can be off by up to 5e-5)
    # leave-one-out: the unrounded share of each task's dev inputs that reached an adapter when its own was not there
    held_out = {h: to_adapter(ContentRouter({n: v for n, v in samples.items() if n != h}, **kwargs), dev[h]) for h in specs} if len(specs) > 1 else {}
    held = {h: round(share, 4) for h, share in held_out.items()}
    if held:
        held["mean"] = round(sum(held_out.values()) / len(specs), 4)
    ood = None
    if args.ood:
        texts = [line.rstrip("\n") for line in open(args.ood, encoding="utf-8") if line.strip()]
        ood = {"inputs": len(texts), "to_adapter": round(to_adapter(router, vec(texts)), 4)}
    print(json.dumps({"routing_accuracy": acc, "routed_to": confusion, "held_out_to_adapter": held, "ood_to_adapter": ood, "samples": args.samples,
                      "dev_limit": args.dev_limit, "threshold": args.threshold, "novelty": kwargs["novelty"],
                      "embedding": embedding_spec(backbone.model), "quantization": args.quantization,
                      "fit_seconds": round(fit_seconds, 2), "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()

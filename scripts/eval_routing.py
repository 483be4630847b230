"""Routing accuracy of `adapter: "auto"` on the dev sets of the shared tasks; prints one JSON line.

Prototypes are fitted from each task's training inputs (as `adapterhub-lite train` stores them in
the sidecar), then every dev input is routed among all tasks.

    python scripts/eval_routing.py scripts/tasks/{sst2,rte,ag_news,date_iso,person_json}.yaml
"""

import argparse
import json
import time

from adapterhub_lite.backbone import load_backbone
from adapterhub_lite.router.routing import ContentRouter, fit_prototypes, routing_accuracy, task_texts
from adapterhub_lite.spec import load_spec


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--quantization", default="8bit")
    ap.add_argument("--samples", type=int, default=256, help="training inputs per task for its prototypes")
    ap.add_argument("--k", type=int, default=4, help="prototypes per task")
    ap.add_argument("--threshold", type=float, default=0.5)
    args = ap.parse_args()
    bb = load_backbone(args.base, args.quantization)
    specs = {s.name: s for s in map(load_spec, args.specs)}
    t0 = time.perf_counter()
    protos = {n: fit_prototypes(bb.model, bb.tokenizer, task_texts(s, "train", args.samples), args.k) for n, s in specs.items()}
    router = ContentRouter(protos, threshold=args.threshold)
    acc = routing_accuracy(bb.model, bb.tokenizer, specs, router)
    print(json.dumps({"routing_accuracy": acc, "k": args.k, "samples": args.samples, "threshold": args.threshold,
                      "quantization": args.quantization, "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()

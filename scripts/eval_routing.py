"""Routing accuracy of `adapter: "auto"` on the dev sets of the shared tasks; prints one JSON line.

Each task's routing sample is embedded from its training inputs (as `adapterhub-lite train` stores
it in routing.safetensors), the router's classifier is fitted over all of them, and then every dev
input is routed among all tasks.

    python scripts/eval_routing.py scripts/tasks/{sst2,rte,ag_news,date_iso,person_json}.yaml
"""

import argparse
import json
import time

from adapterhub_lite.artifacts.samples import embed, embedding_spec, task_texts
from adapterhub_lite.core.spec import load_spec
from adapterhub_lite.model.backbone import load_backbone
from adapterhub_lite.serving.routing import ContentRouter, routing_accuracy


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--quantization", default="8bit")
    ap.add_argument("--samples", type=int, default=384, help="training inputs per task in its routing sample")
    ap.add_argument("--threshold", type=float, default=0.5)
    args = ap.parse_args()
    backbone = load_backbone(args.base, args.quantization)
    specs = {s.name: s for s in map(load_spec, args.specs)}
    t0 = time.perf_counter()
    samples = {n: embed(backbone.model, backbone.tokenizer, task_texts(s, "train", args.samples)) for n, s in specs.items()}
    t1 = time.perf_counter()
    router = ContentRouter(samples, threshold=args.threshold)
    fit_seconds = time.perf_counter() - t1
    acc = routing_accuracy(backbone.model, backbone.tokenizer, specs, router)
    print(json.dumps({"routing_accuracy": acc, "samples": args.samples, "threshold": args.threshold, "embedding": embedding_spec(backbone.model),
                      "quantization": args.quantization, "fit_seconds": round(fit_seconds, 2), "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()

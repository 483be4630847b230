"""What folding a LoRA adapter into the base weights costs: max |Δlogit| and the dev score before
vs after, on the backbone the adapter was trained on (8-bit: the merged weights are re-quantized).
Prints one JSON line.

    python scripts/fold_error.py adapters/sst2/1.0.0 [--rows 200]
"""

import argparse
import json

from adapterhub_lite.artifacts.loading import load_adapter
from adapterhub_lite.core.data import load_task_data
from adapterhub_lite.model.evaluate import evaluate_split
from adapterhub_lite.ops.merge import fold_into_base


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("adapter", help="a LoRA adapter folder")
    ap.add_argument("--rows", type=int, default=200, help="dev rows scored before and after")
    ap.add_argument("--quantization", help="override the recorded backbone quantization")
    args = ap.parse_args()
    model, backbone, spec, meta = load_adapter(args.adapter, quantization=args.quantization)
    dev = load_task_data(spec, ("dev",))["dev"]
    before, _, _ = evaluate_split(model, backbone.tokenizer, spec, dev, limit=args.rows)
    folded, err = fold_into_base(model, backbone.tokenizer, dev.prompts[:16])
    after, _, _ = evaluate_split(folded, backbone.tokenizer, spec, dev, limit=args.rows)
    metric = spec.primary_metric
    print(json.dumps({"adapter": args.adapter, "quantization": backbone.fingerprint["quantization"], "max_abs_dlogit": round(err, 4),
                      "metric": metric, "rows": min(args.rows, len(dev)), "adapter_score": before[metric], "folded_score": after[metric]}))


if __name__ == "__main__":
    main()

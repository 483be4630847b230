"""Train tokens/s of one task spec with the backbone in 8-bit vs unquantized, in the same run.

Prints one JSON line. The two settings alternate in rounds over the same batches, so machine
noise hits both alike; the ratio is the figure to read, not the absolute speeds.

    python scripts/bench_quant.py scripts/tasks/sst2.yaml --steps 8 --rounds 3
"""

import argparse
import json
import time

import torch

from adapterhub_lite.core.data import load_task_data
from adapterhub_lite.core.spec import load_spec
from adapterhub_lite.model.adapter import attach
from adapterhub_lite.model.backbone import load_backbone
from adapterhub_lite.model.evaluate import label_token_ids
from adapterhub_lite.model.heads import task_loss


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--steps", type=int, default=8, help="timed optimizer steps per round and setting")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    spec = load_spec(args.spec, args.overrides)
    train = load_task_data(spec, ("train",))["train"]
    torch.manual_seed(0)
    batches = [torch.randint(len(train), (spec.train.batch_size,)).tolist() for _ in range(args.steps)]

    runs = {}
    for quant in ("8bit", "none"):
        backbone = load_backbone(spec.base, quant)
        model = attach(backbone.model, spec.method, spec.method_args)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.train.lr)
        labels = label_token_ids(backbone.tokenizer, spec) if spec.type == "classification" else None
        runs[quant] = (model, backbone.tokenizer, opt, labels)

    def step(quant, rows):
        model, tok, opt, labels = runs[quant]
        prompts, answers = [train.prompts[i] for i in rows], [train.answers[i] for i in rows]
        task_loss(model, tok, prompts, answers, spec.train.max_length, labels).backward()
        opt.step()
        opt.zero_grad()
        return sum(len(tok(p).input_ids) for p in prompts)

    seconds = {q: 0.0 for q in runs}
    tokens = {q: 0 for q in runs}
    for quant in runs:  # warm-up: first steps allocate and are not representative
        step(quant, batches[0])
    for _ in range(args.rounds):
        for quant in runs:
            for rows in batches:
                t0 = time.perf_counter()
                tokens[quant] += step(quant, rows)
                seconds[quant] += time.perf_counter() - t0
    tps = {q: tokens[q] / seconds[q] for q in runs}
    print(json.dumps({
        "spec": args.spec, "method": spec.method, "batch_size": spec.train.batch_size, "threads": torch.get_num_threads(),
        "train_tokens_per_s_8bit": round(tps["8bit"], 1), "train_tokens_per_s_none": round(tps["none"], 1),
        "ratio_8bit_vs_none": round(tps["8bit"] / tps["none"], 3),
    }))


if __name__ == "__main__":
    main()

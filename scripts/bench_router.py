"""Router benchmark: one JSON line of ratios measured in the same run (absolute times mean little here).

- forward throughput, a batch of 32 rows × 64 tokens, with 1, 8 and 32 distinct LoRA adapters (r=8):
  ours ÷ the plain base model and ours ÷ peft's mixed-batch path (`adapter_names=`);
- greedy generation tokens/s, same three settings and ratios;
- warm swap (Router.use on a resident adapter), cold load of the 1st and the 100th adapter,
  resident bytes of 100 adapters ÷ the sum of their safetensors files.
Each timing is the median of --repeats runs, the settings interleaved so noise hits them alike.

    python scripts/bench_router.py [--quantization none|8bit] [--base smollm2-135m]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from adapterhub_lite.backbone import load_backbone
from adapterhub_lite.folder import FORMAT, SIDECAR, write_json
from adapterhub_lite.router.router import Router

ROWS, TOKENS, NEW_TOKENS = 32, 64, 16


def make_adapters(base_model, fingerprint: dict, hub_id: str, folder: Path, n: int) -> list[Path]:
    """n random LoRA adapters (r=8 on q/v) with minimal sidecars, saved as ordinary folders."""
    model = get_peft_model(base_model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                  task_type="CAUSAL_LM", init_lora_weights=False))
    out = []
    for i in range(n):
        torch.manual_seed(i)
        for name, p in model.named_parameters():
            if "lora_" in name:
                torch.nn.init.normal_(p, std=0.02)
        path = folder / f"a{i:03d}"
        model.save_pretrained(path)
        write_json(path / SIDECAR, {
            "format": FORMAT, "name": path.name, "method": "lora", "metrics": {},
            "task": {"name": path.name, "type": "generation", "data": {"train": "x.jsonl", "dev": "x.jsonl"},
                     "prompt": "{text}", "target": "target"},
            "base": {"name": "bench", "hub_id": hub_id, "fingerprint": fingerprint},
        })
        out.append(path)
    model.unload()  # give the base model back its plain modules
    return out


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--quantization", default="none", choices=("none", "8bit"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--adapters", type=int, default=100)
    args = ap.parse_args()
    torch.manual_seed(0)

    ours_bb = load_backbone(args.base, args.quantization)
    peft_bb = load_backbone(args.base, args.quantization)
    base_bb = load_backbone(args.base, args.quantization)
    tmp = tempfile.TemporaryDirectory(prefix="bench-router-")
    folders = make_adapters(peft_bb.model, ours_bb.fingerprint, ours_bb.hub_id, Path(tmp.name), args.adapters)

    router = Router(ours_bb)
    for f in folders:
        router.register(f.name, f)
    cold = []
    for f in folders:  # cold load: read, check and stack each adapter
        t0 = time.perf_counter()
        router.use(f.name)
        cold.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for f in folders[:50]:  # warm swap: all resident already
        router.use(f.name)
    swap_ms = (time.perf_counter() - t0) / 50 * 1000
    file_bytes = sum((f / "adapter_model.safetensors").stat().st_size for f in folders)

    peft_model = PeftModel.from_pretrained(peft_bb.model, folders[0], adapter_name=folders[0].name)
    for f in folders[1:32]:
        peft_model.load_adapter(f, adapter_name=f.name)
    peft_model.eval()

    vocab = ours_bb.tokenizer.vocab_size
    ids = torch.randint(100, vocab - 100, (ROWS, TOKENS))
    rows = ids.tolist()
    prompts = ids[:, :16]
    result = {"quantization": args.quantization, "threads": torch.get_num_threads(), "rows": ROWS, "tokens": TOKENS}
    with torch.no_grad():
        for distinct in (1, 8, 32):
            names = [folders[i % distinct].name for i in range(ROWS)]
            fwd = {
                "base": lambda: base_bb.model(input_ids=ids, logits_to_keep=1),
                "peft": lambda: peft_model(input_ids=ids, adapter_names=names, logits_to_keep=1),
                "ours": lambda: router.bank.forward(rows, names, logits_positions=[[-1]] * ROWS),
            }
            gen = {
                "base": lambda: base_bb.model.generate(input_ids=prompts, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False),
                "peft": lambda: peft_model.generate(input_ids=prompts, adapter_names=names, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False),
                "ours": lambda: router.bank.generate(prompts.tolist(), names, NEW_TOKENS, eos_token_id=-1),
            }
            for kind, fns in (("forward", fwd), ("generate", gen)):
                for fn in fns.values():
                    fn()  # warm-up
                t = {k: [] for k in fns}
                for _ in range(args.repeats):  # interleaved
                    for k, fn in fns.items():
                        t[k].append(timed(fn, 1))
                med = {k: statistics.median(v) for k, v in t.items()}
                tag = "" if kind == "forward" else "gen_"
                result[f"{tag}mixed{distinct}_vs_base"] = round(med["base"] / med["ours"], 3)
                result[f"{tag}mixed{distinct}_vs_peft"] = round(med["peft"] / med["ours"], 3)
                result[f"{tag}mixed{distinct}_ours_tokens_per_s"] = round(ROWS * (TOKENS if kind == "forward" else NEW_TOKENS) / med["ours"], 1)
    result.update({
        "swap_warm_ms": round(swap_ms, 4),
        "load_cold_first_ms": round(cold[0] * 1000, 2),
        "load_cold_100th_ms": round(cold[-1] * 1000, 2),
        "load_cold_median_ms": round(statistics.median(cold) * 1000, 2),
        "mem_100_ratio": round(router.resident_bytes() / file_bytes, 4),
        "adapters": len(folders),
    })
    print(json.dumps(result))


if __name__ == "__main__":
    main()

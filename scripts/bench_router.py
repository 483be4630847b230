"""Router benchmark: one JSON line of ratios measured in the same run, on the CPU or a GPU.

- forward throughput of a mixed batch with 1, 8 and 32 distinct LoRA adapters: ours (AdapterBank) ÷ the plain
  base model, and ours ÷ peft's mixed-batch path (`adapter_names=`);
- greedy generation tokens/s, same three settings and ratios, and ours over static buffers (serving/static.py, CUDA
  graphs on a GPU) ÷ ours over the growing cache (`static=False`, the decode path before static shapes);
  `gen_base_ours_tokens_per_s`: the plain backbone decoded by ours (every row `None`);
- warm swap (Router.use on a resident adapter), cold load of the first and the last adapter, resident bytes of
  all adapters ÷ the sum of their safetensors files;
- at 32 adapters, max |Δlogit| of ours vs peft (same batch) and vs the base model (the updates are real).

Two geometries (`--geometry`, default by device):
- cpu: 32 rows × 64 tokens, generation 16 + 16 new tokens, LoRA r=8 on q/v, 100 adapters (the README's figures);
- gpu: 64 rows × 256 tokens, generation 256 + 32 new tokens, LoRA on q/k/v/o with ranks 8 and 16 alternating,
  32 adapters.
Each timing is the median of --repeats runs after warm-up, the three contenders interleaved so noise hits them
alike; on CUDA every timed region is bracketed by torch.cuda.synchronize(). Absolute times and tokens/s mean
something on a GPU only; on a shared CPU read the ratios. The adapters are random (non-zero B, so every update
is real) PEFT folders in a temp dir.

    python scripts/bench_router.py [--device cuda] [--dtype auto|bf16|fp16|fp32] [--quantization none|8bit|4bit]
                                   [--base smollm2-135m|FOLDER] [--geometry cpu|gpu] [--rows N --tokens N ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from adapterhub_lite.artifacts.files import write_json
from adapterhub_lite.artifacts.folder import FORMAT, SIDECAR
from adapterhub_lite.model.backbone import default_device, dtype_name, load_backbone
from adapterhub_lite.serving.router import Router

GEOMETRIES = {
    "cpu": dict(rows=32, tokens=64, prompt_tokens=16, new_tokens=16, targets=["q_proj", "v_proj"], ranks=[8], adapters=100, repeats=3, warmup=1),
    "gpu": dict(rows=64, tokens=256, prompt_tokens=256, new_tokens=32, targets=["q_proj", "k_proj", "v_proj", "o_proj"], ranks=[8, 16],
                adapters=32, repeats=5, warmup=2),
}
DISTINCT = (1, 8, 32)


def make_adapters(base_model, fingerprint: dict, hub_id: str, folder: Path, n: int, targets: list[str], ranks: list[int]) -> list[Path]:
    """n random LoRA adapters (rank ranks[i % len(ranks)], alpha 2r) with minimal sidecars, saved as PEFT folders."""
    out: list[Path | None] = [None] * n
    for r in ranks:  # one peft model per rank; its factors are re-drawn for each adapter of that rank
        # init_lora_weights=False: B is not zero, so the update is real (and then re-drawn below anyway).
        model = get_peft_model(base_model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                                      task_type="CAUSAL_LM", init_lora_weights=False))
        for i in range(n):
            if ranks[i % len(ranks)] != r:
                continue
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
            out[i] = path
        model.unload()  # give the base model back its plain modules
    return out


def clock(fn, cuda: bool) -> float:
    """Seconds for fn(); on CUDA the queue is drained before and after, so the time is the work's own."""
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="smollm2-135m", help="a built-in name or a local model folder (e.g. from make_random_model.py)")
    ap.add_argument("--quantization", default="none", choices=("none", "8bit", "4bit"))
    ap.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    ap.add_argument("--device", default=None, help="default: adapterhub_lite's default_device()")
    ap.add_argument("--geometry", default=None, choices=sorted(GEOMETRIES), help="default: gpu on CUDA, else cpu")
    for key in ("rows", "tokens", "prompt_tokens", "new_tokens", "adapters", "repeats", "warmup"):
        ap.add_argument("--" + key.replace("_", "-"), type=int, default=None, help="override the geometry's value")
    ap.add_argument("--ranks", type=int, nargs="+", default=None, help="LoRA ranks, alternating over the adapters")
    ap.add_argument("--profile", help="write torch.profiler tables (one forward of base, peft and ours at 32 adapters) to this file")
    args = ap.parse_args()
    device = args.device or default_device()
    cuda = torch.device(device).type == "cuda"
    geo_name = args.geometry or ("gpu" if cuda else "cpu")
    g = {**GEOMETRIES[geo_name], **{k: v for k, v in vars(args).items() if k in GEOMETRIES[geo_name] and v is not None}}
    rows_n, tokens, prompt_n, new = g["rows"], g["tokens"], min(g["prompt_tokens"], g["tokens"]), g["new_tokens"]
    if g["adapters"] < max(DISTINCT):
        sys.exit(f"error: --adapters {g['adapters']} is below {max(DISTINCT)}, the most distinct adapters a batch uses; pass at least {max(DISTINCT)}")
    torch.manual_seed(0)

    # Three copies: peft wraps its model's modules and the bank hooks its own, so the base model stays untouched.
    ours_bb = load_backbone(args.base, args.quantization, device, dtype=args.dtype)
    peft_bb = load_backbone(args.base, args.quantization, device, dtype=args.dtype)
    base_bb = load_backbone(args.base, args.quantization, device, dtype=args.dtype)
    dev = ours_bb.model.get_input_embeddings().weight.device
    tmp = tempfile.TemporaryDirectory(prefix="bench-router-")
    folders = make_adapters(peft_bb.model, ours_bb.fingerprint, ours_bb.hub_id, Path(tmp.name), g["adapters"], g["targets"], g["ranks"])

    router = Router(ours_bb)
    for f in folders:
        router.register(f.name, f)
    cold = []
    for f in folders:  # cold load: read, check and stack each adapter
        cold.append(clock(lambda: router.use(f.name), cuda))
    t0 = time.perf_counter()
    for f in folders[:50]:  # warm swap: all resident already
        router.use(f.name)
    swap_ms = (time.perf_counter() - t0) / len(folders[:50]) * 1000
    file_bytes = sum((f / "adapter_model.safetensors").stat().st_size for f in folders)

    peft_model = PeftModel.from_pretrained(peft_bb.model, folders[0], adapter_name=folders[0].name)
    for f in folders[1:max(DISTINCT)]:
        peft_model.load_adapter(f, adapter_name=f.name)
    peft_model.eval()

    vocab = ours_bb.model.config.vocab_size  # not the tokenizer's: a stand-in tokenizer may be smaller
    ids_cpu = torch.randint(100, vocab - 100, (rows_n, tokens))
    ids = ids_cpu.to(dev)  # base and peft take tensors on the model's device; the bank takes token lists
    rows = ids_cpu.tolist()
    prompts = ids[:, :prompt_n]
    prompt_rows = ids_cpu[:, :prompt_n].tolist()
    ones = torch.ones_like(prompts)
    pad = ours_bb.tokenizer.pad_token_id
    gen_kw = dict(attention_mask=ones, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=pad)
    result = {"quantization": args.quantization, "threads": torch.get_num_threads(), "rows": rows_n, "tokens": tokens,
              "device": torch.cuda.get_device_name(dev) if cuda else "cpu", "dtype": dtype_name(ours_bb.dtype), "geometry": geo_name,
              "gen_prompt_tokens": prompt_n, "new_tokens": new, "targets": g["targets"], "ranks": g["ranks"], "base": args.base}
    base_tps = {"forward": [], "generate": []}
    with torch.inference_mode():
        for distinct in DISTINCT:
            names = [folders[i % distinct].name for i in range(rows_n)]
            fwd = {
                "base": lambda: base_bb.model(input_ids=ids, logits_to_keep=1),
                "peft": lambda: peft_model(input_ids=ids, adapter_names=names, logits_to_keep=1),
                "ours": lambda: router.bank.forward(rows, names, logits_positions=[[-1]] * rows_n),
            }
            gen = {
                "base": lambda: base_bb.model.generate(input_ids=prompts, **gen_kw),
                "peft": lambda: peft_model.generate(input_ids=prompts, adapter_names=names, **gen_kw),
                "ours": lambda: router.bank.generate(prompt_rows, names, new, eos_token_id=-1, graphs=cuda),
                "dynamic": lambda: router.bank.generate(prompt_rows, names, new, eos_token_id=-1, static=False),
            }
            for kind, fns in (("forward", fwd), ("generate", gen)):
                for _ in range(g["warmup"]):
                    for fn in fns.values():
                        fn()
                t = {k: [] for k in fns}
                for _ in range(g["repeats"]):  # interleaved
                    for k, fn in fns.items():
                        t[k].append(clock(fn, cuda))
                med = {k: statistics.median(v) for k, v in t.items()}
                tag = "" if kind == "forward" else "gen_"
                n_tokens = rows_n * (tokens if kind == "forward" else new)
                result[f"{tag}mixed{distinct}_vs_base"] = round(med["base"] / med["ours"], 3)
                result[f"{tag}mixed{distinct}_vs_peft"] = round(med["peft"] / med["ours"], 3)
                result[f"{tag}mixed{distinct}_ours_tokens_per_s"] = round(n_tokens / med["ours"], 1)
                if "dynamic" in med:
                    result[f"{tag}mixed{distinct}_static_vs_dynamic"] = round(med["dynamic"] / med["ours"], 3)
                base_tps[kind].append(n_tokens / med["base"])
        if args.profile:  # where the time goes: the kernels (or CPU ops) of one forward each, at 32 adapters
            from torch.profiler import ProfilerActivity, profile
            sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
            with open(args.profile, "w") as fh:
                for k, fn in fwd.items():
                    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
                        clock(fn, cuda)
                    fh.write(f"=== {k}: forward, {rows_n} x {tokens}, 32 adapters ===\n{prof.key_averages().table(sort_by=sort, row_limit=14)}\n")
        # Same batch, same shape: what ours computes is what peft computes (8-bit and bf16 round differently).
        ours_last = torch.cat(router.bank.forward(rows, names, logits_positions=[[-1]] * rows_n)).float()
        peft_last = peft_model(input_ids=ids, adapter_names=names, logits_to_keep=1).logits[:, -1].float()
        base_last = base_bb.model(input_ids=ids, logits_to_keep=1).logits[:, -1].float()
        ours_gen = router.bank.generate(prompt_rows, names, new, eos_token_id=-1, graphs=cuda)
        plain = [None] * rows_n  # the backbone alone through our decode path (the GPU goal's "base-model decode")
        for _ in range(g["warmup"]):
            router.bank.generate(prompt_rows, plain, new, eos_token_id=-1, graphs=cuda)
        ours_base_s = statistics.median(clock(lambda: router.bank.generate(prompt_rows, plain, new, eos_token_id=-1, graphs=cuda), cuda)
                                        for _ in range(g["repeats"]))
        peft_gen = peft_model.generate(input_ids=prompts, adapter_names=names, **gen_kw)[:, prompt_n:].tolist()
    result.update({
        "base_tokens_per_s": round(statistics.median(base_tps["forward"]), 1),
        "gen_base_tokens_per_s": round(statistics.median(base_tps["generate"]), 1),
        "gen_base_ours_tokens_per_s": round(rows_n * new / ours_base_s, 1),  # prefill included, as in every gen_ figure
        "cuda_graphs_captured": router.bank._spare.captured if router.bank._spare is not None else 0,
        "mixed32_max_abs_dlogit_vs_peft": round((ours_last - peft_last).abs().max().item(), 6),
        "mixed32_max_abs_dlogit_vs_base": round((ours_last - base_last).abs().max().item(), 4),
        "gen_mixed32_rows_equal_peft": round(sum(a == b for a, b in zip(ours_gen, peft_gen)) / rows_n, 3),
        "swap_warm_ms": round(swap_ms, 4),
        "load_cold_first_ms": round(cold[0] * 1000, 2),
        f"load_cold_{len(folders)}th_ms" if len(folders) == 100 else "load_cold_last_ms": round(cold[-1] * 1000, 2),
        "load_cold_median_ms": round(statistics.median(cold) * 1000, 2),
        f"mem_{len(folders)}_ratio": round(router.resident_bytes() / file_bytes, 4),
        "adapters": len(folders),
    })
    if cuda:
        result["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

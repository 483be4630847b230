"""How far an 8-bit backbone's greedy decoding moves when its KV cache carries masked columns (what a longer
batch-mate gives a row), against the same row decoded alone — plain transformers + bitsandbytes, no adapterhub code.

Each quantization prints one JSON line: per generated token, the largest |logit difference| between the row alone
and the row with `--masked` masked cache columns, and the first token where they differ. Unquantized the two agree
exactly; in 8-bit, bitsandbytes rounds each token's activations to int8 with a per-token scale, so a one-ulp float
difference (attention over a wider cache) can flip an int8 rounding and move an activation by a whole step.

    python scripts/int8_batch_variance.py                       # default backbone, 8bit and none
"""

import argparse
import json

import torch
from transformers import DynamicCache

from adapterhub_lite.model.backbone import load_backbone


@torch.no_grad()
def decode_logits(model, prompt: list[int], pad: int, masked: int, steps: int) -> torch.Tensor:
    """Greedy decoding of `prompt` (prefilled with `masked` padding columns after it), each step's logits [steps, vocab]."""
    cache = DynamicCache()
    mask = torch.tensor([[1] * len(prompt) + [0] * masked])
    out = model(input_ids=torch.tensor([prompt + [pad] * masked]), attention_mask=mask, past_key_values=cache, use_cache=True)
    logits, pos = [out.logits[0, len(prompt) - 1]], len(prompt)
    for _ in range(steps - 1):
        token = logits[-1].argmax()
        mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
        out = model(input_ids=token.view(1, 1), attention_mask=mask, position_ids=torch.tensor([[pos]]), past_key_values=cache, use_cache=True)
        logits.append(out.logits[0, -1])
        pos += 1
    return torch.stack(logits)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--prompt", default="The weather today")
    ap.add_argument("--masked", type=int, default=4, help="masked cache columns beside the row")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--quantizations", nargs="+", default=["8bit", "none"], choices=("8bit", "none"))
    args = ap.parse_args()
    for quant in args.quantizations:
        bb = load_backbone(args.base, quant, device="cpu")
        prompt = bb.tokenizer(args.prompt, add_special_tokens=False).input_ids
        alone = decode_logits(bb.model, prompt, bb.tokenizer.pad_token_id, 0, args.steps)
        beside = decode_logits(bb.model, prompt, bb.tokenizer.pad_token_id, args.masked, args.steps)
        # teacher-forced on each side's own greedy tokens: once they choose differently the rows diverge entirely
        diff = (alone - beside).abs().amax(-1).tolist()
        same_tokens = next((i for i, (a, b) in enumerate(zip(alone.argmax(-1), beside.argmax(-1))) if a != b), None)
        print(json.dumps({"base": args.base, "quantization": quant, "masked_columns": args.masked, "prompt_tokens": len(prompt),
                          "first_logit_diff_over_1e-3": next((i for i, d in enumerate(diff) if d > 1e-3), None),
                          "first_differing_token": same_tokens, "max_logit_diff": float(f"{max(diff):.3g}"),
                          "per_token_max_logit_diff": [float(f"{d:.3g}") for d in diff]}))


if __name__ == "__main__":
    main()

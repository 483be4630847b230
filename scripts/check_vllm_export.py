"""Check `adapterhub-lite export vllm` against vLLM's own code, without a GPU.

    bash scripts/setup_vllm_check.sh   # vLLM and what its parser and LoRA loader import, pinned, in .venv-vllm/
    PYTHONPATH=.venv-vllm .venv/bin/python scripts/check_vllm_export.py --registry adapters/ [--all-versions] [--base ID]

Needs vLLM importable (a CPU machine will do: vLLM's wheel without its deps, as scripts/setup_vllm_check.sh installs it).
It builds the export plan, then:
- parses the printed `vllm serve ...` command with the parser the `vllm` CLI builds for `serve` (make_arg_parser) and checks
  that every --lora-modules value names the folder the plan serves, and --max-loras / --max-lora-rank as printed;
- for every served folder, runs what vLLM's LoRA worker runs before serving it (vllm/lora/worker_manager.py):
  PEFTHelper.from_local_dir + validate_legal against a LoRAConfig with the exported --max-lora-rank and --max-loras,
  then LoRAModel.from_local_checkpoint on the CPU with a Llama's LoRA modules, and compares each module's rank and
  scale with what peft applies (LoraModel's own per-module `scaling`, read from adapter_config.json by peft).
Prints one line per served name and exits 0, or names the first disagreement and exits 1.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")  # vLLM refuses to build its config with no platform found

# The LoRA layers of a Llama-style decoder as vLLM's worker expects them (packed qkv/gate_up unpacked), vocab layers too.
LLAMA_LORA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"}


def peft_scales(folder: str) -> dict[str, tuple[int, float]]:
    """{module: (rank, scale)} as peft computes them for this folder (LoraConfig + its rank/alpha patterns), no model."""
    import json

    from peft import LoraConfig
    from peft.utils.other import get_pattern_key

    from adapterhub_lite.model.lora_format import factor_key, tensor_shapes

    cfg = LoraConfig(**{k: v for k, v in json.loads(open(os.path.join(folder, "adapter_config.json")).read()).items()
                        if k in LoraConfig.__dataclass_fields__})
    out = {}
    for key in tensor_shapes(folder):
        parsed = factor_key(key)
        if parsed and parsed[1] == "A":
            module = parsed[0].removeprefix("base_model.model.")
            r = cfg.rank_pattern.get(get_pattern_key(cfg.rank_pattern.keys(), module), cfg.r)
            alpha = cfg.alpha_pattern.get(get_pattern_key(cfg.alpha_pattern.keys(), module), cfg.lora_alpha)
            out[module] = (r, alpha / math.sqrt(r) if cfg.use_rslora else alpha / r)
    return out


def check(plan: dict) -> list[str]:
    """One line per served name; raises AssertionError naming the first disagreement with vLLM."""
    from vllm.config.lora import LoRAConfig
    from vllm.entrypoints.common.cli_args import make_arg_parser
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    argv = shlex.split(plan["command_line"])
    assert argv[:2] == ["vllm", "serve"], f"the command does not start with `vllm serve`: {argv[:2]}"
    parser = FlexibleArgumentParser()
    make_arg_parser(parser.add_subparsers(dest="subparser").add_parser("serve"))  # as ServeSubcommand.subparser_init builds it
    args = parser.parse_args(argv[1:])  # what `vllm serve …` parses (vllm/entrypoints/cli/main.py)
    served = {m.name: m.path for m in args.lora_modules}
    want = {a["name"]: a["path"] for a in plan["adapters"]}
    assert served == want, f"vLLM reads --lora-modules as {served}, the plan serves {want}"
    assert args.model_tag == plan["base"] and args.enable_lora, (args.model_tag, args.enable_lora)
    assert args.max_loras == len(want), f"--max-loras {args.max_loras} for {len(want)} served names"
    lora_config = LoRAConfig(max_lora_rank=args.max_lora_rank, max_loras=args.max_loras)
    lines = []
    for name, path in served.items():
        helper = PEFTHelper.from_local_dir(path, None)
        helper.validate_legal(lora_config)  # raises ValueError, as vLLM does before loading the adapter
        model = LoRAModel.from_local_checkpoint(path, LLAMA_LORA_MODULES, helper, lora_model_id=1, device="cpu")
        peft = peft_scales(path)
        got = {m: (w.rank, w.scaling) for m, w in model.loras.items()}
        assert set(got) == set(peft), f"{name}: vLLM loads modules {sorted(set(got) ^ set(peft))} differently from peft"
        for m, (rank, scale) in got.items():
            assert rank == peft[m][0] and math.isclose(scale, peft[m][1], rel_tol=1e-6), \
                f"{name}: {m} has rank {rank}, scale {scale} in vLLM; peft applies rank {peft[m][0]}, scale {peft[m][1]}"
        lines.append(f"{name}: {path} ok ({len(got)} modules, rank ≤ {max(r for r, _ in got.values())} within --max-lora-rank {args.max_lora_rank})")
    return lines


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, build the export plan, check it with vLLM; 0 when vLLM agrees, 1 at the first disagreement."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--registry", required=True)
    ap.add_argument("--all-versions", action="store_true")
    ap.add_argument("--base")
    a = ap.parse_args(argv)
    from adapterhub_lite.ops.export import plan_export

    plan = plan_export(a.registry, "vllm", all_versions=a.all_versions, base=a.base)
    try:
        lines = check(plan)
    except (AssertionError, ValueError) as exc:  # ValueError: vLLM's own refusal (validate_legal, the loader)
        print(f"vLLM disagrees with the export: {exc}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

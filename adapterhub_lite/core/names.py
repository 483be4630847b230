"""Names every layer shares: the served model names that are not adapters, the backbone's choices, and the cache folder."""

import os
import re
from pathlib import Path

BASE = "base"  # a request served by the plain backbone, no adapter
AUTO = "auto"  # a request whose adapter is picked from its input (content routing)
RESERVED = (BASE, AUTO)  # never the name of an adapter
MERGED_PREFIX = "merged-"  # a per-request merge is served as this + 12 hex digits of its recipe's hash


def is_request_merge(name: object) -> bool:
    """Whether `name` has the shape of a per-request merge's name (MERGED_PREFIX + 12 hex digits)."""
    return isinstance(name, str) and re.fullmatch(re.escape(MERGED_PREFIX) + "[0-9a-f]{12}", name) is not None

QUANTIZATIONS = ("8bit", "4bit", "none")
DTYPES = ("auto", "bf16", "fp16", "fp32")  # compute dtype; auto: bf16 on CUDA that has it (else fp16), fp32 on the CPU


def cache_dir() -> Path:
    """Where this package caches (converted backbones, Hub registries' versions): $ADAPTERHUB_CACHE or
    ~/.cache/adapterhub_lite. Here, not in model.weights, so the registry reads it without loading torch."""
    root = os.environ.get("ADAPTERHUB_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "adapterhub_lite"
    return Path(root)

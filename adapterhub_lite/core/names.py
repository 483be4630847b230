"""Names every layer shares: the served model names that are not adapters, and the backbone's choices."""

import re

BASE = "base"  # a request served by the plain backbone, no adapter
AUTO = "auto"  # a request whose adapter is picked from its input (content routing)
RESERVED = (BASE, AUTO)  # never the name of an adapter
MERGED_PREFIX = "merged-"  # a per-request merge is served as this + 12 hex digits of its recipe's hash


def is_request_merge(name: object) -> bool:
    """Whether `name` has the shape of a per-request merge's name (MERGED_PREFIX + 12 hex digits)."""
    return isinstance(name, str) and re.fullmatch(re.escape(MERGED_PREFIX) + "[0-9a-f]{12}", name) is not None

QUANTIZATIONS = ("8bit", "4bit", "none")
DTYPES = ("auto", "bf16", "fp16", "fp32")  # compute dtype; auto: bf16 on CUDA that has it (else fp16), fp32 on the CPU

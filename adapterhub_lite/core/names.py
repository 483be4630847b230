"""Names every layer shares: the served model names that are not adapters, and the backbone's choices."""

BASE = "base"  # a request served by the plain backbone, no adapter
AUTO = "auto"  # a request whose adapter is picked from its input (content routing)
RESERVED = (BASE, AUTO)  # never the name of an adapter
MERGED_PREFIX = "merged-"  # a per-request merge is served as this + a hash of its recipe

QUANTIZATIONS = ("8bit", "4bit", "none")
DTYPES = ("auto", "bf16", "fp16", "fp32")  # compute dtype; auto: bf16 on CUDA that has it (else fp16), fp32 on the CPU

"""adapterhub_lite: parameter-efficient task adapters on one frozen, 8-bit backbone."""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING

# bitsandbytes logs a line for every 8-bit matmul on CPU ("inputs will be cast … to float16") and
# one at import about an optional kernels package; both are expected here and drown the progress bar.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
# bitsandbytes' import asks `kernels` for its CPU kernels; offline (HF_HUB_OFFLINE=1) kernels warns that it skips a
# publisher check: a line on stderr before every command's output, an error's one line included.
logging.getLogger("kernels").setLevel(logging.ERROR)

# The public names are imported on first use (PEP 562 module __getattr__, as transformers does):
# `import adapterhub_lite` and the commands that only read JSON (list, info, verify, --help) must
# not pay for torch, transformers and peft, which take seconds to import.
_LAZY = {
    "AdapterHubError": ".core.errors",
    "Backbone": ".model.backbone",
    "load_backbone": ".model.backbone",
    "Router": ".serving.router",
    "TaskSpec": ".core.spec",
    "load_spec": ".core.spec",
}

__all__ = ["AdapterHubError", "Backbone", "Router", "TaskSpec", "load_backbone", "load_spec"]  # = the keys of _LAZY
from ._moved import install as _install_moved  # noqa: E402
from .core import __version__  # noqa: E402,F401 - one home for the version (core imports nothing heavy)

_install_moved()  # old module paths (adapterhub_lite.router.router, …) keep working for one release, with a warning

if TYPE_CHECKING:  # static type checkers and IDEs see the real names
    from adapterhub_lite.core.errors import AdapterHubError
    from adapterhub_lite.core.spec import TaskSpec, load_spec
    from adapterhub_lite.model.backbone import Backbone, load_backbone
    from adapterhub_lite.serving.router import Router


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

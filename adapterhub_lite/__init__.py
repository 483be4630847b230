"""adapterhub_lite: parameter-efficient task adapters on one frozen, 8-bit backbone."""

import logging

# bitsandbytes logs a line for every 8-bit matmul on CPU ("inputs will be cast … to float16") and
# one at import about an optional kernels package; both are expected here and drown the progress bar.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

from .backbone import Backbone, load_backbone
from .errors import AdapterHubError
from .router.router import Router
from .spec import TaskSpec, load_spec

__all__ = ["AdapterHubError", "Backbone", "Router", "TaskSpec", "load_backbone", "load_spec"]
__version__ = "0.1.0"

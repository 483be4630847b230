"""Old module paths (before the layer packages, 0.1.0) → their new homes, for one release.

`import adapterhub_lite.router.router` still works and warns (DeprecationWarning); the module it gives is the
new one itself, so patching an attribute through either name patches the same object. Removed in 0.2.
Names only, no imports: the layers' contract (pyproject.toml's [tool.importlinter]) sees nothing here.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {f"adapterhub_lite.{old}": f"adapterhub_lite.{new}" for old, new in {
    "errors": "core.errors", "spec": "core.spec", "data": "core.data", "metrics": "core.metrics",
    "backbone": "model.backbone", "adapter": "model.adapter", "lora_format": "model.lora_format",
    "rowconfig": "model.rowconfig", "rowlora": "model.rowlora", "heads": "model.heads", "evaluate": "model.evaluate",
    "sidecar": "artifacts.sidecar", "folder": "artifacts.folder", "registry": "artifacts.registry", "hub": "artifacts.hub",
    "registries": "artifacts.registries", "samples": "artifacts.samples",
    "defaults": "training.defaults", "train": "training.recipes.train",
    "multitask": "training.recipes", "multitask.joint": "training.recipes.joint", "multitask.compose": "training.recipes.compose",
    "multitask.weighting": "training.weighting", "multitask.sampling": "training.mixing",
    "multitask.interference": "ops.interference", "multitask.cli": "cli.multitask",
    "router": "serving", "router.batch": "serving.bank", "router.routing": "serving.routing", "router.router": "serving.router",
    "router.merge": "ops.merge",
    "serve": "serving", "serve.engine": "serving.engine", "serve.params": "serving.params", "serve.sampling": "serving.sampling",
    "serve.output": "serving.output", "serve.protocol": "serving.protocol", "serve.runtime": "serving.runtime",
    "serve.handlers": "serving.handlers", "serve.api": "serving.api", "serve.metrics": "serving.metrics",
    "serve.export": "ops.export", "serve.cli": "cli.serve",
}.items()}


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old module name and loads it as its new module (with a DeprecationWarning)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=True)  # a package: old.sub imports resolve too

    def create_module(self, spec):
        return None  # a placeholder; exec_module puts the real module in its place

    def exec_module(self, module):
        new = MOVED[module.__name__]
        warnings.warn(f"{module.__name__} moved to {new} (adapterhub_lite 0.1.0); the old path goes in 0.2", DeprecationWarning, stacklevel=3)
        sys.modules[module.__name__] = importlib.import_module(new)  # the import system returns what sys.modules holds


def install() -> None:
    """Put the finder first on sys.meta_path (once)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())

"""Layers point one way: recipes do not import serving, serving imports no recipe, the registry not the hub."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module, forbidden", [
    ("adapterhub_lite.train", ("adapterhub_lite.router", "adapterhub_lite.serve")),
    ("adapterhub_lite.multitask.joint", ("adapterhub_lite.router", "adapterhub_lite.serve")),
    ("adapterhub_lite.router.router", ("adapterhub_lite.train", "adapterhub_lite.training", "adapterhub_lite.multitask")),
    ("adapterhub_lite.serve.api", ("adapterhub_lite.train", "adapterhub_lite.training", "adapterhub_lite.multitask")),
    ("adapterhub_lite.registry", ("adapterhub_lite.hub", "adapterhub_lite.registries")),
])
def test_a_module_does_not_import_the_layers_above_it(module, forbidden):
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.startswith({forbidden!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-1000:]
    assert out.stdout.strip() == "[]", f"{module} imports {out.stdout.strip()}"

"""The layers hold: the import-linter contract (pyproject.toml) passes and fails on a planted upward import,
no module imports itself back through others (imports inside functions included), the old module paths still
work for one release, and the lazy imports the commands rely on stay lazy at run time."""

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = str(Path(sys.executable).parent / "lint-imports")


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(cwd), "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "HOME": str(cwd)}
    return subprocess.run([LINT, "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_code_passes_ruff_as_pyproject_configures_it():
    """The style rules hold on every file (ruff is in the dev extra, which scripts/test.sh installs): a change that
    breaks them fails here, not in a reviewer's later run."""
    ruff = Path(sys.executable).parent / "ruff"
    if not ruff.exists():
        pytest.skip("ruff is in the dev extra: EXTRAS=test,dev bash scripts/setup.sh (scripts/test.sh does)")
    out = subprocess.run([str(ruff), "check", "--no-cache", "adapterhub_lite", "tests", "scripts"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-1000:]


def test_the_layer_contract_holds():
    out = _lint(ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-1000:]
    assert "0 broken" in out.stdout


@pytest.mark.parametrize("module, line", [
    ("core/spec.py", "    from adapterhub_lite.serving.router import Router  # planted: the core reaching up into serving\n"),
    ("training/loop.py", "    import adapterhub_lite.serving.engine  # planted: training importing serving\n"),
    ("artifacts/folder.py", "    from adapterhub_lite.artifacts.loading import load_adapter  # planted: the format reaching the model\n"),
])
def test_a_planted_import_breaks_the_contract_even_inside_a_function(tmp_path, module, line):
    shutil.copytree(ROOT / "adapterhub_lite", tmp_path / "adapterhub_lite", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / "adapterhub_lite" / module
    target.write_text(target.read_text() + "\n\ndef _planted():\n" + line)
    out = _lint(tmp_path)
    assert out.returncode != 0 and "BROKEN" in out.stdout, out.stdout[-2000:]


def _cycle(graph) -> list[str] | None:
    """One import cycle among the package's modules (depth-first search), or None."""
    mods = sorted(graph.modules)
    edges = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in mods}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for n in edges[m]:
            if state.get(n) == 1:
                return path[path.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return None

    for m in mods:
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycle_lazy_imports_included():
    # grimp reads every import statement, those inside functions too (what hid four cycles before)
    graph = grimp.build_graph("adapterhub_lite")
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_one():
    class Graph:  # a -> b -> c -> a
        modules = {"a", "b", "c", "d"}

        @staticmethod
        def find_modules_directly_imported_by(m):
            return {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}[m]

    assert _cycle(Graph) == ["a", "b", "c", "a"]


OLD_PATHS = {
    "adapterhub_lite.router.router": "adapterhub_lite.serving.router",
    "adapterhub_lite.folder": "adapterhub_lite.artifacts.folder",
    "adapterhub_lite.serve.api": "adapterhub_lite.serving.api",
    "adapterhub_lite.multitask.joint": "adapterhub_lite.training.recipes.joint",
    "adapterhub_lite.spec": "adapterhub_lite.core.spec",
}


def test_an_old_module_path_still_works_and_warns():
    import importlib

    for old, new in OLD_PATHS.items():
        for name in [m for m in sys.modules if m == old or m.startswith(old + ".")]:
            del sys.modules[name]  # an earlier import through the old path would skip the finder
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = importlib.import_module(old)
        assert module is importlib.import_module(new), old  # the same object: patching either name patches both
        assert any(f"moved to {new}" in str(w.message) and w.category is DeprecationWarning for w in caught), old


def test_the_public_api_is_where_it_was():
    import adapterhub_lite

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the public names do not go through the old paths
        names = {n: getattr(adapterhub_lite, n) for n in adapterhub_lite.__all__}
    assert names["Router"].__module__ == "adapterhub_lite.serving.router"
    assert names["load_spec"].__module__ == "adapterhub_lite.core.spec"


@pytest.mark.parametrize("modules, forbidden", [
    (("adapterhub_lite.training.recipes.train", "adapterhub_lite.training.recipes.joint"), ("adapterhub_lite.serving",)),
    (("adapterhub_lite.serving.api",), ("adapterhub_lite.training", "adapterhub_lite.cli")),
    (("adapterhub_lite.artifacts.registry",), ("adapterhub_lite.artifacts.hub", "adapterhub_lite.artifacts.registries", "torch")),
])
def test_a_module_does_not_load_the_layers_above_it_at_run_time(modules, forbidden):
    # what the static contract cannot see: imports by string (importlib), and the light commands' torch-free path
    code = f"import sys, {', '.join(modules)}; print(sorted(m for m in sys.modules if m.startswith({forbidden!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-1000:]
    assert out.stdout.strip() == "[]", f"{modules} import {out.stdout.strip()}"

"""Shared fixtures: a tiny random backbone (built locally) and tiny task data written per test."""

import json
import os
import shutil
import traceback

import pytest
import torch
import yaml
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# One switch decides where the whole suite runs: the CPU by default, CUDA with
# ADAPTERHUB_TEST_DEVICE=cuda. The library's default_device() reads ADAPTERHUB_DEVICE, and CLI
# subprocesses inherit it, so no test assumes the CPU.
TEST_DEVICE = os.environ.get("ADAPTERHUB_TEST_DEVICE", "cpu")
os.environ["ADAPTERHUB_DEVICE"] = TEST_DEVICE
# ADAPTERHUB_DEVICE_GUARD=1 runs every test under DeviceGuard (below): on a machine without a GPU it
# finds the tensors that would be on the wrong device on one.
DEVICE_GUARD = os.environ.get("ADAPTERHUB_DEVICE_GUARD") == "1"


REAL_CACHE = os.environ.get("ADAPTERHUB_CACHE")  # the slow test uses the user's real cache


def device_problem(name: str) -> str | None:
    """Why `name` cannot be the suite's device (None when it can), in one line."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        return f"ADAPTERHUB_TEST_DEVICE={name!r} is not a torch device; use cpu or cuda (or cuda:N)"
    if dev.type == "cpu":
        return None
    if dev.type != "cuda":
        return f"ADAPTERHUB_TEST_DEVICE={name!r}: the suite runs on cpu or cuda only"
    if not torch.cuda.is_available():
        build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return (f"ADAPTERHUB_TEST_DEVICE={name!r} but torch {torch.__version__} ({build}) sees no CUDA device; "
                "run on a GPU machine with a CUDA build of torch, or unset it to run on the CPU")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        return f"ADAPTERHUB_TEST_DEVICE={name!r} but only {torch.cuda.device_count()} CUDA device(s) exist; use cuda:0 … cuda:{torch.cuda.device_count() - 1}"
    return None


def pytest_configure(config):
    """Refuse an unusable test device once, before collection, instead of failing every test."""
    problem = device_problem(TEST_DEVICE)
    if problem:
        raise pytest.UsageError(problem)


@pytest.fixture(autouse=True, scope="session")
def _cache(tmp_path_factory):
    """Build the tiny backbone once per session in a private cache (the real one is left alone)."""
    os.environ["ADAPTERHUB_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture
def device() -> torch.device:
    """The device the suite runs on (tensors a test builds itself go here)."""
    dev = torch.device(TEST_DEVICE)
    if dev.type == "cuda" and dev.index is None:  # tensors report cuda:0, and torch.device("cuda") != torch.device("cuda:0")
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


class DeviceGuard(TorchFunctionMode):
    """Finds, on the CPU, the tensors that would be on the wrong device on a GPU.

    Each tensor made while the guard is on gets a tag: "dev" (a Parameter, or made with an explicit
    device=, moved with .to(device) / .cuda(), or computed from a "dev" tensor) or "host" (made by a
    factory without device=, such as a tokenizer's torch.tensor, moved with .cpu(), or computed from
    host tensors only). Tensors made elsewhere carry no tag and count as neither. An op that mixes
    the two would fail on CUDA ("index is on cpu, different from other tensors on cuda:0"); it is
    recorded with the innermost frame of this project's code. What CUDA allows is let through: host
    0-dim tensors in any op, host indices into a device tensor, copies across devices (copy_,
    setitem, .to). Known blind spot: every Parameter counts as on the device, so a test that builds
    its own CPU model on purpose and feeds it host tensors is reported too.
    """

    FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.arange, torch.rand,
                 torch.randn, torch.randint, torch.randperm, torch.linspace, torch.eye, torch.frombuffer, torch.from_numpy,
                 torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, torch.rand_like, torch.randn_like,
                 torch.Tensor.new_tensor, torch.Tensor.new_zeros, torch.Tensor.new_ones, torch.Tensor.new_full, torch.Tensor.new_empty}
    FRESH = {torch.tensor, torch.frombuffer, torch.from_numpy}  # host unless device= (the others follow their source tensor)
    ROOTS = ("/adapterhub_lite/", "/tests/", "/scripts/")

    def __init__(self):
        super().__init__()
        self.problems: dict[str, str] = {}  # "file:line op" → what would fail on CUDA

    @staticmethod
    def tag(t) -> str | None:
        if isinstance(t, torch.nn.Parameter):
            return "dev"
        return t.__dict__.get("_device_guard") if isinstance(t, torch.Tensor) else None

    def _report(self, func, what: str) -> None:
        where = "?"
        for frame in reversed(traceback.extract_stack()[:-2]):
            if any(r in frame.filename for r in self.ROOTS) and not frame.filename.endswith("conftest.py"):
                where = f"{frame.filename.rsplit('/', 2)[-2]}/{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
                break
        self.problems.setdefault(f"{where} {getattr(func, '__name__', func)}", what)

    def _result_tag(self, func, args, kwargs, flat, tags) -> str | None:
        if func in self.FACTORIES:
            if kwargs.get("device") is not None:
                return "dev"
            return "host" if func in self.FRESH or not flat else tags[0]
        if func is torch.Tensor.cpu:
            return "host"
        if func is torch.Tensor.cuda:
            return "dev"
        if func is torch.Tensor.to:
            if kwargs.get("device") is not None or any(isinstance(a, (str, torch.device)) for a in args[1:]):
                return "dev"
            other = next((a for a in args[1:] if isinstance(a, torch.Tensor)), None)
            return self.tag(other) if other is not None else tags[0]
        if func in (torch.Tensor.copy_, torch.Tensor.__setitem__):
            return tags[0]  # copies across devices are allowed; the destination keeps its device
        if func is torch.Tensor.__getitem__:
            if tags[0] == "host" and "dev" in tags[1:]:
                self._report(func, "a host tensor indexed with device indices")
            return tags[0]
        dev = "dev" in tags
        host = [tuple(t.shape) for t, g in zip(flat, tags) if g == "host" and t.dim() > 0]
        if dev and host:
            self._report(func, f"host tensor(s) of shape {host[:3]} meet device tensors")
        generator = kwargs.get("generator")
        if dev and generator is not None and generator.device.type == "cpu":
            self._report(func, "a host torch.Generator draws for device tensors")
        if dev and func is torch.Tensor.numpy:
            self._report(func, ".numpy() of a device tensor (call .cpu() first)")
        return "dev" if dev else ("host" if "host" in tags else None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)  # the mode is off inside this handler: nothing below recurses
        flat = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        result = self._result_tag(func, args, kwargs, flat, [self.tag(t) for t in flat])
        if result is not None:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
                    t.__dict__["_device_guard"] = result
        return out


@pytest.fixture
def device_guard():
    """A DeviceGuard for the body of one test: `with device_guard: …`, then read device_guard.problems."""
    return DeviceGuard()


@pytest.fixture(autouse=True)
def _guard_every_test(request):
    """With ADAPTERHUB_DEVICE_GUARD=1 (on the CPU), fail any test during which DeviceGuard saw a device mix-up
    (tests that hold their own `device_guard` check it themselves)."""
    if not DEVICE_GUARD or TEST_DEVICE != "cpu" or "device_guard" in request.fixturenames:
        yield
        return
    with DeviceGuard() as guard:
        yield
    if guard.problems:
        pytest.fail("would fail on CUDA: " + "; ".join(f"{k}: {v}" for k, v in guard.problems.items()), pytrace=False)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


OTHER_BACKBONE = "badbadbadbadbad0"


def on_another_backbone(folder, dest):
    """A copy of an adapter folder whose sidecar says it was trained on another backbone (id OTHER_BACKBONE)."""
    shutil.copytree(folder, dest)
    meta = json.loads((dest / "adapterhub.json").read_text())
    meta["base"]["fingerprint"].update(weights_sha256="2" * 64, id=OTHER_BACKBONE)
    (dest / "adapterhub.json").write_text(json.dumps(meta))
    return dest


@pytest.fixture
def cls_task(tmp_path, monkeypatch):
    """A trivially learnable 2-class task: the word in the text decides the label."""
    monkeypatch.chdir(tmp_path)
    words = {"aaaa": "pos", "bbbb": "neg"}
    rows = [{"text": f"{w} {i % 7}", "label": lab} for i in range(48) for w, lab in words.items()]
    _write_jsonl(tmp_path / "train.jsonl", rows)
    _write_jsonl(tmp_path / "dev.jsonl", rows[:16])
    spec = {
        "name": "toy", "type": "classification",
        "data": {"train": "train.jsonl", "dev": "dev.jsonl"},
        "prompt": "Text: {text}\nLabel:", "label": "label", "labels": {"pos": "x", "neg": "z"},
        "metric": ["accuracy"], "method": "lora", "method_args": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
        "train": {"max_steps": 6, "batch_size": 8, "lr": 1e-2, "warmup_steps": 0, "eval_every": 3,
                  "eval_samples": 16, "checkpoint_every": 2, "max_length": 64},
        "base": "tiny-random-llama", "quantization": "none",
    }
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path


@pytest.fixture
def gen_task(tmp_path, monkeypatch):
    """A tiny copy task for the generation path."""
    monkeypatch.chdir(tmp_path)
    rows = [{"text": t, "target": t.upper()} for t in ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op"]]
    _write_jsonl(tmp_path / "train.jsonl", rows)
    _write_jsonl(tmp_path / "dev.jsonl", rows[:4])
    spec = {
        "name": "copy", "type": "generation", "data": {"train": "train.jsonl", "dev": "dev.jsonl"},
        "prompt": "In: {text}\nOut:", "target": "target", "metric": ["exact_match"], "method": "lora",
        "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "warmup_steps": 0, "eval_every": 2,
                  "eval_samples": 4, "max_length": 32, "max_new_tokens": 4},
        "base": "tiny-random-llama", "quantization": "none",
    }
    (tmp_path / "copy.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path


def train_tiny(folder, name="toy", **overrides):
    """Train a tiny classification adapter (2 labels, 16 rows) into folder/name; returns its path.

    `overrides` replace top-level spec keys (e.g. method_args=…) or, under `train`, training keys.
    """
    from adapterhub_lite.core.spec import spec_from_dict
    from adapterhub_lite.training.recipes.train import train

    rows = [{"text": f"{w} {i}", "label": w} for i in range(8) for w in ("pos", "neg")]
    data = folder / "toy.jsonl"
    if not data.exists():
        _write_jsonl(data, rows)
    raw = {
        "name": name, "type": "classification", "data": {"train": str(data), "dev": str(data)},
        "prompt": "T: {text}\nL:", "label": "label", "labels": ["pos", "neg"], "base": "tiny-random-llama",
        "quantization": "none", "train": {"max_steps": 2, "batch_size": 4, "eval_every": 2, "max_length": 32},
    }
    raw["train"].update(overrides.pop("train", {}))
    raw.update(overrides)
    return train(spec_from_dict(raw), folder / name, progress=False)


@pytest.fixture(scope="session")
def serve_registry(tmp_path_factory):
    """The server tests' registry: nine tiny adapters of every kind (tests/serving.py), trained once per session."""
    from .serving import build_registry

    return build_registry(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def served(serve_registry):
    """A server on serve_registry (tests/serving.py's Served), one per test module, stopped after it."""
    from .serving import Served

    s = Served(serve_registry)
    yield s
    s.close()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two tiny classification adapters, cls_a and cls_b (another seed), trained once per test module."""
    d = tmp_path_factory.mktemp("adapters")
    return {"cls_a": train_tiny(d, "cls_a"), "cls_b": train_tiny(d, "cls_b", train={"seed": 3})}


def crash_after_checkpoint(monkeypatch, run, step: int | None = None) -> None:
    """Run `run()` as a process killed right after it wrote the checkpoint of `step` (None: its first one): Checkpoint.save
    raises once that checkpoint is on disk. save is put back afterwards, so the test can resume."""
    from adapterhub_lite.training.checkpoint import Checkpoint

    save = Checkpoint.save

    def crashing(self, payload):
        save(self, payload)
        if step is None or payload["state"]["step"] == step:
            raise RuntimeError("simulated crash")

    monkeypatch.setattr(Checkpoint, "save", crashing)
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            run()
    finally:
        monkeypatch.setattr(Checkpoint, "save", save)

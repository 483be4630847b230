"""Fast and quiet: JSON-only commands never import torch; training and merging leave no library warnings
(peft looking the base up online, transformers' deprecation); long eval / predict / infer runs show a bar on stderr."""

import json
import os
import subprocess
import sys
import warnings

import pytest

from adapterhub_lite.cli import main

from .conftest import train_tiny

HEAVY = ("torch", "transformers", "peft", "bitsandbytes")
# What a demo printed before: peft's Hub look-up of the base (offline: both lines) and peft's read of a deprecated property.
NOISE = ("Unable to fetch remote file", "Could not find a config file", "is_gradient_checkpointing")


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A tiny adapter and a registry holding it: (adapter folder, registry folder)."""
    from adapterhub_lite.artifacts.registry import LocalRegistry

    d = tmp_path_factory.mktemp("fast_quiet")
    folder = train_tiny(d, "toy")
    LocalRegistry(d / "reg").publish(folder, "1.0.0")
    return folder, d / "reg"


def _heavy_modules_after(argv: list[str], statement: str | None = None) -> tuple[int, list[str], str]:
    """Run `adapterhub-lite argv` (or a Python statement) in a fresh interpreter; (exit code, heavy modules it imported, stdout)."""
    body = statement or f"""
from adapterhub_lite.cli import main
try:
    rc = main({argv!r})
except SystemExit as exc:  # --help
    rc = exc.code
"""
    code = f"""import sys
{body}
print("HEAVY=" + ",".join(m for m in {HEAVY!r} if m in sys.modules))
sys.exit(rc if isinstance(rc, int) else 0)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    heavy = proc.stdout.rsplit("HEAVY=", 1)[-1].strip()
    return proc.returncode, [m for m in heavy.split(",") if m], proc.stdout + proc.stderr


@pytest.mark.parametrize("argv", [
    ["list"], ["list", "--json"], ["info", "toy"], ["verify"], ["--help"], ["list", "--help"], ["serve", "--help"], ["export", "--help"],
])
def test_json_commands_do_not_import_torch(published, argv):
    _, reg = published
    full = argv + (["--registry", str(reg)] if argv[0] in ("list", "info", "verify") and "--help" not in argv else [])
    rc, heavy, out = _heavy_modules_after(full)
    assert rc == 0, out
    assert heavy == [], f"`adapterhub-lite {' '.join(argv)}` imported {heavy}"
    if argv == ["list"]:
        assert "toy" in out and "1.0.0" in out  # it did read the registry


def test_import_package_is_light_and_every_public_name_resolves():
    rc, heavy, out = _heavy_modules_after([], "import adapterhub_lite\nfrom adapterhub_lite import AdapterHubError, TaskSpec, load_spec\nrc = 0")
    assert rc == 0 and heavy == [], (heavy, out)
    import adapterhub_lite
    from adapterhub_lite import Backbone, Router, load_backbone  # noqa: F401  (the lazy names still import)

    assert adapterhub_lite.Router is Router
    for name in adapterhub_lite.__all__:
        assert getattr(adapterhub_lite, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        adapterhub_lite.nope  # noqa: B018


def test_train_and_merge_raise_no_library_warnings(tmp_path, monkeypatch):
    """With a hub id as base (as the real default backbone has), peft must not look it up online when saving
    (offline it warns twice), and attaching / loading adapters must not trigger transformers' FutureWarning."""
    import peft.utils.save_and_load as peft_save

    from adapterhub_lite.model import backbone
    from adapterhub_lite.ops.merge import merge_adapters

    real_resolve = backbone.resolve
    monkeypatch.setattr(backbone, "resolve", lambda name: (real_resolve(name)[0], "HuggingFaceTB/SmolLM2-135M-Instruct"))
    lookups = []
    real_check = peft_save.check_file_exists_on_hf_hub
    monkeypatch.setattr(peft_save, "check_file_exists_on_hf_hub", lambda *a, **k: lookups.append(a) or real_check(*a, **k))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # pytest's config ignores FutureWarning; the CLI's users see it
        a = train_tiny(tmp_path, "a")
        b = train_tiny(tmp_path, "b", train={"seed": 3})
        merge_adapters({"a": a, "b": b}, {"a": 0.5, "b": 0.5}, "linear", task="a", output=tmp_path / "mix", report_rows=0)
    assert json.loads((a / "adapter_config.json").read_text())["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert lookups == [], f"peft looked the base up on the Hub: {lookups}"
    noise = [f"{w.category.__name__}: {w.message}" for w in caught if any(n in str(w.message) for n in NOISE)]
    assert noise == []


def _rows(n: int) -> list[dict]:
    return [{"text": f"{'pos' if i % 2 else 'neg'} {i}", "label": "pos" if i % 2 else "neg"} for i in range(n)]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _command(kind, folder, reg, path):
    if kind == "eval":
        return ["eval", str(folder), "--split", path, "--json"]
    if kind == "predict":
        return ["predict", str(folder), "--input", path]
    return ["infer", "--registry", str(reg), "--input", path]


def test_refused_training_input_is_one_line_on_stderr_offline(cls_task):
    """Offline, importing bitsandbytes made `kernels` warn 'Skipping publisher trust check …' before every command's
    output: a refusal was two lines on stderr, the first not about the input."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "adapterhub_lite.cli", "train", "toy.yaml", "train.lr=0", "--no-progress"],
                          cwd=cls_task, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.splitlines() == ["error: invalid task spec toy.yaml: train.lr must be > 0, got 0.0"], done.stderr


def test_progress_bar_only_from_a_few_hundred_rows():
    from adapterhub_lite.model.evaluate import PROGRESS_MIN_ROWS, progress_bar

    assert PROGRESS_MIN_ROWS == 300
    assert progress_bar(299, "x").disable and progress_bar(300, "x", enabled=False).disable
    assert not progress_bar(300, "x").disable


@pytest.mark.parametrize("kind", ["eval", "predict", "infer"])
def test_progress_bar_on_stderr_and_off_with_no_progress(published, tmp_path, capsys, kind):
    folder, reg = published
    rows = [{**r, "adapter": "toy"} for r in _rows(300)] if kind == "infer" else _rows(300)
    path = _write(tmp_path / "rows.jsonl", rows)
    for extra, shown in (([], True), (["--no-progress"], False)):
        assert main(_command(kind, folder, reg, path) + extra) == 0
        out, err = capsys.readouterr()
        assert ("300/300" in err and f"{kind}:" in err) == shown, (extra, err[-300:])
        assert "300/300" not in out  # the bar never mixes into the answers
        answers = [json.loads(line) for line in out.splitlines() if line.strip()]
        assert len(answers) == (1 if kind == "eval" else 300)


@pytest.mark.parametrize("kind", ["predict", "merge"])
def test_no_progress_also_silences_the_libraries_bars(published, tmp_path, kind):
    """A fresh process (the libraries read the switch at import): transformers' "Loading weights" bar shows, then not.
    merge (like interference and compose-fit) has no bar of its own, but loads weights as every backbone command does."""
    import shutil

    folder, _ = published
    shutil.copytree(folder, tmp_path / "twin")
    argv = {"predict": ["predict", str(folder), "--text", "pos 1"],
            "merge": ["merge", str(folder), str(tmp_path / "twin"), "--weights", "0.5", "0.5", "--report-rows", "2"]}[kind]
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": ""}
    runs = {flag: subprocess.run([sys.executable, "-m", "adapterhub_lite.cli", *argv, *flag,
                                  *(["--output", str(tmp_path / f"merged{len(flag)}")] if kind == "merge" else [])],
                                 capture_output=True, text=True, env=env, timeout=300) for flag in ((), ("--no-progress",))}
    assert all(r.returncode == 0 for r in runs.values()), {k: r.stderr[-500:] for k, r in runs.items()}
    assert "Loading weights" in runs[()].stderr and "Loading weights" not in runs[("--no-progress",)].stderr


@pytest.mark.parametrize("command", ["train", "eval", "predict", "infer", "merge", "train-multi", "interference", "compose-fit", "serve"])
def test_every_command_that_loads_a_backbone_takes_no_progress(command):
    from adapterhub_lite.cli.main import build_parser

    options = build_parser()._subparsers._group_actions[0].choices[command]._option_string_actions
    assert "--device" in options and "--no-progress" in options


def test_no_progress_silences_the_libraries_bars_in_process_too(published, capsys, monkeypatch):
    """main() called in a process that imported transformers already (a notebook, a script, these tests): transformers
    read the environment switch at its import, so --no-progress must turn its bars off directly; the 'Loading weights'
    bar shows without the flag and not with it."""
    from transformers.utils import logging as hf_logging

    folder, _ = published
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "")  # main() sets it: restored after the test
    was = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    try:
        shown = {}
        for flag in ((), ("--no-progress",)):
            assert main(["predict", str(folder), "--text", "pos 1", *flag]) == 0
            shown[flag] = "Loading weights" in capsys.readouterr().err
        assert shown == {(): True, ("--no-progress",): False}
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


@pytest.mark.parametrize("command", ["train", "train-multi"])
def test_no_progress_turns_the_training_step_bar_off(cls_task, capsys, command):
    """The training loop's step bar shows on stderr, and --no-progress turns it off (the flag is passed on to the loop
    by train and train-multi alike). train-multi (two trainings a run) runs with the flag only, to stay fast: the
    bar it would show is the loop's, shown by train's first run."""
    import yaml

    other = yaml.safe_load((cls_task / "toy.yaml").read_text())
    (cls_task / "other.yaml").write_text(yaml.safe_dump({**other, "name": "other"}))
    specs = ["toy.yaml"] if command == "train" else ["toy.yaml", "other.yaml"]
    shown = {}
    for flag in ((), ("--no-progress",)) if command == "train" else (("--no-progress",),):
        assert main([command, *specs, "train.max_steps=1", "--output", f"out{len(flag)}", *flag]) == 0
        shown[flag] = "1/1 [" in capsys.readouterr().err
    assert shown == ({(): True, ("--no-progress",): False} if command == "train" else {("--no-progress",): False})


def test_a_library_warning_is_one_warning_line_on_the_command_line(published):
    """The package's own warnings (an adapter run in another quantization, one left out of routing or not served) reach
    a command's stderr as one `warning: …` line, as train's data warnings do: Python's default showed the source file,
    line, `UserWarning:` and the calling source line (`router = Router.from_registry(...`) under it."""
    folder, _ = published  # trained unquantized: --quantization 8bit warns
    done = subprocess.run([sys.executable, "-m", "adapterhub_lite.cli", "predict", str(folder), "--text", "pos 1",
                           "--quantization", "8bit", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-500:]
    said = [line for line in done.stderr.splitlines() if "was trained on an unquantized backbone" in line]
    assert said and all(line.startswith("warning: adapter ") for line in said), done.stderr[-800:]
    assert "UserWarning" not in done.stderr, done.stderr[-800:]

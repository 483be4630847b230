"""README.md against the program: what a new user copies from it must exist.

Cheap checks (no model): every Python block's imports import, every `adapterhub-lite <command>` line names a
command that exists and only flags that command takes, and every `python scripts/….py` it shows is a file.
"""

import argparse
import ast
import functools
import inspect
import re
import shlex
from pathlib import Path

import pytest

from adapterhub_lite.cli import build_parser

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README, flags=re.M | re.S)


def _commands() -> list[str]:
    """Each shell command line of the README's bash blocks, continuation lines joined, comments dropped."""
    lines = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("block", _blocks("python"), ids=lambda b: b.splitlines()[0][:40])
def test_python_blocks_import(block):
    """The imports of every Python snippet run (a snippet that raises ImportError on its first lines is a README bug)."""
    tree = ast.parse(block)
    imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert imports or "openai" not in block
    for node in imports:
        if isinstance(node, ast.ImportFrom) and node.module == "openai":
            continue  # the client of the serve section: not this package's dependency
        exec(compile(ast.Module(body=[node], type_ignores=[]), "README.md", "exec"), {})


def _expand_braces(word: str) -> list[str]:
    """bash's brace expansion, which the README's lines use (`scripts/tasks/{sst2,rte}.yaml`); a quoted JSON value
    such as --autoscaling's holds spaces or quotes inside its braces and is left alone, as bash leaves it."""
    m = re.search(r"\{([\w.-]+(?:,[\w.-]+)+)\}", word)
    if not m:
        return [word]
    return [w for alt in m.group(1).split(",") for w in _expand_braces(word[:m.start()] + alt + word[m.end():])]


def _cli_lines() -> list[tuple[str, list[str]]]:
    """Each README line that runs `adapterhub-lite …` (or `-m adapterhub_lite.cli …` under a launcher): the line and
    the words after the program name, as the shell hands them over."""
    found = []
    for line in _commands():
        words = [w for word in shlex.split(line.replace("…", ""), comments=False) for w in _expand_braces(word)]
        for i, word in enumerate(words):
            if word == "adapterhub-lite" or (word == "adapterhub_lite.cli" and i and words[i - 1] == "-m"):
                rest = [w for w in words[i + 1:] if w not in ("&", "|")]
                if rest and not rest[0].startswith("-"):
                    found.append((line, rest))
                break
    return found


def _package_calls(block: str):
    """The calls a Python snippet makes to this package: (source text, the function called, its ast.Call). Names come
    from the snippet's own `from adapterhub_lite… import` lines; `r = Router.from_registry(…)` makes `r.use(…)` a call of
    Router.use."""
    tree = ast.parse(block)
    names: dict = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("adapterhub_lite"):
            exec(compile(ast.Module(body=[node], type_ignores=[]), "README.md", "exec"), names)
    made: dict = {}  # variable → the class one of whose classmethods made it
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Attribute)
                and isinstance(node.value.func.value, ast.Name) and isinstance(names.get(node.value.func.value.id), type)):
            made.update({t.id: names[node.value.func.value.id] for t in node.targets if isinstance(t, ast.Name)})
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func, text = node.func, ast.get_source_segment(block, node.func)
        if isinstance(func, ast.Name) and func.id in names and func.id != "__builtins__":
            yield text, names[func.id], node
        elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in names:
            yield text, getattr(names[func.value.id], func.attr, None), node
        elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in made:
            cls = made[func.value.id]
            method = getattr(cls, func.attr, None)
            static = isinstance(inspect.getattr_static(cls, func.attr, None), (classmethod, staticmethod))
            yield text, method if method is None or static else functools.partial(method, None), node


def test_python_blocks_call_what_exists_with_arguments_it_takes():
    """Each call a Python snippet makes to this package names a function or method that exists and passes arguments its
    signature takes (how many, which keywords): a renamed method or keyword fails here before a user pastes it."""
    problems, seen = [], 0
    for block in _blocks("python"):
        for text, func, call in _package_calls(block):
            seen += 1
            if func is None:
                problems.append(f"{text}: no such function or method")
                continue
            try:
                inspect.signature(func).bind(*call.args, **{k.arg: k.value for k in call.keywords if k.arg})
            except TypeError as exc:
                problems.append(f"{text}(…): {exc}")
    assert seen >= 8
    assert not problems, "\n".join(problems)


def test_cli_lines_name_real_commands_and_flags():
    subs = _subparsers()
    problems = []
    lines = _cli_lines()
    for line, rest in lines:
        command = rest[0]
        if command not in subs:
            problems.append(f"{line}: no command {command!r}")
            continue
        known = {opt for a in subs[command]._actions for opt in a.option_strings}
        for flag in (w.split("=")[0] for w in rest[1:] if w.startswith("--")):
            if flag not in known:
                problems.append(f"{line}: {command} takes no {flag}")
    assert len(lines) > 30
    assert not problems, "\n".join(problems)


def test_cli_lines_parse_as_the_program_reads_them(capsys):
    """Each README command line is accepted by the real parser as main() reads it: positionals, choices (`export
    vllm`, `--weighting dynamic`), types (`--autoscaling` JSON, `--density 0.5`), required flags, and `key=value`
    overrides after the options. A flag that exists but takes other values would pass the flag check above."""
    problems = []
    for line, rest in _cli_lines():
        parser = build_parser()
        try:
            args, extra = parser.parse_known_args(rest)
        except SystemExit:
            problems.append(f"{line}: {capsys.readouterr().err.strip()}")
            continue
        takes_overrides = hasattr(args, "overrides") or hasattr(args, "specs")
        if extra and not (takes_overrides and all("=" in e and not e.startswith("-") for e in extra)):
            problems.append(f"{line}: unrecognized {extra}")
    assert not problems, "\n".join(problems)


def test_scripts_the_readme_runs_exist():
    scripts = {m for line in _commands() for m in re.findall(r"\bscripts/[\w/.-]+\.(?:py|sh)\b", line)}
    assert scripts
    assert [s for s in sorted(scripts) if not (ROOT / s).is_file()] == []


def _help(command: str, flag: str) -> str:
    return next(a.help for a in _subparsers()[command]._actions if flag in a.option_strings)


def test_help_texts_say_what_the_readme_and_the_code_do():
    """`adapterhub-lite <cmd> --help` beside the README: merge --method listed 6 of its 12 methods (not
    delta_linear, the *_svd ones or magnitude_prune, which the README's Merge paragraph describes); --device left out
    mps, which the README and the device check accept; --dtype's auto left out fp16 on a GPU without bf16."""
    from adapterhub_lite.ops.merge import MERGE_METHODS

    listed = set(re.findall(r"[a-z_]+", _help("merge", "--method")))
    assert set(MERGE_METHODS) <= listed
    assert "mps" in _help("train", "--device") and "cpu, cuda, cuda:N or mps" in README
    assert "fp16" in _help("eval", "--dtype")
    # eval / predict / serve run adapters in auto whatever they trained in (load_adapter); the help said "the spec's"
    assert "whatever the adapters trained in" in _help("eval", "--dtype") and "spec" not in _help("eval", "--dtype")
    assert "the spec's `dtype`" in _help("train", "--dtype")
    assert "multitask/cli.py" not in build_parser().description


def test_source_files_the_readme_names_exist():
    """Every `folder/file.py` the README points at (a module, a test, a script) is in the repository."""
    named = set(re.findall(r"`((?:[\w.]+/)+[\w]+\.py)", README))
    assert len(named) > 20
    missing = [p for p in sorted(named) if not any((base / p).is_file() for base in (ROOT, ROOT / "adapterhub_lite"))]
    assert missing == []


def test_the_task_spec_table_names_every_spec_key():
    """The README's Task spec table lists every key a spec may hold, and no key the spec refuses."""
    import dataclasses

    from adapterhub_lite.core.spec import DataSpec, TaskSpec, TrainConfig

    section = README.split("## Task spec", 1)[1].split("\n### ", 1)[0]
    rows = {line.split("|")[1] for line in section.splitlines() if line.startswith("| `")}
    table_keys = set(re.findall(r"`([\w.]+)`", " ".join(rows)))
    train_row = next(line for line in section.splitlines() if line.startswith("| `train` |"))
    spec_keys = {f.name for f in dataclasses.fields(TaskSpec) if not f.metadata.get("internal")} | {f"data.{f.name}" for f in dataclasses.fields(DataSpec)}
    assert spec_keys - {"data"} <= table_keys, spec_keys - table_keys
    assert table_keys <= spec_keys, table_keys - spec_keys
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    assert {k for k in train_keys if f"`{k}`" not in train_row} == set()


def _positional_help(command: str, dest: str) -> str:
    return next(a.help for a in _subparsers()[command]._actions if a.dest == dest)


def test_help_description_lists_every_command():
    """`adapterhub-lite --help` opens with the list of commands, which left out reindex."""
    described = set(re.findall(r"[\w-]+", build_parser().description))
    assert [c for c in _subparsers() if c not in described] == []


def test_train_multi_help_names_every_key_the_specs_must_agree_on():
    """train-multi's SPEC_OR_OVERRIDE help named 8 of the 15 `train` keys a joint run takes once for all its specs
    (SHARED_TRAIN_KEYS, which the README's Joint training paragraph lists), and its --resume said a checkpoint is
    taken at every eval, where train.checkpoint_every now sets it (c782af4)."""
    from adapterhub_lite.training.joint_config import SHARED_TRAIN_KEYS

    specs_help = _positional_help("train-multi", "specs")
    assert [k for k in SHARED_TRAIN_KEYS if not re.search(rf"\b{k}\b", specs_help)] == []
    assert "checkpoint_every" in _help("train-multi", "--resume")
    joint = README.split("- **Joint training**", 1)[1].split("\n- **", 1)[0]
    assert [k for k in SHARED_TRAIN_KEYS if f"`{k}`" not in joint and f"`train.{k}`" not in joint] == []


def test_script_lines_pass_flags_the_script_takes():
    """Every flag of a `python scripts/….py` command the README shows (in a block or inline in backticks) is one that
    script's argparse defines; a script that only forwards to a command (`main(["infer", …])`) takes that command's."""
    subs, problems, seen = _subparsers(), [], 0
    inline = [" ".join(span.split()) for span in re.findall(r"`(python scripts/[^`]*)`", README)]  # may wrap lines
    for script, rest in (re.match(r"python (scripts/\w+\.py)(.*)", line).groups() for line in _commands() + inline if line.startswith("python scripts/")):
        source = (ROOT / script).read_text()
        forwards = re.search(r'main\(\["([\w-]+)"', source)
        unquoted = re.sub(r"\"[^\"]*\"|'[^']*'", "", rest)  # a quoted value is another program's (--server-args "…")
        for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", unquoted):
            seen += 1
            if forwards:
                ok = flag in {o for a in subs[forwards.group(1)]._actions for o in a.option_strings}
            else:  # bench_router.py makes its geometry flags from their names: "--" + key.replace("_", "-")
                ok = f'"{flag}"' in source or ('"--" + key.replace("_", "-")' in source and f'"{flag[2:].replace("-", "_")}"' in source)
            if not ok:
                problems.append(f"python {script}{rest}: takes no {flag}")
    assert seen > 30
    assert not problems, "\n".join(problems)


def test_layout_names_every_module():
    """The Layout block names every module of each layer package (cli/ranks.py was missing)."""
    layout = README.split("## Layout", 1)[1].split("```")[1]
    words = set(re.findall(r"\w+", layout))
    package = ROOT / "adapterhub_lite"
    modules = [f for d in ("cli", "core", "model", "artifacts", "ops", "training", "training/recipes", "serving") for f in (package / d).glob("*.py")]
    assert [str(f.relative_to(package)) for f in modules if f.stem not in words and not f.stem.startswith("__")] == []


def test_the_loggers_the_readme_names_exist():
    """Each logger the Operations paragraph tells a user to configure is one the package logs to: it named
    `adapterhub_lite.serving` for the engine's failures, which go to `adapterhub_lite.serve`."""
    package = ROOT / "adapterhub_lite"
    loggers = {name for f in package.rglob("*.py") for name in re.findall(r'getLogger\("([\w.]+)"\)', f.read_text())}
    operations = README.split("- **Operations.**", 1)[1].split("\n- **", 1)[0]
    named = set(re.findall(r"`(adapterhub_lite\.[\w.]+)`", operations))
    assert named and named <= loggers, named - loggers


def test_the_readme_says_where_the_shipped_specs_read_their_data():
    """The shipped specs read their data from outside the repository (`../shared/data/…`), so a fresh clone's first
    `train scripts/tasks/sst2.yaml` stops on a missing file; the Task spec section must say where the data goes (it
    named no such folder)."""
    import yaml

    outside = {path.rsplit("/", 2)[0] for spec in (ROOT / "scripts" / "tasks").rglob("*.yaml")
               for path in yaml.safe_load(spec.read_text())["data"].values() if path.startswith("../")}
    section = README.split("## Task spec", 1)[1].split("\n| key |", 1)[0]
    assert outside and [o for o in sorted(outside) if f"`{o}/" not in section] == []


def test_what_a_spec_may_leave_out_names_every_optional_key():
    """A minimal spec (scripts/tasks/minimal/) leaves out metric, method, base, quantization and dtype too: `train`
    printed them (metric: ["accuracy"], no `#` reason) but the left-out table named none of them, so a user comparing
    with the tuned sst2.yaml (accuracy and macro_f1) could not tell macro_f1 would be missing."""
    import dataclasses

    from adapterhub_lite.core.spec import TaskSpec

    section = README.split("### What a spec may leave out", 1)[1].split("\n#", 1)[0]
    required = {"name", "type", "data", "prompt", "label", "labels", "target"}
    optional = {f.name for f in dataclasses.fields(TaskSpec) if not f.metadata.get("internal")} - required - {"train", "init_from"}
    assert [k for k in sorted(optional) if f"`{k}`" not in section] == []


def _use_train_outputs() -> list[tuple[str, str]]:
    """Each training line of the Use section's bash block and the folder it writes (`--output`, else runs/<name>)."""
    import yaml

    use = README.split("\n## Use\n", 1)[1].split("\n## ", 1)[0]
    found = []
    for line in re.search(r"```bash\n(.*?)```", use, re.S).group(1).splitlines():
        m = re.search(r"(?:adapterhub-lite|adapterhub_lite\.cli|train_adapter\.py) (?:train )?(scripts/\S+\.yaml)(.*)", line)
        if m:
            out = re.search(r"--output (\S+)", m.group(2))
            found.append((line, out.group(1) if out else f"runs/{yaml.safe_load((ROOT / m.group(1)).read_text())['name']}"))
    return found


def test_the_use_snippet_trains_into_a_folder_the_commands_above_did_not_write():
    """Use's Python snippet trained into runs/sst2, which the bash block just above writes first: pasted in order, it
    raised OutputExistsError (telling a Python caller to "pass --overwrite")."""
    use = README.split("\n## Use\n", 1)[1].split("\n## ", 1)[0]
    written = {out for _, out in _use_train_outputs()}
    outputs = re.findall(r'\btrain\(.*?,\s*"([^"]+)"', re.search(r"```python\n(.*?)```", use, re.S).group(1))
    assert outputs and written and set(outputs) & written == set()


def test_the_use_block_trains_each_run_into_its_own_folder():
    """Use's bash block trained scripts/tasks/sst2.yaml into runs/sst2 and then minimal/sst2.yaml (also named sst2),
    the torchrun line and train_adapter.py into the same runs/sst2: pasted in order, each later line stopped on
    "output folder 'runs/sst2' already exists". Only `--resume` (continue that run) may name a folder again."""
    fresh = [(line, out) for line, out in _use_train_outputs() if "--resume" not in line and "--overwrite" not in line]
    seen: dict = {}
    clashes = [f"{line}: writes {out}, as `{seen[out]}` above" for line, out in fresh if seen.setdefault(out, line) != line]
    assert len(fresh) >= 4 and clashes == []


def test_router_run_answers_with_the_keys_the_readme_names(tmp_path):
    """The Router section said a `run` answer is its request with `prediction` added and other keys riding along (an
    id): `Router.run` answers `{"adapter", "prediction"}` only (infer is the one that merges the request back in)."""
    from adapterhub_lite import Router, load_backbone
    from tests.conftest import train_tiny

    router = Router(load_backbone("tiny-random-llama", "none", dtype="fp32"))
    router.register("toy", train_tiny(tmp_path, "toy"))
    answer = router.run([{"adapter": "toy", "text": "ab", "id": 7}])[0]
    router.close()
    section = README.split("## Router: many tasks on one base model", 1)[1].split("\n## ", 1)[0]
    keys = re.search(r"`run` answers each request, in order, with\s+`\{([^}]*)\}`", section)
    assert keys and set(answer) == set(re.findall(r'"(\w+)"', keys.group(1)))


def test_train_multi_lines_give_specs_that_agree():
    """Each README `train-multi` line names specs and overrides a joint run accepts: since train.checkpoint_every became
    the run's (c782af4) both lines were refused, the shipped sst2 / rte / ag_news specs checkpointing every 120 / (every
    eval) / 100 steps. Read without a model: the specs and their agreement only."""
    from adapterhub_lite.cli.multitask import _specs_and_overrides
    from adapterhub_lite.core.errors import AdapterHubError
    from adapterhub_lite.core.spec import load_spec
    from adapterhub_lite.training.joint_config import JointConfig

    lines = [(line, rest) for line, rest in _cli_lines() if rest[0] == "train-multi"]
    problems = []
    for line, rest in lines:
        args, extra = build_parser().parse_known_args(rest)
        paths, overrides = _specs_and_overrides(args.specs + extra)
        try:
            JointConfig.from_specs([load_spec(ROOT / p, overrides) for p in paths])
        except AdapterHubError as exc:
            problems.append(f"{line}: {exc}")
    assert len(lines) >= 2
    assert not problems, "\n".join(problems)


def test_the_cli_points_at_files_that_exist():
    """The command modules' docstrings and comments name the files that do the work (`serving/api.py`); cli/serve.py
    still named `serve/api.py`, the path before the layer packages (0.1.0)."""
    package = ROOT / "adapterhub_lite"
    named = {p for f in (package / "cli").glob("*.py") for p in re.findall(r"\b((?:[a-z_]+/)+[a-z_]+\.py)\b", f.read_text())}
    assert len(named) > 5
    assert [p for p in sorted(named) if not (package / p).is_file() and not (ROOT / p).is_file()] == []


def test_the_metric_names_the_readme_gives_are_served():
    """Each `adapterhub_…` series the README names is one `GET /metrics` exposes under that name, and so is each
    latency histogram its Operations list names under our prefix: it named `adapterhub_scheduler_waits{budget}`, a
    counter prometheus_client exposes as `adapterhub_scheduler_waits_total` (a query for the other finds nothing)."""
    from prometheus_client import generate_latest

    from adapterhub_lite.serving.metrics import ServeMetrics

    served = set(re.findall(r"^# HELP (\w+) ", generate_latest(ServeMetrics().registry).decode(), flags=re.M))
    named = set(re.findall(r"`(adapterhub_(?!lite)[a-z][a-z_]*)", README))
    operations = README.split("- **Operations.**", 1)[1].split("\n- **", 1)[0]
    histograms = re.search(r"`adapterhub_`\):\s*(.*?)\. The per-request", operations, re.S).group(1)
    named |= {f"adapterhub_{h}" for h in re.findall(r"`(\w+)`", histograms)}
    assert len(named) >= 12 and sorted(named - served) == []


def test_train_multi_lines_of_the_scripts_the_readme_runs_give_specs_that_agree():
    """The README's multi-task figures come from `bash scripts/mtl_experiment.sh`, whose train-multi line gave no
    train.checkpoint_every: since that key became the run's (c782af4) the shipped sst2 / rte / ag_news specs' 120 /
    (every eval) / 100 were refused, after step 1's three trainings had run. Each train-multi line of a script the
    README runs must give specs a joint run accepts (read without a model)."""
    from adapterhub_lite.cli.multitask import _specs_and_overrides
    from adapterhub_lite.core.errors import AdapterHubError
    from adapterhub_lite.core.spec import load_spec
    from adapterhub_lite.training.joint_config import JointConfig

    scripts = sorted(set(re.findall(r"\bbash (scripts/[\w/.-]+\.sh)\b", README)))  # in a bash block or inline
    problems, seen = [], 0
    for script in scripts:
        for line in (ROOT / script).read_text().replace("\\\n", " ").splitlines():
            if not line.strip().startswith("adapterhub-lite train-multi "):
                continue
            words = shlex.split(line.split("#")[0])
            seen += 1
            args, extra = build_parser().parse_known_args(words[1:])
            paths, overrides = _specs_and_overrides(args.specs + extra)
            try:
                JointConfig.from_specs([load_spec(ROOT / p, overrides) for p in paths])
            except AdapterHubError as exc:
                problems.append(f"{script}: {exc}")
    assert seen >= 1 and problems == []


def test_the_interference_line_says_where_the_runs_it_reads_come_from():
    """Multi-task's interference line reads runs/sep/sst2, rte and ag_news, which no line of that block (or above it)
    writes: a user pasting the block met 'does not exist'. Each folder it reads is written above in the block
    (`--output`, or a train-multi output's per-task folder) or by the script its comment names."""
    block = re.search(r"## Multi-task learning\n+```bash\n(.*?)```", README, re.S).group(1).replace("\\\n", " ")
    written, problems = set(), []
    for line in block.splitlines():
        command, _, comment = line.partition("  #")
        words = shlex.split(command)
        if words[1:2] == ["interference"]:
            scripts = [(ROOT / s).read_text() for s in re.findall(r"scripts/[\w/.-]+\.sh", comment)]
            for folder in (w for w in words[2:words.index("--output")] if w.startswith("runs/")):
                made_by_script = any(f"--output {folder.rsplit('/', 1)[0]}/$" in text for text in scripts)
                if not (folder in written or folder.rsplit("/", 1)[0] in written or made_by_script):
                    problems.append(folder)
        if "--output" in words:
            written.add(words[words.index("--output") + 1].rstrip("/"))
    assert problems == []


def test_every_option_of_every_command_says_what_it_does():
    """`adapterhub-lite <cmd> --help` is where a README reader looks up a flag the README shows: infer's --batch-size,
    merge's --weights, train-multi's --weighting and --sampling, serve's --port, verify's NAME and others had no text
    at all (only a metavar)."""
    missing = [f"{name} {a.option_strings[0] if a.option_strings else a.dest}" for name, sub in _subparsers().items()
               for a in sub._actions if a.help is None and not isinstance(a, argparse._HelpAction)]
    assert missing == []


def test_a_block_that_activates_the_venv_makes_it_first():
    """Use's block began `. .venv/bin/activate`, which a fresh clone does not have (only scripts/setup.sh, run by
    demo.sh and test.sh, makes it): a reader going straight to Use got 'No such file or directory'. A block that
    activates .venv runs setup.sh (idempotent) before it."""
    blocks = [b for b in _blocks("bash") if ".venv/bin/activate" in b]
    assert blocks and [b.splitlines()[0] for b in blocks if "scripts/setup.sh" not in b.split(".venv/bin/activate", 1)[0]] == []


def test_the_gpu_check_usage_is_the_scripts():
    """On a GPU showed `gpu_check.sh [OUTDIR] [tests|router|train|sst2]`, one phase or none, where the script takes any
    number of phases (`[PHASE ...]`, default all): the usage and the phases it lists are the script's."""
    source = (ROOT / "scripts" / "gpu_check.sh").read_text()
    phases = set(re.search(r"^ALL_PHASES=\(([^)]*)\)", source, re.M).group(1).split())
    usage = re.search(r"`bash scripts/gpu_check.sh ([^`]*)`( \([^)]*\))?", README)
    assert usage.group(1) == "[OUTDIR] [PHASE ...]" and set(re.findall(r"`(\w+)`", usage.group(2) or "")) == phases


def test_every_default_a_help_text_names_is_the_one_the_command_uses():
    """A help text that names a default ("(default 8000)", "(default: adapters)") must name the parser's own: a changed
    default left the --help a README reader looks up telling them another value."""
    checked, wrong = 0, []
    for name, sub in _subparsers().items():
        for a in sub._actions:
            said = re.search(r"\bdefault:? ([\w.]+)", a.help or "")
            if said is None or a.default is None or isinstance(a.default, (bool, list)):
                continue
            checked += 1
            shown = said.group(1).rstrip(".")
            same = shown == str(a.default) or (isinstance(a.default, (int, float)) and re.fullmatch(r"[\d.]+", shown)
                                               and float(shown) == float(a.default))
            if not same:
                wrong.append(f"{name} {a.option_strings[0] if a.option_strings else a.dest}: help says {shown}, default is {a.default!r}")
    assert checked >= 8 and wrong == []


def test_the_adapter_folder_block_lists_the_files_train_writes(tmp_path):
    """The Adapter folder block lists what a user finds in runs/sst2 after `train` (walked: README.md, adapter_config.json,
    adapter_model.safetensors, adapterhub.json, curves.png, metrics.jsonl, routing.safetensors): a file train writes
    and the block leaves out, or one it names that train no longer writes, is a README bug."""
    from tests.conftest import train_tiny

    block = README.split("## Adapter folder", 1)[1].split("```")[1]
    listed = set(re.findall(r"^ {2}([\w.]+(?:, [\w.]+)*)\s", block, flags=re.M))
    listed = {name for group in listed for name in group.split(", ")}
    written = {p.name for p in train_tiny(tmp_path, "toy").iterdir()}
    assert listed == written, (sorted(listed), sorted(written))

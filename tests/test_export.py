"""`adapterhub-lite export vllm|lorax`: the engine command serves every servable LoRA adapter at its
absolute version folder, with the right rank bucket; everything else is listed with its reason."""

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from adapterhub_lite.artifacts.index import file_record
from adapterhub_lite.artifacts.registry import LocalRegistry
from adapterhub_lite.cli import main
from adapterhub_lite.ops.export import VLLM_MAX_LORA_RANKS, ExportError, plan_export, vllm_rank_bucket

from .conftest import train_tiny


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Tiny adapters: LoRA r=4, LoRA r=16 with q_proj at r=32 (same scale), q_proj at r=32 in layer 0 only, LoRA r=8 with
    lora_alpha 8 (peft's defaults), prefix, prompt."""
    d = tmp_path_factory.mktemp("export")
    q32 = {"r": 16, "lora_alpha": 32, "rank_pattern": {"q_proj": 32}, "alpha_pattern": {"q_proj": 64}}
    layer0 = "model.layers.0.self_attn.q_proj"
    return {
        "lora4": train_tiny(d, "lora4", method_args={"r": 4}),
        "lora16": train_tiny(d, "lora16", method_args=q32),
        "layer0": train_tiny(d, "layer0", method_args={"r": 8, "lora_alpha": 8, "rank_pattern": {layer0: 32}, "alpha_pattern": {layer0: 32}}),
        "lora8": train_tiny(d, "lora8", method_args={"r": 8, "lora_alpha": 8}),  # peft's default r and lora_alpha
        "pfx": train_tiny(d, "pfx", method="prefix", method_args={"num_virtual_tokens": 3}),
        "prm": train_tiny(d, "prm", method="prompt", method_args={"num_virtual_tokens": 4}),
    }


@pytest.fixture
def registry(trained, tmp_path):
    """lora4 (1.0.0 and 1.0.1), lora16, pfx and prm published into a fresh registry."""
    reg = LocalRegistry(tmp_path / "reg")
    reg.publish(trained["lora4"], "1.0.0")
    reg.publish(trained["lora4"], "1.0.1")
    for name in ("lora16", "pfx", "prm"):
        reg.publish(trained[name], "1.0.0")
    return tmp_path / "reg"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def lora_modules(argv: list[str]) -> list[str]:
    return argv[argv.index("--lora-modules") + 1:]


def test_rank_buckets_are_the_smallest_vllm_accepts():
    assert [vllm_rank_bucket(r) for r in (1, 8, 9, 16, 33, 128, 129, 257, 320, 321, 512)] == [8, 8, 16, 16, 64, 128, 256, 320, 320, 512, 512]
    assert vllm_rank_bucket(513) is None and VLLM_MAX_LORA_RANKS[-1] == 512


def test_vllm_command_serves_every_lora_at_its_absolute_folder(registry, capsys, monkeypatch):
    monkeypatch.chdir(registry.parent)  # a relative --registry still gives absolute paths
    code, out, err = run(capsys, "export", "vllm", "--registry", "reg")
    assert code == 0
    argv = shlex.split(out.splitlines()[0])
    root = registry.resolve()
    assert argv[:4] == ["vllm", "serve", LocalRegistry(root).index()["adapters"]["lora4"]["1.0.1"]["base"]["hub_id"], "--enable-lora"]
    assert sorted(lora_modules(argv)) == [f"lora16={root}/lora16/1.0.0", f"lora4={root}/lora4/1.0.1"]  # latest version only
    assert argv[argv.index("--max-lora-rank") + 1] == "32"  # rank_pattern's q_proj at 32, not r=16
    assert argv[argv.index("--max-loras") + 1] == "2"
    skipped = [line for line in out.splitlines() if line.startswith("#   pfx@") or line.startswith("#   prm@")]
    assert "# not exportable:" in out and len(skipped) == 2 and all("serves LoRA adapters only" in s for s in skipped)
    assert all(line.startswith("#") for line in out.splitlines()[1:])  # the whole output is safe to paste into a shell
    assert [line for line in err.splitlines() if line] == [err.strip()] and err.startswith("warning: vLLM loads its own copy")


def test_json_output_parses_and_matches_the_command(registry, capsys):
    code, out, _ = run(capsys, "export", "vllm", "--registry", str(registry), "--json")
    plan = json.loads(out)
    assert code == 0 and plan["engine"] == "vllm" and plan["command_line"] == shlex.join(plan["command"])
    assert {(a["name"], a["version"], a["rank"]) for a in plan["adapters"]} == {("lora4", "1.0.1", 4), ("lora16", "1.0.0", 32)}
    assert all(os.path.isabs(a["path"]) and os.path.isdir(a["path"]) for a in plan["adapters"])
    assert {(s["name"], s["method"]) for s in plan["skipped"]} == {("pfx", "prefix"), ("prm", "prompt")}
    assert any("fingerprint" in n for n in plan["notes"]) and not any("quantized base" in n for n in plan["notes"])  # trained unquantized
    assert all(a["labels"] == ["pos", "neg"] and a["prompt_template"] == "T: {text}\nL:" for a in plan["adapters"])


def test_all_versions_serves_name_and_name_at_version(registry):
    plan = plan_export(registry, "vllm", all_versions=True)
    names = [m.split("=")[0] for m in lora_modules(plan["command"])]
    assert sorted(names) == ["lora16", "lora16@1.0.0", "lora4", "lora4@1.0.0", "lora4@1.0.1"]
    assert f"lora4={registry.resolve()}/lora4/1.0.1" in plan["command"]
    modules = dict(m.split("=", 1) for m in lora_modules(plan["command"]))  # each pinned name serves its own version
    assert {n: modules[n] for n in ("lora4@1.0.0", "lora4@1.0.1", "lora16@1.0.0")} == {
        "lora4@1.0.0": f"{registry.resolve()}/lora4/1.0.0", "lora4@1.0.1": f"{registry.resolve()}/lora4/1.0.1",
        "lora16@1.0.0": f"{registry.resolve()}/lora16/1.0.0"}
    assert plan["command"][plan["command"].index("--max-loras") + 1] == "5"


def test_output_writes_a_runnable_script(registry, tmp_path, capsys):
    script = tmp_path / "serve.sh"
    code, out, _ = run(capsys, "export", "vllm", "--registry", str(registry), "--output", str(script))
    assert code == 0 and script.stat().st_mode & stat.S_IXUSR
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".serve.sh")]  # no temp file left
    code, _, err = run(capsys, "export", "vllm", "--registry", str(registry), "--output", str(script / "x.sh"))  # under a file
    assert code == 2 and f"{str(script)!r} is a file, not a folder" in err, err
    fake = tmp_path / "bin"  # a stand-in `vllm` that records the arguments it receives
    fake.mkdir()
    (fake / "vllm").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n')
    (fake / "vllm").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "ARGS_OUT": str(tmp_path / "args.txt")}
    subprocess.run([str(script), "--port", "9000"], check=True, env=env, timeout=60)
    assert (tmp_path / "args.txt").read_text().splitlines() == shlex.split(out.splitlines()[0])[1:] + ["--port", "9000"]


def test_lorax_command_and_requests(registry, capsys):
    code, out, _ = run(capsys, "export", "lorax", "--registry", str(registry), "--json")
    plan, root = json.loads(out), registry.resolve()
    argv = plan["command"]
    assert code == 0 and argv[:3] == ["lorax-launcher", "--model-id", plan["base"]]
    preloaded = [argv[i + 1] for i, a in enumerate(argv) if a == "--preloaded-adapter-ids"]
    assert sorted(preloaded) == [f"{root}/lora16/1.0.0", f"{root}/lora4/1.0.1"]
    assert argv[argv.index("--preloaded-adapter-source") + 1] == "local"
    for a in plan["adapters"]:
        assert a["request"]["parameters"] == {"adapter_id": a["path"], "adapter_source": "local"}
    assert {s["name"] for s in plan["skipped"]} == {"pfx", "prm"}
    assert all("LoRAX serves LoRA adapters only" in s["reason"] for s in plan["skipped"])


def _edited_copy(src, dst, **config_changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "adapter_config.json").read_text())
    for key, value in config_changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


def test_loras_the_engines_would_serve_wrongly_are_skipped_with_the_reason(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    reg = LocalRegistry(tmp_path / "reg")
    reg.publish(trained["lora4"], "1.0.0")
    reg.publish(_edited_copy(trained["lora16"], tmp_path / "dora", use_dora=True), "1.0.0", name="dora")
    reg.publish(_edited_copy(trained["lora16"], tmp_path / "scale", alpha_pattern=None), "1.0.0", name="scale")  # q_proj: 32/32 ≠ 32/16
    reg.publish(trained["layer0"], "1.0.0")
    head = _edited_copy(trained["lora4"], tmp_path / "head", target_modules=["q_proj", "v_proj", "lm_head"])
    weights = load_file(head / "adapter_model.safetensors")
    vocab = weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].new_zeros
    weights |= {"base_model.model.lm_head.lora_A.weight": vocab(4, 64), "base_model.model.lm_head.lora_B.weight": vocab(259, 4)}
    save_file({k: v.contiguous() for k, v in weights.items()}, head / "adapter_model.safetensors")
    reg.publish(head, "1.0.0", name="head")

    vllm, lorax = plan_export(reg.root, "vllm"), plan_export(reg.root, "lorax")
    reasons = {e: {s["name"]: s["reason"] for s in p["skipped"]} for e, p in (("vllm", vllm), ("lorax", lorax))}
    for engine, eng in (("vllm", "vLLM"), ("lorax", "LoRAX")):
        assert f"uses DoRA (use_dora), which {eng} does not implement" in reasons[engine]["dora"]
        assert "give 'q_proj' the scale 1 but the other modules 2" in reasons[engine]["scale"]
        assert "puts LoRA on lm_head" in reasons[engine]["head"]
    # layer 0's q_proj at r=32, layer 1's at r=8, both at scale 1: vLLM pads each module to the slot rank, LoRAX takes one rank per type
    assert "layer0" not in reasons["vllm"] and "different ranks in different layers" in reasons["lorax"]["layer0"]
    assert {a["name"] for a in vllm["adapters"]} == {"lora4", "layer0"} and {a["name"] for a in lorax["adapters"]} == {"lora4"}
    assert vllm["command"][vllm["command"].index("--max-lora-rank") + 1] == "32"


def test_a_damaged_version_refuses_the_whole_export_naming_every_damaged_one(registry, tmp_path, capsys):
    """A damaged registry is bad input: exit 2, one line naming each damaged version, no command printed, no script
    written (a command serving the rest would pass a script's or CI's check). Kinds vLLM cannot take stay exit 0."""
    for version in ("lora16/1.0.0", "lora4/1.0.0"):
        weights = registry / version / "adapter_model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0x01
        weights.write_bytes(bytes(data))
    script = tmp_path / "serve.sh"
    code, out, err = run(capsys, "export", "vllm", "--registry", str(registry), "--all-versions", "--output", str(script))
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: "), err
    assert "2 damaged adapter version(s), so nothing is exported: lora16@1.0.0, lora4@1.0.0" in err and "verify --registry" in err
    assert not script.exists()
    code, out, err = run(capsys, "export", "lorax", "--registry", str(registry))  # latest only: lora16@1.0.0
    assert code == 2 and out == "" and "1 damaged adapter version(s), so nothing is exported: lora16@1.0.0 (integrity check failed" in err


def test_one_base_per_command(registry, capsys):
    index_path = registry / "index.json"
    index = json.loads(index_path.read_text())
    # lora16 trained on another base: its sidecar says so, and the index records that sidecar (an index entry that
    # disagrees with its version's files is refused as damaged)
    sidecar = registry / "lora16" / "1.0.0" / "adapterhub.json"
    meta = json.loads(sidecar.read_text())
    meta["base"]["hub_id"] = "other/model"
    sidecar.write_text(json.dumps(meta))
    entry = index["adapters"]["lora16"]["1.0.0"]
    entry["base"]["hub_id"], entry["files"]["adapterhub.json"] = "other/model", file_record(sidecar)
    index_path.write_text(json.dumps(index))
    mine = index["adapters"]["lora4"]["1.0.1"]["base"]["hub_id"]
    first, second = sorted([(mine, "lora4"), ("other/model", "lora16")])
    plan = plan_export(registry, "vllm")  # a tie (1 adapter each) goes to the first base in name order
    assert plan["base"] == first[0] and [a["name"] for a in plan["adapters"]] == [first[1]]
    assert f"export again with --base {second[0]}" in {s["name"]: s["reason"] for s in plan["skipped"]}[second[1]]
    assert [a["name"] for a in plan_export(registry, "vllm", base=second[0])["adapters"]] == [second[1]]
    code, _, err = run(capsys, "export", "vllm", "--registry", str(registry), "--base", "nope/none")
    assert code == 2 and err.count("\n") == 1 and "--base 'nope/none' matches no exportable adapter" in err


def test_empty_or_unservable_registry_is_one_line_error(trained, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, out, err = run(capsys, "export", "vllm", "--registry", str(tmp_path / "empty"))
    assert code == 2 and out == "" and err.count("\n") == 1 and "holds no adapters" in err
    reg = LocalRegistry(tmp_path / "reg")
    reg.publish(trained["pfx"], "1.0.0")
    reg.publish(trained["prm"], "1.0.0")
    for engine in ("vllm", "lorax"):
        code, out, err = run(capsys, "export", engine, "--registry", str(reg.root), "--output", str(tmp_path / "s.sh"))
        assert code == 2 and out == "" and err.count("\n") == 1 and "none of the 2 adapter version(s)" in err
        assert not (tmp_path / "s.sh").exists()


@pytest.mark.parametrize("folder", ["runs=2, final", "runs=2", "runs,2"])
def test_lora_modules_values_parse_as_vllm_reads_them(trained, tmp_path, capsys, folder):
    """vLLM's --lora-modules (LoRAParserAction) reads a value holding '=' and no ',' as name=path, split at every '=',
    and any other value as JSON {"name", "path"}: a registry whose path holds '=', ',' (either alone, or both) and a
    space still gives every served name its own folder (before, ',' sent the value to the JSON parser, which refused
    it, and a second '=' broke the split)."""
    root = tmp_path / folder / "reg"
    reg = LocalRegistry(root)
    reg.publish(trained["lora4"], "1.0.0")
    reg.publish(trained["lora16"], "1.0.0")
    code, out, _ = run(capsys, "export", "vllm", "--registry", str(root), "--all-versions")
    assert code == 0
    served = {}
    for value in lora_modules(shlex.split(out.splitlines()[0])):
        if "=" in value and "," not in value:
            assert value.count("=") == 1, value
            name, path = value.split("=")
        else:
            fields = json.loads(value)
            assert set(fields) == {"name", "path"}, value
            name, path = fields["name"], fields["path"]
        served[name] = path
    real = root.resolve()
    assert served == {"lora4": f"{real}/lora4/1.0.0", "lora4@1.0.0": f"{real}/lora4/1.0.0",
                      "lora16": f"{real}/lora16/1.0.0", "lora16@1.0.0": f"{real}/lora16/1.0.0"}
    assert "vLLM's JSON form" in out


def test_a_config_that_leaves_r_and_lora_alpha_to_peft_is_read_as_peft_reads_it(trained, tmp_path):
    """peft (and LoRAX, through peft's LoraConfig) read a left-out r or lora_alpha as 8; vLLM's PEFTHelper has no default
    for them and refuses the folder. LoRAX's export took it for r=None and skipped it as unservable."""
    reg = LocalRegistry(tmp_path / "reg")
    reg.publish(_edited_copy(trained["lora8"], tmp_path / "bare", r=None, lora_alpha=None), "1.0.0", name="bare")
    lorax = plan_export(reg.root, "lorax")
    assert [(a["name"], a["rank"]) for a in lorax["adapters"]] == [("bare", 8)] and lorax["skipped"] == []
    with pytest.raises(ExportError, match=r"bare@1.0.0: its adapter_config.json leaves out r, lora_alpha, which vLLM requires"):
        plan_export(reg.root, "vllm")


@pytest.mark.harness  # vLLM's packages in .venv-vllm, made on first use (scripts/setup_vllm_check.sh: 250 MB, ~1 minute)
def test_vllm_s_own_parser_and_lora_loader_take_the_exported_command(trained, tmp_path):
    """vLLM's `serve` parser reads every --lora-modules value (name=path and its JSON form) as the plan serves it, and its
    LoRA worker's checks (PEFTHelper.validate_legal at the exported --max-lora-rank/--max-loras, LoRAModel.from_local_checkpoint)
    take every folder at the rank and scale peft applies per module (rank_pattern/alpha_pattern included)."""
    repo = Path(__file__).parent.parent
    setup = subprocess.run(["bash", str(repo / "scripts" / "setup_vllm_check.sh")], capture_output=True, text=True, timeout=900,
                           env={**os.environ, "PYTHON": sys.executable})  # .venv-vllm is built for the python that imports it
    assert setup.returncode == 0, f"scripts/setup_vllm_check.sh failed: {setup.stderr[-2000:]}"
    root = tmp_path / "runs=2, final" / "reg"
    reg = LocalRegistry(root)
    for name in ("lora4", "lora16", "layer0"):
        reg.publish(trained[name], "1.0.0")
    reg.publish(trained["lora4"], "1.0.1", name="lora4")
    script = repo / "scripts" / "check_vllm_export.py"
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "PYTHONPATH": os.pathsep.join([str(repo), str(repo / ".venv-vllm"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script), "--registry", str(root), "--all-versions"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sorted(line.split(":")[0] for line in done.stdout.splitlines()) == sorted(
        ["layer0", "layer0@1.0.0", "lora16", "lora16@1.0.0", "lora4", "lora4@1.0.0", "lora4@1.0.1"])


def test_a_backbone_path_holding_an_at_sign_is_refused_for_lorax(trained, tmp_path, capsys):
    """lorax-launcher reads --model-id MODEL@REVISION (launcher/src/main.rs, get_model_and_revision splits at '@'), so a
    local backbone folder whose path holds '@' would load another path at a 'revision'; vLLM takes the path whole."""
    folder = shutil.copytree(trained["lora4"], tmp_path / "at")
    sidecar = folder / "adapterhub.json"
    meta = json.loads(sidecar.read_text())
    meta["base"]["hub_id"] = "/srv/models/smol@v2"
    sidecar.write_text(json.dumps(meta))
    reg = LocalRegistry(tmp_path / "reg")
    reg.publish(folder, "1.0.0", name="at")
    code, out, err = run(capsys, "export", "lorax", "--registry", str(reg.root))
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "the backbone '/srv/models/smol@v2' holds '@', which LoRAX reads as model '/srv/models/smol' at revision 'v2'" in err
    assert plan_export(reg.root, "vllm")["command"][2] == "/srv/models/smol@v2"

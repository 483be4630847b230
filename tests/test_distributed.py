"""Data-parallel training (torchrun, gloo, 2 CPU processes) gives what one process gives with the same global batch."""

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

STEPS = ["train.max_steps=10", "train.eval_every=5", "train.checkpoint_every=5", "train.log_every=1", "train.warmup_steps=2"]


def run(args, processes: int, cwd, timeout=300):
    """`adapterhub-lite ARGS` in one process, or under torchrun with `processes` CPU processes (gloo)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ADAPTERHUB_DEVICE": "cpu"}
    if processes == 1:
        cmd = [sys.executable, "-m", "adapterhub_lite.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(_free_port()),
               "-m", "adapterhub_lite.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows(folder, name="metrics.jsonl"):
    """The metrics log without the clock's figure (tokens/s differs run to run)."""
    return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in (folder / name).read_text().splitlines()]


def same_weights(a, b, tol=1e-5):
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert x.keys() == y.keys()
    worst = max((x[k] - y[k]).abs().max().item() for k in x)
    assert worst <= tol, worst
    return worst


@pytest.mark.multiprocess
def test_train_on_two_processes_equals_one_process_with_the_same_global_batch(cls_task):
    one = run(["train", "toy.yaml", *STEPS, "train.batch_size=8", "--output", "one", "--no-progress"], 1, cls_task)
    assert one.returncode == 0, one.stderr[-2000:]
    # 2 processes × 2 rows × 2 micro-batches (gradients synchronised once a step, at the last micro-batch: no_sync before)
    two = run(["train", "toy.yaml", *STEPS, "train.batch_size=2", "train.grad_accum=2", "--output", "two", "--no-progress"], 2, cls_task)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count('"output"') == 1  # rank 0 alone answers
    # the adapter moved (so equality is not that of two untouched adapters), and both runs moved it alike
    assert same_weights(cls_task / "one", cls_task / "two") <= 1e-5
    assert _close(rows(cls_task / "one"), rows(cls_task / "two"))
    meta = json.loads((cls_task / "two" / "adapterhub.json").read_text())
    assert meta["train_state"]["processes"] == 2 and meta["train_state"]["global_batch"] == 8
    # only rank 0 wrote: one folder, no work folder left, nothing else beside
    assert sorted(p.name for p in cls_task.iterdir() if p.name.startswith((".", "one", "two"))) == ["one", "two"]


def _close(a: list[dict], b: list[dict], tol: float = 1e-5) -> bool:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys(), (x, y)
        for k in x:
            if isinstance(x[k], float):
                assert abs(x[k] - y[k]) <= tol * max(1.0, abs(x[k])), (k, x, y)
            else:
                assert x[k] == y[k], (k, x, y)
    return True


@pytest.mark.multiprocess
def test_the_adapter_changes_in_ten_steps(cls_task):
    """Guards the equivalence above: it must compare trained adapters, not two copies of the initial one."""
    out = run(["train", "toy.yaml", *STEPS, "train.batch_size=8", "train.eval_every=10", "--output", "a", "--no-progress"], 1, cls_task)
    assert out.returncode == 0, out.stderr[-2000:]
    first = rows(cls_task / "a")[0]["loss"]
    last = [r for r in rows(cls_task / "a") if "loss" in r][-1]["loss"]
    assert abs(first - last) > 1e-3


def _joint_specs(tmp_path):
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"text": f"{w} {i}", "label": w}) + "\n" for i in range(12) for w in ("yes", "no")))
    gen = tmp_path / "g.jsonl"
    gen.write_text("".join(json.dumps({"text": t, "target": t.upper()}) + "\n" for t in ["ab", "cd", "ef", "gh", "ij", "kl"]))
    common = {"base": "tiny-random-llama", "quantization": "none", "method": "lora",
              "method_args": {"r": 4, "init_lora_weights": False, "target_modules": ["q_proj", "v_proj"]},
              "train": {"max_length": 32, "lr": 1e-2}}
    specs = {
        "a": {"name": "a", "type": "classification", "data": {"train": str(data), "dev": str(data)}, "prompt": "T: {text}\nL:",
              "label": "label", "labels": ["yes", "no"], "metric": ["accuracy"], **common},
        "g": {"name": "g", "type": "generation", "data": {"train": str(gen), "dev": str(gen)}, "prompt": "In: {text}\nOut:",
              "target": "target", "metric": ["exact_match"], **common, "train": {**common["train"], "max_new_tokens": 3}},
    }
    for name, spec in specs.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    return ["a.yaml", "g.yaml"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("weighting", ["dynamic", "uncertainty"])
def test_train_multi_on_two_processes_equals_one_process(tmp_path, weighting):
    specs = _joint_specs(tmp_path)
    flags = ["train.max_steps=10", "train.eval_every=5", "train.eval_samples=4", "train.warmup_steps=2", "--weighting", weighting,
             "--sampling", "dynamic", "--shared-adapter", "--shared-r", "2", "--no-progress"]
    one = run(["train-multi", *specs, "--output", "one", "train.batch_size=8", *flags], 1, tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    two = run(["train-multi", *specs, "--output", "two", "train.batch_size=4", *flags], 2, tmp_path)
    assert two.returncode == 0, two.stderr[-2000:]
    for task in ("a", "g", "shared"):
        same_weights(tmp_path / "one" / task, tmp_path / "two" / task)
    assert _close(rows(tmp_path / "one"), rows(tmp_path / "two"))
    assert json.loads((tmp_path / "two" / "run.json").read_text())["train_state"]["global_batch"] == 8


@pytest.mark.multiprocess
def test_train_multi_steps_that_draw_no_row_of_a_task_train_on_two_processes_as_on_one(tmp_path):
    """A 1-row task beside a 24-row one, sampled proportionally: most steps draw no row of it. Alone, its adapter then gets
    no gradient and AdamW leaves it be; under DDP it got a zero gradient (every adapter is in every process's graph) and
    AdamW moved it by momentum: the 2-process adapter of the small task differed from the 1-process one by 1.5e-3."""
    specs = _joint_specs(tmp_path)
    (tmp_path / "g.jsonl").write_text(json.dumps({"text": "ab", "target": "AB"}) + "\n")
    flags = ["train.max_steps=8", "train.eval_every=8", "train.warmup_steps=1", "train.log_every=1", "--sampling", "proportional",
             "--no-progress"]
    one = run(["train-multi", *specs, "--output", "one", "train.batch_size=4", *flags], 1, tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    two = run(["train-multi", *specs, "--output", "two", "train.batch_size=2", *flags], 2, tmp_path)
    assert two.returncode == 0, two.stderr[-2000:]
    steps = [r for r in rows(tmp_path / "one") if "rows/g" in r]
    assert any(r["rows/g"] == 0 for r in steps[:-1]) and any(r["rows/g"] > 0 for r in steps)  # the case this test is about
    for task in ("a", "g"):
        same_weights(tmp_path / "one" / task, tmp_path / "two" / task)
    assert _close(rows(tmp_path / "one"), rows(tmp_path / "two"))


@pytest.mark.multiprocess
def test_a_run_killed_in_one_process_stops_every_process_and_resumes_with_one(cls_task):
    """kill -9 of rank 1: torchrun stops rank 0 too and exits non-zero; no output folder appears; the
    checkpoint resumes under one process (same global batch) to what one process would have trained."""
    ref = run(["train", "toy.yaml", *STEPS, "train.max_steps=30", "train.batch_size=8", "--output", "ref", "--no-progress"], 1, cls_task)
    assert ref.returncode == 0, ref.stderr[-2000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ADAPTERHUB_DEVICE": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "adapterhub_lite.cli", "train", "toy.yaml", *STEPS, "train.max_steps=30", "train.batch_size=4", "--output", "out", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=cls_task, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpt = cls_task / ".out.partial" / "checkpoint" / "state.pt"
    deadline = time.monotonic() + 240
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ckpt.exists(), proc.communicate()[1][-2000:]
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
    assert len(workers) == 1
    workers[0].send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert not (cls_task / "out").exists()  # nothing half-written where users look
    assert (cls_task / ".out.partial" / "checkpoint" / "state.pt").exists() or (cls_task / ".out.partial" / "checkpoint.old" / "state.pt").exists()

    resumed = run(["train", "toy.yaml", *STEPS, "train.max_steps=30", "train.batch_size=8", "--output", "out", "--resume", "--no-progress"], 1, cls_task)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from step" in resumed.stderr
    same_weights(cls_task / "ref", cls_task / "out")



@pytest.mark.multiprocess
def test_a_launcher_killed_alone_takes_its_processes_with_it(cls_task):
    """kill -9 of torchrun itself (a scheduler's hard kill, the OOM killer): it cannot stop its processes, which run in a
    session of their own; they trained on alone and wrote the output folder after the run looked stopped. Now the
    kernel ends them when the launcher dies, and the checkpoint is left for --resume."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ADAPTERHUB_DEVICE": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "adapterhub_lite.cli", "train", "toy.yaml", *STEPS, "train.max_steps=30", "train.batch_size=4", "--output", "out", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=cls_task, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = cls_task / ".out.partial" / "checkpoint" / "state.pt"
    deadline = time.monotonic() + 240
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert ckpt.exists()
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert len(workers) == 2
    proc.kill()
    proc.wait()
    _, alive = psutil.wait_procs(workers, timeout=240)  # without the fix they end too, once the run is finished
    for p in alive:
        p.kill()
    assert not alive
    assert not (cls_task / "out").exists()  # they stopped, not finished the run the user killed
    resumed = run(["train", "toy.yaml", *STEPS, "train.max_steps=30", "train.batch_size=8", "--output", "out", "--resume", "--no-progress"], 1, cls_task)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from step" in resumed.stderr

CRASH_AT_STEP_5 = (
    "import sys\n"
    "from adapterhub_lite.training.checkpoint import Checkpoint\n"
    "orig = Checkpoint.save\n"
    "def save(self, payload):\n"
    "    orig(self, payload)\n"
    "    if payload['state']['step'] == 5:\n"
    "        raise SystemExit(3)\n"
    "Checkpoint.save = save\n"
    "from adapterhub_lite.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n")


@pytest.mark.multiprocess
def test_a_one_process_checkpoint_resumes_on_two_processes(cls_task):
    ref = run(["train", "toy.yaml", *STEPS, "train.batch_size=8", "--output", "ref", "--no-progress"], 1, cls_task)
    assert ref.returncode == 0, ref.stderr[-2000:]
    crash = cls_task / "crash.py"
    crash.write_text(CRASH_AT_STEP_5)  # one process that checkpoints at step 5 and dies
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ADAPTERHUB_DEVICE": "cpu"}
    died = subprocess.run([sys.executable, str(crash), "train", "toy.yaml", *STEPS, "train.batch_size=8", "--output", "out", "--no-progress"],
                          cwd=cls_task, env=env, capture_output=True, text=True, timeout=300)
    assert died.returncode == 3 and not (cls_task / "out").exists(), died.stderr[-2000:]
    # another global batch (2 × 8 = 16) is refused in one line naming it; the checkpoint stays
    other = run(["train", "toy.yaml", *STEPS, "train.batch_size=8", "--output", "out", "--resume", "--no-progress"], 2, cls_task)
    assert other.returncode != 0 and "train.batch_size × processes: 8 → 16" in other.stderr
    resumed = run(["train", "toy.yaml", *STEPS, "train.batch_size=4", "--output", "out", "--resume", "--no-progress"], 2, cls_task)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from step 5" in resumed.stderr
    same_weights(cls_task / "ref", cls_task / "out")


FIRST_DROPOUT_MASK = (
    "import os, sys\n"
    "import torch.nn.functional as F\n"
    "orig, seen = F.dropout, []\n"
    "def dropout(x, p=0.5, training=True, inplace=False):\n"
    "    y = orig(x, p, training, inplace)\n"
    "    if training and p > 0 and not seen:\n"
    "        seen.append(1)\n"
    "        open(f'mask{os.environ[\"RANK\"]}.txt', 'w').write(''.join('01'[int(v)] for v in (y == 0).flatten()[:256]))\n"
    "    return y\n"
    "F.dropout = dropout\n"
    "from adapterhub_lite.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n")


@pytest.mark.multiprocess
def test_each_process_draws_its_own_dropout_masks(cls_task):
    """Every process was seeded alike, so under LoRA dropout both drew the very same masks for their rows (the global batch's
    dropout noise was one process's, twice). Now each process above rank 0 draws from seed + rank (torchtune's rule)."""
    spec = yaml.safe_load((cls_task / "toy.yaml").read_text())
    spec["method_args"]["lora_dropout"] = 0.5
    (cls_task / "toy.yaml").write_text(yaml.safe_dump(spec))
    (cls_task / "mask.py").write_text(FIRST_DROPOUT_MASK)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ADAPTERHUB_DEVICE": "cpu"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()), "mask.py",
                          "train", "toy.yaml", "train.max_steps=1", "train.eval_every=1", "train.warmup_steps=0", "train.batch_size=4",
                          "--output", "out", "--no-progress"], cwd=cls_task, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    masks = [(cls_task / f"mask{rank}.txt").read_text() for rank in (0, 1)]  # a file each: their stderr lines may interleave
    assert "1" in masks[0] and "0" in masks[0]  # a real dropout mask
    assert masks[0] != masks[1]


def test_a_cpu_run_alone_does_not_ask_accelerate_for_cpu(monkeypatch):
    """accelerate's state is process-wide: after a run on CUDA, Accelerator(cpu=True) is refused ("already been
    initialized"), which broke every CPU run after a GPU run in one process (seen on an H200). Alone, the
    device does not matter to accelerate (device_placement=False); under a launcher cpu=True picks gloo."""
    import accelerate

    from adapterhub_lite.training import parallel

    asked = []

    class Recorder:
        def __init__(self, **kwargs):
            asked.append(kwargs["cpu"])
            raise RuntimeError("stop here")

    monkeypatch.setattr(accelerate, "Accelerator", Recorder)
    for world in ("1", "2"):
        monkeypatch.setenv("WORLD_SIZE", world)
        with pytest.raises(RuntimeError, match="stop here"):
            parallel.Parallel(torch.device("cpu"))
    assert asked == [False, True]


def test_train_multi_scores_a_dev_split_shorter_than_the_processes(monkeypatch):
    """train-multi with train.eval_samples=1 (or a 1-row dev split) under 2 processes: rank 1 predicts no row, and its
    latency per example divided by 0 (ZeroDivisionError on rank 1, seen under torchrun). Rank 0, which writes the
    latency, always has a row; a rank without one records none."""
    import contextlib
    from types import SimpleNamespace

    from adapterhub_lite.training.recipes import joint

    monkeypatch.setattr(joint, "evaluate_split", lambda *a, **k: ({"accuracy": 1.0}, [], 0.5))
    spec = SimpleNamespace(name="a")
    recipe = SimpleNamespace(specs=[spec], data={"a": {"dev": list(range(5))}}, latency={}, model=None,
                             backbone=SimpleNamespace(tokenizer=None), joint=SimpleNamespace(assign=lambda i: contextlib.nullcontext()))
    for rank, latency in ((1, {}), (0, {"a": 500.0})):
        recipe.latency = {}
        assert joint.Joint.scores(recipe, 1, SimpleNamespace(rank=rank, world=2, gather=None)) == {"a": {"accuracy": 1.0}}
        assert recipe.latency == latency


@pytest.mark.multiprocess
def test_two_machines_without_shared_storage_are_refused(tmp_path):
    """Two torchrun "machines" (--nnodes 2 on this host), each in its own folder, as two machines each writing --output to
    its own disk. Each process writes its RNG state into every checkpoint; on node 1 that part was left in a stray
    .out.partial/checkpoint.tmp, the checkpoint on node 0 lacked it, and the run ended with exit 0. Refused up front now."""
    import shutil

    port, env = _free_port(), {**os.environ, "OMP_NUM_THREADS": "1", "ADAPTERHUB_DEVICE": "cpu"}
    nodes = []
    for rank in (0, 1):
        folder = tmp_path / f"node{rank}"
        folder.mkdir()
        for name in ("toy.yaml", "train.jsonl", "dev.jsonl"):
            shutil.copy(_cls_files(tmp_path) / name, folder / name)
        nodes.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
             "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "adapterhub_lite.cli", "train", "toy.yaml", *STEPS,
             "train.max_steps=4", "train.batch_size=4", "--output", "out", "--no-progress"],
            cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    errs = [p.communicate(timeout=300)[1] for p in nodes]
    assert all(p.returncode != 0 for p in nodes), errs[0][-2000:]
    assert "is not on storage every process sees (rank 1 on" in errs[0] + errs[1]
    for rank in (0, 1):  # nothing written on either machine
        assert sorted(p.name for p in (tmp_path / f"node{rank}").iterdir()) == ["dev.jsonl", "toy.yaml", "train.jsonl"]


def _cls_files(tmp_path):
    """The cls_task fixture's spec and data, written in a folder of their own (the fixture itself needs monkeypatch)."""
    folder = tmp_path / "task"
    if not folder.exists():
        folder.mkdir()
        words = {"aaaa": "pos", "bbbb": "neg"}
        rows = [{"text": f"{w} {i % 7}", "label": lab} for i in range(48) for w, lab in words.items()]
        (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
        spec = {"name": "toy", "type": "classification", "data": {"train": "train.jsonl", "dev": "dev.jsonl"},
                "prompt": "Text: {text}\nLabel:", "label": "label", "labels": {"pos": "x", "neg": "z"}, "metric": ["accuracy"],
                "method": "lora", "method_args": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
                "train": {"batch_size": 8, "lr": 1e-2, "max_length": 64}, "base": "tiny-random-llama", "quantization": "none"}
        (folder / "toy.yaml").write_text(yaml.safe_dump(spec))
    return folder

"""Training never leaves a wrong or half-written result: non-finite numbers, a full disk, --overwrite, planted checkpoints."""

import errno
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from adapterhub_lite.artifacts.registry import LocalRegistry
from adapterhub_lite.core.spec import load_spec
from adapterhub_lite.model.heads import Plan
from adapterhub_lite.training.recipes import train as train_mod

from .conftest import train_tiny


def _train(task_dir, *overrides, **kw):
    spec = load_spec(task_dir / "toy.yaml", list(overrides))
    return train_mod.train(spec, task_dir / "out", progress=False, **kw)


def _checkpoint_step(task_dir, name="checkpoint"):
    state = torch.load(task_dir / ".out.partial" / name / "state.pt", map_location="cpu", weights_only=True)
    return state["state"]["step"]


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(cls_task, monkeypatch):
    real, calls = train_mod.loss_plan_ids, []

    def nan_from_step_3(*args, **kw):  # the training loss of step 3 (one batch per step) becomes NaN
        plan = real(*args, **kw)
        calls.append(1)
        if len(calls) < 3:
            return plan
        return Plan(plan.seqs, plan.rows, plan.cols, lambda logp: plan.reduce(logp) * float("nan"))

    monkeypatch.setattr(train_mod, "loss_plan_ids", nan_from_step_3)
    with pytest.raises(ValueError, match=r"loss became non-finite at step 3 \(window mean nan\)") as err:
        _train(cls_task)  # checkpoints every 2 steps: step 2 is the last good one
    assert "\n" not in str(err.value)
    assert not (cls_task / "out").exists()
    assert _checkpoint_step(cls_task) == 2
    assert not (cls_task / ".out.partial" / "checkpoint.tmp").exists()


def test_an_adapter_with_non_finite_weights_is_neither_saved_nor_published(tmp_path):
    folder = train_tiny(tmp_path, "toy")
    tensors = load_file(folder / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=f"non-finite values .* in 1 tensor.*{key}"):
        LocalRegistry(tmp_path / "reg").publish(folder, name="toy")
    assert not (tmp_path / "reg" / "toy").exists()
    meta = json.loads((folder / "adapterhub.json").read_text())
    with pytest.raises(ValueError, match="non-finite values"):
        train_mod.finish_folder(folder, meta, [], "accuracy")


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint_and_resume_finds_it(cls_task, monkeypatch):
    straight = _train(cls_task)
    want = load_file(straight / "adapter_model.safetensors")
    straight.rename(cls_task / "straight")

    real, calls = torch.save, []

    def disk_full_at_second(obj, f, *a, **kw):  # checkpoints at steps 2, 4, 6: the one of step 4 fails
        calls.append(os.path.basename(str(f)))
        if calls.count("state.pt") == 2:  # a checkpoint's last file (accelerate's optimizer and scheduler files come first)
            with open(f, "wb") as fh:
                fh.write(b"half")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", disk_full_at_second)
    with pytest.raises(ValueError, match="cannot write a checkpoint .*No space left on device.*previous checkpoint .* is kept") as err:
        _train(cls_task)
    assert "\n" not in str(err.value)
    monkeypatch.setattr(torch, "save", real)
    assert not (cls_task / ".out.partial" / "checkpoint.tmp").exists() and _checkpoint_step(cls_task) == 2

    # a crash between the two renames of a swap leaves only checkpoint.old: resume finds it
    (cls_task / ".out.partial" / "checkpoint").rename(cls_task / ".out.partial" / "checkpoint.old")
    got = load_file(_train(cls_task, resume=True) / "adapter_model.safetensors")
    assert all(torch.allclose(want[k], got[k], atol=1e-6) for k in want)


def test_disk_full_during_the_final_save_writes_nothing_and_resume_redoes_the_end(cls_task, monkeypatch):
    from peft import PeftModel

    def disk_full(self, path, *a, **kw):
        os.makedirs(path, exist_ok=True)
        (path / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path / "adapter_model.safetensors"))

    real = PeftModel.save_pretrained
    monkeypatch.setattr(PeftModel, "save_pretrained", disk_full)
    with pytest.raises(ValueError, match="cannot write the adapter for .*No space left on device.*nothing was written there") as err:
        _train(cls_task)
    assert "\n" not in str(err.value)
    assert not (cls_task / "out").exists() and not (cls_task / ".out.partial" / "adapter").exists()
    monkeypatch.setattr(PeftModel, "save_pretrained", real)
    assert (_train(cls_task, resume=True) / "adapterhub.json").is_file()


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_overwrite_refuses_what_is_not_an_adapter_folder(cls_task, kind):
    out = cls_task / "out"
    if kind == "file":
        out.write_text("my notes")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("my notes")
    with pytest.raises(ValueError, match=f"--overwrite refused for .*out.*it is a {kind}") as err:
        _train(cls_task, "train.max_steps=1", overwrite=True)
    assert "\n" not in str(err.value)
    assert (out if kind == "file" else out / "notes.txt").read_text() == "my notes"
    assert sorted(p.name for p in cls_task.iterdir() if p.name.startswith(".")) == []  # no .out.old, no .out.partial


def test_overwrite_replaces_an_empty_folder_and_an_adapter_folder(cls_task):
    (cls_task / "out").mkdir()
    out = _train(cls_task, "train.max_steps=1", overwrite=True)
    out = _train(cls_task, "train.max_steps=2", overwrite=True)
    assert json.loads((out / "adapterhub.json").read_text())["train_state"]["steps"] == 2


def test_a_planted_checkpoint_is_refused_without_running_its_code(cls_task):
    marker = cls_task / "pwned"

    class Evil:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    (cls_task / ".out.partial" / "checkpoint").mkdir(parents=True)
    torch.save({"optimizer": Evil()}, cls_task / ".out.partial" / "checkpoint" / "state.pt")
    with pytest.raises(ValueError, match="cannot read checkpoint .* safely") as err:
        _train(cls_task, resume=True)
    assert "\n" not in str(err.value)
    assert not marker.exists()

"""Training settings at their edges are refused in one line, before anything is written; what training writes
can be read by others (0644), as a folder to publish must."""

import stat

import pytest

from adapterhub_lite.cli import main

from .conftest import train_tiny


@pytest.mark.parametrize("override, needle", [
    (["train.eval_samples=0"], "train.eval_samples must be ≥ 1"),
    (["train.max_minutes=-1"], "train.max_minutes must be ≥ 0"),
    (["train.seed=1180591620717411303424"], "train.seed must be between 0 and 2^63 - 1"),  # 2^70
    (["train.seed=-1"], "train.seed must be between 0 and 2^63 - 1"),
    (["train.batch_size=1000"], "train.batch_size=1000 × 1 process(es) = 1000 rows a step"),
    # accumulated micro-batches are one batch (grad_accum 4 × 4 is batch 16): 4 × 25 > 96 rows read rows twice a step
    (["train.batch_size=25", "train.grad_accum=4"], "train.batch_size=25 × 1 process(es) × train.grad_accum=4 = 100 rows a step, "
                                                    "but 'train.jsonl' has 96 training rows; use train.batch_size × train.grad_accum ≤ 96"),
    (["--output", ""], "--output is empty"),
    # a warm-up as long as the run never trains at train.lr (a 1-step run's only step was at rate 0: an untrained adapter)
    (["train.warmup_steps=6"], "train.warmup_steps=6 ≥ train.max_steps=6: every step would warm up (the first at learning rate 0), "
                               "never reaching train.lr; use train.warmup_steps < 6"),
])
def test_training_edges_are_one_line_and_write_nothing(cls_task, capsys, override, needle):
    before = sorted(p.name for p in cls_task.iterdir())
    assert main(["train", "toy.yaml", *override, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and needle in err, err
    assert sorted(p.name for p in cls_task.iterdir()) == before  # no runs/, no partial folder


def test_a_label_no_train_row_holds_is_refused_in_one_line_alone_or_joint(cls_task, capsys):
    """A label of 'labels' with no train row trained silently (exit 0): the loss never asked for it, so the adapter could
    not learn it, and its dev rows were scored as if it could. Refused before anything loads, by `train` and `train-multi`."""
    from adapterhub_lite.core.errors import DataError
    from adapterhub_lite.core.spec import load_spec
    from adapterhub_lite.training.recipes.joint import train_joint

    rows = (cls_task / "train.jsonl").read_text().splitlines()
    (cls_task / "pos.jsonl").write_text("".join(r + "\n" for r in rows if '"pos"' in r))
    before = sorted(p.name for p in cls_task.iterdir())
    assert main(["train", "toy.yaml", "data.train=pos.jsonl", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == ("error: label(s) 'neg' of 'labels' have no row in data.train 'pos.jsonl' (48 rows): an adapter cannot learn a class "
                   "it never sees; add train rows labelled 'neg', or drop it from 'labels'"), err
    assert sorted(p.name for p in cls_task.iterdir()) == before
    specs = [load_spec(cls_task / "toy.yaml", ["name=a"]), load_spec(cls_task / "toy.yaml", ["name=b", "data.train=pos.jsonl"])]
    with pytest.raises(DataError, match="label\\(s\\) 'neg' of 'labels' have no row in data.train 'pos.jsonl'"):
        train_joint(specs, cls_task / "joint", progress=False)
    assert sorted(p.name for p in cls_task.iterdir()) == before


def test_every_file_training_writes_is_readable_by_others(tmp_path):
    folder = train_tiny(tmp_path)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir() if p.is_file()}
    assert {"adapter_model.safetensors", "curves.png", "adapterhub.json"} <= set(modes)
    assert all(m & 0o044 == 0o044 for m in modes.values()), {k: oct(m) for k, m in modes.items()}

"""Defaults for what a spec leaves out (defaults.py): chosen from the data, task, method and model; printed; recorded."""

import json
import math

import pytest
import torch
import yaml
from peft import PeftConfig

from adapterhub_lite.core.data import load_task_data
from adapterhub_lite.core.errors import SpecError
from adapterhub_lite.core.spec import load_spec
from adapterhub_lite.model.backbone import load_backbone
from adapterhub_lite.model.heads import label_token_ids
from adapterhub_lite.training.defaults import EXAMPLE_BUDGET, resolve
from adapterhub_lite.training.loop import LoopConfig, Recipe, StepLoss, fit
from adapterhub_lite.training.parallel import Parallel
from adapterhub_lite.training.recipes.train import train

MINIMAL = ("name", "type", "data", "prompt", "label", "labels", "target", "base", "quantization")  # + the tiny backbone


def _minimal(task_dir, name):
    raw = yaml.safe_load((task_dir / f"{name}.yaml").read_text())
    (task_dir / "minimal.yaml").write_text(yaml.safe_dump({k: v for k, v in raw.items() if k in MINIMAL}))
    return task_dir / "minimal.yaml"


def _resolve(path, *overrides, processes=1):
    spec = load_spec(path, list(overrides))
    backbone = load_backbone(spec.base, spec.quantization, "cpu")
    return resolve(spec, load_task_data(spec), backbone.model, backbone.tokenizer, processes), backbone


def test_a_minimal_classification_spec_gets_settings_from_its_data_and_model(cls_task):
    resolved, backbone = _resolve(_minimal(cls_task, "toy"))
    spec, t = resolved.spec, resolved.spec.train
    linear = {n.rsplit(".", 1)[-1] for n, m in backbone.model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert spec.method_args["target_modules"] == sorted(linear - {"lm_head"})  # every linear layer but the head
    assert (spec.method_args["r"], spec.method_args["lora_alpha"], t.lr) == (8, 16, 1e-3)
    rows = 96  # cls_task's train split
    assert t.epochs == 20 and t.max_steps == math.ceil(20 * rows / t.batch_size)  # a small split: MAX_EPOCHS passes
    assert (t.patience, t.min_steps, t.eval_samples) == (2, 50, 16)  # MIN_STEPS (the budget is 120 steps)
    assert t.min_delta == round(0.4 / math.sqrt(16), 4) and t.checkpoint_every == t.eval_every
    prompts = load_task_data(spec)["train"].prompt_ids(backbone.tokenizer)
    words = label_token_ids(backbone.tokenizer, spec)
    assert t.max_length == max(len(p) for p in prompts) + max(len(w) for w in words)  # the longest prompt + the longest label word
    assert set(resolved.choices) >= {"method_args.target_modules", "train.lr", "train.max_steps", "train.epochs", "train.patience"}
    text = resolved.describe()  # the printed spec is YAML that loads back to the resolved values
    assert yaml.safe_load(text)["train"]["max_steps"] == t.max_steps and "# every linear layer but the output head" in text


def test_the_budget_scales_with_the_data_and_the_processes(cls_task):
    big = cls_task / "big.jsonl"
    big.write_text((cls_task / "train.jsonl").read_text() * 250)  # 24,000 rows: more than the row budget
    resolved, _ = _resolve(_minimal(cls_task, "toy"), "data.train=big.jsonl", "train.batch_size=16")
    assert resolved.spec.train.max_steps == EXAMPLE_BUDGET // 16 and resolved.spec.train.epochs == round(EXAMPLE_BUDGET / 24000, 2)
    two, _ = _resolve(_minimal(cls_task, "toy"), "train.epochs=3", "train.batch_size=8", processes=2)
    assert two.spec.train.max_steps == math.ceil(3 * 96 / 16)  # a step reads 8 rows on each of 2 processes
    assert two.spec.train.patience == 2  # a budget in epochs stops early too


def test_the_learning_rate_follows_the_method_and_the_rank(cls_task):
    low, _ = _resolve(_minimal(cls_task, "toy"), "method_args.r=32")
    assert low.spec.train.lr == 5e-4 and low.spec.method_args["target_modules"]  # 1e-3 × sqrt(8 / 32); targets still filled in
    prompt, _ = _resolve(_minimal(cls_task, "toy"), "method=prompt")
    assert prompt.spec.train.lr == 3e-2


def test_what_the_spec_gives_is_never_changed(cls_task):
    resolved, _ = _resolve(cls_task / "toy.yaml", "train.lr=0.25")
    t = resolved.spec.train
    assert (t.max_steps, t.lr, t.eval_every, t.max_length, t.checkpoint_every) == (6, 0.25, 3, 64, 2)
    assert resolved.spec.method_args["target_modules"] == ["q_proj", "v_proj"] and resolved.spec.method_args["r"] == 4
    assert t.patience == 0  # fixed steps: no early stopping unless asked
    assert not {"train.max_steps", "train.lr", "train.eval_every", "method_args.target_modules"} & set(resolved.choices)


def test_a_spec_setting_both_max_steps_and_epochs_is_refused(cls_task):
    raw = yaml.safe_load((cls_task / "toy.yaml").read_text())
    raw["train"]["epochs"] = 2
    (cls_task / "both.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError, match="train.max_steps=6 and train.epochs=2.0 both set the budget"):
        load_spec(cls_task / "both.yaml")
    with pytest.raises(SpecError, match="both set the budget"):  # both on the command line: no one meaning either
        load_spec(cls_task / "toy.yaml", ["train.epochs=2", "train.max_steps=5"])


def test_an_override_of_the_budget_or_batch_replaces_the_files_other_form(cls_task):
    """`train.epochs=N` on a spec file that fixes max_steps (every shipped spec does) trains N epochs: the override
    replaces the file's max_steps, as `method` replaces method_args. It was refused, and the fix it named
    (train.epochs=0) only undid the override: no command line could train a shipped spec by epochs (max_steps=0 and
    max_steps=null are refused too). batch_tokens and batch_size alike."""
    resolved, _ = _resolve(cls_task / "toy.yaml", "train.epochs=2")
    t = resolved.spec.train
    assert (t.epochs, t.max_steps) == (2.0, 24)  # 96 rows, 8 a step: 12 steps an epoch
    assert "2.0 epochs × 12 steps" in resolved.choices["train.max_steps"]["why"]
    spec = load_spec(cls_task / "toy.yaml", ["train.batch_tokens=512"])
    assert spec.train.batch_tokens == 512 and "train.batch_size" not in spec.given
    spec = load_spec(cls_task / "toy.yaml", ["train.epochs=0"])  # 0: the budget stays the file's max_steps
    assert (spec.train.epochs, spec.train.max_steps) == (0.0, 6) and "train.max_steps" in spec.given


def test_a_generation_spec_sizes_its_decoding_from_the_targets(gen_task):
    resolved, backbone = _resolve(_minimal(gen_task, "copy"))
    answers = load_task_data(resolved.spec)["train"].answer_ids(backbone.tokenizer)
    longest = max(len(a) for a in answers)
    assert resolved.spec.train.max_new_tokens == math.ceil(1.25 * longest) + 1
    # decoding keeps the last max_length - max_new_tokens prompt tokens: no prompt may be cut
    prompts = load_task_data(resolved.spec)["train"].prompt_ids(backbone.tokenizer)
    assert resolved.spec.train.max_length - resolved.spec.train.max_new_tokens == max(len(p) for p in prompts)
    assert resolved.spec.train.eval_samples == 4  # all the dev rows (fewer than 100)


def test_train_prints_the_resolved_spec_and_records_it(cls_task, capsys):
    path = _minimal(cls_task, "toy")
    spec = load_spec(path, ["train.epochs=0.5"])  # a short run; the rest is chosen
    out = train(spec, cls_task / "out", progress=False)
    err = capsys.readouterr().err
    assert "resolved spec" in err and "target_modules:" in err and "# every linear layer but the output head" in err
    meta = json.loads((out / "adapterhub.json").read_text())
    assert meta["task"]["train"]["max_steps"] == 3 and meta["defaults"]["train.max_steps"]["value"] == 3  # ceil(0.5 × 96 / 16)
    assert meta["train_state"]["steps"] == 3
    targets = set(PeftConfig.from_pretrained(str(out)).target_modules)  # plain peft reads the all-linear adapter
    assert targets == set(meta["task"]["method_args"]["target_modules"]) and "gate_proj" in targets


class _Scripted(Recipe):
    """A recipe whose evals return scripted scores: the loop's early-stopping rule, alone."""

    name, identity = "scripted", {}

    def __init__(self, scores):
        self.model = torch.nn.Linear(1, 1)
        self.scores, self.seen = list(scores), []

    def param_groups(self):
        return [{"params": list(self.model.parameters()), "lr": 1e-3}]

    def step_loss(self, call, parallel):
        return StepLoss(call(torch.ones(1, 1)).sum(), 1, 1)

    def evaluate(self, limit, parallel):
        self.seen.append({k: v.clone() for k, v in self.model.state_dict().items()})  # the weights at each eval, in order
        score = self.scores.pop(0)
        return score, {"score": score}

    def trainable(self):
        return dict(self.model.state_dict())

    def load_trainable(self, values):
        self.model.load_state_dict(values)


@pytest.mark.parametrize("min_delta, min_steps, stop_step, best_step", [
    (0.0, 0, 4, 2),     # 0.6 at step 2 is the best; steps 3, 4 do not beat it
    (0.05, 0, 3, 3),    # 0.58 → 0.6 → 0.62 creeps by less than min_delta: stop at 3, keeping 0.62 (the best seen)
    (0.05, 6, 6, 3),    # the same creep, but not before step 6
])
def test_early_stopping_counts_only_real_gains_and_waits_for_min_steps(tmp_path, min_delta, min_steps, stop_step, best_step):
    scores = {(0.0, 0): [0.5, 0.6, 0.58, 0.59, 0.7], (0.05, 0): [0.58, 0.6, 0.62, 0.7], (0.05, 6): [0.58, 0.6, 0.62, 0.6, 0.6, 0.61, 0.9]}
    recipe = _Scripted(scores[(min_delta, min_steps)])
    cfg = LoopConfig(max_steps=20, eval_every=1, patience=2, min_delta=min_delta, min_steps=min_steps)
    result = fit(recipe, cfg, Parallel(torch.device("cpu"), "none"), tmp_path / "work", progress=False)
    assert (result.state.step, result.stopped_by, result.state.best_step) == (stop_step, "early_stopping", best_step)
    # fit() returns the best evaluated weights (one eval a step), not the last ones
    final = recipe.model.state_dict()
    assert all(torch.equal(final[k], recipe.seen[best_step - 1][k]) for k in final)
    assert best_step == stop_step or not all(torch.equal(final[k], recipe.seen[-1][k]) for k in final)


def test_the_best_weights_are_the_first_to_reach_the_best_score_and_the_last_step_is_evaluated(tmp_path):
    """A later eval that only equals the best does not replace it (Trainer keeps the best by a strict `greater`), and
    the run's last step is evaluated even when eval_every does not divide max_steps (the end can be the best)."""
    recipe = _Scripted([0.5, 0.6, 0.6])
    result = fit(recipe, LoopConfig(max_steps=5, eval_every=2), Parallel(torch.device("cpu"), "none"), tmp_path / "work", progress=False)
    assert len(recipe.seen) == 3  # steps 2, 4 and 5
    assert result.state.best_step == 4
    final = recipe.model.state_dict()
    assert all(torch.equal(final[k], recipe.seen[1][k]) for k in final) and not all(torch.equal(final[k], recipe.seen[2][k]) for k in final)



def test_an_eval_that_only_ties_the_best_counts_against_patience(tmp_path):
    """Keras' EarlyStopping rule with min_delta 0: an improvement is a score strictly above the last real one, so
    evals that only repeat it run the patience out."""
    recipe = _Scripted([0.5, 0.6, 0.6, 0.6, 0.9])
    result = fit(recipe, LoopConfig(max_steps=5, eval_every=1, patience=2), Parallel(torch.device("cpu"), "none"), tmp_path / "work", progress=False)
    assert (result.state.step, result.stopped_by, result.state.best_step) == (4, "early_stopping", 2)

def test_a_batch_in_tokens_sets_the_rows_and_scales_the_learning_rate(cls_task, monkeypatch):
    """Issue 22: on a GPU the default batch is in tokens (from the device's free memory and the model); a spec may
    give train.batch_tokens anywhere; the CPU default stays batch_size rows."""
    from adapterhub_lite.training import defaults

    cpu, backbone = _resolve(_minimal(cls_task, "toy"))
    assert cpu.spec.train.batch_size == 16 and cpu.spec.train.batch_tokens == 0 and "train.batch_tokens" not in cpu.choices
    spec = load_spec(_minimal(cls_task, "toy"))
    prompts = load_task_data(spec)["train"].prompt_ids(backbone.tokenizer)
    label = max(len(w) for w in label_token_ids(backbone.tokenizer, spec))
    mean = sum(len(p) + label for p in prompts) / len(prompts)

    given, _ = _resolve(_minimal(cls_task, "toy"), "train.batch_tokens=640")
    t = given.spec.train
    assert t.batch_size == round(640 / mean) and t.batch_size != 16
    assert t.lr == float(f"{1e-3 * math.sqrt(t.batch_size / 16):.2g}")  # Adam's square-root rule from the rate at 16 rows
    assert "640 tokens a step" in given.choices["train.batch_size"]["why"]
    assert given.choices["train.lr"]["value"] == t.lr  # the sidecar records the rate that was used
    two, _ = _resolve(_minimal(cls_task, "toy"), "train.batch_tokens=640", processes=2)
    assert two.spec.train.batch_size == round(640 / mean / 2)  # rows per process
    # the rule reads the global batch: rows per process × processes
    assert two.spec.train.lr == float(f"{1e-3 * math.sqrt(two.spec.train.batch_size * 2 / 16):.2g}") == two.choices["train.lr"]["value"]

    # a GPU with 2 GiB free: half of it over the activations one token keeps, within GPU_BATCH_TOKENS
    monkeypatch.setattr(defaults, "device_memory", lambda model: ("cuda", 2 * 2**30))
    gpu, _ = _resolve(_minimal(cls_task, "toy"))
    c = backbone.model.config
    fits = int(0.5 * 2 * 2**30 / (c.num_hidden_layers * c.hidden_size * defaults.ACTIVATION_BYTES))
    want = max(1024, min(defaults.GPU_BATCH_TOKENS, fits) // 1024 * 1024)
    assert gpu.spec.train.batch_tokens == want and gpu.choices["train.batch_tokens"]["value"] == want
    rows = min(round(want / mean), len(prompts))  # at most the split
    assert gpu.spec.train.batch_size == rows and gpu.spec.train.max_steps == math.ceil(20 * 96 / rows)
    assert gpu.spec.train.lr == float(f"{1e-3 * min(defaults.LR_SCALE_MAX, math.sqrt(rows / 16)):.2g}")
    # what the spec gives is kept: its batch_size, its learning rate
    fixed, _ = _resolve(_minimal(cls_task, "toy"), "train.batch_size=8", "train.lr=0.01")
    assert (fixed.spec.train.batch_size, fixed.spec.train.lr, fixed.spec.train.batch_tokens) == (8, 0.01, 0)


def test_a_batch_in_tokens_is_the_step_s_tokens_under_accumulation(cls_task):
    """train.batch_tokens is the tokens an optimizer step reads (the reason recorded says so, "640 tokens a step", and
    processes share it): with grad_accum 2 each micro-batch holds half. It was not divided by grad_accum, so a step read
    grad_accum times the tokens asked for (copy task: batch_tokens=40 grad_accum=2 gave 3 rows of 15 tokens a
    micro-batch, 90 tokens a step, recorded as '40 tokens a step')."""
    one, backbone = _resolve(_minimal(cls_task, "toy"), "train.batch_tokens=640")
    two, _ = _resolve(_minimal(cls_task, "toy"), "train.batch_tokens=640", "train.grad_accum=2")
    spec = load_spec(_minimal(cls_task, "toy"))
    prompts = load_task_data(spec)["train"].prompt_ids(backbone.tokenizer)
    mean = sum(len(p) + max(len(w) for w in label_token_ids(backbone.tokenizer, spec)) for p in prompts) / len(prompts)
    assert two.spec.train.batch_size == round(640 / mean / 2) != one.spec.train.batch_size
    assert "640 tokens a step (train.batch_tokens) ÷ 2 micro-batches" in two.choices["train.batch_size"]["why"]
    assert two.spec.train.lr == float(f"{1e-3 * math.sqrt(two.spec.train.batch_size * 2 / 16):.2g}")  # the step's rows


def test_a_batch_in_tokens_with_accumulation_reads_at_most_the_split_a_step(cls_task):
    """A batch in tokens was capped at the split's rows per micro-batch: with grad_accum 4 a step of 4 × 96 rows read
    each of the 96 rows four times (train now refuses a step over the split). The cap is the split ÷ grad_accum."""
    resolved, _ = _resolve(_minimal(cls_task, "toy"), "train.batch_tokens=100000", "train.grad_accum=4")
    assert resolved.spec.train.batch_size == 96 // 4
    # the learning rate is scaled by the step's rows as capped (24 × 4), not by the uncapped rows (96 × 4)
    from adapterhub_lite.training.defaults import LR_SCALE_MAX

    assert resolved.spec.train.lr == float(f"{1e-3 * min(LR_SCALE_MAX, math.sqrt(96 / 16)):.2g}") == resolved.choices["train.lr"]["value"]


def test_a_split_smaller_than_the_default_batch_is_read_once_a_step(cls_task):
    """A minimal spec over 10 train rows was refused for train.batch_size=16, a value it never wrote: the default batch
    is now the split (÷ grad_accum), said as chosen; a batch_size the spec gives is still refused over the split."""
    rows = (cls_task / "train.jsonl").read_text().splitlines()
    (cls_task / "ten.jsonl").write_text("".join(r + "\n" for r in rows[:10]))
    resolved, _ = _resolve(_minimal(cls_task, "toy"), "data.train=ten.jsonl")
    assert resolved.spec.train.batch_size == 10 and "10 train rows in a step" in resolved.choices["train.batch_size"]["why"]
    accumulated, _ = _resolve(_minimal(cls_task, "toy"), "data.train=ten.jsonl", "train.grad_accum=3")
    assert accumulated.spec.train.batch_size == 3
    given, _ = _resolve(_minimal(cls_task, "toy"), "data.train=ten.jsonl", "train.batch_size=16")
    assert given.spec.train.batch_size == 16


def test_a_spec_giving_both_batch_size_and_batch_tokens_is_refused(cls_task):
    raw = yaml.safe_load((cls_task / "toy.yaml").read_text())
    raw["train"]["batch_tokens"] = 512
    (cls_task / "both.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError, match="train.batch_size=8 and train.batch_tokens=512 both set the batch"):
        load_spec(cls_task / "both.yaml")


def test_the_warmup_reason_names_its_cap(cls_task):
    """warmup_steps left out is 5% of the steps, at most 100: the reason recorded beside it says so (it said "5% of
    4000 steps" beside 100)."""
    resolved, _ = _resolve(_minimal(cls_task, "toy"), "train.max_steps=4000")
    assert resolved.spec.train.warmup_steps == 100
    assert resolved.choices["train.warmup_steps"]["why"] == "5% of 4000 steps, at most 100"
    short, _ = _resolve(_minimal(cls_task, "toy"), "train.max_steps=400")
    assert (short.spec.train.warmup_steps, short.choices["train.warmup_steps"]["why"]) == (20, "5% of 400 steps")
    # a warm-up's first step runs at learning rate 0: one step of it made a 1-step run an untrained adapter (lora_B = 0)
    one, _ = _resolve(_minimal(cls_task, "toy"), "train.max_steps=1")
    assert one.spec.train.warmup_steps == 0 and "learning rate 0" in one.choices["train.warmup_steps"]["why"]

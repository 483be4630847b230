"""Joint multi-task training: one forward/backward pass, each row through its own task's adapter."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from adapterhub_lite.artifacts.registry import LocalRegistry
from adapterhub_lite.cli import main
from adapterhub_lite.core.errors import SpecError
from adapterhub_lite.core.spec import spec_from_dict
from adapterhub_lite.model.adapter import save_lora
from adapterhub_lite.model.backbone import load_backbone
from adapterhub_lite.model.evaluate import label_token_ids
from adapterhub_lite.model.heads import label_scores, loss_plan, task_loss
from adapterhub_lite.serving.router import Router
from adapterhub_lite.training.checkpoint import Checkpoint
from adapterhub_lite.training.joint_config import SHARED, JointConfig
from adapterhub_lite.training.loop import LoopConfig
from adapterhub_lite.training.recipes.joint import JointLora, _attach, joint_losses, train_joint
from adapterhub_lite.training.weighting import Equal

from .conftest import crash_after_checkpoint


def _spec(name, kind="classification", **extra):
    raw = {"name": name, "type": kind, "data": {"train": "t.jsonl", "dev": "d.jsonl"}, "prompt": "T: {text}\nA:",
           "base": "tiny-random-llama", "quantization": "none", "method": "lora",
           "method_args": {"r": 4, "target_modules": ["q_proj", "v_proj"]}, "train": {"max_length": 48}}
    if kind == "classification":
        raw.update(label="label", labels=["yes", "no"])
    else:
        raw.update(target="target")
        raw["train"] = {**raw["train"], "max_new_tokens": 8}  # the prompt keeps max_length - max_new_tokens tokens
    raw.update(extra)
    return spec_from_dict(raw)


ROWS = {
    "a": (["T: good day\nA:", "T: bad day\nA:", "T: fine\nA:"], [0, 1, 0]),
    "b": (["T: one two\nA:", "T: three\nA:", "T: " + "a long row " * 6 + "\nA:"], [1, 0, 1]),  # several length buckets
    "g": (["T: ab\nA:", "T: cd\nA:"], ["AB", "CD"]),
}


def _joint(shared: bool):
    backbone = load_backbone("tiny-random-llama", "none", dtype="fp32")
    specs = [_spec("a"), _spec("b", method_args={"r": 2, "target_modules": ["q_proj", "k_proj", "v_proj"]}), _spec("g", "generation")]
    torch.manual_seed(0)
    model = _attach(backbone.model, specs, JointConfig(shared_adapter=shared, shared_r=3))
    with torch.no_grad():  # peft starts B at zero, which would hide A's gradient: randomise all factors
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.2)
    joint = JointLora(model, [s.name for s in specs], shared, 0.0)
    labels = {s.name: label_token_ids(backbone.tokenizer, s) if s.type == "classification" else None for s in specs}
    return backbone, specs, model, joint, labels


def _lora_grads(model, adapter):
    return {n: p.grad.clone() for n, p in model.named_parameters() if f".{adapter}." in n and p.grad is not None}


def test_the_joint_config_reaches_its_weighting_and_sampling_rules(tmp_path, monkeypatch):
    """JointConfig's weighting (and its args) and sampling temperature are what the run uses (the rules' own tests
    build them directly): fixed weights show in every metrics row; the sampler is made with the temperature given."""
    from adapterhub_lite.training.recipes import joint as joint_mod

    monkeypatch.chdir(tmp_path)
    _write_tasks(tmp_path, copies={"a": 4, "g": 1})
    specs = [_spec("a", data={"train": "a.jsonl", "dev": "a.jsonl"}, train={"max_length": 48}),
             _spec("g", "generation", data={"train": "g.jsonl", "dev": "g.jsonl"}, train={"max_length": 48, "max_new_tokens": 2})]
    made = []

    class Recording(joint_mod.TaskSampler):
        def __init__(self, sizes, rule, temperature, **kw):
            made.append((dict(sizes), rule, temperature))
            super().__init__(sizes, rule, temperature, **kw)

    monkeypatch.setattr(joint_mod, "TaskSampler", Recording)
    cfg = JointConfig(max_steps=2, batch_size=4, warmup_steps=0, eval_every=2, eval_samples=2, weighting="fixed",
                      weighting_args={"weights": {"a": 0.25, "g": 0.75}}, sampling="temperature", temperature=5.0)
    out = train_joint(specs, tmp_path / "mtl", cfg, progress=False)
    rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert rows and all((r["weight/a"], r["weight/g"]) == (0.25, 0.75) for r in rows)
    assert made == [({"a": 4 * len(ROWS["a"][0]), "g": len(ROWS["g"][0])}, "temperature", 5.0)]


@pytest.mark.parametrize("shared", [False, True])
def test_joint_step_gives_each_adapter_its_alone_gradient_over_n(shared):
    backbone, specs, model, joint, labels = _joint(shared)
    tok = backbone.tokenizer
    plans = {i: loss_plan(tok, *ROWS[s.name], 48, labels[s.name]) for i, s in enumerate(specs)}
    losses = joint_losses(model, tok.pad_token_id, joint, plans)
    Equal([s.name for s in specs]).combine({specs[i].name: v for i, v in losses.items()}).backward()
    joint_grads = {s.name: _lora_grads(model, s.name) for s in specs}
    shared_joint = _lora_grads(model, SHARED) if shared else {}

    # Alone: plain peft forward with only this task's adapter (and the shared one) active.
    model.base_model.enable_adapter_layers()
    shared_alone = {}
    for i, s in enumerate(specs):
        model.zero_grad(set_to_none=True)
        model.base_model.set_adapter([SHARED, s.name] if shared else s.name)
        loss = task_loss(model, tok, *ROWS[s.name], 48, labels[s.name])
        assert torch.allclose(loss, losses[i], atol=1e-5), (s.name, loss.item(), losses[i].item())
        loss.backward()
        alone = _lora_grads(model, s.name)
        assert set(alone) == set(joint_grads[s.name]) and alone
        for n, g in alone.items():
            assert torch.allclose(joint_grads[s.name][n], g / len(specs), atol=1e-5, rtol=1e-4), (n, (joint_grads[s.name][n] - g / len(specs)).abs().max().item(), g.abs().max().item())
            assert g.abs().sum() > 0
        for n, g in _lora_grads(model, SHARED).items():
            shared_alone[n] = shared_alone.get(n, 0) + g / len(specs)
    for n, g in shared_joint.items():  # the shared adapter gets the mean of the tasks' gradients
        assert torch.allclose(g, shared_alone[n], atol=1e-5, rtol=1e-4), n


def _recipe(tmp_path, monkeypatch, **cfg):
    """A Joint recipe of a classification task a and a generation task g (every g row the same), its factors random."""
    from adapterhub_lite.core.data import load_task_data
    from adapterhub_lite.training.recipes.joint import Joint

    monkeypatch.chdir(tmp_path)
    _write_tasks(tmp_path, copies={"a": 4, "g": 1})
    (tmp_path / "g.jsonl").write_text((json.dumps({"text": "ab", "target": "AB CD EF"}) + "\n") * 8)
    train = {"max_length": 48, "weight_decay": 0.1}
    specs = [_spec("a", data={"train": "a.jsonl", "dev": "a.jsonl"}, train=train),
             _spec("g", "generation", data={"train": "g.jsonl", "dev": "g.jsonl"}, train={**train, "max_new_tokens": 8})]
    backbone = load_backbone("tiny-random-llama", "none", dtype="fp32")
    torch.manual_seed(0)
    model = _attach(backbone.model, specs, JointConfig())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.2)
    joint = JointLora(model, [s.name for s in specs], False, 0.0)
    return Joint(specs, JointConfig(batch_size=4, **cfg), model, joint, backbone, {s.name: load_task_data(s) for s in specs})


def test_a_joint_steps_generation_loss_is_the_mean_over_its_target_tokens(tmp_path, monkeypatch):
    """Joint.step_loss divides a task's summed loss by that task's loss_items: for a generation task its target tokens
    + EOS, so its loss is the per-token mean that task_loss (and a run of it alone) takes, not a sum per row. Every
    training row of g is the same, so whatever rows the step draws, their mean is that row's."""
    from adapterhub_lite.training.parallel import Parallel

    recipe = _recipe(tmp_path, monkeypatch)
    model, tok = recipe.model, recipe.backbone.tokenizer
    parallel = Parallel(recipe.backbone.device)
    for _ in range(20):  # the sampler draws tasks at random: until a step holds g's rows
        part = recipe.step_loss(model, parallel)
        if "loss/g" in part.logs:
            break
    model.base_model.enable_adapter_layers()
    model.base_model.set_adapter("g")
    with torch.no_grad():
        want = task_loss(model, tok, ["T: ab\nA:"], ["AB CD EF"], 48, None)
    assert len(tok(" AB CD EF").input_ids) > 1  # several target tokens a row: a sum per row would differ
    assert part.logs["loss/g"].item() == pytest.approx(want.item(), rel=1e-5)


def test_a_joint_eval_scores_the_tasks_mean_and_the_loss_weights_are_not_decayed(tmp_path, monkeypatch):
    """The score a joint run keeps its best by (and stops on) is the mean of the tasks' primary metrics, not the best
    task's; and the learned loss weights (uncertainty's log-variances) get no weight decay, which would pull them to 0
    whatever the tasks' losses say, though each task's own adapter gets its train.weight_decay."""
    recipe = _recipe(tmp_path, monkeypatch, weighting="uncertainty")
    monkeypatch.setattr(recipe, "scores", lambda limit, parallel: {"a": {"accuracy": 1.0}, "g": {recipe.specs[1].primary_metric: 0.2}})
    score, row = recipe.evaluate(None, None)
    assert score == pytest.approx(0.6) and row["dev/mean"] == 0.6
    groups = recipe.param_groups()
    weights = {id(p) for p in recipe.weighting.parameters()}
    assert weights and [g["weight_decay"] for g in groups if {id(p) for p in g["params"]} == weights] == [0.0]
    assert [g["weight_decay"] for g in groups if not {id(p) for p in g["params"]} & weights] == [0.1, 0.1]


def _write_tasks(folder, copies):
    """a.jsonl (classification) and g.jsonl (generation) from ROWS, each row repeated copies[name] times."""
    for name, (prompts, answers) in (("a", ROWS["a"]), ("g", ROWS["g"])):
        key = "label" if name == "a" else "target"
        rows = [{"text": p.split(": ")[1].split("\n")[0], key: ["yes", "no"][x] if key == "label" else x} for p, x in zip(prompts, answers)]
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * copies[name]))


@pytest.mark.parametrize("weighting", ["equal", "dynamic", "uncertainty"])
def test_accumulated_joint_micro_batches_train_the_adapters_of_one_batch(tmp_path, monkeypatch, weighting):
    """grad_accum 4 × 4 rows gives the adapters and logged losses of one batch of 16, to 1e-5, as for one adapter. Each
    micro-batch drew its own tasks and rows and averaged its tasks' means, equally: the two differed by more than the
    weights themselves (0.15 on weights of 0.13), a dynamic rule's history counted micro-batches, and uncertainty's + s
    was added once a micro-batch. Targets of 1 to 4 copies: the micro-batches count different numbers of tokens."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"{w} {i}", "label": w}) + "\n" for i in range(16) for w in ("yes", "no")))
    (tmp_path / "g.jsonl").write_text("".join(json.dumps({"text": t * (1 + i % 3), "target": t.upper() * (1 + i % 4)}) + "\n"
                                              for i, t in enumerate(["ab", "cd", "ef", "gh"] * 8)))
    specs = [_spec("a", data={"train": "a.jsonl", "dev": "a.jsonl"}, train={"max_length": 48, "lr": 1e-3}),
             _spec("g", "generation", data={"train": "g.jsonl", "dev": "g.jsonl"}, train={"max_length": 48, "max_new_tokens": 8, "lr": 1e-3})]
    runs = {}
    for batch, accum in ((16, 1), (4, 4)):
        cfg = JointConfig(max_steps=3, batch_size=batch, grad_accum=accum, warmup_steps=0, eval_every=3, eval_samples=2, weighting=weighting,
                          sampling="temperature", log_every=1)
        out = train_joint(specs, tmp_path / f"b{batch}", cfg, progress=False)
        assert json.loads((out / "run.json").read_text())["train_state"]["global_batch"] == 16  # rows a step reads, as train records it
        logged = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
        runs[batch] = ({t: load_file(out / t / "adapter_model.safetensors") for t in ("a", "g")},
                       [{k: v for k, v in r.items() if k.startswith(("loss", "weight/"))} for r in logged])
    (one, one_log), (four, four_log) = runs[16], runs[4]
    assert max(one["g"][k].abs().max().item() for k in one["g"] if "lora_B" in k) > 1e-4  # trained: lora_B starts at zero
    assert max((one[t][k] - four[t][k]).abs().max().item() for t in one for k in one[t]) <= 1e-5
    assert len(one_log) == 3 and all(a == pytest.approx(b, abs=1e-5) for a, b in zip(one_log, four_log)), (one_log, four_log)


def test_joint_run_writes_a_folder_per_task_that_plain_peft_loads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_tasks(tmp_path, copies={"a": 4, "g": 4})
    # a high learning rate: after 3 steps the shared adapter must change what the model generates (checked below)
    specs = [_spec("a", data={"train": "a.jsonl", "dev": "a.jsonl"}, train={"max_length": 48, "lr": 0.2}),
             _spec("g", "generation", data={"train": "g.jsonl", "dev": "g.jsonl"}, train={"max_length": 48, "max_new_tokens": 3, "lr": 0.2})]
    cfg = JointConfig(max_steps=3, batch_size=4, warmup_steps=0, eval_every=2, eval_samples=4, weighting="dynamic",
                      sampling="round_robin", shared_adapter=True, shared_r=2, log_every=1)
    out = train_joint(specs, tmp_path / "mtl", cfg, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["a", "curves.png", "g", "metrics.jsonl", "run.json", SHARED]
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history if "loss" in r] == [1, 2, 3]
    assert all("weight/a" in r and "weight/g" in r for r in history if "loss" in r)
    assert any("dev/a/accuracy" in r for r in history)
    run = json.loads((out / "run.json").read_text())
    assert set(run["dev"]) == {"a", "g"}

    # Each task folder holds shared + task factors (r = r_shared + r_task) and a full sidecar.
    assert json.loads((out / "a" / "adapter_config.json").read_text())["r"] == 2 + 4
    meta = json.loads((out / "a" / "adapterhub.json").read_text())
    assert meta["joint"]["tasks"] == ["a", "g"] and meta["metrics"] == run["dev"]["a"]
    assert json.loads((out / SHARED / "adapterhub.json").read_text())["task"] is None

    # Both publish like single-task adapters; the shared one is listed and served, never routed to.
    reg = LocalRegistry(tmp_path / "reg")
    reg.publish(out / "a", name="a_joint")
    reg.publish(out / SHARED, name="mtl_shared")
    assert main(["list", "--registry", str(tmp_path / "reg")]) == 0
    router = Router(load_backbone("tiny-random-llama", "none", dtype="fp32"), reg)
    for name in ("a_joint", "mtl_shared"):
        router.register(name)
    texts = ["good day", "bad day", "fine", "ok", "nope", "sure", "x", "no way"]
    answers = router.run([{"adapter": "mtl_shared", "text": "ab"}, {"adapter": "auto", "text": "good day"}]
                         + [{"adapter": "a_joint", "text": t} for t in texts])
    # "good day" is a row of task a's own data: routing picks a's adapter for it
    assert [r["adapter"] for r in answers[:2]] == ["mtl_shared", "a_joint"]
    # each answer is what plain peft gives with the published folder, and the adapters change the answers
    tok = router.backbone.tokenizer
    plain = PeftModel.from_pretrained(load_backbone("tiny-random-llama", "none", dtype="fp32").model, out / SHARED).eval()
    ids = torch.tensor([tok("ab").input_ids], device=plain.device)
    with torch.no_grad():
        gen = plain.generate(input_ids=ids, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    assert answers[0]["prediction"] == tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip().split("\n")[0].strip()
    assert answers[0]["prediction"] != router.run([{"adapter": "base", "text": "ab"}])[0]["prediction"]
    plain_a = PeftModel.from_pretrained(load_backbone("tiny-random-llama", "none", dtype="fp32").model, out / "a").eval()
    prompts, labels = [specs[0].prompt.format(text=t) for t in ["good day"] + texts], label_token_ids(tok, specs[0])
    with torch.no_grad():
        want = label_scores(plain_a, tok, prompts, labels, 48).argmax(-1).tolist()
    assert [r["prediction"] for r in answers[1:]] == [["yes", "no"][i] for i in want]


@pytest.mark.parametrize("shared", [False, True])
def test_exported_task_adapter_equals_the_routed_one_under_plain_peft(shared, tmp_path):
    backbone, specs, model, joint, _ = _joint(shared)
    ids = backbone.tokenizer(["T: good day\nA:", "T: x\nA:"], return_tensors="pt", padding=True).to(backbone.model.device)
    for i, s in enumerate(specs):
        with torch.no_grad(), joint.assign(i):
            want = model(**ids).logits
        save_lora(tmp_path / s.name, joint.export(i), "tiny")
        fresh = load_backbone("tiny-random-llama", "none", dtype="fp32").model
        with torch.no_grad():
            got = PeftModel.from_pretrained(fresh, tmp_path / s.name)(**ids).logits
        assert (got - want).abs().max() < 1e-5


def test_tasks_that_cannot_train_jointly_are_refused_all_at_once():
    specs = [_spec("a"), _spec("a", method="prefix", method_args={}), _spec("c", quantization="8bit")]
    with pytest.raises(SpecError) as err:
        train_joint(specs, "unused")
    msg = str(err.value)
    assert "distinct" in msg and "method 'prefix'" in msg and "quantization differs" in msg


def test_resumed_joint_run_equals_the_uninterrupted_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rows = [{"text": f"{w} {i}", "label": w} for i in range(8) for w in ("yes", "no")]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    specs = [_spec(n, data={"train": "t.jsonl", "dev": "t.jsonl"}) for n in ("a", "b")]
    # two micro-batches a step and a cosine schedule still warming up at the crash (step 2): the task sampler, the loss
    # weights, the data cursors, the optimizer, the schedule and the RNG all come back
    cfg = JointConfig(max_steps=4, batch_size=4, grad_accum=2, warmup_steps=3, schedule="cosine", eval_every=2, eval_samples=4,
                      weighting="uncertainty", sampling="dynamic", shared_adapter=True, shared_r=2, log_every=1)
    straight = train_joint(specs, tmp_path / "straight", cfg, progress=False)

    crash_after_checkpoint(monkeypatch, lambda: train_joint(specs, tmp_path / "resumed", cfg, progress=False))
    capsys.readouterr()
    resumed = train_joint(specs, tmp_path / "resumed", cfg, resume=True, progress=False)
    assert "resuming from step 2" in capsys.readouterr().err  # not a silent restart from scratch
    for task in ("a", "b", SHARED):
        want, got = load_file(straight / task / "adapter_model.safetensors"), load_file(resumed / task / "adapter_model.safetensors")
        assert want.keys() == got.keys() and all(torch.allclose(want[k], got[k], atol=1e-6) for k in want), task
    def rows(run):  # the clock's figure aside, the logs are identical
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows(straight) == rows(resumed)


def test_joint_resume_identity_counts_the_global_batch_not_the_process_count():
    """Two processes × 4 rows resume a run of one process × 8 rows; another global batch is refused."""
    from adapterhub_lite.core.data import Split
    from adapterhub_lite.training.progress import joint_identity

    data = {n: {"train": Split([], [], "t.jsonl", n + "-sha"), "dev": Split([], [], "d.jsonl", n + "-d")} for n in ("a", "b")}

    def identity(batch, processes):
        specs = [_spec(n, train={"max_length": 48, "batch_size": batch}) for n in ("a", "b")]
        return joint_identity(specs, JointConfig(batch_size=batch), data, processes)["sha256"]

    assert identity(8, 1) == identity(4, 2) != identity(4, 1)


def test_the_specs_schedule_decay_and_accumulation_reach_a_joint_run(tmp_path, monkeypatch):
    """train-multi read only some of the specs' train keys: schedule, grad_accum and weight_decay were dropped silently
    (a linear schedule, no decay, no accumulation). Now: schedule and grad_accum are the run's (they must agree),
    weight_decay is each task's own (its optimizer group), and keys a joint run cannot follow are refused."""
    import math

    monkeypatch.chdir(tmp_path)
    _write_tasks(tmp_path, copies={"a": 4, "g": 4})

    def specs(decay_a=0.0, **train):
        return [_spec("a", data={"train": "a.jsonl", "dev": "a.jsonl"}, train={"max_length": 48, "lr": 0.05, "weight_decay": decay_a, **train}),
                _spec("g", "generation", data={"train": "g.jsonl", "dev": "g.jsonl"}, train={"max_length": 48, "max_new_tokens": 2, "lr": 0.05, **train})]

    shared = {"max_steps": 4, "batch_size": 4, "warmup_steps": 0, "eval_every": 4, "eval_samples": 2, "schedule": "cosine", "grad_accum": 2,
              "max_grad_norm": 0.0, "log_every": 1}  # no clipping: one global norm would tie g's step to a's weights
    cfg = JointConfig.from_specs(specs(**shared), weighting="equal", sampling="round_robin")
    assert (cfg.schedule, cfg.grad_accum) == ("cosine", 2)
    from adapterhub_lite.training.recipes import joint as joint_mod

    draws, draw = [], joint_mod.TaskSampler.draw_batch
    monkeypatch.setattr(joint_mod.TaskSampler, "draw_batch", lambda self, n: draws.append(n) or draw(self, n))
    plain = train_joint(specs(**shared), tmp_path / "plain", cfg, progress=False)
    assert draws == [8] * 4  # 4 optimizer steps, each drawing its 2 micro-batches of 4 rows at once
    rows = [r for r in map(json.loads, (plain / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    assert [r["lr"] for r in rows] == pytest.approx([0.05 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)], abs=1e-6)
    decayed = train_joint(specs(0.5, **shared), tmp_path / "decayed", cfg, progress=False)
    weights = {run: {t: load_file(run / t / "adapter_model.safetensors") for t in ("a", "g")} for run in (plain, decayed)}
    # a's decay moves a's factors only: under equal weighting g's loss and gradients do not see a's adapter
    assert any(not torch.equal(weights[plain]["a"][k], weights[decayed]["a"][k]) for k in weights[plain]["a"])
    assert all(torch.equal(weights[plain]["g"][k], weights[decayed]["g"][k]) for k in weights[plain]["g"])
    with pytest.raises(SpecError, match=r"train.epochs is set \(a: 2.0, g: 2.0\) but a joint run does not read it"):
        JointConfig.from_specs(specs(epochs=2.0, **shared))
    with pytest.raises(SpecError, match=r"train.schedule differs between the tasks \(a: cosine, g: linear\)"):
        JointConfig.from_specs([specs(**shared)[0], specs(**{**shared, "schedule": "linear"})[1]])


def test_every_loop_setting_a_spec_gives_reaches_a_joint_run():
    """train-multi dropped specs' loop keys silently while JointConfig lacked their fields (patience, min_steps, ...: no early
    stop). Each loop setting a spec's `train` gives must reach the joint run's loop, bar the two a joint run sets itself."""
    from dataclasses import fields

    from adapterhub_lite.training.loop import LoopConfig

    given = {"max_steps": 7, "eval_every": 3, "warmup_steps": 2, "schedule": "cosine", "grad_accum": 3, "max_grad_norm": 0.5,
             "eval_samples": 9, "max_minutes": 4.0, "patience": 2, "min_delta": 0.1, "min_steps": 5, "checkpoint_every": 2, "log_every": 4, "seed": 3}
    assert set(given) == {f.name for f in fields(LoopConfig)}  # a new loop setting must be placed here too
    specs = [_spec("a", train={"max_length": 48, **given}), _spec("g", "generation", train={"max_length": 48, "max_new_tokens": 8, **given})]
    loop = LoopConfig.from_train(JointConfig.from_specs(specs))
    assert {k: getattr(loop, k) for k in given} == given


def test_a_joint_run_logs_and_checkpoints_as_its_specs_say_and_refuses_compile_always(tmp_path, monkeypatch):
    """train-multi wrote a metrics row every step and checkpointed only at evals, whatever train.log_every and
    train.checkpoint_every said (README: silently ignored). They are the run's now, as for `train`; left out,
    checkpoint_every is every eval. train.compile: always cannot be honoured (the per-row layer runs eager): refused."""
    monkeypatch.chdir(tmp_path)
    _write_tasks(tmp_path, copies={"a": 4, "g": 4})

    def specs(**train):
        return [_spec("a", data={"train": "a.jsonl", "dev": "a.jsonl"}, train={"max_length": 48, **train}),
                _spec("g", "generation", data={"train": "g.jsonl", "dev": "g.jsonl"}, train={"max_length": 48, "max_new_tokens": 2, **train})]

    shared = {"max_steps": 6, "batch_size": 4, "warmup_steps": 0, "eval_every": 6, "eval_samples": 2}
    saved, save = [], Checkpoint.save
    monkeypatch.setattr(Checkpoint, "save", lambda self, state: saved.append(state["state"]["step"]) or save(self, state))
    given = specs(**shared, log_every=3, checkpoint_every=2)
    out = train_joint(given, tmp_path / "mtl", JointConfig.from_specs(given, weighting="equal", sampling="round_robin"), progress=False)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 3, 4, 6]  # every 3 steps, and a window ends at each checkpoint (as in `train`)
    assert saved == [2, 4, 6]
    # left out: a checkpoint at every eval, as `train` resolves it
    assert JointConfig.from_specs(specs(**shared)).checkpoint_every is None
    assert LoopConfig.from_train(JointConfig.from_specs(specs(**{**shared, "eval_every": 3}))).checkpoint_every is None
    with pytest.raises(SpecError, match=r"train.compile is 'always' \(a, g\) but a joint run's per-row adapters run eager; pass train.compile=auto"):
        JointConfig.from_specs(specs(**shared, compile="always"))
    with pytest.raises(SpecError, match=r"train.log_every differs between the tasks \(a: 3, g: 5\)"):
        JointConfig.from_specs([specs(**shared, log_every=3)[0], specs(**shared, log_every=5)[1]])
    assert JointConfig.from_specs([specs(**shared, log_every=3)[0], specs(**shared)[1]]).log_every == 3  # left out by g: a's


def test_a_joint_run_in_fp16_scales_its_loss(tmp_path, monkeypatch):
    """Issue 22: joint training had no loss scaler under fp16 (dtype=auto picks fp16 on GPUs without bf16), so small
    gradients underflowed. fit() applies it for every recipe: each joint step goes through an enabled GradScaler."""
    monkeypatch.chdir(tmp_path)
    _write_tasks(tmp_path, copies={"a": 4, "g": 4})
    scales, step = [], torch.amp.GradScaler.step
    monkeypatch.setattr(torch.amp.GradScaler, "step", lambda self, *a, **k: scales.append(self.get_scale() if self.is_enabled() else None)
                        or step(self, *a, **k))
    specs = [_spec("a", data={"train": "a.jsonl", "dev": "a.jsonl"}), _spec("g", "generation", data={"train": "g.jsonl", "dev": "g.jsonl"})]
    cfg = JointConfig(max_steps=2, batch_size=4, warmup_steps=0, eval_every=2, eval_samples=2, weighting="equal", sampling="round_robin")
    out = train_joint(specs, tmp_path / "mtl", cfg, dtype="fp16", progress=False)
    assert json.loads((out / "a" / "adapterhub.json").read_text())["base"]["dtype"] == "fp16"
    assert len(scales) == 2 and all(s is not None and s > 1 for s in scales)


def test_a_short_joint_run_without_a_warm_up_is_not_refused_over_the_default_one(tmp_path, monkeypatch):
    """a7448a9 refuses a warm-up as long as the run; train-multi took TrainConfig's fixed warmup_steps=20 for a spec that
    left it out, so `train.max_steps=10` was refused naming warmup_steps=20, a value nobody wrote. Left out, a run's
    warm-up is what `train` chooses (resolve_joint, at the start of the run); given, it is kept (and fit() refuses it)."""
    from adapterhub_lite.core.data import load_task_data
    from adapterhub_lite.training.defaults import resolve_joint
    from adapterhub_lite.training.loop import LoopConfig

    monkeypatch.chdir(tmp_path)
    _write_tasks(tmp_path, copies={"a": 2, "g": 2})
    backbone = load_backbone("tiny-random-llama", "none", "cpu")

    def warmup(**train):
        specs = [_spec("a", data={"train": "a.jsonl", "dev": "a.jsonl"}, train={"max_length": 48, **train}),
                 _spec("g", "generation", data={"train": "g.jsonl", "dev": "g.jsonl"}, train={"max_length": 48, "max_new_tokens": 8, **train})]
        data = {s.name: load_task_data(s) for s in specs}
        return LoopConfig.from_train(resolve_joint(specs, JointConfig.from_specs(specs), data, backbone.model, backbone.tokenizer)[1]).warmup_steps

    assert (warmup(max_steps=10), warmup(max_steps=1), warmup(max_steps=400)) == (1, 0, 20)  # 5% of the steps, as for `train`
    assert warmup(max_steps=10, warmup_steps=10) == 10


def test_train_multi_says_what_train_says_of_its_data(tmp_path, monkeypatch, capsys):
    """Prompts cut to train.max_length and dev rows a train row holds are said by `train` (685e30f, 2179506); train-multi
    read the same data without a word. Each warning is said once per task, named."""
    monkeypatch.chdir(tmp_path)
    _write_tasks(tmp_path, copies={"a": 2, "g": 2})
    long = tmp_path / "g_long.jsonl"
    long.write_text(json.dumps({"text": "x " * 40, "target": "y"}) + "\n" + (tmp_path / "g.jsonl").read_text())
    train = {"max_length": 24, "max_steps": 1, "batch_size": 4, "eval_samples": 2}
    specs = [_spec("a", data={"train": "a.jsonl", "dev": "a.jsonl"}, train=train),
             _spec("g", "generation", data={"train": "g_long.jsonl", "dev": "g.jsonl"}, train={**train, "max_new_tokens": 2})]
    train_joint(specs, tmp_path / "mtl", JointConfig.from_specs(specs, weighting="equal", sampling="round_robin"), progress=False)
    err = capsys.readouterr().err
    assert "a: warning: " in err and "have the same prompt as a row of 'a.jsonl'" in err, err
    assert "g: warning: 1 of " in err and "rows of 'g_long.jsonl' (row 1) do not fit train.max_length=24" in err, err


def test_a_joint_run_killed_while_writing_its_folders_resumes_and_writes_them(tmp_path, monkeypatch):
    """train-multi killed while it wrote its output folders (in the work folder's out/) left out/ half-written; the
    --resume that the checkpoint allows then died in a traceback (FileExistsError: '.k0.partial/out', found by SIGKILL at
    random moments) instead of writing them. train's own recipe removes such a leftover first; the joint one now too."""
    from adapterhub_lite.training.recipes import joint as joint_mod

    monkeypatch.chdir(tmp_path)
    rows = [{"text": f"{w} {i}", "label": w} for i in range(8) for w in ("yes", "no")]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    specs = [_spec(n, data={"train": "t.jsonl", "dev": "t.jsonl"}) for n in ("a", "b")]
    cfg = JointConfig(max_steps=2, batch_size=4, warmup_steps=0, eval_every=2, eval_samples=4)
    save = joint_mod.save_lora

    def killed(folder, *a, **k):
        save(folder, *a, **k)
        raise RuntimeError("simulated kill")  # after the first task's folder: out/ exists, half-written

    monkeypatch.setattr(joint_mod, "save_lora", killed)
    with pytest.raises(RuntimeError, match="simulated kill"):
        train_joint(specs, tmp_path / "run", cfg, progress=False)
    monkeypatch.setattr(joint_mod, "save_lora", save)
    assert (tmp_path / ".run.partial" / "out").is_dir() and not (tmp_path / "run").exists()
    out = train_joint(specs, tmp_path / "run", cfg, resume=True, progress=False)
    assert all((out / name / "adapter_model.safetensors").is_file() for name in ("a", "b"))


def test_a_joint_run_killed_while_removing_its_work_folder_leaves_a_finished_run(tmp_path, monkeypatch):
    """After train-multi's folders are in place its work folder is removed, as train's: a process killed during the
    removal could leave checkpoint/state.pt (what marks a checkpoint) beside a half-removed optimizer state, and the
    finished run would then be taken for an interrupted one. The checkpoints' state.pt go first (remove_work)."""
    import shutil
    from pathlib import Path

    from adapterhub_lite.core.errors import OutputExistsError

    monkeypatch.chdir(tmp_path)
    rows = [{"text": f"{w} {i}", "label": w} for i in range(8) for w in ("yes", "no")]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    specs = [_spec(n, data={"train": "t.jsonl", "dev": "t.jsonl"}) for n in ("a", "b")]
    cfg = JointConfig(max_steps=2, batch_size=4, warmup_steps=0, eval_every=2, eval_samples=4)
    work, rmtree = tmp_path / ".run.partial", shutil.rmtree

    def killed(path, *a, **k):
        if Path(path) == work:  # the process dies with part of the checkpoint removed, state.pt not yet
            next(p for p in (work / "checkpoint").iterdir() if p.name != "state.pt").unlink()
            raise RuntimeError("simulated kill")
        return rmtree(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(RuntimeError, match="simulated kill"):
        train_joint(specs, tmp_path / "run", cfg, progress=False)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    assert (tmp_path / "run" / "a" / "adapter_model.safetensors").is_file()
    with pytest.raises(OutputExistsError, match="already exists; pass --overwrite"):
        train_joint(specs, tmp_path / "run", cfg, progress=False)

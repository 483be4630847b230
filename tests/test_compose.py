"""Learned composition (LoraHub-style): weights over source LoRAs, fitted on a few shots."""

import json

import pytest
import torch
from peft import PeftModel

from adapterhub_lite.core.data import load_task_data
from adapterhub_lite.core.spec import spec_from_dict
from adapterhub_lite.model.adapter import read_lora, save_lora
from adapterhub_lite.model.backbone import load_backbone
from adapterhub_lite.model.evaluate import evaluate_split
from adapterhub_lite.training.recipes.compose import ComposeError, Composition, compose_fit

from .conftest import train_tiny


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("sources")
    return {name: train_tiny(d, name, method_args={"r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "v_proj"]},
                             train={"max_steps": 3, "lr": 5e-2, "seed": seed})
            for name, r, seed in (("one", 4, 0), ("two", 2, 1), ("three", 4, 2))}


def _logits(model, tok):
    ids = tok(["T: pos 3\nL:", "T: neg 1\nL:"], return_tensors="pt", padding=True).to(model.device)
    with torch.no_grad():
        return model(**ids).logits


def test_weights_one_zero_zero_equal_the_first_source(sources, tmp_path):
    backbone = load_backbone("tiny-random-llama", "none", dtype="fp32")
    comp = Composition(backbone.model, {n: read_lora(f) for n, f in sources.items()})
    comp.weights = torch.tensor([1.0, 0.0, 0.0])
    with comp.composed():
        got = _logits(backbone.model, backbone.tokenizer)
    save_lora(tmp_path / "composed", comp.export(), "tiny")
    want = _logits(PeftModel.from_pretrained(load_backbone("tiny-random-llama", "none", dtype="fp32").model, sources["one"]), backbone.tokenizer)
    saved = _logits(PeftModel.from_pretrained(load_backbone("tiny-random-llama", "none", dtype="fp32").model, tmp_path / "composed"), backbone.tokenizer)
    assert (got - want).abs().max() < 1e-5
    assert (saved - want).abs().max() < 1e-5
    assert (got - _logits(backbone.model, backbone.tokenizer)).abs().max() > 1e-4  # outside the context: the plain backbone


def test_weighted_composition_is_the_weighted_sum_of_updates(sources):
    backbone = load_backbone("tiny-random-llama", "none", dtype="fp32")
    factors = {n: read_lora(f) for n, f in sources.items()}
    comp = Composition(backbone.model, factors)
    comp.weights = torch.tensor([0.5, -1.0, 2.0])
    module = next(iter(factors["one"].modules))
    a, b = comp.factors(module, 3)
    fresh = [read_lora(f) for f in sources.values()]  # not the tensors handed to Composition (moved to the device there)
    want = sum(w * f.update(module) for w, f in zip([0.5, -1.0, 2.0], fresh))
    assert torch.allclose((b @ a).cpu(), want, atol=1e-6)


@pytest.mark.parametrize("search", ["cma", "gradient"])
def test_compose_fit_writes_an_adapter_with_its_weights_and_a_report(sources, tmp_path, search):
    rows = [{"text": f"{w} {i}", "label": w} for i in range(8) for w in ("pos", "neg")]
    (tmp_path / "new.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = spec_from_dict({"name": "new", "type": "classification", "data": {"train": str(tmp_path / "new.jsonl"), "dev": str(tmp_path / "new.jsonl")},
                           "prompt": "T: {text}\nL:", "label": "label", "labels": ["pos", "neg"], "base": "tiny-random-llama",
                           "quantization": "none", "train": {"max_length": 32, "batch_size": 4}})
    report = compose_fit(spec, sources, tmp_path / "out", shots=6, search=search, budget=8, lora_steps=2)
    assert set(report["weights"]) == {"one", "two", "three"}
    assert report["best_single"]["adapter"] in sources and {"base", "sources", "lora_on_shots", "composed"} <= set(report)
    meta = json.loads((tmp_path / "out" / "adapterhub.json").read_text())
    assert meta["composition"]["weights"] == report["weights"] and len((tmp_path / "out" / "shots.jsonl").read_text().splitlines()) == 6
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 + 2 + 4  # the sources' factors concatenated, weights folded into B
    # the saved update is the reported weighted sum of the sources' updates
    saved, fresh = read_lora(tmp_path / "out"), {n: read_lora(f) for n, f in sources.items()}
    for module in saved.modules:
        want = sum(w * fresh[n].update(module) for n, w in report["weights"].items())
        assert torch.allclose(saved.update(module), want, atol=1e-5), module
    # the reported score is what plain peft scores with the saved folder
    backbone = load_backbone("tiny-random-llama", "none", dtype="fp32")
    plain = PeftModel.from_pretrained(backbone.model, tmp_path / "out").eval()
    metrics, _, _ = evaluate_split(plain, backbone.tokenizer, spec, load_task_data(spec, ("dev",))["dev"])
    assert {k: report["composed"][k] for k in spec.metric} == {k: metrics[k] for k in spec.metric}
    assert meta["metrics"] == report["composed"]


def test_compose_refuses_bad_requests(sources, tmp_path):
    spec = spec_from_dict({"name": "new", "type": "classification", "data": {"train": "x.jsonl", "dev": "x.jsonl"},
                           "prompt": "T: {text}\nL:", "label": "label", "labels": ["pos", "neg"], "base": "tiny-random-llama", "quantization": "none"})
    with pytest.raises(ComposeError, match="search 'grid'"):
        compose_fit(spec, sources, tmp_path / "o", search="grid")
    with pytest.raises(ComposeError, match="at least two"):
        compose_fit(spec, {"one": sources["one"]}, tmp_path / "o")
    with pytest.raises(ComposeError, match="--l1 must be a penalty ≥ 0, got -1"):  # it rewarded large weights, exit 0
        compose_fit(spec, sources, tmp_path / "o", l1=-1)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("again, needle", [(False, "are both named 'one'"), (True, "is given twice; give each source once")])
def test_the_cli_refuses_a_source_given_twice_or_two_of_one_name(sources, tmp_path, capsys, again, needle):
    """compose-fit keyed its --from sources by name in a dict: a source given twice, or two folders of one name (two runs
    of a task), kept the last alone, so the weights were fitted over fewer sources than given, exit 0, unsaid."""
    import shutil

    from adapterhub_lite.cli.main import main

    other = tmp_path / "x" / "one"
    shutil.copytree(sources["two"], other)
    data = sources["one"].parent / "toy.jsonl"
    (tmp_path / "new.yaml").write_text(json.dumps({"name": "new", "type": "classification", "data": {"train": str(data), "dev": str(data)},
                                                   "prompt": "T: {text}\nL:", "label": "label", "labels": ["pos", "neg"],
                                                   "base": "tiny-random-llama", "quantization": "none"}))
    given = [str(sources["one"]), str(sources["three"]), str(sources["one"] if again else other)]
    code = main(["compose-fit", str(tmp_path / "new.yaml"), "--from", *given, "--output", str(tmp_path / "c"), "--no-baselines",
                 "--budget", "2", "--shots", "4"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.yaml", "x"]


def test_the_lora_on_shots_baseline_is_scored_on_the_reports_dev_rows(sources, tmp_path):
    """compose-fit --rows N scores every entry of the report on the first N dev rows; the LoRA-on-shots baseline
    was scored by its training's final eval on the whole dev split, so its number sat beside the others unlike."""
    rows = [{"text": f"{w} {i}", "label": w} for i in range(8) for w in ("pos", "neg")]
    (tmp_path / "new.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = spec_from_dict({"name": "new", "type": "classification", "data": {"train": str(tmp_path / "new.jsonl"), "dev": str(tmp_path / "new.jsonl")},
                           "prompt": "T: {text}\nL:", "label": "label", "labels": ["pos", "neg"], "base": "tiny-random-llama",
                           "quantization": "none", "train": {"max_length": 32, "batch_size": 4}})
    report = compose_fit(spec, sources, tmp_path / "out", shots=6, budget=2, lora_steps=1, eval_rows=5)
    assert report["dev_rows"] == 5
    assert report["lora_on_shots"]["dev_rows"] == 5


def test_the_lora_on_shots_baseline_trains_the_steps_it_is_given(tmp_path):
    """compose-fit's lora_steps is what the LoRA-on-shots baseline trains (its report says so): the train settings it
    sets were not marked as given, so train's defaults (resolve) replaced them (2 steps asked, 20 trained, eval every 10)."""
    from adapterhub_lite.training.recipes.compose import _lora_on_shots

    rows = [{"text": f"{w} {i}", "label": w} for i in range(8) for w in ("pos", "neg")]
    (tmp_path / "new.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = spec_from_dict({"name": "new", "type": "classification", "data": {"train": str(tmp_path / "new.jsonl"), "dev": str(tmp_path / "new.jsonl")},
                           "prompt": "T: {text}\nL:", "label": "label", "labels": ["pos", "neg"], "base": "tiny-random-llama",
                           "quantization": "none", "train": {"max_length": 32}})
    report = _lora_on_shots(spec, "".join(json.dumps(r) + "\n" for r in rows[:6]), tmp_path / "work", 2, None, None, 16)
    meta = json.loads((tmp_path / "work" / "lora_on_shots" / "adapterhub.json").read_text())
    assert meta["train_state"]["steps"] == report["steps"] == 2
    assert meta["task"]["train"]["eval_every"] == 2 and meta["task"]["train"]["warmup_steps"] == 0


def test_a_lora_on_shots_baseline_of_no_steps_is_refused_before_anything_loads(tmp_path):
    """--lora-steps 0 would train the baseline 0 steps and write a sidecar (max_steps 0) its own reader refuses, after
    the whole fit; it is refused first, naming --no-baselines."""
    spec = spec_from_dict({"name": "new", "type": "classification", "data": {"train": "x.jsonl", "dev": "x.jsonl"},
                           "prompt": "T: {text}\nL:", "label": "label", "labels": ["pos", "neg"], "base": "tiny-random-llama", "quantization": "none"})
    with pytest.raises(ComposeError, match="--lora-steps 1 or more"):
        compose_fit(spec, {"one": tmp_path / "one", "two": tmp_path / "two"}, tmp_path / "o", lora_steps=0)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("search", ["gradient", "cma"])
def test_each_search_returns_the_best_weights_it_evaluated_not_its_last(search):
    """The searches keep the weights of their lowest loss: here the loss grows with each call whatever w is, so the
    best is an early evaluation, not where the search ended (which the composed adapter would otherwise be)."""
    from adapterhub_lite.training.recipes import compose as compose_mod

    seen = []

    def objective(w):
        seen.append((w.detach().clone(), len(seen)))
        return ((w - 1) ** 2).sum() + 0.3 * (len(seen) - 1)

    w, trace = getattr(compose_mod, f"_{search}")(objective, 2, 12, seed=0)
    best = min(range(len(trace)), key=lambda i: trace[i]["loss"])
    assert best < len(trace) - 1
    assert torch.allclose(w, seen[best][0])


def test_the_report_names_the_best_source_and_the_search_pays_the_l1_penalty(sources, tmp_path, monkeypatch):
    """With the task loss held at 0, each loss the search sees is l1 · Σ|w| (> 0 off w = 0: the penalty is paid), and
    with each dev score scripted (composed, base, then the sources in order) best_single is the highest-scoring
    source, not another."""
    from adapterhub_lite.training.recipes import compose as compose_mod

    rows = [{"text": f"{w} {i}", "label": w} for i in range(8) for w in ("pos", "neg")]
    (tmp_path / "new.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = spec_from_dict({"name": "new", "type": "classification", "data": {"train": str(tmp_path / "new.jsonl"), "dev": str(tmp_path / "new.jsonl")},
                           "prompt": "T: {text}\nL:", "label": "label", "labels": ["pos", "neg"], "base": "tiny-random-llama",
                           "quantization": "none", "train": {"max_length": 32, "batch_size": 4}})
    scores = iter([0.5, 0.1, 0.6, 0.9, 0.3])  # composed, base, one, two, three
    monkeypatch.setattr(compose_mod, "evaluate_split",
                        lambda *a, **k: ({**{m: 0.0 for m in spec.metric}, spec.primary_metric: next(scores)}, None, 0.01))
    monkeypatch.setattr(compose_mod, "task_loss", lambda *a, **k: torch.zeros(()))
    searched, cma = [], compose_mod._cma
    monkeypatch.setattr(compose_mod, "_cma", lambda *a, **k: searched.append(out := cma(*a, **k)) or out)
    report = compose_fit(spec, sources, tmp_path / "out", shots=6, search="cma", budget=8, l1=0.5, lora_steps=1)
    assert report["best_single"]["adapter"] == "two"
    weights, trace = searched[0]
    assert trace and all(t["loss"] > 0 for t in trace) and weights.abs().sum() > 0


@pytest.mark.parametrize("damage, needle", [("cut short", "cannot be read as safetensors"), ("NaN", "non-finite values")])
def test_a_damaged_source_is_refused_in_one_line(sources, tmp_path, damage, needle):
    """compose-fit read its sources' weights without the checks every other way in applies (check_adapter_folder): a
    truncated adapter_model.safetensors was safetensors' traceback, and a source holding NaN was composed."""
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(sources["one"], bad)
    weights = bad / "adapter_model.safetensors"
    if damage == "cut short":
        weights.write_bytes(weights.read_bytes()[:-100])
    else:
        state = load_file(weights)
        first = sorted(state)[0]
        state[first] = torch.full_like(state[first], float("nan"))
        save_file(state, weights, metadata={"format": "pt"})
    data = sources["one"].parent / "toy.jsonl"
    spec = spec_from_dict({"name": "new", "type": "classification", "data": {"train": str(data), "dev": str(data)},
                           "prompt": "T: {text}\nL:", "label": "label", "labels": ["pos", "neg"], "base": "tiny-random-llama",
                           "quantization": "none"})
    with pytest.raises(ComposeError, match=needle) as caught:
        compose_fit(spec, {"bad": bad, "two": sources["two"]}, tmp_path / "o", shots=4, budget=2, baselines=False)
    assert "\n" not in str(caught.value) and str(weights) in str(caught.value)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("n, budget", [(4, 40), (3, 40), (2, 1)])
def test_cma_spends_its_budget_and_no_more(n, budget):
    """--budget is the loss evaluations the search makes: cma's maxfevals let the last generation run whole, so 4 sources
    (generations of 8) at the default budget 40 made 48 evaluations, and a budget of 1 made 6. Each evaluation is one step of
    the trace (metrics.jsonl): a generation's were all numbered as its first."""
    from adapterhub_lite.training.recipes import compose as compose_mod

    calls = []
    _, trace = compose_mod._cma(lambda w: calls.append(w) or ((w - 0.3) ** 2).sum(), n, budget, seed=0)
    assert len(calls) == len(trace) == budget
    assert [t["step"] for t in trace] == list(range(1, budget + 1))


def _new_task(tmp_path):
    rows = [{"text": f"{w} {i}", "label": w} for i in range(8) for w in ("pos", "neg")]
    (tmp_path / "new.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return spec_from_dict({"name": "new", "type": "classification", "data": {"train": str(tmp_path / "new.jsonl"), "dev": str(tmp_path / "new.jsonl")},
                           "prompt": "T: {text}\nL:", "label": "label", "labels": ["pos", "neg"], "base": "tiny-random-llama",
                           "quantization": "none", "train": {"max_length": 32, "batch_size": 4}})


def test_the_sidecar_names_the_step_whose_weights_were_kept(sources, tmp_path, monkeypatch):
    """train_state.best_step said the search's last evaluation whatever it was; the weights kept are the lowest loss's."""
    from adapterhub_lite.training.recipes import compose as compose_mod

    trace = [{"step": 1, "loss": 0.9}, {"step": 2, "loss": 0.2}, {"step": 3, "loss": 0.5}]
    monkeypatch.setattr(compose_mod, "_cma", lambda *a, **k: (torch.tensor([0.1, 0.2, 0.3]), trace))
    compose_fit(_new_task(tmp_path), sources, tmp_path / "out", shots=4, budget=3, baselines=False)
    meta = json.loads((tmp_path / "out" / "adapterhub.json").read_text())
    assert meta["train_state"]["steps"] == 3 and meta["train_state"]["best_step"] == 2


@pytest.mark.parametrize("search", ["cma", "gradient"])
def test_a_search_that_saw_no_finite_loss_is_refused_not_saved_as_the_base_model(sources, tmp_path, monkeypatch, search):
    """With every few-shot loss NaN (an fp16 overflow, say) both searches kept w = 0 and compose-fit saved the base model
    as the composed adapter, exit 0; it is refused in one line and nothing is written."""
    from adapterhub_lite.training.recipes import compose as compose_mod

    monkeypatch.setattr(compose_mod, "task_loss", lambda *a, **k: torch.tensor(float("nan")))
    with pytest.raises(ComposeError, match=r"^every one of the 3 few-shot losses the search evaluated was nan, so no weights were fitted") as caught:
        compose_fit(_new_task(tmp_path), sources, tmp_path / "out", shots=4, search=search, budget=3, baselines=False)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_shots_missing_a_class_or_repeating_a_row_are_said(sources, tmp_path, capsys):
    """compose-fit fitted on whatever shots it drew, unsaid: one shot of a two-class task (the weights then fitted to
    one label), or eight shots that were two rows repeated; nor did it say what train says of its data."""
    spec = _new_task(tmp_path)
    compose_fit(spec, sources, tmp_path / "one", shots=1, budget=1, baselines=False)
    err = capsys.readouterr().err
    assert "warning: the 1 shots hold no row of class(es) 'neg' (1 of 2), so the weights are fitted without them" in err \
        or "warning: the 1 shots hold no row of class(es) 'pos' (1 of 2), so the weights are fitted without them" in err, err
    assert "have the same prompt as a row of" in err  # train's own warning: these dev rows are the training file's
    rows = [{"text": "pos 1", "label": "pos"}, {"text": "neg 1", "label": "neg"}] * 4
    (tmp_path / "dup.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec.data.train = str(tmp_path / "dup.jsonl")
    compose_fit(spec, sources, tmp_path / "dup", shots=8, budget=1, baselines=False)
    err = capsys.readouterr().err
    assert "warning: 6 of the 8 shots repeat an earlier shot's prompt (shots.jsonl line " in err and "fitted on 2 distinct inputs" in err, err
    lines = (tmp_path / "dup" / "shots.jsonl").read_text().splitlines()  # the lines it names are the file's repeats, 1-based
    again = [i + 1 for i, line in enumerate(lines) if line in lines[:i]]
    assert f"(shots.jsonl line {', '.join(map(str, again[:5]))}, …)" in err, (again, err)
    compose_fit(_new_task(tmp_path), sources, tmp_path / "fine", shots=8, budget=1, baselines=False)
    err = capsys.readouterr().err
    assert "shots hold no row" not in err and "shots repeat" not in err, err


def test_the_sidecar_says_how_many_dev_rows_its_metrics_were_measured_on(sources, tmp_path):
    """With --rows 5 the composed score (the sidecar's metrics) is the first 5 dev rows', but the sidecar and its card
    named the whole 16-row dev file alone, so `eval` on the folder (all 16) disagreed with it unexplained. It records
    metrics_rows, as merge does, and the card says those rows; eval over them gives the recorded metrics."""
    spec = _new_task(tmp_path)
    report = compose_fit(spec, sources, tmp_path / "out", shots=6, budget=2, baselines=False, eval_rows=5)
    meta = json.loads((tmp_path / "out" / "adapterhub.json").read_text())
    assert meta["metrics_rows"] == report["dev_rows"] == 5 and meta["data"]["dev"]["rows"] == 16
    assert "## Results (dev, 5 rows)" in (tmp_path / "out" / "README.md").read_text()
    backbone = load_backbone("tiny-random-llama", "none", dtype="fp32")
    plain = PeftModel.from_pretrained(backbone.model, tmp_path / "out").eval()
    metrics, _, _ = evaluate_split(plain, backbone.tokenizer, spec, load_task_data(spec, ("dev",))["dev"], limit=meta["metrics_rows"])
    assert {k: metrics[k] for k in meta["metrics"]} == meta["metrics"]


def test_the_sidecar_records_each_source_by_its_weights_and_registry_version(sources, tmp_path):
    """The sidecar's composition.sources held each source's path alone, which may hold other weights later (a retrain
    into the same folder): it records, as merge does, the sha256 of the weights composed and the registry's name@version."""
    import hashlib

    from adapterhub_lite.artifacts.registries import open_registry

    reg = tmp_path / "registry"
    reg.mkdir()
    (reg / "index.json").write_text(json.dumps({"format": "adapterhub_lite.registry/1", "adapters": {}}))
    open_registry(reg).publish(sources["two"], "1.2.0", name="two")
    given = {"one": sources["one"], "two": reg / "two" / "1.2.0"}
    compose_fit(_new_task(tmp_path), given, tmp_path / "out", shots=4, budget=1, baselines=False)
    recorded = json.loads((tmp_path / "out" / "adapterhub.json").read_text())["composition"]["sources"]
    assert recorded == {n: {"folder": str(f), "registry_ref": {"one": None, "two": "two@1.2.0"}[n],
                            "adapter_sha256": hashlib.sha256((f / "adapter_model.safetensors").read_bytes()).hexdigest()}
                        for n, f in given.items()}

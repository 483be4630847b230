"""`predict` reads a long prompt whole, as `serve`, `infer` and `Router.run` do (README: no prompt is ever cut)."""

import json
import re

import pytest
from transformers import LlamaForCausalLM

from adapterhub_lite.artifacts.loading import load_adapter
from adapterhub_lite.cli import main
from adapterhub_lite.core.data import render
from adapterhub_lite.core.errors import ContextLengthError
from adapterhub_lite.model.backbone import load_backbone
from adapterhub_lite.serving.router import Router

from .conftest import train_tiny


@pytest.mark.parametrize("named", [True, False])
def test_predict_reads_a_long_prompt_whole(tmp_path, capsys, monkeypatch, named):
    folder = train_tiny(tmp_path)
    if not named:  # a backbone whose config names no context length read train.max_length's window, silently
        monkeypatch.setattr("adapterhub_lite.model.backbone.model_context", lambda backbone: None)
    _, backbone, spec, _ = load_adapter(folder)
    text = "pos neg " * 40  # far past train.max_length (32); keeping its end within that answered unlike `serve`
    n = len(backbone.tokenizer(render(spec, {"text": text})).input_ids)
    assert n > 2 * spec.train.max_length
    read = []  # the sequence lengths the backbone is run on: every prompt token must be read
    forward = LlamaForCausalLM.forward
    monkeypatch.setattr(LlamaForCausalLM, "forward", lambda self, input_ids=None, **kw: read.append(input_ids.shape[1]) or forward(self, input_ids, **kw))
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": text}) + "\n")
    assert main(["predict", str(folder), "--input", str(tmp_path / "in.jsonl"), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["prediction"] in ("pos", "neg")
    assert max(read) >= n


def test_predict_refuses_a_prompt_over_the_context(tmp_path, capsys):
    folder = train_tiny(tmp_path)
    context = load_adapter(folder)[0].config.max_position_embeddings
    capsys.readouterr()  # training's log
    (tmp_path / "in.jsonl").write_text('{"text": "pos"}\n\n' + json.dumps({"text": "pos " * context}) + "\n")  # row 2, line 3
    code = main(["predict", str(folder), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"), "--no-progress"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1
    assert "in.jsonl:3: input row 2: the request needs" in errors[0]  # the file and its line: it named neither
    assert f"but this model's maximum context length is {context} tokens" in errors[0] and not (tmp_path / "out.jsonl").exists()


def test_predict_counts_a_prompt_adapters_virtual_tokens(tmp_path, capsys):
    # prompt tuning puts 4 positions before the prompt: a prompt that fits the context only without them ran positions
    # past it in predict, where serve, infer and Router.run refuse it ("4 virtual tokens of adapter …")
    folder = train_tiny(tmp_path, method="prompt", method_args={"num_virtual_tokens": 4})
    model, backbone, spec, _ = load_adapter(folder)
    context, tok = model.config.max_position_embeddings, backbone.tokenizer
    label = max(len(tok(" " + w, add_special_tokens=False).input_ids) for w in spec.labels)
    empty = len(tok(render(spec, {"text": ""})).input_ids)
    text = "p" * (context - label - 2 - empty)  # fits with its label, not with the virtual tokens too
    n = len(tok(render(spec, {"text": text})).input_ids)
    assert n + label - 1 <= context < n + 4 + label - 1
    capsys.readouterr()  # training's log
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": text}) + "\n")
    code = main(["predict", str(folder), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"), "--no-progress"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and not (tmp_path / "out.jsonl").exists()
    said = f"the request needs {n + 4 + label - 1} tokens ({n} in the prompt, 4 virtual tokens of adapter 'toy', {label - 1} for the longest " \
           "label's tokens but its last) " \
           f"but this model's maximum context length is {context} tokens"
    assert said in errors[0]
    # the same problem in the same words as Router.run (and so infer and serve) refuses it: predict said "the model's
    # context is …" and "for the answer", its own wording of the one check
    router = Router(load_backbone("tiny-random-llama", "none", dtype="fp32"))
    router.register("toy", folder)
    with pytest.raises(ContextLengthError, match=re.escape(said)):
        router.run([{"adapter": "toy", "text": text}])


def test_predict_refuses_rows_that_set_generation_settings_it_does_not_apply(tmp_path, capsys):
    """A row's max_new_tokens or temperature was echoed beside an answer that never applied it (infer honours the first
    and refuses the rest; predict answers within the task's budget): refused naming the line, nothing written. A column
    the prompt reads is data, whatever its name."""
    folder = train_tiny(tmp_path)
    capsys.readouterr()  # training's log
    (tmp_path / "in.jsonl").write_text('{"text": "pos 1"}\n\n' + json.dumps({"text": "neg 2", "max_new_tokens": 4, "temperature": 0.7}) + "\n")
    out = tmp_path / "out.jsonl"
    code = main(["predict", str(folder), "--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and not out.exists(), err
    assert re.search(r"in\.jsonl: row\(s\) on line\(s\) \[3\] set \['max_new_tokens', 'temperature'\], which predict does not read", err[0]), err
    rows = tmp_path / "seeded.jsonl"
    rows.write_text("".join(json.dumps({"text": f"{w} {i}", "seed": str(i), "label": w}) + "\n" for i in range(8) for w in ("pos", "neg")))
    seeded = train_tiny(tmp_path, "seeded", prompt="T: {text} ({seed})\nL:", data={"train": str(rows), "dev": str(rows)})  # reads a column `seed`
    capsys.readouterr()
    (tmp_path / "seed.jsonl").write_text(json.dumps({"text": "pos 1", "seed": "7"}) + "\n")
    assert main(["predict", str(seeded), "--input", str(tmp_path / "seed.jsonl"), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["prediction"] in ("pos", "neg")


def test_predict_reads_whole_a_prompt_that_fits_but_for_its_longest_labels_last_token(tmp_path, monkeypatch):
    """Scoring runs the prompt and each label but its last token: a prompt of context - longest label + 1 tokens fits.
    predict refused it (the whole label was asked for); read with the label plan's max_length at the context, it would
    lose its first token instead. It is read whole, and its longest label's sequence is the context exactly."""
    from adapterhub_lite.model import evaluate

    folder = train_tiny(tmp_path)
    model, backbone, spec, _ = load_adapter(folder)
    context = model.config.max_position_embeddings
    longest = max(map(len, evaluate.label_token_ids(backbone.tokenizer, spec)))
    assert longest > 1
    ids = [5 + i % 50 for i in range(context - longest + 1)]
    plans, plan_ids = [], evaluate.label_plan_ids
    monkeypatch.setattr(evaluate, "label_plan_ids", lambda *a: plans.append(plan_ids(*a)) or plans[-1])
    evaluate.predict(model, backbone.tokenizer, spec, [""], prompt_ids=[ids], context=context)
    assert all(seq[: len(ids)] == ids for seq in plans[0].seqs) and max(map(len, plans[0].seqs)) == context
    with pytest.raises(ContextLengthError, match=f"needs {context + 1} tokens"):
        evaluate.predict(model, backbone.tokenizer, spec, [""], prompt_ids=[ids + [5]], context=context)

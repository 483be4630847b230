"""`auto` says how it chose: each routed result carries the adapter, the classifier's probability, the runner-up and why
it fell back to base (Router.run, infer's file, the server's body and header, streamed too); `serve --route-threshold`."""

import json

import pytest
import torch

from adapterhub_lite.cli.main import build_parser, main
from adapterhub_lite.model.backbone import load_backbone
from adapterhub_lite.serving.params import ROUTING_HEADER
from adapterhub_lite.serving.router import Router
from adapterhub_lite.serving.routing import ContentRouter, Routing

from .test_routing_hostile import folders  # noqa: F401 - the module fixture: cls_a ("pos 3") and gen ("cd")
from .test_routing_novelty import FAR, clusters


def test_decide_says_the_candidate_its_probability_the_runner_up_and_why_base_answered():
    router = ContentRouter(clusters())
    near_a = torch.tensor([[4.0, 0, 0, 0, 0, 0, 0, 0]])
    sure = router.decide(near_a)[0]
    assert (sure.adapter, sure.candidate, sure.runner_up, sure.fallback) == ("a", "a", "b", None)
    assert sure.confidence > 0.5 and sure.confidence + sure.runner_up_confidence == pytest.approx(1, abs=1e-3)
    assert router.route(near_a) == [(sure.adapter, sure.confidence)]  # route() is decide()'s adapter and confidence
    unsure = ContentRouter(clusters(), threshold=1.0).decide(torch.tensor([[4.0, 0.5, 0, 0, 0, 0, 0, 0]]))[0]
    assert (unsure.adapter, unsure.candidate, unsure.fallback) == ("base", "a", "threshold")
    far = router.decide(FAR)
    assert [(f.adapter, f.fallback) for f in far] == [("base", "novelty")] * 2 and all(f.candidate in ("a", "b") for f in far)
    assert router.decide(torch.tensor([[float("nan")] * 8]))[0] == Routing("base", 0.0, None, fallback="no_text")
    alone = ContentRouter({"only": clusters()["a"]}).decide(near_a)[0]
    assert (alone.adapter, alone.confidence, alone.runner_up, alone.runner_up_confidence) == ("only", 1.0, None, None)
    assert sure.header() == f"a;confidence={sure.confidence};candidate=a;runner_up=b;runner_up_confidence={sure.runner_up_confidence}"


@pytest.fixture(scope="module")
def routers(folders):  # noqa: F811 - the imported fixture
    """A router that picks by content, and one whose threshold no probability reaches (every `auto` row to base)."""
    out = {}
    for threshold in (0.5, 1.0):
        r = out[threshold] = Router(load_backbone("tiny-random-llama", "none", dtype="fp32"), route_threshold=threshold)
        for name, folder in folders.items():
            r.register(name, folder)
    return out


def test_run_returns_how_each_auto_row_was_routed_and_nothing_for_named_rows(routers):
    rows = [{"adapter": "auto", "text": "pos 3"}, {"adapter": "cls_a", "text": "neg 2"}, {"adapter": "auto", "text": "cd"}]
    out = routers[0.5].run(rows)
    assert "routing" not in out[1]
    for o, want in zip((out[0], out[2]), ("cls_a", "gen")):
        how = o["routing"]
        assert o["adapter"] == how["adapter"] == how["candidate"] == want and how["fallback"] is None, o
        assert 0.5 <= how["confidence"] <= 1 and how["runner_up"] == ({"cls_a", "gen"} - {want}).pop(), o
    base = routers[1.0].run(rows)  # below the threshold: base answers, and says which adapter it would have been and why not
    assert [b["adapter"] for b in base] == ["base", "cls_a", "base"]
    assert (base[0]["routing"]["candidate"], base[0]["routing"]["fallback"]) == ("cls_a", "threshold")
    assert base[0]["routing"]["confidence"] == out[0]["routing"]["confidence"]  # the same classifier: only the threshold differs


def test_infer_writes_the_routing_of_each_auto_row_into_its_answer(folders, tmp_path):  # noqa: F811
    from adapterhub_lite.artifacts.registry import LocalRegistry

    reg = LocalRegistry(tmp_path / "reg")
    for name, folder in folders.items():
        reg.publish(folder, "1.0.0", name=name)
    (tmp_path / "in.jsonl").write_text('{"adapter": "auto", "text": "pos 3", "id": 1}\n{"adapter": "gen", "text": "cd", "id": 2}\n')
    assert main(["infer", "--registry", str(reg.root), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "out.jsonl"),
                 "--no-progress"]) == 0
    first, second = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert first["adapter"] == "cls_a" and first["routing"]["adapter"] == "cls_a" and first["routing"]["confidence"] >= 0.5, first
    assert set(first["routing"]) == {"adapter", "confidence", "candidate", "runner_up", "runner_up_confidence", "fallback"}
    assert "routing" not in second
    # infer takes serve's --route-threshold (it always routed at 0.5): at 1.0 no probability reaches it, base answers
    assert main(["infer", "--registry", str(reg.root), "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "hi.jsonl"),
                 "--no-progress", "--route-threshold", "1.0"]) == 0
    high = json.loads((tmp_path / "hi.jsonl").read_text().splitlines()[0])
    assert (high["adapter"], high["routing"]["candidate"], high["routing"]["fallback"]) == ("base", "cls_a", "threshold"), high
    assert high["routing"]["confidence"] == first["routing"]["confidence"]


def test_infer_refuses_a_route_threshold_as_serve_does(capsys):
    for bad, why in (("1.5", "the threshold is 1.5; give a probability from 0 to 1"), ("-0.1", "the threshold is -0.1")):
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args(["infer", "--input", "x.jsonl", "--route-threshold", bad])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert exit_.value.code == 2 and f"argument --route-threshold: {why}" in err, err
    assert build_parser().parse_args(["infer", "--input", "x.jsonl"]).route_threshold == 0.5


def test_the_server_says_how_auto_chose_in_each_choice_and_a_header_streamed_or_not(served):
    c = served.client
    raw = c.completions.with_raw_response.create(model="auto", prompt=["pos 3", "cd"], max_tokens=3, temperature=0)
    items, body = raw.headers[ROUTING_HEADER].split(","), raw.parse()
    assert len(items) == len(body.choices) == 2
    for item, choice in zip(items, body.choices):
        how = choice.model_extra["routing"]  # an extra field, as `adapter`: the openai client keeps it
        assert choice.adapter == how["adapter"] and item.startswith(how["adapter"] + ";confidence=" + str(how["confidence"])), (item, how)
        assert 0 <= how["confidence"] <= 1 and how["candidate"] in served.router.folders
    chat = c.chat.completions.create(model="auto", messages=[{"role": "user", "content": "pos 3"}], max_tokens=3, temperature=0)
    assert chat.choices[0].routing == body.choices[0].routing  # the same text: routed alike
    named = c.completions.with_raw_response.create(model="cls_a", prompt="pos 3", max_tokens=1)
    assert ROUTING_HEADER not in named.headers and "routing" not in named.parse().choices[0].model_extra
    last = [ch for ch in c.completions.create(model="gen_a@1.0.0", prompt="ab", max_tokens=2, stream=True) if ch.choices][-1]
    assert last.choices[0].model_extra["adapter"] == "gen_a@1.0.0"  # a named adapter's stream says it too, as its whole answer
    for stream in (c.completions.with_raw_response.create(model="auto", prompt="pos 3", max_tokens=3, stream=True),
                   c.chat.completions.with_raw_response.create(model="auto", messages=[{"role": "user", "content": "pos 3"}], max_tokens=3,
                                                               stream=True)):
        assert stream.headers[ROUTING_HEADER] == items[0]  # sent before the first chunk
        chunks = list(stream.parse())
        last = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason is not None][0]
        assert last.choices[0].model_extra["routing"] == body.choices[0].routing
        assert last.choices[0].model_extra["adapter"] == body.choices[0].adapter  # each choice carries it, streamed or whole
        assert all("routing" not in ch.choices[0].model_extra for ch in chunks if ch is not last and ch.choices)


def test_serve_takes_route_threshold_checks_it_as_the_router_does_and_shows_it_in_health(serve_registry, capsys):
    from starlette.testclient import TestClient

    from adapterhub_lite.serving.api import build_app

    for bad, why in (("1.5", "the threshold is 1.5; give a probability from 0 to 1"), ("nan", "'nan' is not a finite number")):
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args(["serve", "--route-threshold", bad])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and f"argument --route-threshold: {why}" in err, err
    args = build_parser().parse_args(["serve", "--registry", str(serve_registry), "--quantization", "none", "--dtype", "fp32",
                                      "--route-threshold", "0.9"])
    app, engine, _ = build_app(args)
    assert engine.router.route_threshold == 0.9
    with TestClient(app) as client:
        assert client.get("/health").json()["route_threshold"] == 0.9
    assert build_parser().parse_args(["serve"]).route_threshold == 0.5  # the Router's default
